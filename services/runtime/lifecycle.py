"""Process lifecycle: the event loop every `svc` process runs on (uvloop unless
SVC_UVLOOP=off, ADR 0036); SIGTERM/SIGINT set a stop event, a second one cancels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping

from services.runtime.errors import ConfigError

log = logging.getLogger(__name__)

_UVLOOP_CHOICES = ("on", "off")


def loop_factory(env: Mapping[str, str] | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop `svc` runs on: uvloop's when `SVC_UVLOOP` is `on` (the default) and
    uvloop is importable, asyncio's own otherwise. A bad value is a ConfigError (one line)."""
    env = os.environ if env is None else env
    value = (env.get("SVC_UVLOOP") or "on").strip().lower() or "on"
    if value not in _UVLOOP_CHOICES:
        raise ConfigError(
            f"SVC_UVLOOP={value!r} is invalid: expected one of {', '.join(_UVLOOP_CHOICES)}"
            " (off runs the standard asyncio loop)"
        )
    if value == "on":
        try:
            import uvloop
        except ImportError:  # not installed on this platform: asyncio's loop is fine
            pass
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """`uvloop` or `asyncio`: which event loop runs this process (logged at start)."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def install_stop_signals(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: graceful drain (set `stop`). Second: cancel the main task."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second signal, cancelling", extra={"signal": sig.name})
            if main is not None:
                main.cancel()
            return
        log.info("stopping", extra={"signal": sig.name})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)
