from __future__ import annotations

import pytest

import loopwise as lw


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store() -> lw.MemoryStore:
    return lw.MemoryStore()


@pytest.fixture
def sqlite_store(tmp_path):
    s = lw.SQLiteStore(tmp_path / "loopwise.db")
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _isolated_default_db(tmp_path, monkeypatch):
    # A test that forgets store= writes to its own temporary database, never the repo's.
    monkeypatch.setenv("LOOPWISE_DB", str(tmp_path / "default.db"))
