"""Where plugin tools run, so that SVC_TOOL_TIMEOUT can really stop them (ADR 0014).

- `async def` tools run on the event loop: a timeout cancels them at their next await.
- `def` tools declared `run="thread"` (blocking I/O) run in a daemon thread the loop does
  not wait on: at the timeout the turn moves on; the thread ends when its I/O times out.
- `def` tools (the default for `def`) and tools declared `run="process"` (CPU-bound) run
  in a warm worker process (a fresh interpreter): at the timeout the worker is killed
  (SIGKILL) and replaced, so not even a C-level computation that holds the GIL can
  freeze the core. The pool lives as long as the role (`async with ToolRunner()`); its
  workers die with it, and with the core process even on kill -9 (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import logging
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from services.plugins.base import ToolError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


# How a worker starts: a fresh interpreter (not a fork of the core, and not a re-import of
# the core's __main__), told the core's sys.path so it imports tools the same way.
_BOOT = "import sys; from services.plugins.runner import _serve; _serve(int(sys.argv[1]))"


def _serve(fd: int) -> None:  # pragma: no cover - runs in the worker process
    """The worker process: run one pickled `(fn, args)` at a time, send back the result."""
    # Ctrl-C and a SIGTERM to the process group are for the core to handle: it finishes
    # its turns, then closes the pool; a core that dies takes its workers along anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # Linux: die with the core, even on kill -9
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    conn = Connection(fd)
    try:
        sys.path[:] = conn.recv()
    except (EOFError, OSError):
        return
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the core closed the socket: shut down
        reply: tuple[str, Any]
        try:
            fn, args = pickle.loads(payload)  # noqa: S301 - written by our own parent
            result = fn(*args)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
            reply = ("ok", result)
        except ToolError as exc:
            reply = ("tool", str(exc))
        except BaseException as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(("error", f"its result cannot be sent back: {exc}"))
        except (EOFError, OSError):
            return


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _mark(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _CrashedError(Exception):
    """The worker process died while running a job."""


class _Worker:
    """One warm worker process and the socket to it."""

    def __init__(self, process: subprocess.Popen[bytes], conn: Connection) -> None:
        self.process = process
        self.conn = conn

    @classmethod
    def start(cls) -> _Worker:
        """Start a worker: a fork+exec of a few ms; its imports run on its own time."""
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=2,  # a tool's print() must not reach the core's stdout
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        conn.send(list(sys.path))
        return cls(process, conn)

    async def call(self, payload: bytes) -> tuple[str, Any]:
        """Send one job and wait (without blocking the loop) for its (status, value);
        _CrashedError if the process died."""
        loop = asyncio.get_running_loop()
        try:
            self.conn.send_bytes(payload)
        except OSError:
            raise _CrashedError from None
        readable = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, _mark, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            reply: tuple[str, Any] = self.conn.recv()
        except (EOFError, OSError):
            raise _CrashedError from None
        return reply

    def kill(self) -> None:
        """SIGKILL the worker and close the socket (reaping happens off the loop)."""
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(OSError):
            self.conn.close()

    def reap(self) -> None:
        """Wait for a killed worker to exit (blocking)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


class ToolRunner:
    """A small pool of warm worker processes for tools, plus daemon threads."""

    def __init__(self, *, processes: int = 2, warm: int = 1) -> None:
        self.size = max(1, processes)
        self.warm = min(warm, self.size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._starting = 0
        self._changed = asyncio.Condition()
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()
        self.started = 0  # worker processes started so far (replacements included)

    async def __aenter__(self) -> ToolRunner:
        # Start-up (an interpreter and its imports) is paid here, not in a turn.
        for _ in range(self.warm):
            try:
                self._idle.append(self._start())
            except OSError as exc:  # the core still serves; a tool call will try again
                log.warning("cannot start a tool worker process", extra={"error": repr(exc)})
                break
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def pids(self) -> list[int]:
        """The worker processes alive in the pool (for tests and `svc status`)."""
        return [w.process.pid for w in [*self._idle, *self._busy]]

    async def in_process(self, fn: Callable[..., Any], *args: Any, what: str = "tool") -> Any:
        """Run `fn(*args)` in a worker; a cancellation (the tool timeout) kills the worker."""
        try:
            payload = pickle.dumps((fn, args))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ToolError(
                f"{what} cannot run in a worker process ({exc}): define it at module level "
                "with picklable parameters, or declare run='thread'"
            ) from None
        worker = await self._acquire()
        finished = False
        try:
            status, value = await worker.call(payload)
            finished = True
        except _CrashedError:
            raise ToolError(f"{what} crashed its worker process") from None
        finally:
            if finished:
                await self._release(worker)
            else:  # timed out, cancelled or crashed: it may be spinning; kill and replace
                self._busy.discard(worker)
                worker.kill()
                self._spawn(self._reap(worker))
                if not self._closed and len(self._idle) + len(self._busy) < self.warm:
                    with contextlib.suppress(OSError):  # else the next call starts one
                        self._idle.append(self._start())
                self._spawn(self._notify())
        if status == "ok":
            return value
        if status == "tool":
            raise ToolError(value)
        raise ToolError(f"{what} failed: {value}")

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in a daemon thread (for blocking I/O); at a cancellation the
        turn moves on and the thread is left to finish on its own."""
        return await in_thread(fn, *args)

    async def _acquire(self) -> _Worker:
        async with self._changed:
            while True:
                if self._closed:
                    raise ToolError("the core is shutting down")
                if self._idle:
                    worker = self._idle.pop()
                    self._busy.add(worker)
                    return worker
                if len(self._busy) + self._starting < self.size:
                    self._starting += 1
                    break
                await self._changed.wait()
        try:
            worker = self._start()
        finally:
            self._starting -= 1
        self._busy.add(worker)
        return worker

    def _start(self) -> _Worker:
        worker = _Worker.start()
        self.started += 1
        return worker

    async def _release(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        if self._closed:
            worker.kill()
            self._spawn(self._reap(worker))
            return
        self._idle.append(worker)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _reap(self, worker: _Worker) -> None:
        await asyncio.to_thread(worker.reap)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Kill every worker and wait until they are gone."""
        self._closed = True
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for worker in workers:
            worker.kill()
        await asyncio.gather(*(self._reap(w) for w in workers), return_exceptions=True)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self._notify()


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a daemon thread (not the loop's default executor, which shutdown
    waits on): a thread stuck past its timeout cannot hold up the process's exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def fail(exc: BaseException) -> None:
        if not done.done():
            done.set_exception(exc)

    def succeed(result: Any) -> None:
        if not done.done():
            done.set_result(result)

    def work() -> None:
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
        except BaseException as exc:
            outcome: Callable[[Any], None] = fail
            value: Any = exc
        else:
            outcome, value = succeed, result
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(outcome, value)

    threading.Thread(target=work, daemon=True, name="svc-tool-thread").start()
    return await done
