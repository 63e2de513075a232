"""A file that is not a loopwise database is refused before anything writes to it."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

import loopwise as lw
from loopwise._stores.sqlite import SCHEMA_VERSION


def _snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file in `directory`: its sha256 and its mtime (ns)."""
    out = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        st = entry.stat()
        out[entry.name] = (hashlib.sha256(Path(entry.path).read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


def _sqlite(path: Path, *statements: str, journal_mode: str = "delete") -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode = {journal_mode}")
    for statement in statements:
        conn.execute(statement)
    conn.close()


def _rollback_app(path: Path) -> None:
    _sqlite(path, "CREATE TABLE users (id INTEGER, name TEXT)", "INSERT INTO users VALUES (1, 'ann')")


def _wal_app(path: Path) -> None:
    _sqlite(path, "CREATE TABLE orders (id INTEGER)", "INSERT INTO orders VALUES (7)", journal_mode="wal")


def _app_with_user_version(path: Path) -> None:
    # Many applications version their schema with user_version too.
    _sqlite(path, "CREATE TABLE users (id INTEGER)", "PRAGMA user_version = 3")


def _app_with_a_high_user_version(path: Path) -> None:
    _sqlite(path, "CREATE TABLE notes (body TEXT)", f"PRAGMA user_version = {SCHEMA_VERSION + 40}")


def _only_a_view(path: Path) -> None:
    _sqlite(path, "CREATE VIEW answer AS SELECT 42")


def _text(path: Path) -> None:
    path.write_text("these are my notes, not a database\n" * 100)


def _short_binary(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + b"\x01" * 20)


def _binary(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def _newer_loopwise(path: Path) -> None:
    lw.SQLiteStore(path).close()
    _sqlite(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}", journal_mode="wal")


CASES = {
    "rollback-mode app": (_rollback_app, "holds other tables: users"),
    "wal-mode app": (_wal_app, "holds other tables: orders"),
    "app using user_version": (_app_with_user_version, "user_version is 3 but it has no events table"),
    "app with a high user_version": (_app_with_a_high_user_version, "no event_chunks table; it holds notes"),
    "only a view": (_only_a_view, "holds other tables: answer"),
    "text": (_text, "file is not a database"),
    "short binary": (_short_binary, "file is not a database"),
    "binary": (_binary, "file is not a database"),
    "newer loopwise": (_newer_loopwise, "newer loopwise"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_refused_file_is_left_byte_for_byte_as_it_was(tmp_path, case):
    make, message = CASES[case]
    directory = tmp_path / "d"
    directory.mkdir()
    path = directory / "other.db"
    make(path)
    before = _snapshot(directory)
    with pytest.raises(lw.UserError, match="is not a loopwise database|newer loopwise") as info:
        lw.SQLiteStore(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert _snapshot(directory) == before  # no byte changed, no journal file made beside it


def test_an_empty_file_becomes_a_new_database(tmp_path):
    path = tmp_path / "made-by-mkstemp.db"
    path.touch()
    store = lw.SQLiteStore(path)
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_an_empty_sqlite_database_becomes_a_loopwise_one(tmp_path):
    path = tmp_path / "blank.db"
    _sqlite(path, "CREATE TABLE scratch (x)", "DROP TABLE scratch")
    assert path.read_bytes().startswith(b"SQLite format 3")
    lw.SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_a_loopwise_database_in_use_by_another_connection_opens(tmp_path):
    """The read-only check reads a database whose -wal file another connection holds open."""
    path = tmp_path / "lw.db"
    first = lw.SQLiteStore(path)
    agent = lw.Agent(lw.models.ScriptedModel(["hi"]), store=first)
    agent.run_sync("task", run_id="r1")
    holder = sqlite3.connect(path)
    holder.execute("SELECT count(*) FROM event_chunks").fetchone()
    assert path.with_name(path.name + "-wal").exists()
    second = lw.SQLiteStore(path)
    assert second.has_run("r1")
    second.close()
    holder.close()
    first.close()
