"""Process lifecycle: SIGTERM/SIGINT set a stop event; a second one cancels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

log = logging.getLogger(__name__)


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
