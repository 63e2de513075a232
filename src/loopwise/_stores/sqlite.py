"""The SQLite event store: the default, durable across process crashes.

A batch of events (one per step that must be durable: before a model call, before
an iteration's tools start, at the end) is appended to this process's journal
(`_stores.journal`) with one `write(2)` on the caller's thread: once that returns, the
events survive a crash of the process, and the run moves on. Every `GATHER_S` the
journaled batches are copied into SQLite, all of them in one transaction (group
commit: a sequential caller's few dozen runs, or 1,000 concurrent runs' hundreds of
batches, cost one commit, not one per batch; and a row per run's stretch of
consecutive events, not per event: see `_stores.journal.chunk_rows`), by a callback on the event loop that
wrote them; a thread (the janitor) copies what no event loop will (batches written
outside one, or left by a loop that has closed) and checkpoints the WAL.

Why on the event loop and not on a thread of its own: under CPython's GIL, a thread
that wants to run Python while the event loop is busy is woken, in vain, at every
point where the loop lets go of the GIL (each turn of the loop, each `write(2)`).
On the 2-core VM this was measured on, a writer thread cost the loop ~100 µs a run
that way, more than the copy itself (~50 µs on the loop). The copy on the loop never
waits for the database: it uses no busy timeout, and a database locked by another
process leaves the batches in the journal for the next try.

`load` and `has_run` read the journals (this process's and other live ones') besides
the database, and recover those of crashed processes, so they see every event that
is durable without waiting; other reads in this process first copy what is pending,
so they see their own writes.

The database runs in WAL mode with ``synchronous=NORMAL``, and neither it nor the
journal calls fsync: a write survives a crash of the process, but not a power loss
or an OS crash, which may lose the last writes.
Several processes may share one file; a busy timeout makes them wait their turn.

`prune` deletes whole runs in short transactions of their own (a few hundred runs
each), so the writers of running agents wait milliseconds, not the whole prune.

By role: the schema and its migrations (`_stores.sqlite_schema`), the write path and the
janitor (`_stores.sqlite_write`), the reads (`_stores.sqlite_read`), prune (`_stores.sqlite_prune`), tail
(`_stores.sqlite_tail`); this module opens the store, recovers crashed processes' journals,
and closes it.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from .._control.local import LocalControl, local_control
from .._errors import UserError, store_error
from .._events import Event
from .journal import Segment, journal_files, recover
from .sqlite_prune import _Pruner
from .sqlite_read import _Reader
from .sqlite_schema import SCHEMA_VERSION, _check_ours, _connect, _migrate, _not_ours
from .sqlite_tail import tail as _tail
from .sqlite_write import _FORKED, _conditions, _Janitor, _open_stores, _Writer
from .base import EventStore

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "default_db_path", "default_store"]

_log = logging.getLogger("loopwise")
RECOVER_BUSY_TIMEOUT_MS = 250


def default_db_path() -> Path:
    """`$LOOPWISE_DB`, or `.loopwise/loopwise.db` in the current directory."""
    return Path(os.environ.get("LOOPWISE_DB") or Path(".loopwise") / "loopwise.db")


def default_store() -> SQLiteStore:
    """The store of runs given no store: an `SQLiteStore` at `default_db_path`, one per path and process."""
    path = default_db_path().absolute()
    store = _default_stores.get(path)
    if store is None:
        store = _default_stores[path] = SQLiteStore(path)
    return store


_default_stores: dict[Path, SQLiteStore] = {}


@atexit.register
def _close_all() -> None:
    for store in list(_open_stores):
        store.close()


class SQLiteStore(_Writer, _Reader, _Pruner, EventStore):
    """Events in a SQLite file (WAL mode): journaled at once, copied into SQLite every `GATHER_S`.

    Args:
        path: The database file; created (with its directory) if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory; give SQLiteStore a file path")
        _check_ours(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cannot open the loopwise database {self.path}: {exc}") from None
        try:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:  # a full disk, an I/O error: not the file's fault
                raise store_error(self.path, "open", exc) from None
            except sqlite3.DatabaseError as exc:
                raise _not_ours(self.path, str(exc)) from None
            try:
                _migrate(conn, self.path)
            except sqlite3.OperationalError as exc:
                raise store_error(self.path, "create or migrate the tables of", exc) from None
        finally:
            conn.close()
        self._reader = _connect(self.path, check_same_thread=False)
        self._read_lock = threading.Lock()
        # The journal and the queue of batches to copy, under one lock: a batch is queued
        # in the order it was journaled. `_cond` wakes the janitor, `_copied` readers
        # waiting for their writes to be copied (a copy does not wake the janitor).
        self._cond, self._copied = _conditions()
        # What this store's rows name as their writer, and its journal files are named after.
        self._writer = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._segment: Segment | None = None
        self._segments: list[Segment] = []  # this process's, the live one last
        self._serial = 0
        self._pending: list[tuple[Segment, tuple, bytes]] = []
        self._pending_since = 0.0  # (monotonic) when the oldest pending batch was queued
        self._queued = 0  # batches journaled
        self._ingested = 0  # of those, batches copied into SQLite (or refused by it)
        # The event loop a copy is scheduled on (`call_later`), if any.
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        # The connection that copies, used by one thread at a time (under `_copy_lock`).
        self._copy_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._busy_ms = -1  # the busy timeout `_conn` is set to
        self._copied_bytes = 0  # since the last checkpoint
        self._checkpoint_due = False
        # Runs whose events SQLite refused (their id taken by another process's run): the
        # copies drop their later events too (used under `_copy_lock`).
        self._refused: set[str] = set()
        self._janitor: _Janitor | None = None
        self._janitor_idle = False
        self._stopping = False
        self._closed: bool | str = False
        self._recover()
        _open_stores.add(self)

    def describe(self) -> str:
        return str(self.path)

    def control_plane(self) -> LocalControl:
        """`LocalControl`: leases and kills in tables of this database (every process on this machine)."""
        return local_control(self.path)

    def tail(self, run_id: str, after_seq: int = -1) -> AsyncIterator[Event]:
        """`EventStore.tail`: follows a run written by any process on this machine (`_stores.sqlite_tail`)."""
        return _tail(self, run_id, after_seq)

    def _own_paths(self) -> set[Path]:
        with self._cond:
            return {s.path for s in self._segments}

    def _recover(self) -> None:
        """Copy into SQLite what crashed processes left in their journals."""
        own = self._own_paths()
        if not any(p not in own for p in journal_files(self.path)):
            return
        try:
            conn = _connect(self.path)
            try:
                # Never wait long for the write lock here: until a later try, reads merge them.
                conn.execute(f"PRAGMA busy_timeout = {RECOVER_BUSY_TIMEOUT_MS}")
                copied = recover(conn, self.path, own)
            finally:
                conn.close()
        except sqlite3.Error as exc:  # (say, locked by a long prune) `load` still reads them
            _log.warning("could not recover the journals of crashed processes into %s yet (%s); "
                         "reads include them meanwhile", self.path, exc)
            return
        if copied:
            _log.info("recovered %d events from crashed processes' journals into %s", copied, self.path)

    def close(self) -> None:
        """Copy what is journaled into SQLite, stop the janitor thread, close the connections.

        The journal is deleted once it is all in; what could not be written stays in it,
        and the next process to open the database recovers it.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            janitor = self._janitor
            self._cond.notify_all()
        deadline = time.monotonic() + 10  # (a database locked by another process: at most this)
        if janitor is not None:
            janitor.join(timeout=10)
        self._flush(blocking=True, timeout=max(0.1, deadline - time.monotonic()))
        with self._cond:
            self._tidy_segments()
        with self._copy_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._read_lock:
            self._reader.close()
        _open_stores.discard(self)

    def _forget_after_fork(self) -> None:
        """In a forked child: the store is the parent's; using it says so (never hangs on its locks)."""
        for segment in self._segments:  # (the parent's lock stays with the parent's descriptor)
            try:
                os.close(segment.fd)
            except OSError:
                pass
        self._segments = []
        self._segment = None
        self._pending = []
        self._queued = self._ingested = 0
        self._janitor = None
        self._flush_loop = None
        # Its locks and SQLite's own may have been held by the parent's threads at the fork.
        # (Its connections are left as they are, never used: closing them here could touch
        # the parent's database state.)
        self._cond, self._copied = _conditions()
        self._read_lock = threading.Lock()
        self._copy_lock = threading.Lock()
        self._closed = _FORKED


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
