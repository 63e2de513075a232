"""The SQLite event log's schema: its versions, their migrations, and refusing a file that is not ours.

The schema is versioned with SQLite's ``user_version``; `_migrate` brings an older
database to `SCHEMA_VERSION` on open, in one transaction. `_check_ours` refuses, read
only and before anything writes to it, a file that is not a loopwise database.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .._errors import UserError

__all__ = ["BUSY_TIMEOUT_MS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 5
BUSY_TIMEOUT_MS = 10_000

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


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None
