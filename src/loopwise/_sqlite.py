"""The SQLite event store: the default, durable across process crashes.

A batch of events (one per step that must be durable: before a model call, before
an iteration's tools start, at the end) is appended to this process's journal
(`_journal`) with one `write(2)` on the caller's thread: once that returns, the
events survive a crash of the process, and the run moves on. Every `GATHER_S` the
journaled batches are copied into SQLite, all of them in one transaction (group
commit: a sequential caller's few dozen runs, or 1,000 concurrent runs' hundreds of
batches, cost one commit, not one per batch; and a row per run's stretch of
consecutive events, not per event: see `_journal.chunk_rows`), by a callback on the event loop that
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
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Collection
from pathlib import Path

from ._control_local import LocalControl, _lease, local_control
from ._errors import StoreError, UserError, store_error
from ._events import Event, RunFinished, RunStarted, dump_lines, load_event, load_events
from ._events import first_error as _first_error
from ._journal import (
    SEGMENT_MAX,
    TRUNCATE_AT,
    Segment,
    chunk_rows,
    json_array,
    journal_events,
    journal_files,
    live_journal_mentions,
    recover,
    segment_path,
    writer_lives,
)
from ._sqlite_tail import tail as _tail
from ._store import (
    EventStore,
    PruneResult,
    RunPage,
    RunSummary,
    check_list_args,
    check_prune_args,
    encode_cursor,
    running_here,
)

__all__ = ["SQLiteStore", "default_db_path", "default_store"]

_log = logging.getLogger("loopwise")

SCHEMA_VERSION = 5
BUSY_TIMEOUT_MS = 10_000
RECOVER_BUSY_TIMEOUT_MS = 250
# How long batches gather before they are copied into SQLite: more runs per transaction
# (SQLite's per-commit cost is shared), at the price of other processes seeing new
# events this much later. Durability does not wait for it (see `_journal`).
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

# Migrations from version N-1 to N, applied in order inside one transaction.
_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE events (
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            ts REAL NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID;
        CREATE INDEX events_kind_ts ON events (kind, ts);
    """,
    # An index over every event's kind dirtied one index page per kind on each commit;
    # only `list_runs` needs one, and only over run_started events.
    2: """
        DROP INDEX IF EXISTS events_kind_ts;
        CREATE INDEX events_started_ts ON events (ts) WHERE kind = 'run_started';
    """,
    # A rowid table: a run's rows are appended to the table's last pages instead of
    # being spread over the random places its run id sorts to (each a page written to
    # the WAL per commit, and again at the checkpoint). Measured with 10 runs a commit:
    # SQLite's CPU per run ~175 -> ~75 us, the file 11 -> 7.4 KB per run.
    3: """
        CREATE TABLE events_v3 (
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            ts REAL NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        );
        INSERT INTO events_v3 (run_id, seq, kind, ts, data) SELECT run_id, seq, kind, ts, data FROM events;
        DROP TABLE events;
        ALTER TABLE events_v3 RENAME TO events;
        CREATE INDEX events_started_ts ON events (ts) WHERE kind = 'run_started';
    """,
    # A row per chunk of a run's consecutive events (what one copy has of the run: all of
    # a short run, an iteration's worth of a long one), not per event: SQLite's work per
    # row is most of a copy's. Measured with (a)'s runs, 60 a commit: ~62 us of CPU per
    # run as 17 rows, ~21 us as one. The `events` view keeps the old shape for queries.
    4: """
        ALTER TABLE events RENAME TO events_v3;
        CREATE TABLE event_chunks (
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            ts REAL NOT NULL,
            last_ts REAL NOT NULL,
            last_kind TEXT NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        );
        INSERT INTO event_chunks (run_id, seq, last_seq, ts, last_ts, last_kind, data)
            SELECT run_id, seq, seq, ts, ts, kind, '[' || data || ']' FROM events_v3 ORDER BY rowid;
        DROP TABLE events_v3;
        CREATE INDEX event_chunks_started ON event_chunks (ts) WHERE seq = 0;
        CREATE VIEW events (run_id, seq, kind, ts, data) AS
            SELECT c.run_id, c.seq + e.key, json_extract(e.value, '$.kind'), json_extract(e.value, '$.ts'), e.value
              FROM event_chunks c, json_each(c.data) e;
    """,
    # Which process wrote a row (its journal's ``<pid>-<token>``, NULL before this
    # version): a resume elsewhere asks whether that process still lives (its journal's
    # lock), when the run has no end and no lease yet and its journal has been emptied.
    5: """
        ALTER TABLE event_chunks ADD COLUMN writer TEXT;
    """,
}


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


def _connect(path: Path, *, check_same_thread: bool = True, cached_statements: int = 128) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=check_same_thread,
        cached_statements=cached_statements,
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _not_ours(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} is not a loopwise database ({why}); pass --db / set $LOOPWISE_DB to a loopwise "
        "database or to a new file path"
    )


# The table that holds the events, by schema version (a database whose user_version names
# a schema but lacks its table is another application's that uses user_version too).
_EVENTS_TABLE = {1: "events", 2: "events", 3: "events", 4: "event_chunks", 5: "event_chunks"}


def _foreign(version: int, names: list[str]) -> str | None:
    """Why a database of this user_version and these schema objects is not ours (None if it is)."""
    if version == 0:
        return f"it holds other tables: {', '.join(sorted(names)[:5])}" if names else None
    table = _EVENTS_TABLE.get(min(version, SCHEMA_VERSION))
    if table not in names:
        shown = ", ".join(sorted(names)[:5]) or "nothing"
        return f"its user_version is {version} but it has no {table} table; it holds {shown}"
    return None


def _check_ours(path: Path) -> None:
    """Refuse a file that is not a loopwise database before anything writes to it.

    Read only, through SQLite (without this, `PRAGMA journal_mode = WAL` would rewrite
    another application's database, and SQLite would make journal files beside it,
    before the schema says it is not ours). Never with a plain `open()`: closing any
    descriptor of the file drops every POSIX lock this process holds on it, the locks
    of its other SQLite connections included. A missing or empty file passes: it
    becomes a new database.

    With no -wal file beside it, the database is all in the main file, read
    `immutable` (no locks, no files made: a read-only connection to a WAL-mode file
    would leave -wal and -shm files behind); else, or if that read fails (a writer
    changed the file meanwhile), over a read-only connection.
    """
    try:
        if path.stat().st_size == 0:
            return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot open the loopwise database {path}: {exc}") from None
    uri = path.absolute().as_uri()
    modes = ["mode=ro"]
    if not path.with_name(path.name + "-wal").exists():
        modes.insert(0, "immutable=1")
    for mode in modes:
        try:
            conn = sqlite3.connect(f"{uri}?{mode}", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
            finally:
                conn.close()
            break
        except sqlite3.Error as exc:
            if mode == modes[-1]:
                raise _not_ours(path, str(exc)) from None
    why = _foreign(version, names)
    if why:
        raise _not_ours(path, why)
    if version > SCHEMA_VERSION:
        raise _newer(path, version)


def _newer(path: Path, version: int) -> UserError:
    return UserError(
        f"{path} was written by a newer loopwise (schema {version}, this one knows {SCHEMA_VERSION}); "
        "upgrade loopwise to read it"
    )


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the database to `SCHEMA_VERSION` (`_check_ours` has passed it)."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise _not_ours(path, str(exc)) from None
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise _newer(path, version)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
        why = _foreign(version, [r[0] for r in conn.execute("SELECT name FROM sqlite_master")])
        if why:
            raise _not_ours(path, why)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class _Janitor(threading.Thread):
    """Copies the batches no event loop will, and checkpoints the WAL, off the loops' path.

    The event loops copy their own batches (`SQLiteStore._flush_on_loop`). Left for this
    thread: batches written outside an event loop, batches of a loop that closed before
    its copy came, batches a loop could not copy (the database was locked), all once
    they have waited `JANITOR_S`, and the WAL's checkpoints. It sleeps while nothing
    waits, and wakes about twice a second while runs are busy: rarely enough that it
    does not cost their event loop the GIL hand-offs a per-commit thread did.
    """

    def __init__(self, store: SQLiteStore) -> None:
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


# Tables beside the event log keyed by a `run_id` column: `prune` deletes a pruned run's
# rows from each one that exists (the control plane's leases and kill requests).
_PRUNE_TABLES: tuple[str, ...] = ("lw_leases", "lw_kills")
# Runs deleted per transaction: each run goes whole, and writers wait at most one chunk.
_PRUNE_CHUNK = 200

# Every run whose last event is before the cutoff: its id, its last event's kind and
# stop reason, its tags (JSON), and its number of events (seqs have no gaps).
# The latest runs: each one's first event and its latest end (an end is always the last
# event of its row), by the partial index over first rows, newest first (start time, then
# run id: `list_runs`'s cursor names a place in that order). A row that is not JSON (an
# edit) comes back whole, for `list_runs` to leave out: SQLite's JSON functions would
# fail the whole query on it (hence the CASEs, which SQLite evaluates lazily).
# `{where}`: conditions on the first row `s`; `{having}`: on the end `finished`.
_LIST_RUNS = """
    SELECT started, finished, ts, run_id FROM (
        SELECT CASE WHEN json_valid(s.data) THEN json_extract(s.data, '$[0]') ELSE s.data END AS started,
               (SELECT CASE WHEN json_valid(f.data) THEN json_extract(f.data, '$[#-1]') ELSE f.data END
                  FROM event_chunks f
                 WHERE f.run_id = s.run_id AND f.last_kind = 'run_finished'
                 ORDER BY f.seq DESC LIMIT 1) AS finished,
               s.ts AS ts, s.run_id AS run_id
          FROM event_chunks s
         WHERE s.seq = 0{where}
    )
     WHERE 1{having}
     ORDER BY ts DESC, run_id DESC
     LIMIT ?
"""
_LIST_SINCE = " AND s.ts >= ?"
_LIST_BEFORE = " AND s.ts <= ? AND (s.ts < ? OR s.run_id < ?)"
_LIST_TAG = (" AND CASE WHEN json_valid(s.data) THEN EXISTS (SELECT 1 FROM json_each(s.data, '$[0].tags') "
             "WHERE value = ?) ELSE 0 END")
_LIST_RUNNING = " AND finished IS NULL"
_LIST_FINISHED = " AND finished IS NOT NULL"
_LIST_STOP_REASON = " AND CASE WHEN json_valid(finished) THEN json_extract(finished, '$.stop_reason') END = ?"

_PRUNE_CANDIDATES = """
    SELECT s.run_id, l.last_kind,
           CASE WHEN json_valid(l.data) THEN json_extract(l.data, '$[#-1].stop_reason') END,
           CASE WHEN json_valid(s.data) THEN json_extract(s.data, '$[0].tags') END,
           l.last_seq + 1
      FROM event_chunks s
      JOIN event_chunks l ON l.run_id = s.run_id
                         AND l.seq = (SELECT MAX(m.seq) FROM event_chunks m WHERE m.run_id = s.run_id)
     WHERE s.seq = 0 AND l.last_ts < ?
"""


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


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


_open_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for store in list(_open_stores):
        store.close()


class SQLiteStore(EventStore):
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

    # -- writing -----------------------------------------------------------------------

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

    # -- reading -----------------------------------------------------------------------

    def _read(self, sql: str, args: tuple = (), *, sync: bool = True) -> list[tuple]:
        """A query of the database, once this process's journaled events are in it (unless not `sync`)."""
        if self._closed is _FORKED:
            raise UserError(f"the store {self.path} is {_FORKED}")
        if sync:
            self._sync()
        with self._read_lock:
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise UserError(f"cannot read the loopwise database {self.path}: {exc}") from None

    def _journaled(self, run_id: str) -> dict[int, bytes]:
        """`run_id`'s events in the journals (this process's and other live ones'), by seq.

        Read before the database: a line gone from a journal meanwhile (emptied once in
        SQLite) is then in the database when it is read. So `load` and `has_run` never
        wait for a copy (this process's may be held up by another's long transaction).
        """
        return {event["seq"]: line for event, line in journal_events(self.path, run_id)
                if isinstance(event.get("seq"), int)}

    def load(self, run_id: str) -> list[Event]:
        """All of a run's events: a crashed process's journal is recovered first, live ones are read too."""
        self._recover()
        journaled = self._journaled(run_id)
        rows = self._read("SELECT data FROM event_chunks WHERE run_id = ? ORDER BY seq", (run_id,), sync=False)
        by_seq: dict[int, Event] = {}
        try:
            for (data,) in rows:
                for event in load_events(data):
                    by_seq.setdefault(event.seq, event)  # (rows never overlap; if they did, one event a seq)
            for seq, line in journaled.items():
                if seq not in by_seq:
                    by_seq[seq] = load_event(line)
        except ValueError as exc:  # pydantic's ValidationError, or JSON that is not
            raise UserError(f"run {run_id} in {self.path} holds an event this loopwise cannot read "
                            f"({_first_error(exc)}): written by a newer loopwise, or edited") from None
        if not by_seq:
            raise self._unknown(run_id)
        return [by_seq[seq] for seq in sorted(by_seq)]

    def tail(self, run_id: str, after_seq: int = -1) -> AsyncIterator[Event]:
        """`EventStore.tail`: follows a run written by any process on this machine (`_sqlite_tail`)."""
        return _tail(self, run_id, after_seq)

    def written_elsewhere(self, run_id: str) -> bool:
        """Whether another live process wrote `run_id`'s latest events.

        Its journal holds them, or (once they are in SQLite: a busy process empties its
        journal every few milliseconds) the run's latest row names it as the writer and
        its journal files are still locked. A process that has journaled anything keeps
        one until its store is closed.
        """
        if live_journal_mentions(self.path, run_id, self._own_paths()):
            return True
        rows = self._read("SELECT writer FROM event_chunks WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,),
                          sync=False)
        writer = rows[0][0] if rows else None
        if writer is None or writer in {store._writer for store in list(_open_stores)}:
            return False  # (unknown: written before schema 5; or by this process, which knows its runs)
        return writer_lives(self.path, writer)

    def has_run(self, run_id: str) -> bool:
        query = "SELECT 1 FROM event_chunks WHERE run_id = ? LIMIT 1"
        if self._read(query, (run_id,), sync=False):
            return True
        self._recover()
        return bool(self._journaled(run_id)) or bool(self._read(query, (run_id,), sync=False))

    def list_runs(self, *, status: str | None = None, stop_reason: str | None = None, tag: str | None = None,
                  since: float | None = None, limit: int = 20, cursor: str | None = None) -> RunPage:
        q = check_list_args(status, stop_reason, tag, since, limit, cursor)
        where, having, args = "", "", []
        if q.since is not None:
            where += _LIST_SINCE
            args.append(q.since)
        if q.before is not None:
            where += _LIST_BEFORE
            args += [q.before[0], q.before[0], q.before[1]]
        if q.tag is not None:
            where += _LIST_TAG
            args.append(q.tag)
        if q.status == "running":
            having += _LIST_RUNNING
        elif q.status == "finished" or q.stop_reason is not None:
            having += _LIST_FINISHED
        if q.stop_reason is not None:
            having += _LIST_STOP_REASON
            args.append(q.stop_reason)
        rows = self._read(_LIST_RUNS.format(where=where, having=having), (*args, q.limit + 1))
        page = RunPage(self._summaries(rows[:q.limit]))
        if len(rows) > q.limit:  # (from the rows, not the summaries: a row left out is passed all the same)
            page.next_cursor = encode_cursor(rows[q.limit - 1][2], rows[q.limit - 1][3])
        return page

    def _summaries(self, rows: list[tuple]) -> list[RunSummary]:
        summaries = []
        for started_json, finished_json, _, _ in rows:
            try:
                started = load_event(started_json)
                finished = load_event(finished_json) if finished_json else None
            except ValueError as exc:  # one unreadable run does not hide the others
                _log.warning("the event log %s holds a run this loopwise cannot read (%s); it is left out of "
                             "the list", self.path, _first_error(exc))
                continue
            if not isinstance(started, RunStarted) or not (finished is None or isinstance(finished, RunFinished)):
                _log.warning("the event log %s holds a run whose first or last event is not what it should be "
                             "(%s, %s); it is left out of the list", self.path, started.kind,
                             None if finished is None else finished.kind)
                continue
            summaries.append(RunSummary.from_events(started, finished))
        return summaries

    def prune(self, *, before: float, statuses: Collection[str] | None = None, tags: Collection[str] = (),
              dry_run: bool = False, vacuum: bool = False) -> PruneResult:
        """`EventStore.prune`; `vacuum` then gives the freed pages back to the file system.

        Runs are chosen, then deleted a chunk at a time, each chunk in one ``BEGIN
        IMMEDIATE`` transaction that checks its runs again under the write lock: a run
        resumed meanwhile (its last event no longer old, or no longer an end) stays.
        """
        cutoff, wanted, tag_set = check_prune_args(before, statuses, tags)
        self._recover()
        self._sync()
        conn = _connect(self.path)
        try:
            chosen, events, kept = self._prune_candidates(conn, cutoff, wanted, tag_set, None)
            if dry_run:
                return PruneResult(run_ids=tuple(chosen), events=events, dry_run=True, unfinished_kept=kept)
            deleted: list[str] = []
            deleted_events = 0
            for i in range(0, len(chosen), _PRUNE_CHUNK):
                ids, n = self._prune_chunk(conn, chosen[i:i + _PRUNE_CHUNK], cutoff, wanted, tag_set)
                deleted += ids
                deleted_events += n
            if _table_exists(conn, "lw_kills"):
                # Kills of a tag or of all runs (no run id): read by the watchers once, at once;
                # past the cutoff they are history of no run.
                conn.execute("DELETE FROM lw_kills WHERE run_id = '' AND ts < ?", (cutoff,))
            if vacuum:
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return PruneResult(run_ids=tuple(deleted), events=deleted_events, unfinished_kept=kept)
        except sqlite3.Error as exc:
            raise UserError(f"cannot prune the loopwise database {self.path}: {exc}") from None
        finally:
            conn.close()

    def _prune_candidates(self, conn: sqlite3.Connection, cutoff: float, wanted: frozenset[str],
                          tags: frozenset[str], among: list[str] | None) -> tuple[list[str], int, int]:
        sql, args = _PRUNE_CANDIDATES, (cutoff,)
        if among is not None:
            sql += " AND s.run_id IN (SELECT value FROM json_each(?))"
            args = (cutoff, json.dumps(among))  # type: ignore[assignment]
        rows = conn.execute(sql, args).fetchall()
        busy = running_here() | self._leased(conn, [r[0] for r in rows if r[1] != "run_finished"])
        chosen: list[str] = []
        events = kept = 0
        for run_id, last_kind, stop_reason, tags_json, n in rows:
            if run_id in busy:
                continue
            if tags and tags.isdisjoint(json.loads(tags_json or "[]")):
                continue
            status = stop_reason if last_kind == "run_finished" else "unfinished"
            if status not in wanted:
                kept += status == "unfinished"
                continue
            chosen.append(run_id)
            events += n
        return chosen, events, kept

    @staticmethod
    def _leased(conn: sqlite3.Connection, run_ids: list[str]) -> set[str]:
        """Of `run_ids` (runs without an end), those a live process holds a lease on."""
        if not run_ids or not _table_exists(conn, "lw_leases"):
            return set()
        rows = conn.execute(
            "SELECT run_id, owner, host, pid, tags, acquired, heartbeat FROM lw_leases "
            "WHERE run_id IN (SELECT value FROM json_each(?))", (json.dumps(run_ids),)
        ).fetchall()
        return {row[0] for row in rows if _lease(row).live()}

    def _prune_chunk(self, conn: sqlite3.Connection, ids: list[str], cutoff: float, wanted: frozenset[str],
                     tags: frozenset[str]) -> tuple[list[str], int]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            still, _, _ = self._prune_candidates(conn, cutoff, wanted, tags, ids)
            ids = json.dumps(still)
            n = conn.execute("SELECT COALESCE(SUM(last_seq - seq + 1), 0) FROM event_chunks "
                             "WHERE run_id IN (SELECT value FROM json_each(?))", (ids,)).fetchone()[0]
            conn.executemany("DELETE FROM event_chunks WHERE run_id = ?", [(i,) for i in still])
            for table in _PRUNE_TABLES:
                if _table_exists(conn, table):
                    conn.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(i,) for i in still])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return still, n

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


_FORKED = "a store of the parent process (opened before os.fork()); open a new SQLiteStore in the child"


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
