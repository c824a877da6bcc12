"""`svc replay projection NAME`: rebuild a projection from its stream -- to the end, to a
sequence or to a time -- into a new file, or atomically into the live one.

The log is read by an ephemeral consumer (nothing is written to any stream). The rebuild
always goes to a fresh file first; only a finished file is published:

- to a path that does not exist: a hard link (atomic, and never over a file someone
  created meanwhile), then the temp name is removed;
- to an existing projection file (the live one, or `--out` with `--force`): ONE SQLite
  transaction on that file replaces every view table and the checkpoint from the
  attached fresh file. Readers in WAL mode see the old rows or the new ones, never a mix,
  and nobody's open connection is pulled from under them (no rename over a WAL file).

A running core keeps tailing the live file from its own position, so moving the live file
back in time would make it skip events: that is refused (build into `--out` instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TextIO

import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts.streams import PLUGINS
from projections import plugins as plugin_view
from projections.replay import Progress, duration
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError, ServiceError
from services.runtime.settings import Settings

REBUILD_BATCH = 5000  # events per transaction in a fresh file
_SWAP_ATTEMPTS = 5


class ReplayInputError(ConfigError):
    """A replay request that cannot be served as asked (exit 2)."""


class ReplayError(ServiceError):
    """A replay that failed on the way (exit 1); nothing was published."""


class Rebuilder(Protocol):
    """A projection that can be caught up into a file (PluginProjection is one)."""

    position: int
    skipped: int

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def catch_up(self, *, upto: int | None = None) -> int: ...


@dataclass(frozen=True)
class Rebuildable:
    """A projection `svc replay projection` knows: its stream, tables, live file."""

    stream: str
    tables: tuple[str, ...]
    schema: tuple[str, ...]
    checkpoint: str  # the checkpoint row's name
    live_path: Callable[[Settings], Path]
    open: Callable[[Bus, Path], Rebuilder]


def _plugins_live(settings: Settings) -> Path:
    from services.app import plugin_db

    return plugin_db(settings)


def _plugins_open(bus: Bus, path: Path) -> Rebuilder:
    from services.plugins.projection import PluginProjection
    from services.plugins.registry import discover, manifests

    return PluginProjection(bus, path, manifests(discover()), fresh=True, batch=REBUILD_BATCH)


PROJECTIONS: dict[str, Rebuildable] = {
    "plugins": Rebuildable(
        stream=PLUGINS.name,
        tables=plugin_view.TABLES,
        schema=plugin_view.SCHEMA,
        checkpoint="plugins",
        live_path=_plugins_live,
        open=_plugins_open,
    ),
}


def lookup(name: str) -> Rebuildable:
    """The projection called `name`; ReplayInputError listing the known ones."""
    try:
        return PROJECTIONS[name]
    except KeyError:
        raise ReplayInputError(
            f"unknown projection {name!r}: known are {', '.join(sorted(PROJECTIONS))}"
        ) from None


@dataclass(frozen=True)
class Request:
    """What to rebuild, to where, as of when (at most one of `to_seq` and `at`)."""

    name: str
    to_seq: int | None = None
    at: datetime | None = None
    out: Path | None = None
    force: bool = False

    def check(self) -> Rebuildable:
        """Validate what can be checked without a server."""
        spec = lookup(self.name)
        if self.to_seq is not None and self.at is not None:
            raise ReplayInputError("give --to-seq or --at, not both")
        if self.to_seq is not None and self.to_seq < 0:
            raise ReplayInputError(f"--to-seq must be >= 0, not {self.to_seq}")
        if self.out is not None and self.out.exists() and not self.force:
            raise ReplayInputError(f"--out {self.out} exists: choose a new file, or --force")
        return spec


@dataclass(frozen=True)
class Summary:
    """The outcome, as printed (or as JSON)."""

    projection: str
    stream: str
    file: str
    published: str  # "new file" | "swapped into the live file" | ...
    position: int  # the stream sequence the projection stands at
    target: int  # the sequence asked for (to-seq, at, or the stream's end)
    at: str | None
    applied: int
    skipped: int
    elapsed: float
    rate: float

    def to_builtins(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def render(self) -> str:
        """The human summary: position, counts, time, rate."""
        when = f" (last event at or before {self.at})" if self.at else ""
        return (
            f"replayed projection {self.projection!r} to {self.stream} seq {self.position}"
            f"{when} -> {self.file} ({self.published})\n"
            f"  {self.applied:,} events applied, {self.skipped:,} skipped (malformed or"
            f" unknown), {duration(self.elapsed)} at {self.rate:,.0f} events/s"
        )


class Reporter:
    """Progress on stderr: one updating line on a terminal, else a line every ~2 s."""

    def __init__(self, out: TextIO | None = None, *, interval: float | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.interval = interval if interval is not None else (0.25 if self.tty else 2.0)

    def show(self, progress: Progress) -> None:
        if self.tty:
            self.out.write(f"\r{progress.line()}\x1b[K")
        else:
            self.out.write(f"replay: {progress.line()}\n")
        self.out.flush()

    def done(self, progress: Progress) -> None:
        self.show(progress)
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    async def follow(self, position: Callable[[], int], base: int, total: int) -> None:
        """Show progress every `interval` until cancelled."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            self.show(Progress(position() - base, total, time.monotonic() - started))


async def seq_at(bus: Bus, stream: str, when: datetime) -> int:
    """The sequence of the last message stored at or before `when` (to the microsecond;
    0 if none): the server places a by-start-time consumer on the first one after it."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=when + timedelta(microseconds=1),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=10.0,
        mem_storage=True,
    )
    info = await bus.js.add_consumer(stream, config)
    try:
        # A new consumer reports the sequence before its start as already delivered.
        return info.delivered.stream_seq if info.delivered else 0
    finally:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await bus.js.delete_consumer(stream, info.name)


def _checkpoint(path: Path, name: str) -> tuple[int, str] | None:
    """(seq, stream identity) stored in a projection file, or None if it has none."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT seq, stream FROM checkpoint WHERE name = ?", (name,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return (int(row[0]), str(row[1])) if row else None


def _swap(spec: Rebuildable, fresh: Path, dest: Path, identity: str, guard: bool) -> int | None:
    """Replace `dest`'s view tables and checkpoint with `fresh`'s in one transaction.
    With `guard`, give up (returning the newer position) if `dest` already stands past
    the fresh file in the same stream."""
    conn = sqlite3.connect(dest, isolation_level=None, timeout=30)
    try:
        for ddl in spec.schema:
            conn.execute(ddl)
        conn.execute("ATTACH DATABASE ? AS fresh", (str(fresh),))
        conn.execute("BEGIN IMMEDIATE")  # the writer lock: a live projection waits
        try:
            ours = conn.execute(
                "SELECT seq FROM fresh.checkpoint WHERE name = ?", (spec.checkpoint,)
            ).fetchone()
            theirs = conn.execute(
                "SELECT seq, stream FROM main.checkpoint WHERE name = ?", (spec.checkpoint,)
            ).fetchone()
            if guard and theirs and theirs[1] == identity and int(theirs[0]) > int(ours[0]):
                conn.execute("ROLLBACK")
                return int(theirs[0])
            for table in spec.tables:
                conn.execute(f"DELETE FROM main.{table}")  # noqa: S608 -- our table names
                conn.execute(f"INSERT INTO main.{table} SELECT * FROM fresh.{table}")  # noqa: S608
            conn.execute(
                "INSERT OR REPLACE INTO main.checkpoint SELECT * FROM fresh.checkpoint"
                " WHERE name = ?",
                (spec.checkpoint,),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("DETACH DATABASE fresh")
    finally:
        conn.close()
    return None


def _publish_new(fresh: Path, dest: Path) -> bool:
    """Give the finished file `dest`'s name unless something exists there (atomic)."""
    try:
        os.link(fresh, dest)
    except FileExistsError:
        return False
    fresh.unlink()
    return True


def _remove(path: Path) -> None:
    for leftover in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)


async def replay(
    bus: Bus, settings: Settings, request: Request, reporter: Reporter | None = None
) -> Summary:
    """Rebuild `request.name` as asked and publish it; see the module docstring."""
    spec = request.check()
    reporter = reporter or Reporter()
    try:
        info = await bus.js.stream_info(spec.stream)
    except nats.js.errors.NotFoundError:
        raise ReplayError(f"stream {spec.stream} does not exist") from None
    identity, last = str(info.created), info.state.last_seq
    base = max(info.state.first_seq - 1, 0)
    if request.to_seq is not None:
        if request.to_seq > last:
            raise ReplayInputError(
                f"--to-seq {request.to_seq} is beyond {spec.stream}'s last sequence {last}"
            )
        target = request.to_seq
    elif request.at is not None:
        target = min(await seq_at(bus, spec.stream, request.at), last)
    else:
        target = last
    live = request.out is None
    dest = spec.live_path(settings) if live else Path(request.out or "")
    if live and not request.force:
        stored = _checkpoint(dest, spec.checkpoint) if dest.exists() else None
        if stored and stored[1] == identity and stored[0] > target:
            raise ReplayInputError(
                f"the live projection ({dest}) is at {spec.stream} seq {stored[0]}, past"
                f" {target}: a running core would go on from {target} and skip events;"
                " rebuild into --out FILE (or stop every core and use --force)"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fresh = dest.parent / f".{dest.name}.replay-{os.getpid()}.tmp"
    _remove(fresh)
    started = time.monotonic()
    published = ""
    try:
        position, skipped, applied = await _build(spec, bus, fresh, target, base, reporter)
        follow = live and request.to_seq is None and request.at is None
        for _ in range(_SWAP_ATTEMPTS):
            if _publish_new(fresh, dest):
                published = "new file"
                break
            ahead = await asyncio.to_thread(
                _swap, spec, fresh, dest, identity, live and not request.force
            )
            if ahead is None:
                published = "swapped into the live file" if live else "replaced the file"
                break
            if not follow:
                raise ReplayError(
                    f"the live projection moved on to seq {ahead} (past {target}) while"
                    " rebuilding: rebuild into --out FILE"
                )
            # The live core applied more while we rebuilt: catch the fresh file up too.
            target = (await bus.js.stream_info(spec.stream)).state.last_seq
            position, skipped, more = await _build(spec, bus, fresh, target, base, reporter)
            applied += more
        else:
            raise ReplayError(
                f"the live projection kept moving ahead ({_SWAP_ATTEMPTS} attempts): try again"
            )
    except sqlite3.Error as exc:
        raise ReplayError(f"SQLite error on {dest}: {exc}") from None
    finally:
        _remove(fresh)
    elapsed = time.monotonic() - started
    return Summary(
        projection=request.name,
        stream=spec.stream,
        file=str(dest),
        published=published,
        position=position,
        target=target,
        at=request.at.isoformat().replace("+00:00", "Z") if request.at else None,
        applied=applied,
        skipped=skipped,
        elapsed=elapsed,
        rate=applied / elapsed if elapsed > 0 else 0.0,
    )


async def _build(
    spec: Rebuildable, bus: Bus, path: Path, target: int, base: int, reporter: Reporter
) -> tuple[int, int, int]:
    """Catch the projection in `path` up to `target` with progress on the way; return
    (position, skipped, applied)."""
    started = time.monotonic()
    total = max(target - base, 0)
    async with spec.open(bus, path) as projection:
        ticker = asyncio.create_task(reporter.follow(lambda: projection.position, base, total))
        try:
            applied = await projection.catch_up(upto=target)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        done = max(projection.position - base, 0)
        reporter.done(Progress(done, max(total, done), time.monotonic() - started))
        return projection.position, projection.skipped, applied
