"""The neonize session store seam: what a client is opened on, which devices it holds.

One store (WHATSAPP_STORE: a SQLite file, or a Postgres DSN shared by every host) holds
the devices of many accounts; each account resumes its own device by JID, recorded in
the `devices` bucket by `svc whatsapp pair`. Two neonize traps shape this module
(docs/adr/0019-whatsapp-store-and-pairing.md):

- resuming a JID that is not in the store aborts the whole interpreter (a Go panic,
  exit 134), so `check_resumable` must say yes before a client is ever built with `jid=`;
- without `uuid=` the store name -- a DSN with its password -- becomes the client key
  that the Go side logs, so clients are keyed by `client_uuid(account)`.

neonize is imported lazily: only a process that uses the neonize transport needs it.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import logging
import os
import sqlite3
import sys
from types import ModuleType
from typing import Any

from services.runtime.errors import ServiceError
from services.runtime.settings import SessionStore

# SQLite answers at once; a timeout only guards a wedged file system.
SQLITE_TIMEOUT = 10.0
# Beyond the DSN's connect_timeout: lib/pq applies it per connection attempt, and the
# schema check that follows a connection needs a moment too.
POSTGRES_HEADROOM = 5.0


class StoreError(ServiceError):
    """The session store could not be read or changed (the message never holds a password)."""


def neonize_module(name: str) -> ModuleType:
    """Import a neonize module, without the two side effects of neonize's own import:

    - it runs `os.popen("uname -a").read()` (neonize/utils/platform.py) and never closes
      the pipe: the pipe and its unreaped child outlive the import, and their
      ResourceWarning (an error under `-W error`) surfaces later, wherever they are
      collected. During the import, `os.popen` reads the output and closes what it opened;
    - it calls `logging.basicConfig(level=INFO)`: the root logger is put back as it was.
    """
    if name in sys.modules:
        return sys.modules[name]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    popen = os.popen

    def closing_popen(cmd: str, mode: str = "r", buffering: int = -1) -> io.StringIO:
        with popen(cmd, mode, buffering) as pipe:
            return io.StringIO(pipe.read())

    os.popen = closing_popen  # type: ignore[assignment]
    try:
        return importlib.import_module(name)
    finally:
        os.popen = popen
        root.handlers[:] = handlers
        root.setLevel(level)


def store_name(store: SessionStore) -> str:
    """What NewAClient's `name` gets. A SQLite path is made absolute: neonize takes any
    name starting with `postgres` for a DSN (a file called postgres.sqlite would be)."""
    if store.dsn:
        return store.dsn.value
    assert store.path is not None
    return str(store.path.expanduser().resolve())


def store_timeout(store: SessionStore) -> float:
    """How long one look into the store may take before it counts as unreachable."""
    if store.dsn:
        return store.connect_timeout + POSTGRES_HEADROOM
    return SQLITE_TIMEOUT


def client_uuid(account: str) -> str:
    """The key neonize's Go side knows the account's client by (logged; never the DSN)."""
    return f"switchboard-whatsapp-{account}"


def jid_string(jid: Any) -> str:
    """A neonize JID as whatsmeow prints it (`user[.agent][:device]@server`): the form
    the store's `jid` column and the `devices` bucket hold."""
    user = str(jid.User)
    if jid.RawAgent:
        user = f"{user}.{jid.RawAgent}"
    if jid.Device:
        user = f"{user}:{jid.Device}"
    return f"{user}@{jid.Server}"


def device_jid(device_id: str) -> Any:
    """The neonize JID that resumes `device_id` (as recorded in the `devices` bucket)."""
    build_jid = neonize_module("neonize.utils.jid").build_jid
    user, _, server = device_id.partition("@")
    return build_jid(user, server or "s.whatsapp.net")


def _ensure_parent(store: SessionStore) -> None:
    if store.path is not None:
        store.path.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def _read_devices(factory: Any, name: str) -> set[str]:
    devices = factory.get_all_devices_from_db(name)
    found = {f"{d.JID.User}@{d.JID.Server}" for d in devices}
    # The Go side answers a DB error with the line "error: ..." and neonize parses it as
    # devices: usually a ValueError, but an error text of the right shape would pass.
    if any(device.startswith("error: ") for device in found):
        raise ValueError("the store answered with an error")
    return found


async def devices_in_store(store: SessionStore, *, timeout: float | None = None) -> set[str]:
    """The device JIDs (`15550000001:7@s.whatsapp.net`) the store holds. Opening the store
    creates neonize's tables if they are missing. Raises StoreError, within `timeout`
    (default: the DSN's connect_timeout plus headroom), if the store cannot be read."""
    _ensure_parent(store)
    limit = store_timeout(store) if timeout is None else timeout
    # Imported here, not in the thread: the first import takes seconds and silences a
    # warning, which is not thread-safe.
    factory = neonize_module("neonize.aioze.client").ClientFactory
    # The Go call blocks its thread: run it aside. On a timeout the thread is left to
    # finish (it cannot be interrupted); lib/pq's connect_timeout bounds it too.
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_read_devices, factory, store_name(store)), limit
        )
    except TimeoutError:
        raise StoreError(
            f"the session store {store.shown} did not answer within {limit:g} s:"
            " check that it is reachable (WHATSAPP_STORE)"
        ) from None
    except ValueError:
        # neonize's message is about unpacking, and the Go error may quote the DSN.
        raise StoreError(
            f"the session store {store.shown} could not be opened: check WHATSAPP_STORE,"
            " that the database is running and the credentials are right"
        ) from None


async def check_resumable(
    store: SessionStore, device_id: str | None, *, timeout: float | None = None
) -> str | None:
    """None if `device_id` can be resumed from `store`; else why not (the account is
    parked as needs_pairing, and no client is built: resuming a missing device aborts
    the process). Raises StoreError if the store cannot be read (try again later)."""
    if not device_id:
        return "needs_pairing: no device is recorded for the account (svc whatsapp pair)"
    if device_id not in await devices_in_store(store, timeout=timeout):
        return (
            f"needs_pairing: device {mask_device(device_id)} is not in the session store"
            f" {store.shown} (logged out, or removed): pair the account again"
        )
    return None


def delete_device(store: SessionStore, device_id: str) -> bool:
    """Remove a device and its keys from the store, as whatsmeow's
    `Container.DeleteDevice` does (one row; every other table cascades from it). True if
    it was there. neonize has no call for this: the SQL is whatsmeow's own."""
    if store.dsn:
        return _delete_postgres(store, device_id)
    _ensure_parent(store)
    path = store_name(store)
    try:
        with sqlite3.connect(path, timeout=SQLITE_TIMEOUT) as db:
            db.execute("PRAGMA foreign_keys = ON")  # neonize opens it with _foreign_keys=on
            cursor = db.execute("DELETE FROM whatsmeow_device WHERE jid = ?", (device_id,))
            return cursor.rowcount > 0
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False
        raise StoreError(f"the session store {store.shown} could not be changed: {exc}") from None


def _delete_postgres(store: SessionStore, device_id: str) -> bool:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "removing a device from a Postgres session store needs psycopg:"
            " pip install 'psycopg[binary]'"
        ) from None
    try:
        with psycopg.connect(store.dsn.value, autocommit=True) as db:
            cursor = db.execute("DELETE FROM whatsmeow_device WHERE jid = %s", (device_id,))
            return cursor.rowcount > 0
    except psycopg.errors.UndefinedTable:
        return False
    except psycopg.Error:
        # psycopg's message can quote connection parameters: say only what to check.
        raise StoreError(
            f"the session store {store.shown} could not be changed: check that the database"
            " is reachable and the credentials are right"
        ) from None


def mask_device(device_id: str) -> str:
    """A device JID fit for logs and terminals: the phone number's middle hidden
    (`15550000001:7@s.whatsapp.net` -> `1555…01:7@s.whatsapp.net`)."""
    user, at, server = device_id.partition("@")
    number, colon, device = user.partition(":")
    if len(number) > 6:
        number = f"{number[:4]}…{number[-2:]}"
    return f"{number}{colon}{device}{at}{server}"
