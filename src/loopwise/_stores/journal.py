"""The SQLite store's journal: events are durable once written here, before SQLite has them.

A run must not move on until its events would survive a crash of its process (before
a model call, before its tools run). Waiting for a SQLite commit on another thread
costs the event loop a cross-thread hand-off each time (~45 µs of kernel time on a
VM, six times a run); committing on the event loop would cost it the commit. Instead
the loop appends the events' JSON to a file of its own process, the journal, with one
`write(2)`: once it returns, the bytes are in the operating system's page cache and
survive the process (exactly what SQLite's WAL with ``synchronous=NORMAL`` promises:
a process crash loses nothing, a power loss or an OS crash may lose the last writes).
The store then copies the events into SQLite, many runs' batches per transaction,
every few milliseconds (`_stores.sqlite`).

Files: ``<db>-lwj-<pid>-<token>-<n>`` beside the database, one line of JSON an event.
The process holds an exclusive `flock` on each of its segments for as long as it may
write to it, so "can I lock it?" tells a dead owner's journal from a live one's
without trusting pids. A segment is emptied (truncated) once everything in it is in
SQLite, or sealed when it grows past `SEGMENT_MAX` and deleted once it is.

Readers: `recover` copies the journals of dead processes into SQLite (idempotent: only
the events after a run's last one in SQLite, in a transaction that holds the write
lock, so two processes recovering at once, or a crash between the copy and the
unlink, do no harm). `journal_events` reads the journals of live processes, whose
last events may not be in SQLite yet.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "Segment",
    "chunk_rows",
    "journal_events",
    "journal_files",
    "json_array",
    "live_journal_mentions",
    "recover",
    "segment_path",
    "writer_lives",
]

_log = logging.getLogger("loopwise")

#: A segment past this size is sealed and a new one started (it is deleted once in SQLite).
SEGMENT_MAX = 4 * 1024 * 1024
#: The live segment is emptied once all of it is in SQLite and it is at least this big.
TRUNCATE_AT = 256 * 1024

_INSERT_IGNORE = ("INSERT OR IGNORE INTO event_chunks (run_id, seq, last_seq, ts, last_ts, last_kind, data, "
                  "writer) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def _prefix(db: Path) -> str:
    return f"{db.name}-lwj-"


def segment_path(db: Path, writer: str, n: int) -> Path:
    """Segment `n` of the journal of `writer` (``<pid>-<token>``: one process's store) on `db`."""
    return db.parent / f"{_prefix(db)}{writer}-{n}"


class Segment:
    """One journal file of this process: written under the store's lock."""

    __slots__ = ("fd", "ingested", "path", "sealed", "size", "written")

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = 0
        self.written = 0  # batches appended
        self.ingested = 0  # of those, batches copied into SQLite
        self.sealed = False

    def append(self, blob: bytes) -> None:
        """Append `blob`, all of it, or raise `OSError` with none of it left in the file."""
        try:
            n = os.write(self.fd, blob)
            if n < len(blob):  # a short write (a signal, a full disk): the rest, until all or an error
                view = memoryview(blob)[n:]
                while view:
                    view = view[os.write(self.fd, view):]
        except OSError:
            try:  # (a torn batch would join the next one's first line, and that line be lost)
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            raise
        self.size += len(blob)
        self.written += 1

    def drained(self) -> bool:
        return self.ingested == self.written

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)
        self.size = 0

    def remove(self) -> None:
        """Unlink, then close (the lock goes with the last descriptor, after the file is gone)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


def journal_files(db: Path) -> list[Path]:
    """Every journal segment of `db`, whoever wrote it."""
    prefix = _prefix(db)
    try:
        with os.scandir(db.parent) as it:
            return sorted(Path(e.path) for e in it if e.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _complete_lines(data: bytes) -> Iterator[bytes]:
    """The whole lines of a journal (a torn last line, from a write being made, is left out)."""
    end = data.rfind(b"\n")
    if end < 0:
        return
    for line in data[:end].split(b"\n"):
        if line:
            yield line


def _event_of(line: bytes) -> tuple | None:
    """A journal line's ``(run_id, seq, ts, kind, line)``, or None if it is not an event's."""
    try:
        d = json.loads(line)
        event = (d["run_id"], d["seq"], d["ts"], d["kind"], line)
    except (ValueError, KeyError, TypeError):
        return None
    return event if isinstance(event[0], str) and isinstance(event[1], int) else None


def _recovered_rows(conn: sqlite3.Connection, events: list[tuple], writer: str | None) -> list[tuple]:
    """The `event_chunks` rows for journaled `events` that SQLite lacks.

    Per run, the events after the last one SQLite has (a process copies its journal in
    order, so what it had copied before it died is a prefix), made into rows as a copy
    makes them (`chunk_rows`).
    """
    by_run: dict[str, dict[int, tuple]] = {}
    for event in events:
        by_run.setdefault(event[0], {}).setdefault(event[1], event)
    batches = []
    for run_id, by_seq in by_run.items():
        last = conn.execute("SELECT MAX(last_seq) FROM event_chunks WHERE run_id = ?", (run_id,)).fetchone()[0]
        for seq in sorted(by_seq):
            if last is None or seq > last:
                _, _, ts, kind, line = by_seq[seq]
                batches.append(((run_id, seq, ts, seq, ts, kind), line + b"\n"))
    return [(*row[:6], json_array(row[6]), writer) for row in chunk_rows(batches)]


def chunk_rows(batches: list[tuple[tuple, bytes]]) -> list[list]:
    """The `event_chunks` rows of journaled batches: one per run, where its batches follow on.

    A batch's meta is ``(run_id, seq, ts, last_seq, last_ts, last_kind)`` of its events
    (consecutive events of one run). A batch that does not follow on from its run's row
    (a gap, or a resumed run's first after its end: a run's end closes its row, so that
    `list_runs` finds each end as the last event of a row) starts a row of its own. A
    row's data is still its batches' bytes: `json_array` makes it text.
    """
    rows: list[list] = []
    open_rows: dict[str, list] = {}
    for meta, blob in batches:
        row = open_rows.get(meta[0])
        if row is not None and row[2] + 1 == meta[1] and row[5] != "run_finished":
            row[2], row[4], row[5] = meta[3], meta[4], meta[5]
            row[6].append(blob)
        else:
            run_id, seq, ts, last_seq, last_ts, last_kind = meta
            row = [run_id, seq, last_seq, ts, last_ts, last_kind, [blob]]
            open_rows[run_id] = row
            rows.append(row)
    return rows


def json_array(blobs: list[bytes]) -> str:
    """Journaled lines of JSON (each ended by a newline) as one JSON array, as text.

    A line of JSON holds no raw newline (JSON escapes it in strings), so the newlines
    are exactly the separators.
    """
    data = blobs[0] if len(blobs) == 1 else b"".join(blobs)
    return "[" + data[:-1].replace(b"\n", b",").decode() + "]"


def recover(conn: sqlite3.Connection, db: Path, own: set[Path]) -> int:
    """Copy the journals of dead processes into SQLite, then delete them; returns the events copied."""
    copied = 0
    for path in journal_files(db):
        if path in own:
            continue
        with _probe(path, fcntl.LOCK_EX) as dead:
            if not dead:
                continue  # gone, or its process is alive: its own copies go on
            data = path.read_bytes()
            events = []
            for line in _complete_lines(data):
                event = _event_of(line)
                if event is None:
                    _log.error("journal %s: an unreadable line was skipped: %.80r", path, line)
                    continue
                events.append(event)
            if events:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    rows = _recovered_rows(conn, events, _writer_of(path, db))
                    conn.executemany(_INSERT_IGNORE, rows)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                copied += sum(row[2] - row[1] + 1 for row in rows)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    return copied


@contextmanager
def _probe(path: Path, lock: int) -> Iterator[bool | None]:
    """Whether `path`'s process is dead: True (its lock is ours, held in the block), False (alive), None (gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, lock | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _run_events(data: bytes, run_id: str) -> Iterator[tuple[dict, bytes]]:
    """The whole lines of journal `data` that are events of `run_id`: each parsed, and as written."""
    key = run_id.encode()
    if key not in data:
        return
    for line in _complete_lines(data):
        if key in line:  # (the id may also appear in another run's text: parsed to be sure)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("run_id") == run_id:
                yield event, line


def journal_events(db: Path, run_id: str) -> list[tuple[dict, bytes]]:
    """`run_id`'s events in the journals of every process (this one too): each parsed, and as written."""
    out: list[tuple[dict, bytes]] = []
    for path in journal_files(db):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        out.extend(_run_events(data, run_id))
    return out


def writer_lives(db: Path, writer: str) -> bool:
    """Whether the process that wrote rows as `writer` (``<pid>-<token>``) still holds a journal file locked."""
    prefix = f"{_prefix(db)}{writer}-"
    for path in journal_files(db):
        if path.name.startswith(prefix):
            with _probe(path, fcntl.LOCK_SH) as dead:
                if dead is False:
                    return True
    return False


def _writer_of(path: Path, db: Path) -> str | None:
    """The ``<pid>-<token>`` of journal file `path` (as `segment_path` names it)."""
    parts = path.name[len(_prefix(db)):].split("-")
    return f"{parts[0]}-{parts[1]}" if len(parts) == 3 else None


def live_journal_mentions(db: Path, run_id: str, own: set[Path]) -> bool:
    """Whether the journal of a live process other than this one (`own`: ours) holds an event of `run_id`."""
    for path in journal_files(db):
        if path in own:
            continue
        with _probe(path, fcntl.LOCK_SH) as dead:
            if dead is not False:
                continue  # gone, or a dead process's (recovery copies it)
            data = path.read_bytes()
        if next(_run_events(data, run_id), None) is not None:
            return True
    return False
