from __future__ import annotations

import pytest

import loopwise as lw


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def fake_clock():
    """A `loopwise.testing.FakeClock` driving the test's event loop, as an agent's run does with
    its clock: waits jump ahead when nothing else can happen, and timeouts are exact fake time."""
    import asyncio

    from loopwise.testing import FakeClock

    clock = FakeClock()
    loop = asyncio.get_running_loop()
    clock.install(loop)
    yield clock
    clock.uninstall(loop)


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


@pytest.fixture(autouse=True)
def _close_control_planes_made_here():
    # A process keeps one control plane per database for its life (`control_for`); the
    # suite is one process that opens a thousand databases, so each test closes the local
    # ones it made (their SQLite connections and kill markers), or descriptors pile up.
    from loopwise._control import plane as _control_plane

    before = set(_control_plane._controls)
    yield
    with _control_plane._controls_lock:
        made = [key for key in _control_plane._controls if key not in before and key[0] == "local"]
        planes = [_control_plane._controls.pop(key) for key in made]
    for plane in planes:
        plane.close()
