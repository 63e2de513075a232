"""The SQLite event store: the default, durable across process crashes.

Writes go through one writer thread per store. The loop hands it a batch (one per
iteration) and awaits a future; the thread commits every batch waiting in its queue
in one transaction (group commit: 1,000 concurrent runs cost a few commits, not
1,000) and resolves the futures. sqlite3 releases the GIL while it does I/O.

The database runs in WAL mode with ``synchronous=NORMAL``: a commit survives a
crash of the process (the loop only moves on once its batch is committed), but
not a power loss or an OS crash, which may lose the last commits.
Several processes may share one file; a busy timeout makes them wait their turn.

`prune` deletes whole runs in short transactions of their own (a few hundred runs
each), so the writers of running agents wait milliseconds, not the whole prune.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import queue
import sqlite3
import threading
import weakref
from collections.abc import Awaitable, Collection
from pathlib import Path

from ._errors import UserError
from ._events import Event, RunFinished, RunStarted, dump_events, load_event
from ._store import EventStore, PruneResult, RunSummary, check_prune_args, running_here

__all__ = ["SQLiteStore", "default_db_path"]

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
_MAX_BATCH = 1024
# Checkpoint the WAL into the database every this many pages (SQLite's default is
# 1,000). A run's commits rewrite the same few index pages over and over; a longer
# WAL copies each of them back once per checkpoint instead of four times, which
# takes about a sixth off the writer's CPU per run. The price: the -wal file grows
# to ~16 MB (4 KiB pages) before it is reused, and a checkpoint, when it comes,
# holds that commit up longer (tens of ms, four times rarer).
WAL_AUTOCHECKPOINT_PAGES = 4000

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
}


def default_db_path() -> Path:
    """`$LOOPWISE_DB`, or `.loopwise/loopwise.db` in the current directory."""
    return Path(os.environ.get("LOOPWISE_DB") or Path(".loopwise") / "loopwise.db")


def _connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=check_same_thread
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _not_ours(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} is not a loopwise database ({why}); pass --db / set $LOOPWISE_DB to a loopwise "
        "database or to a new file path"
    )


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise _not_ours(path, str(exc)) from None
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{path} was written by a newer loopwise (schema {version}, this one knows {SCHEMA_VERSION}); "
            "upgrade loopwise to read it"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
        if version == 0:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if tables:
                raise _not_ours(path, f"it holds other tables: {', '.join(sorted(tables)[:5])}")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class _Writer(threading.Thread):
    """Commits queued batches, many at a time, and resolves their futures."""

    def __init__(self, path: Path, q: queue.SimpleQueue) -> None:
        super().__init__(name=f"loopwise-sqlite-writer:{path.name}", daemon=True)
        self.path = path
        self.queue = q

    def run(self) -> None:
        conn = _connect(self.path)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        get, get_nowait = self.queue.get, self.queue.get_nowait
        try:
            while True:
                item = get()
                if item is None:
                    return
                batch = [item]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        nxt = get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list) -> None:
        # Serialize outside the transaction; an event that cannot be serialized fails
        # its own batch only.
        rows: list[list[tuple] | None] = []
        errors: list[BaseException | None] = []
        for events, _, _ in batch:
            try:
                rows.append(_rows(events))
                errors.append(None)
            except Exception as exc:
                rows.append(None)
                errors.append(exc)
        good = [r for r in rows if r is not None]
        if good:
            try:
                self._insert(conn, good[0] if len(good) == 1 else [row for r in good for row in r])
            except Exception:
                # Isolate the failing batch (say, a duplicate run id) from the others.
                for i, r in enumerate(rows):
                    if r is not None:
                        try:
                            self._insert(conn, r)
                        except Exception as exc:
                            errors[i] = exc
        by_loop: dict[object, list] = {}
        for (_, loop, fut), err in zip(batch, errors):
            if fut is None:
                if isinstance(loop, threading.Event):
                    loop.set()
                continue
            by_loop.setdefault(loop, []).append((fut, err))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)  # type: ignore[attr-defined]
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                pass

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[tuple]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# Tables beside the event log keyed by a `run_id` column: `prune` deletes a pruned run's
# rows from each one that exists (the control plane's leases and kill requests).
_PRUNE_TABLES: tuple[str, ...] = ("lw_leases", "lw_kills")
# Runs deleted per transaction: each run goes whole, and writers wait at most one chunk.
_PRUNE_CHUNK = 200

# Every run whose last event is before the cutoff: its id, its last event's kind and
# stop reason, its tags (JSON), and its number of events (seqs have no gaps).
_PRUNE_CANDIDATES = """
    SELECT s.run_id, l.kind, json_extract(l.data, '$.stop_reason'), json_extract(s.data, '$.tags'), l.seq + 1
      FROM events s
      JOIN events l ON l.run_id = s.run_id
                   AND l.seq = (SELECT MAX(m.seq) FROM events m WHERE m.run_id = s.run_id)
     WHERE s.kind = 'run_started' AND s.seq = 0 AND l.ts < ?
"""

_INSERT = "INSERT INTO events (run_id, seq, kind, ts, data) VALUES (?, ?, ?, ?, ?)"


def _rows(events: list[Event]) -> list[tuple]:
    """The rows of `events`: the columns the queries use, and the event as JSON text."""
    return [(e.run_id, e.seq, e.kind, e.ts, data.decode()) for e, data in zip(events, dump_events(events))]


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _resolve(items: list) -> None:
    for fut, err in items:
        if fut.done():
            continue
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)


_open_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for store in list(_open_stores):
        store.close()


class SQLiteStore(EventStore):
    """Events in a SQLite file (WAL mode), committed by a writer thread.

    Args:
        path: The database file; created (with its directory) if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory; give SQLiteStore a file path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cannot open the loopwise database {self.path}: {exc}") from None
        try:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.DatabaseError as exc:
                raise _not_ours(self.path, str(exc)) from None
            _migrate(conn, self.path)
        finally:
            conn.close()
        self._reader = _connect(self.path, check_same_thread=False)
        self._read_lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: _Writer | None = None
        self._writer_lock = threading.Lock()
        self._closed = False
        _open_stores.add(self)

    def describe(self) -> str:
        return str(self.path)

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._closed:
                raise UserError(f"the store {self.path} is closed")
            if self._writer is None:
                self._writer = _Writer(self.path, self._queue)
                self._writer.start()

    def write(self, events: list[Event]) -> Awaitable[None] | None:
        if self._writer is None:
            self._start_writer()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            done = threading.Event()
            self._queue.put((events, done, None))
            done.wait()
            return None
        fut = loop.create_future()
        self._queue.put((events, loop, fut))
        return fut

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._read_lock:
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise UserError(f"cannot read the loopwise database {self.path}: {exc}") from None

    def load(self, run_id: str) -> list[Event]:
        rows = self._read("SELECT data FROM events WHERE run_id = ? ORDER BY seq", (run_id,))
        if not rows:
            raise self._unknown(run_id)
        return [load_event(r[0]) for r in rows]

    def has_run(self, run_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM events WHERE run_id = ? LIMIT 1", (run_id,)))

    def list_runs(self, *, limit: int = 20) -> list[RunSummary]:
        rows = self._read(
            """
            SELECT s.data,
                   (SELECT f.data FROM events f
                     WHERE f.run_id = s.run_id AND f.kind = 'run_finished'
                     ORDER BY f.seq DESC LIMIT 1)
              FROM events s
             WHERE s.kind = 'run_started'
             ORDER BY s.ts DESC
             LIMIT ?
            """,
            (limit,),
        )
        summaries = []
        for started_json, finished_json in rows:
            started = load_event(started_json)
            finished = load_event(finished_json) if finished_json else None
            assert isinstance(started, RunStarted)
            assert finished is None or isinstance(finished, RunFinished)
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
        from ._control import _lease

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
            cur = conn.executemany("DELETE FROM events WHERE run_id = ?", [(i,) for i in still])
            n = cur.rowcount
            for table in _PRUNE_TABLES:
                if _table_exists(conn, table):
                    conn.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(i,) for i in still])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return still, n

    def close(self) -> None:
        """Commit what is queued, stop the writer thread and close the connections."""
        with self._writer_lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout=10)
        with self._read_lock:
            self._reader.close()
        _open_stores.discard(self)
