"""The SQLite store's write path: journal a batch at once, copy batches into SQLite in groups.

`SQLiteStore.write` appends a batch to this process's journal (`_stores.journal`) with one
`write(2)`: durable when it returns. Every `GATHER_S` the journaled batches are copied
into SQLite in one transaction, by a callback on the event loop that wrote them
(`_Writer._flush_on_loop`), a row per run's stretch of consecutive events (`_insert`);
the `_Janitor` thread copies what no event loop will and checkpoints the WAL. Why on
the event loop, and why no busy timeout there: see `_stores.sqlite`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import StoreError, UserError
from .._events import Event, dump_lines
from .journal import SEGMENT_MAX, TRUNCATE_AT, Segment, chunk_rows, json_array, segment_path
from .sqlite_schema import BUSY_TIMEOUT_MS, _connect

if TYPE_CHECKING:
    from .sqlite import SQLiteStore

__all__ = ["CHECKPOINT_BYTES", "FLUSH_MAX_BATCHES", "GATHER_S", "JANITOR_S"]

_log = logging.getLogger("loopwise")

# How long batches gather before they are copied into SQLite: more runs per transaction
# (SQLite's per-commit cost is shared), at the price of other processes seeing new
# events this much later. Durability does not wait for it (see `_stores.journal`).
GATHER_S = 0.02
# Batches copied by one callback on the event loop: it holds the loop up for a few
# milliseconds at most; a backlog (after the database was locked) goes in several.
FLUSH_MAX_BATCHES = 1000
# Batches no event loop copied for this long (a loop closed with some pending, or
# writes made outside any loop... see `_Janitor`) are copied by the janitor thread.
JANITOR_S = 0.5
# The janitor checkpoints the WAL (PASSIVE, on a connection of its own, off the event
# loop) after this many bytes of events were copied since the last checkpoint (~2-4
# WAL pages per 1 KB... the -wal file stays around 10-20 MB). The copies themselves
# never checkpoint: a checkpoint of that size takes tens of milliseconds.
CHECKPOINT_BYTES = 4 * 1024 * 1024

# The stores open in this process (closed at exit; forgotten in a forked child).
_open_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()

_FORKED = "a store of the parent process (opened before os.fork()); open a new SQLiteStore in the child"


class _Janitor(threading.Thread):
    """Copies the batches no event loop will, and checkpoints the WAL, off the loops' path.

    The event loops copy their own batches (`SQLiteStore._flush_on_loop`). Left for this
    thread: batches written outside an event loop, batches of a loop that closed before
    its copy came, batches a loop could not copy (the database was locked), all once
    they have waited `JANITOR_S`, and the WAL's checkpoints. It sleeps while nothing
    waits, and wakes about twice a second while runs are busy: rarely enough that it
    does not cost their event loop the GIL hand-offs a per-commit thread did.
    """

    def __init__(self, store: _Writer) -> None:
        super().__init__(name=f"loopwise-sqlite-janitor:{store.path.name}", daemon=True)
        self.store = store

    def run(self) -> None:
        store = self.store
        cond = store._cond
        checkpointer: sqlite3.Connection | None = None
        try:
            while True:
                with cond:
                    while not store._pending and not store._stopping and not store._checkpoint_due:
                        store._janitor_idle = True
                        cond.wait()
                        store._janitor_idle = False
                    if store._stopping:
                        return  # `close` copies what is left
                    checkpoint = store._checkpoint_due
                    store._checkpoint_due = False
                    wait = 0.0
                    if store._pending:
                        # A loop's copy is due within GATHER_S: leave it that long, else ours.
                        patience = JANITOR_S if store._loop_flush_due() else GATHER_S
                        wait = store._pending_since + patience - time.monotonic()
                if checkpoint:
                    try:
                        checkpointer = checkpointer or _connect(store.path)
                        checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error as exc:  # another process's checkpoint, say: the next one
                        _log.debug("WAL checkpoint of %s skipped: %s", store.path, exc)
                if wait > 0:
                    with cond:
                        if not store._stopping:
                            cond.wait(wait)
                    continue
                if store._pending:
                    store._flush(blocking=True)
        finally:
            if checkpointer is not None:
                checkpointer.close()


def _copy(conn: sqlite3.Connection, path: Path, items: list, refused: set[str], writer: str) -> None:
    """Put journaled batches into SQLite, in one transaction (raises `sqlite3.Error` if it cannot).

    A run's consecutive batches become one row (`chunk_rows`). A batch that breaks a
    constraint (its run id taken by another process's run: its first row's key is) is
    kept out, with an error logged, and so are the later batches of its run (`refused`,
    run ids, kept by the caller): they would land beside the other run's rows. The
    other batches go in.
    """
    batches = [(meta, blob) for _, meta, blob in items if meta[0] not in refused]
    try:
        _insert(conn, chunk_rows(batches), writer)
        return
    except sqlite3.IntegrityError:
        pass
    for batch in batches:
        run_id = batch[0][0]
        if run_id in refused:
            continue
        try:
            _insert(conn, chunk_rows([batch]), writer)
        except sqlite3.IntegrityError as exc:
            refused.add(run_id)
            _log.error("the event log %s refused %d events of run %s (%s: %s); they and the run's later "
                       "events are dropped (is another process running a run with the same id?)",
                       path, batch[0][3] - batch[0][1] + 1, run_id, type(exc).__name__, exc)


def _insert(conn: sqlite3.Connection, rows: list[list], writer: str) -> None:
    """One transaction of `chunk_rows` written by `writer`; a statement's worth at a time made into text and bound.

    Many rows per INSERT, not `executemany` (one statement step per row, and sqlite3
    lets go of the GIL at each). The rows' text exists for one statement at a time: a
    copy of a thousand runs' batches, or of a backlog after the database was locked,
    does not hold all of it at once. ``OR FAIL``, not the default ``ABORT``: no
    statement journal (a temporary file SQLite otherwise writes every changed page to
    first); a failed statement rolls the whole transaction back here anyway.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        values: list = []
        n = size = 0
        for run_id, seq, last_seq, ts, last_ts, last_kind, blobs in rows:
            data = json_array(blobs)
            values += (run_id, seq, last_seq, ts, last_ts, last_kind, data, writer)
            n += 1
            size += len(data)
            if n >= _ROWS_PER_INSERT or size >= _BYTES_PER_INSERT:
                conn.execute(_INSERT_ROWS + ",".join([_ROW_PARAMS] * n), values)
                values = []
                n = size = 0
        if n:
            conn.execute(_INSERT_ROWS + ",".join([_ROW_PARAMS] * n), values)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


_INSERT_ROWS = ("INSERT OR FAIL INTO event_chunks (run_id, seq, last_seq, ts, last_ts, last_kind, data, writer) "
                "VALUES ")
_ROW_PARAMS = "(?,?,?,?,?,?,?,?)"
# Rows, and characters of events, per INSERT statement (8 parameters a row; SQLite
# allows 32,766 a statement): few statements per commit, and a bounded amount of text
# alive at once.
_ROWS_PER_INSERT = 500
_BYTES_PER_INSERT = 256 * 1024


def _consecutive(events: list[Event]) -> list[list[Event]]:
    """`events` cut where the next is not its run's next."""
    parts: list[list[Event]] = []
    for event in events:
        if parts and (prev := parts[-1][-1]).run_id == event.run_id and prev.seq + 1 == event.seq:
            parts[-1].append(event)
        else:
            parts.append([event])
    return parts


def _conditions() -> tuple[threading.Condition, threading.Condition]:
    lock = threading.Lock()
    return threading.Condition(lock), threading.Condition(lock)


class _Writer:
    """`SQLiteStore`'s write path (a part of the class: the state is set in its `__init__`)."""

    path: Path
    _cond: threading.Condition
    _copied: threading.Condition
    _closed: bool | str
    _writer: str
    _segment: Segment | None
    _segments: list[Segment]
    _serial: int
    _pending: list[tuple[Segment, tuple, bytes]]
    _pending_since: float
    _queued: int
    _ingested: int
    _flush_loop: asyncio.AbstractEventLoop | None
    _copy_lock: threading.Lock
    _conn: sqlite3.Connection | None
    _busy_ms: int
    _copied_bytes: int
    _checkpoint_due: bool
    _refused: set[str]
    _janitor: _Janitor | None
    _janitor_idle: bool
    _stopping: bool

    def write(self, events: list[Event]) -> None:
        """Journal `events` (durable when this returns); they are copied into SQLite within `GATHER_S`."""
        if not events:
            return None
        first, last = events[0], events[-1]
        if first.run_id != last.run_id or last.seq - first.seq != len(events) - 1:
            # Not one run's consecutive events (a run writes nothing else): a batch each.
            for part in _consecutive(events):
                self.write(part)
            return None
        # What the copy needs besides the JSON, which it takes from the journaled bytes
        # (no second copy of the events waits in memory for it).
        meta = (first.run_id, first.seq, first.ts, last.seq, last.ts, last.kind)
        blob = dump_lines(events)
        with self._cond:
            if self._closed:
                raise UserError(f"the store {self.path} is {'closed' if self._closed is True else self._closed}")
            segment = self._segment
            if segment is None:
                segment = self._open_segment()
            try:
                segment.append(blob)
            except OSError as exc:  # a full disk: nothing of the batch is in the journal (see `append`)
                raise StoreError(f"cannot append to the loopwise journal {segment.path} of the database "
                                 f"{self.path}: {exc}") from None
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append((segment, meta, blob))
            self._queued += 1
            if segment.size >= SEGMENT_MAX:
                segment.sealed = True
                self._segment = None
            if self._janitor_idle:
                self._cond.notify()
            elif self._janitor is None:
                self._janitor = _Janitor(self)
                self._janitor.start()
            flush_loop = self._flush_loop
            if flush_loop is None or flush_loop.is_closed():  # (closed before its copy came)
                self._schedule_flush()
        return None

    def _schedule_flush(self) -> None:
        """(Under the lock.) Copy in `GATHER_S`, on the running event loop (none: the janitor will)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_loop = loop
        loop.call_later(GATHER_S, self._flush_on_loop, loop)

    def _loop_flush_due(self) -> bool:
        """(Under the lock.) Whether an event loop will copy the pending batches soon."""
        loop = self._flush_loop
        if loop is None:
            return False
        if loop.is_closed():  # it closed before its copy came
            self._flush_loop = None
            return False
        return True

    def _flush_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._cond:
            if self._flush_loop is loop:
                self._flush_loop = None
        if self._closed:
            return
        if not self._flush(blocking=False, limit=FLUSH_MAX_BATCHES):
            return  # locked: the next write schedules another copy, or the janitor makes it
        with self._cond:
            if self._pending and self._flush_loop is None and not self._closed:
                self._flush_loop = loop  # a backlog: the next part at the loop's next turn
                loop.call_soon(self._flush_on_loop, loop)

    def _flush(self, *, blocking: bool, limit: int | None = None, timeout: float | None = None) -> bool:
        """Copy pending batches (at most `limit`) into SQLite; False if they could not be, yet.

        `blocking`: wait for the database's busy timeout and retry failures (with a
        logged error and a growing pause) until `timeout`, or while the store is open.
        Else (on an event loop) never wait: the database is locked, or this store's
        connection is busy on another thread, and False says so at once.
        """
        if not self._copy_lock.acquire(blocking, -1 if timeout is None or not blocking else timeout):
            return False
        try:
            with self._cond:
                if limit is not None and len(self._pending) > limit:
                    items, self._pending = self._pending[:limit], self._pending[limit:]
                else:
                    items, self._pending = self._pending, []
                since, self._pending_since = self._pending_since, time.monotonic()
            if not items:
                return True
            try:
                ok = self._copy_items(items, blocking, timeout)
            except BaseException:
                ok = False
                raise
            finally:
                with self._cond:
                    if ok:
                        self._ingested += len(items)
                        for segment, _, _ in items:
                            segment.ingested += 1
                        self._tidy_segments()
                        self._copied_bytes += sum(len(blob) for _, _, blob in items)
                        if self._copied_bytes >= CHECKPOINT_BYTES:
                            self._copied_bytes = 0
                            self._checkpoint_due = True
                            if self._janitor_idle:
                                self._cond.notify()
                    else:  # back in front, in journal order
                        self._pending[:0] = items
                        self._pending_since = since
                    self._copied.notify_all()
            return ok
        finally:
            self._copy_lock.release()

    def _copy_items(self, items: list, blocking: bool, timeout: float | None) -> bool:
        """(Holding `_copy_lock`.) `_copy`, on this store's connection, with retries when `blocking`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                conn = self._connection(BUSY_TIMEOUT_MS if blocking else 0)
                _copy(conn, self.path, items, self._refused, self._writer)
                return True
            except sqlite3.Error as exc:  # locked (past the busy timeout), disk full, I/O
                if not blocking:
                    if not isinstance(exc, sqlite3.OperationalError) or "locked" not in str(exc):
                        _log.error("the event log %s cannot be written (%s: %s); retrying (the events are "
                                   "kept in its journal)", self.path, type(exc).__name__, exc)
                    return False
                if self._stopping or (deadline is not None and time.monotonic() + delay > deadline):
                    _log.error("the event log %s cannot be written (%s: %s); the events are kept in its "
                               "journal", self.path, type(exc).__name__, exc)
                    return False
                _log.error("the event log %s cannot be written (%s: %s); retrying in %.1f s (the events "
                           "are kept in its journal)", self.path, type(exc).__name__, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _connection(self, busy_ms: int) -> sqlite3.Connection:
        """(Holding `_copy_lock`.) The copying connection, with this busy timeout."""
        conn = self._conn
        if conn is None:
            # No statement cache: each copy's INSERT has its own number of rows, and a cache
            # of compiled statements of hundreds of rows each would hold megabytes for nothing.
            conn = _connect(self.path, check_same_thread=False, cached_statements=0)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the janitor checkpoints, off the loop
            self._conn = conn
        if busy_ms != self._busy_ms:
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._busy_ms = busy_ms
        return conn

    def _open_segment(self) -> Segment:
        self._serial += 1
        path = segment_path(self.path, self._writer, self._serial)
        try:
            segment = Segment(path)
        except OSError as exc:
            raise UserError(f"cannot write the loopwise journal {path}: {exc}") from None
        self._segment = segment
        self._segments.append(segment)
        return segment

    def _tidy_segments(self) -> None:
        """(Under the lock.) Delete sealed segments that are all in SQLite; empty the live one."""
        keep = []
        for segment in self._segments:
            # (A sealed one stays while no live one exists: the process keeps a file locked,
            # by which others tell it lives, see `written_elsewhere`.)
            if segment.drained() and (self._stopping or (segment.sealed and self._segment is not None)):
                segment.remove()
            else:
                keep.append(segment)
                if segment.drained() and segment.size >= TRUNCATE_AT:
                    segment.truncate()
        self._segments = keep
        if self._segment is not None and self._segment.fd < 0:
            self._segment = None

    def _sync(self, timeout: float = 30.0) -> None:
        """Copy what this process journaled so far into SQLite (so a read sees its own writes)."""
        with self._cond:
            target = self._queued
            if self._ingested >= target:
                return
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(f"the event log {self.path} has not taken this process's last events in "
                                f"{timeout:g} s (is the database locked or failing? see the log); they are "
                                "safe in its journal")
            self._flush(blocking=True, timeout=left)
            with self._cond:
                # Another thread may be copying our batches: give it a moment, then look again.
                if self._copied.wait_for(lambda: self._ingested >= target, min(0.05, left)):
                    return
