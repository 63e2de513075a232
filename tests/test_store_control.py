"""A store declares the control plane its runs' kills go through (`EventStore.control_plane`).

An `SQLiteStore` declares its database's `LocalControl`, a `MemoryStore` its
in-process `MemoryControl`; a store that declares none gets a clear `UserError` for
a kill that must cross processes, never a process-local plane that would miss them.
"""

from __future__ import annotations

import anyio
import pytest

import loopwise as lw
from loopwise._control.kill import control_for
from loopwise._control.local import LocalControl
from loopwise._control.plane import MemoryControl
from loopwise._control.redis import RedisControl
from loopwise.models import FunctionModel, ModelRequest, ModelResponse

from .redis_server import RedisServer


class ListStore(lw.EventStore):
    """A third-party store: events in a dict; it declares no control plane (the default).

    It has a `path`, as a PostgreSQL or S3 store might: no plane may be guessed from it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.runs: dict[str, list[lw.Event]] = {}

    def write(self, events: list[lw.Event]) -> None:
        for e in events:
            self.runs.setdefault(e.run_id, []).append(e)

    def load(self, run_id: str) -> list[lw.Event]:
        if run_id not in self.runs:
            raise self._unknown(run_id)
        return list(self.runs[run_id])

    def has_run(self, run_id: str) -> bool:
        return run_id in self.runs

    def list_runs(self, **kwargs: object) -> list:
        return []


def _hanging_agent(store: lw.EventStore, started: anyio.Event | None = None, **kwargs: object) -> lw.Agent:
    async def fn(request: ModelRequest) -> ModelResponse:
        if started is not None:
            started.set()
        await anyio.sleep(60)
        return ModelResponse(text="never")

    return lw.Agent(FunctionModel(fn), store=store, limits=lw.Limits(budget_usd=None), **kwargs)


def test_each_builtin_store_declares_its_plane(tmp_path):
    sqlite = lw.SQLiteStore(tmp_path / "lw.db")
    memory = lw.MemoryStore()
    try:
        plane = sqlite.control_plane()
        assert isinstance(plane, LocalControl) and plane.path == (tmp_path / "lw.db").resolve()
        assert sqlite.control_plane() is plane and control_for(sqlite) is plane  # one per file and process
        assert lw.SQLiteStore(tmp_path / "lw.db").control_plane() is plane
        assert isinstance(memory.control_plane(), MemoryControl)
        assert control_for(memory) is memory.control_plane()
        assert lw.MemoryStore().control_plane() is not memory.control_plane()  # (its runs only)
        assert ListStore("x").control_plane() is None
    finally:
        sqlite.close()


def test_a_store_without_a_plane_gets_a_clear_error_not_a_local_plane(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOPWISE_REDIS_URL", raising=False)
    # Its `path` names an SQLite file: the old guess made a LocalControl of it.
    store = ListStore(str(tmp_path / "looks-like.db"))
    with pytest.raises(lw.UserError) as err:
        control_for(store)
    message = str(err.value)
    assert "\n" not in message and "declares no control plane" in message and "redis://" in message
    # A kill of a run this process is not executing must cross processes: refused, with why.
    with pytest.raises(lw.UserError, match="declares no control plane"):
        lw.kill("someone-elses-run", store=store)
    with pytest.raises(lw.UserError, match="declares no control plane"):
        lw.kill(tag="nightly", store=store)
    with pytest.raises(lw.UserError, match="declares no control plane"):
        lw.kill(all=True, store=store)
    assert not (tmp_path / "looks-like.db").exists()  # nothing made a database of its path


def test_a_plane_that_is_not_one_is_refused():
    class Odd(ListStore):
        def control_plane(self):  # noqa: ANN202
            return "redis://localhost"

    with pytest.raises(lw.UserError, match=r"Odd.control_plane\(\) returned a str"):
        control_for(Odd("x"))


async def test_runs_of_a_store_without_a_plane_run_and_are_killed_from_their_process(monkeypatch):
    monkeypatch.delenv("LOOPWISE_REDIS_URL", raising=False)
    store = ListStore("x")
    started = anyio.Event()
    agent = _hanging_agent(store, started)
    result = {}

    async def go() -> None:
        result["r"] = await agent.run("t", run_id="here")

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        await started.wait()
        assert lw.kill("here", reason="from this process", store=store) == 1
    assert result["r"].stop_reason == "killed"
    assert store.runs["here"][-2].reason == "from this process"
    # Once it ended, a kill of it cannot be told from one for another process: refused.
    with pytest.raises(lw.UserError, match="declares no control plane"):
        lw.kill("here", store=store)


async def test_redis_overrides_what_the_store_declares(tmp_path, monkeypatch):
    server = RedisServer.start_new(tmp_path)
    try:
        store = ListStore("x")
        plane = control_for(store, server.url)
        assert isinstance(plane, RedisControl)
        monkeypatch.setenv("LOOPWISE_REDIS_URL", server.url)
        assert control_for(store) is plane
        sqlite = lw.SQLiteStore(tmp_path / "lw.db")
        assert control_for(sqlite) is plane  # the environment wins over the database's own plane
        # And a run of the plane-less store is killed through Redis.
        started = anyio.Event()
        agent = _hanging_agent(store, started)
        assert agent.control is plane
        result = {}

        async def go() -> None:
            result["r"] = await agent.run("t", run_id="via-redis")

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            await started.wait()
            assert await anyio.to_thread.run_sync(lambda: lw.kill("via-redis", store=store)) == 1
        assert result["r"].stop_reason == "killed"
        sqlite.close()
    finally:
        from loopwise._control import plane as _control_plane

        with _control_plane._controls_lock:
            made = _control_plane._controls.pop(("redis", server.url), None)
        if made is not None:
            made.close()
        server.close()
