"""The plugin projection: PLUGINS replayed into SQLite (rows and checkpoint in one
transaction), caught up on start, live-tailed, readable by the core on every turn.

Events are applied in batches (up to 1,000 per transaction during a rebuild, one at a time
when tailing); each batch writes its rows and the checkpoint together, so a crash at any
point resumes exactly after the last committed event. Several processes may share one
file: a batch skips what the stored checkpoint says is already applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite
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


class PluginProjection:
    """`async with PluginProjection(bus, path, manifests) as p: await p.catch_up()`."""

    def __init__(
        self,
        bus: Bus,
        path: Path | str,
        manifests: dict[str, PluginManifest],
        name: str = "plugins",
    ) -> None:
        self.bus = bus
        self.path = str(path)
        self.manifests = manifests
        self.name = name
        self.position = 0
        self.skipped = 0
        self.changed = asyncio.Event()  # set after every committed batch
        self._db: aiosqlite.Connection | None = None
        self._checked = False
        # Our writes and our reads share one connection: a read must not land inside a
        # batch's open transaction (it would see rows the checkpoint does not cover yet).
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> PluginProjection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        for ddl in view.SCHEMA:
            await self._db.execute(ddl)
        await self._db.execute(
            "INSERT OR IGNORE INTO checkpoint VALUES (?, 0, 0, '')", (self.name,)
        )
        self.position, self.skipped = await self._checkpoint()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        """The open connection."""
        assert self._db is not None, "use `async with PluginProjection(...)`"
        return self._db

    async def _checkpoint(self) -> tuple[int, int]:
        async with self.db.execute(
            "SELECT seq, skipped FROM checkpoint WHERE name = ?", (self.name,)
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def _same_stream(self) -> None:
        """Start over if PLUGINS was recreated since this file was built (its checkpoint
        would point into a different history)."""
        info = await self.bus.js.stream_info(PLUGINS.name)
        identity = str(info.created)
        async with self.db.execute(
            "SELECT stream FROM checkpoint WHERE name = ?", (self.name,)
        ) as cur:
            row = await cur.fetchone()
        if row and row[0] == identity:
            return
        if row and row[0]:
            log.warning(
                "PLUGINS was recreated: rebuilding the projection", extra={"path": self.path}
            )
        await self.db.execute("BEGIN IMMEDIATE")
        for table in view.TABLES:
            await self.db.execute(f"DELETE FROM {table}")  # noqa: S608 -- our own table names
        await self.db.execute(
            "UPDATE checkpoint SET seq = 0, skipped = 0, stream = ? WHERE name = ?",
            (identity, self.name),
        )
        await self.db.execute("COMMIT")
        self.position, self.skipped = 0, 0

    async def catch_up(self, *, upto: int | None = None) -> int:
        """Apply every event after the checkpoint (up to `upto`); return how many."""
        if not self._checked:
            await self._same_stream()
            self._checked = True
        applied = 0
        batch: list[tuple[int, list[view.Statement] | None]] = []
        async for stored in read(
            self.bus, PLUGINS.name, start_seq=self.position + 1, stop_seq=upto
        ):
            batch.append((stored.seq, self._statements(stored.seq, stored.data)))
            if len(batch) >= BATCH:
                applied += await self._commit(batch)
                batch = []
        if batch:
            applied += await self._commit(batch)
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

    async def _commit(self, batch: list[tuple[int, list[view.Statement] | None]]) -> int:
        async with self._lock:
            return await self._commit_locked(batch)

    async def _commit_locked(self, batch: list[tuple[int, list[view.Statement] | None]]) -> int:
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        try:
            stored, skipped = await self._checkpoint()
            todo = [(seq, st) for seq, st in batch if seq > stored]
            # Consecutive statements with the same SQL run as one executemany: the order
            # of effects is kept, and a rebuild does not pay a thread hop per row.
            run_sql, run_params = "", list[tuple[Any, ...]]()
            for _, statements in todo:
                for sql, params in statements or []:
                    if sql != run_sql and run_params:
                        await db.executemany(run_sql, run_params)
                        run_params = []
                    run_sql = sql
                    run_params.append(params)
            if run_params:
                await db.executemany(run_sql, run_params)
            skipped += sum(1 for _, st in todo if st is None)
            last = max([stored, *(seq for seq, _ in todo)])
            await db.execute(
                "UPDATE checkpoint SET seq = ?, skipped = ? WHERE name = ?",
                (last, skipped, self.name),
            )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        self.position, self.skipped = last, skipped
        self.changed.set()
        self.changed = asyncio.Event()
        return len(todo)

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

    async def snapshot(
        self,
    ) -> tuple[int, list[view.InstalledRow], dict[str, tuple[list[str], list[str]]]]:
        """The checkpoint with the installed rows and policies it covers (one read
        transaction, so the position is exact even when another process shares the file)."""
        async with self._lock:
            db = self.db
            await db.execute("BEGIN")
            try:
                async with db.execute(
                    "SELECT seq FROM checkpoint WHERE name = ?", (self.name,)
                ) as cur:
                    row = await cur.fetchone()
                async with db.execute(
                    "SELECT scope, name, state, version, config FROM installed"
                ) as cur:
                    installed = [
                        view.InstalledRow(r[0], r[1], r[2], r[3], json.loads(r[4]))
                        for r in await cur.fetchall()
                    ]
                async with db.execute("SELECT scope, allow, deny FROM policy") as cur:
                    policies = {
                        r[0]: (json.loads(r[1]), json.loads(r[2])) for r in await cur.fetchall()
                    }
            finally:
                await db.execute("COMMIT")
        return (int(row[0]) if row else 0), installed, policies

    async def rows(self) -> tuple[list[view.InstalledRow], dict[str, tuple[list[str], list[str]]]]:
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
        key = view.fact_chat(channel, account, chat)
        async with self.db.execute("SELECT key, value FROM facts WHERE chat = ?", (key,)) as cur:
            return {str(k): str(v) for k, v in await cur.fetchall()}

    async def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every view table, sorted (for determinism checks)."""
        out = {}
        for table in view.TABLES:
            async with self.db.execute(f"SELECT * FROM {table} ORDER BY 1, 2") as cur:  # noqa: S608
                out[table] = [tuple(r) for r in await cur.fetchall()]
        return out
