"""The kill marker beside an SQLite database: how a kill wakes the watchers of other processes.

Every kill stored in the database's ``lw_kills`` also overwrites a small file beside
it (``<db>-lwkills``) with fresh random bytes. A watcher (`_control.local`) compares
its bytes with one `pread` every poll, and reads ``lw_kills`` only when they changed.
The event store's `tail` watches the same way for new events (`_stores.sqlite_tail`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .plane import _log

__all__ = ["marker_path"]


def marker_path(db: Path) -> Path:
    """The kill marker of database `db`: 8 bytes that every `record_kills` overwrites after its commit."""
    return db.with_name(db.name + "-lwkills")


_MARKER_SIZE = 8
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _marker_mode(db: Path) -> int:
    # The database's permissions, as SQLite gives its -wal and -shm files: whoever may
    # store a kill may signal it.
    try:
        return os.stat(db).st_mode & 0o666
    except OSError:
        return 0o644


def _bump_marker(db: Path) -> None:
    """Tell the watchers of every process on `db` that ``lw_kills`` has new rows (best effort).

    Fresh random bytes, written in place: whatever another killer writes at the same
    time, the marker ends up different from what any watcher saw before either write
    (a collision is a 2**-64 chance, and `QUERY_EVERY_S` catches even that). Never
    truncated or appended to: a watcher reads its first 8 bytes. A marker that cannot
    be written only slows delivery to `QUERY_EVERY_S`: the request is already stored.
    """
    path = marker_path(db)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | _CLOEXEC, _marker_mode(db))
        try:
            if hasattr(os, "pwrite"):
                os.pwrite(fd, os.urandom(_MARKER_SIZE), 0)
            else:  # Windows
                os.write(fd, os.urandom(_MARKER_SIZE))
        finally:
            os.close(fd)
    except OSError as exc:
        _log.debug("loopwise control plane (%s): cannot signal the kill through %s (%s); watchers "
                   "read it at their next periodic query", db, path, exc)


class _Marker:
    """The kill marker, open: its bytes read with `pread`, and its (device, inode).

    Not a memory map: a map of a file someone empties faults (SIGBUS) at the next read
    and kills the process; a read of it is short, which counts as a change.
    """

    __slots__ = ("fd", "id")

    def __init__(self, fd: int, id: tuple[int, int]) -> None:
        self.fd = fd
        self.id = id

    def read(self) -> bytes | None:
        try:
            return os.pread(self.fd, _MARKER_SIZE, 0)
        except OSError:  # (closed meanwhile)
            return None

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _open_marker(db: Path) -> _Marker | None:
    """The kill marker of `db`, open for reading (created if missing).

    None where it cannot be: the watcher then reads ``lw_kills`` at every poll.
    """
    path = marker_path(db)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _CLOEXEC, _marker_mode(db))
        except PermissionError:  # another user's marker: watch it all the same
            fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_size < _MARKER_SIZE:
                # Only ever grown (a killer's write may land first; it is kept).
                os.ftruncate(fd, _MARKER_SIZE)
                if hasattr(os, "fchmod"):
                    try:
                        os.fchmod(fd, _marker_mode(db))
                    except OSError:
                        pass
        except BaseException:
            os.close(fd)
            raise
        return _Marker(fd, (st.st_dev, st.st_ino))
    except OSError as exc:
        _log.debug("loopwise control plane (%s): cannot open the kill marker %s (%s); polling the "
                   "database instead", db, path, exc)
        return None

