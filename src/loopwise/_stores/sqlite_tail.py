"""`SQLiteStore.tail`: follow a run written by any process on this machine.

Woken by SQLite's change counter, not by reading the run again: ``PRAGMA
data_version`` on a connection of the tail's own changes when any other connection
(another process's, or this process's copy into SQLite) commits, and reading it
costs a look at the WAL index in shared memory, no query of a table, no write. The
tail reads it on its event loop at a bounded interval (from `POLL_MIN_S`, doubling
while nothing changes, up to `POLL_MAX_S`), and reads the run's new rows, in a
thread, only after a commit. Nothing is added to the write path: the writers do not
know that anyone follows.

Events reach SQLite within `_stores.sqlite_write.GATHER_S` of being journaled (see `_stores.sqlite`), so a
tail sees them that much, plus one poll, after they are durable.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .._errors import UserError
from .._events import Event, load_events
from .._events import first_error as _first_error
from .base import check_after_seq, follow

if TYPE_CHECKING:
    from .sqlite import SQLiteStore

__all__ = ["POLL_MAX_S", "POLL_MIN_S", "tail"]

#: The change counter is read this often right after a change ...
POLL_MIN_S = 0.01
#: ... and at most this far apart while nothing changes.
POLL_MAX_S = 0.2

_NEW_ROWS = "SELECT data FROM event_chunks WHERE run_id = ? AND last_seq > ? ORDER BY seq"


async def tail(store: SQLiteStore, run_id: str, after_seq: int) -> AsyncIterator[Event]:
    """`EventStore.tail` for `store` (see there)."""
    after = check_after_seq(after_seq)
    if not await asyncio.to_thread(store.has_run, run_id):  # (the journals of live processes included)
        raise store._unknown(run_id)
    conn = await asyncio.to_thread(_open, store)
    try:
        def changed_since() -> int | None:
            try:
                return conn.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error:  # (busy: a checkpoint, say) read the rows all the same
                return None

        async def wait(seen: int | None) -> None:
            delay = POLL_MIN_S
            while seen is not None and changed_since() == seen:
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL_MAX_S)

        def arm():  # noqa: ANN202 - the counter now; a commit after this changes it
            return wait(changed_since())

        async def read(seq: int) -> list[Event]:
            rows = await asyncio.to_thread(store._read, _NEW_ROWS, (run_id, seq), sync=False)
            try:
                return [e for (data,) in rows for e in load_events(data) if e.seq > seq]
            except ValueError as exc:
                raise UserError(f"run {run_id} in {store.path} holds an event this loopwise cannot read "
                                f"({_first_error(exc)}): written by a newer loopwise, or edited") from None

        async for event in follow(read, arm, after):
            yield event
    finally:
        conn.close()


def _open(store: SQLiteStore) -> sqlite3.Connection:
    # No busy timeout: it is read on the event loop, which must never wait.
    return sqlite3.connect(store.path, timeout=0, isolation_level=None, check_same_thread=False,
                           cached_statements=4)
