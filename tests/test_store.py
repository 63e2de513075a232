"""The event stores: SQLite durability across real process crashes, sharing, bad files."""

from __future__ import annotations

import select
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import loopwise as lw
from loopwise._stores.sqlite import SCHEMA_VERSION
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ScriptedModel, ToolCall


def run_script(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_a_crashed_process_loses_no_completed_iteration(tmp_path):
    db = tmp_path / "crash.db"
    proc = run_script(
        """
        import os, sys
        import loopwise as lw
        from loopwise.models import ScriptedModel, ToolCall

        @lw.tool
        def step(n: int) -> str:
            if n == 3:
                os._exit(17)   # the process dies hard in the middle of iteration 3
            return f"step {n} done"

        model = ScriptedModel([ToolCall("step", {"n": 1}), ToolCall("step", {"n": 2}), ToolCall("step", {"n": 3}), "never"])
        agent = lw.Agent(model, tools=[step], store=lw.SQLiteStore(sys.argv[1]))
        agent.run_sync("crash me", run_id="doomed")
        """,
        str(db),
    )
    assert proc.returncode == 17, proc.stderr
    store = lw.SQLiteStore(db)
    events = store.load("doomed")
    store.close()
    done = [e for e in events if e.kind == "tool_call_finished"]
    assert [e.content for e in done] == ["step 1 done", "step 2 done"]
    assert not any(e.kind == "run_finished" for e in events)
    # Everything before the third tool call was committed before that call started
    # (and everything before each model call before that call started).
    assert events[-1].kind == "tool_call_started" and events[-1].iteration == 3
    assert events[-2].kind == "model_call_finished" and events[-2].iteration == 3
    assert [e.seq for e in events] == list(range(len(events)))


def test_several_processes_share_one_database(tmp_path):
    db = tmp_path / "shared.db"
    code = """
        import asyncio, sys
        import loopwise as lw
        from loopwise.models import ScriptedModel, ToolCall

        @lw.tool
        async def echo(x: int) -> int:
            return x

        async def main():
            agent = lw.Agent(ScriptedModel([ToolCall("echo", {"x": 1}), "ok"]), tools=[echo],
                             store=lw.SQLiteStore(sys.argv[1]))
            results = await asyncio.gather(*(agent.run(f"task {i}", tags=[sys.argv[2]]) for i in range(30)))
            assert all(r.stop_reason == "done" for r in results), results
        asyncio.run(main())
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(db), f"p{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = lw.SQLiteStore(db)
    runs = store.list_runs(limit=1000)
    assert len(runs) == 120
    assert all(r.stop_reason == "done" and r.status == "finished" for r in runs)
    assert {t for r in runs for t in r.tags} == {"p0", "p1", "p2", "p3"}
    for r in runs[:5]:
        assert lw.RunResult.from_events(store.load(r.run_id)).output == "ok"
    store.close()


def test_a_text_file_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(lw.UserError, match="is not a loopwise database"):
        lw.SQLiteStore(path)
    assert path.read_text().startswith("these are my notes")  # nothing lost


def test_a_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(lw.UserError, match="holds other tables: users"):
        lw.SQLiteStore(path)


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.db"
    lw.SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(lw.UserError, match="newer loopwise"):
        lw.SQLiteStore(path)


def test_schema_is_versioned_and_in_wal_mode(tmp_path):
    path = tmp_path / "new" / "dir" / "lw.db"
    lw.SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    lw.SQLiteStore(path).close()  # reopening an up-to-date database is a no-op


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(lw.UserError, match="is a directory"):
        lw.SQLiteStore(tmp_path)


@pytest.mark.parametrize("make", [lw.MemoryStore, "sqlite"])
def test_stores_list_and_load_runs_alike(tmp_path, make):
    store = lw.SQLiteStore(tmp_path / "x.db") if make == "sqlite" else make()
    agent = lw.Agent(ScriptedModel(["one"]), store=store, name="a1")
    first = agent.run_sync("t1", tags=["x"])
    second = agent.run_sync("t2")
    runs = store.list_runs()
    assert [r.run_id for r in runs] == [second.run_id, first.run_id]
    assert runs[1].tags == ("x",) and runs[1].agent == "a1" and runs[1].stop_reason == "done"
    assert runs[1].iterations == 1 and runs[1].output == "one"
    assert store.has_run(first.run_id) and not store.has_run("nope")
    with pytest.raises(lw.UserError, match="no run with id 'nope'"):
        store.load("nope")
    store.close()


async def test_running_runs_are_listed_as_running(sqlite_store):
    import anyio

    gate = anyio.Event()

    @lw.tool
    async def wait() -> str:
        """Wait for the gate."""
        await gate.wait()
        return "ok"

    agent = lw.Agent(ScriptedModel([ToolCall("wait", {}), "done"]), tools=[wait], store=sqlite_store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run, "t")
        while not sqlite_store.list_runs():
            await anyio.sleep(0.01)
        assert sqlite_store.list_runs()[0].status == "running"
        gate.set()
    assert sqlite_store.list_runs()[0].status == "finished"


def test_reusing_a_run_id_is_a_user_error(sqlite_store):
    agent = lw.Agent(ScriptedModel(["x"]), store=sqlite_store)
    agent.run_sync("t", run_id="fixed")
    with pytest.raises(lw.UserError, match="already exists; use agent.resume"):
        agent.run_sync("t", run_id="fixed")


def test_default_store_is_loopwise_db_or_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPWISE_DB")
    agent = lw.Agent(ScriptedModel(["x"]))
    result = agent.run_sync("t")
    assert (tmp_path / ".loopwise" / "loopwise.db").exists()
    assert lw.SQLiteStore(tmp_path / ".loopwise" / "loopwise.db").load(result.run_id)[-1].kind == "run_finished"
    monkeypatch.setenv("LOOPWISE_DB", str(tmp_path / "elsewhere.db"))
    lw.Agent(ScriptedModel(["x"])).run_sync("t")
    assert (tmp_path / "elsewhere.db").exists()


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    from loopwise._stores.sqlite_schema import _MIGRATIONS

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(_MIGRATIONS[1])
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    old = lw.SQLiteStore(path)  # migrates v1 -> current
    agent = lw.Agent(ScriptedModel(["hi"]), store=old)
    result = agent.run_sync("t")
    old.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    # lw_* belong to the control plane (leases and kill requests), created beside the log.
    assert {i for i in indexes if not i.startswith("lw_")} == {"event_chunks_started"}
    from loopwise._stores.sqlite_read import _LIST_RUNS

    plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + _LIST_RUNS.format(where="", having=""), (5,)))
    # No sort of every run: the index gives the order, and only runs started at the same
    # instant are sorted (by run id, the cursor's tie-break): the "RIGHT PART" of the ORDER BY.
    assert "event_chunks_started" in plan and "TEMP B-TREE FOR ORDER BY" not in plan, plan
    conn.close()
    store = lw.SQLiteStore(path)
    assert store.list_runs()[0].run_id == result.run_id
    store.close()


CRASHING_WRITER = """
import asyncio, os, random, sys
import loopwise as lw
from loopwise.models import ScriptedModel, ToolCall

@lw.tool
async def step(n: int) -> int:
    await asyncio.sleep(random.uniform(0.001, 0.03))
    return n

async def main():
    store = lw.SQLiteStore(sys.argv[1])
    model = ScriptedModel([ToolCall("step", {"n": 1}), ToolCall("step", {"n": 2}), ToolCall("step", {"n": 3}), "ok"])
    agent = lw.Agent(model, tools=[step], store=store)
    batch = 0
    while True:  # until SIGKILL
        await asyncio.gather(*(agent.run("go", tags=[sys.argv[2]]) for _ in range(25)))
        batch += 1
        print(batch, flush=True)

asyncio.run(main())
"""


def test_processes_killed_mid_write_leave_every_run_whole_and_resumable(tmp_path):
    """Three processes, 25 runs at a time each, SIGKILLed at unrelated moments: every run's events are
    in SQLite once, without gaps, its result reads back, and each run that was cut off resumes to its end."""
    db = tmp_path / "crashy.db"
    lw.SQLiteStore(db).close()
    procs = [subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(db), f"p{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = []
    try:
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            poller = select.poll()  # (not select.select: a descriptor past 1024 is out of its range)
            poller.register(proc.stdout, select.POLLIN)
            assert poller.poll(60_000) and proc.stdout.readline(), f"p{i} never finished a batch"  # it writes now
            time.sleep(0.1 * (i + 1))  # then dies in the middle of another
            proc.kill()
    finally:
        for proc in procs:
            proc.kill()
            errors.append(proc.communicate(timeout=30)[1][-2000:])
    store = lw.SQLiteStore(db)  # recovers the dead journals
    try:
        runs = store.list_runs(limit=10_000)
        assert len(runs) > 3 * 25, errors  # (each process finished a batch, and started another)
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("SELECT count(*) FROM (SELECT run_id FROM events GROUP BY run_id "
                                "HAVING max(seq) + 1 != count(*) OR min(seq) != 0)").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM (SELECT 1 FROM events GROUP BY run_id, seq "
                                "HAVING count(*) > 1)").fetchone()[0] == 0
        finally:
            conn.close()
        cut_off = [r for r in runs if r.status != "finished"]
        assert cut_off, "no run was cut off: the kills came too late to test anything"
        for run in runs:
            events = store.load(run.run_id)
            assert [e.seq for e in events] == list(range(len(events)))
            if run.status == "finished":
                assert lw.RunResult.from_events(events).output == "ok"

        @lw.tool
        async def step(n: int) -> int:
            return n

        def model(request: ModelRequest) -> ModelResponse:
            # From the transcript, not a script: a call cut off mid-way is asked again on resume
            # (and counted as made), so a ScriptedModel's position would move on by one.
            done = sum(1 for m in request.messages if m.role == "tool")
            return ModelResponse(text="ok") if done >= 3 else ModelResponse(tool_calls=[ToolCall("step", {"n": done + 1})])

        resumer = lw.Agent(FunctionModel(model), tools=[step], store=store)
        for run in cut_off:
            try:
                result = resumer.resume_sync(run.run_id)
            except lw.UserError as exc:
                raise AssertionError(f"{run.run_id} ({run.status}, {len(store.load(run.run_id))} events): {exc}") from exc
            assert (result.stop_reason, result.output) == ("done", "ok"), result
        assert all(r.status == "finished" for r in store.list_runs(limit=10_000))
    finally:
        store.close()
