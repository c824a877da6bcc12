"""The plugin projection: PLUGINS replayed into SQLite (rows and checkpoint in one
transaction), caught up on start, live-tailed, readable by the core on every turn.

Events are applied in batches (up to `batch` per transaction, 1,000 by default); each
batch writes its rows and the checkpoint together, so a crash at any point resumes exactly
after the last committed event. Several processes may share one file: a batch skips what
the stored checkpoint says is already applied.

SQLite runs on one worker thread per projection, and each batch (or read) is a single job
on it: the event loop pays one thread hop per batch, while a batch is being written the
loop already reads and decodes the next one, and a read never lands inside a batch's
open transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import nats.errors

from contracts.codec import decode_any
from contracts.errors import ContractError
from contracts.plugins import PluginManifest
from contracts.streams import PLUGINS
from projections import plugins as view
from services.runtime.bus import Bus
from services.runtime.reader import read

log = logging.getLogger(__name__)

BATCH = 1000
FRESH_CACHE_KIB = 128 * 1024
T = TypeVar("T")
Batch = list[tuple[int, list[view.Statement] | None]]
Policies = dict[str, tuple[list[str], list[str]]]


class PluginProjection:
    """`async with PluginProjection(bus, path, manifests) as p: await p.catch_up()`.

    `fresh=True` is for a file nobody else has open that is thrown away if the build
    fails (a rebuild, `svc replay projection`): no journal and no fsync.
    """

    def __init__(
        self,
        bus: Bus,
        path: Path | str,
        manifests: dict[str, PluginManifest],
        name: str = "plugins",
        *,
        fresh: bool = False,
        batch: int = BATCH,
    ) -> None:
        self.bus = bus
        self.path = str(path)
        self.manifests = manifests
        self.name = name
        self.fresh = fresh
        self.batch = batch
        self.position = 0
        self.skipped = 0
        self.changed = asyncio.Event()  # set after every committed batch
        self._conn: sqlite3.Connection | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._checked = False

    async def __aenter__(self) -> PluginProjection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="projection")
        try:
            self.position, self.skipped = await self._call(self._open)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        # After whatever is still queued (a write of a cancelled catch-up), on the worker.
        await asyncio.wrap_future(worker.submit(self._close))
        worker.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the projection's SQLite thread."""
        assert self._worker is not None, "use `async with PluginProjection(...)`"
        return await asyncio.get_running_loop().run_in_executor(self._worker, partial(fn, *args))

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (only for use on the projection's thread, via `_call`)."""
        assert self._conn is not None, "use `async with PluginProjection(...)`"
        return self._conn

    # --- on the SQLite thread -----------------------------------------------------------

    def _open(self) -> tuple[int, int]:
        conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False
        )
        self._conn = conn
        if self.fresh:
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            # Nobody else reads it while it is built: no lock round trips per batch, and a
            # page cache big enough for the indexes of a million rows.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute(f"PRAGMA cache_size=-{FRESH_CACHE_KIB}")
        else:
            _wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
        for ddl in view.SCHEMA:
            conn.execute(ddl)
        conn.execute("INSERT OR IGNORE INTO checkpoint VALUES (?, 0, 0, '')", (self.name,))
        return self._checkpoint()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _checkpoint(self) -> tuple[int, int]:
        row = self.db.execute(
            "SELECT seq, skipped FROM checkpoint WHERE name = ?", (self.name,)
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def _restart_if_other_stream(self, identity: str) -> bool:
        db = self.db
        row = db.execute("SELECT stream FROM checkpoint WHERE name = ?", (self.name,)).fetchone()
        if row and row[0] == identity:
            return False
        if row and row[0]:
            log.warning(
                "PLUGINS was recreated: rebuilding the projection", extra={"path": self.path}
            )
        db.execute("BEGIN IMMEDIATE")
        for table in view.TABLES:
            db.execute(f"DELETE FROM {table}")  # noqa: S608 -- our own table names
        db.execute(
            "UPDATE checkpoint SET seq = 0, skipped = 0, stream = ? WHERE name = ?",
            (identity, self.name),
        )
        db.execute("COMMIT")
        return True

    def _write(self, batch: Batch) -> tuple[int, int, int]:
        """One transaction: the batch's rows (minus what is already applied) and the
        checkpoint. Returns (applied, position, skipped)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            stored, skipped = self._checkpoint()
            todo = [(seq, st) for seq, st in batch if seq > stored]
            # Consecutive statements with the same SQL run as one executemany; the order
            # of effects is kept.
            run_sql, run_params = "", list[tuple[Any, ...]]()
            for _, statements in todo:
                for sql, params in statements or []:
                    if sql != run_sql and run_params:
                        db.executemany(run_sql, run_params)
                        run_params = []
                    run_sql = sql
                    run_params.append(params)
            if run_params:
                db.executemany(run_sql, run_params)
            skipped += sum(1 for _, st in todo if st is None)
            last = max([stored, *(seq for seq, _ in todo)])
            db.execute(
                "UPDATE checkpoint SET seq = ?, skipped = ? WHERE name = ?",
                (last, skipped, self.name),
            )
            db.execute("COMMIT")
        except BaseException:
            # Without a journal (fresh) a rollback is undefined; that file is discarded.
            if not self.fresh and db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return len(todo), last, skipped

    def _snapshot(self) -> tuple[int, list[view.InstalledRow], Policies]:
        db = self.db
        db.execute("BEGIN")
        try:
            row = db.execute("SELECT seq FROM checkpoint WHERE name = ?", (self.name,)).fetchone()
            installed = [
                view.InstalledRow(r[0], r[1], r[2], r[3], json.loads(r[4]))
                for r in db.execute("SELECT scope, name, state, version, config FROM installed")
            ]
            policies = {
                r[0]: (json.loads(r[1]), json.loads(r[2]))
                for r in db.execute("SELECT scope, allow, deny FROM policy")
            }
        finally:
            db.execute("COMMIT")
        return (int(row[0]) if row else 0), installed, policies

    def _facts(self, key: str) -> dict[str, str]:
        rows = self.db.execute("SELECT key, value FROM facts WHERE chat = ?", (key,))
        return {str(k): str(v) for k, v in rows}

    def _dump(self) -> dict[str, list[tuple[Any, ...]]]:
        return {
            table: [
                tuple(r)
                for r in self.db.execute(f"SELECT * FROM {table} ORDER BY 1, 2")  # noqa: S608
            ]
            for table in view.TABLES
        }

    # --- on the event loop --------------------------------------------------------------

    async def _same_stream(self) -> None:
        """Start over if PLUGINS was recreated since this file was built (its checkpoint
        would point into a different history)."""
        info = await self.bus.js.stream_info(PLUGINS.name)
        if await self._call(self._restart_if_other_stream, str(info.created)):
            self.position, self.skipped = 0, 0

    async def catch_up(self, *, upto: int | None = None) -> int:
        """Apply every event after the checkpoint (up to `upto`); return how many."""
        if not self._checked:
            await self._same_stream()
            self._checked = True
        applied = 0
        batch: Batch = []
        writing: asyncio.Future[int] | None = None  # the previous batch, being committed
        try:
            async for stored in read(
                self.bus,
                PLUGINS.name,
                start_seq=self.position + 1,
                stop_seq=upto,
                batch=max(self.batch, BATCH),
            ):
                batch.append((stored.seq, self._statements(stored.seq, stored.data)))
                if len(batch) >= self.batch:
                    if writing is not None:
                        applied += await writing
                    writing = asyncio.ensure_future(self._commit(batch))
                    batch = []
            if writing is not None:
                applied += await writing
            writing = None
            if batch:
                applied += await self._commit(batch)
        finally:
            if writing is not None:  # the read failed: let the pending write land first
                await asyncio.wait([writing])
                if not writing.cancelled():
                    writing.exception()  # the read's error is the one to report
        return applied

    def _statements(self, seq: int, data: bytes) -> list[view.Statement] | None:
        try:
            event = decode_any(data)
        except ContractError as exc:
            log.warning("skipped malformed event", extra={"seq": seq, "error": str(exc)})
            return None
        if not isinstance(event, view.HANDLED_TYPES):
            log.warning(
                "skipped event of another kind", extra={"seq": seq, "type": type(event).__name__}
            )
            return None
        return view.apply(event)

    async def _commit(self, batch: Batch) -> int:
        applied, self.position, self.skipped = await self._call(self._write, batch)
        self.changed.set()
        self.changed = asyncio.Event()
        return applied

    async def run(self, stop: asyncio.Event) -> None:
        """Tail PLUGINS: a plain subscription wakes the catch-up; a timer covers gaps."""
        wake = asyncio.Event()

        async def on_event(_: object) -> None:
            wake.set()

        sub = await self.bus.nc.subscribe(f"{PLUGINS.subjects[0]}", cb=on_event)
        try:
            while not stop.is_set():
                try:
                    await self.catch_up()
                except (nats.errors.Error, TimeoutError, OSError) as exc:
                    log.warning("projection catch-up failed", extra={"error": repr(exc)})
                wake.clear()
                waiters = [asyncio.create_task(e.wait()) for e in (wake, stop)]
                await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def snapshot(self) -> tuple[int, list[view.InstalledRow], Policies]:
        """The checkpoint with the installed rows and policies it covers (one read
        transaction, so the position is exact even when another process shares the file)."""
        return await self._call(self._snapshot)

    async def rows(self) -> tuple[list[view.InstalledRow], Policies]:
        """Installed rows and policies, as resolution needs them."""
        _, installed, policies = await self.snapshot()
        return installed, policies

    async def resolve_at(self, channel: str, account: str) -> tuple[int, list[view.Decision]]:
        """The PLUGINS position the view stands at, and every tool in effect for
        (channel, account) there with whether it is allowed."""
        seq, installed, policies = await self.snapshot()
        return seq, view.resolve(installed, policies, self.manifests, channel, account)

    async def resolve(self, channel: str, account: str) -> list[view.Decision]:
        """Every tool in effect for (channel, account) and whether it is allowed."""
        return (await self.resolve_at(channel, account))[1]

    async def facts(self, channel: str, account: str, chat: str) -> dict[str, str]:
        """The memory plugin's facts for a chat."""
        return await self._call(self._facts, view.fact_chat(channel, account, chat))

    async def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every view table, sorted (for determinism checks)."""
        return await self._call(self._dump)


BUSY_TIMEOUT_S = 30.0


def _wal(conn: sqlite3.Connection) -> None:
    """Switch `conn`'s database to WAL. Core replicas on one host share the file, and two
    of them opening a new one at once can get "database is locked" here without SQLite's
    busy handler being called (the switch needs an exclusive lock): a replica then died at
    start. Retry for as long as the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # on the projection's own SQLite thread, never the event loop
