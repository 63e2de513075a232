"""The kill switch: a run stops from any process, in-flight work is cancelled, nothing is lost.

Real processes: `loopwise run` in a child process, `loopwise kill` from another; the
halt latency is read from the run's own events (`kill_received.requested_ts` to
`run_finished.ts`), with generous bounds (the machine is shared).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

import loopwise as lw
from loopwise._control.kill import control_for
from loopwise._control.local import LocalControl
from loopwise._control.plane import local_runs
from loopwise._stores.journal import journal_events
from loopwise.cli import main
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ScriptedModel, ToolCall

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LW_TEST_DIR=str(tmp_path), PYTHONPATH=str(ROOT), **extra)
    env.pop("LOOPWISE_REDIS_URL", None)
    return env


def _start(tmp_path: Path, agent: str, db: Path, *args: str, command: str = "run", **env: str) -> subprocess.Popen:
    """`loopwise run` (or `resume`) in a child process; its output goes to files in `tmp_path`."""
    target = [f"tests.durable_agents:{agent}"] if command == "run" else ["--agent", f"tests.durable_agents:{agent}"]
    log = tmp_path / f"child-{time.monotonic_ns()}"
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loopwise", command, *target, "--db", str(db), *args],
            cwd=ROOT, env=_env(tmp_path, **env), stdout=out, stderr=err,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


@contextmanager
def _napping(tmp_path: Path, db: Path, agent: str = "sleeper", *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A `loopwise run` child whose run sits in its sleeping tool: (the process, the run id).

    The child is killed on the way out, whatever the test did with it.
    """
    proc = _start(tmp_path, agent, db, *(args or ("--task", "sleep")))
    try:
        _wait_for(tmp_path / "napping", proc)
        [run_id] = _running_ids(db, 1)
        yield proc, run_id
    finally:
        proc.kill()
        proc.wait()


def _output(proc: subprocess.Popen) -> str:
    log = proc.log  # type: ignore[attr-defined]
    return Path(f"{log}.out").read_text() + Path(f"{log}.err").read_text()


def _wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before {path.name}:\n{_output(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


def _running_ids(db: Path, n: int, timeout: float = 30.0) -> list[str]:
    """The ids of `n` runs holding a live lease in `db` (waits for them)."""
    lw.SQLiteStore(db).close()  # the database exists (and is a loopwise one) before the control tables
    plane = LocalControl(db)
    try:
        deadline = time.monotonic() + timeout
        while True:
            live = sorted(r for r, lease in plane.leases().items() if lease.live())
            if len(live) >= n:
                return live
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(live)} runs running after {timeout} s, expected {n}")
            time.sleep(0.02)
    finally:
        plane.close()


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopwise", *args], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)


def _events(db: Path, run_id: str) -> list:
    store = lw.SQLiteStore(db)
    try:
        return store.load(run_id)
    finally:
        store.close()


@pytest.mark.parametrize("agent", ["sleeper", "thread_sleeper"])
def test_kill_from_another_process_stops_a_run_whose_tool_sleeps_30s(tmp_path, agent):
    db = tmp_path / "lw.db"
    with _napping(tmp_path, db, agent) as (proc, run_id):
        t0 = time.monotonic()
        killer = _cli("kill", run_id, "--reason", "operator says stop", "--db", str(db), tmp_path=tmp_path)
        assert killer.returncode == 0, killer.stderr
        assert "kill sent to 1 run" in killer.stdout
        proc.wait(timeout=20)
        elapsed = time.monotonic() - t0
    assert elapsed < 10, f"the run took {elapsed:.1f} s to stop; its tool sleeps 30 s"
    events = _events(db, run_id)
    kinds = [e.kind for e in events]
    assert kinds[-2:] == ["kill_received", "run_finished"]
    received, finished = events[-2], events[-1]
    assert finished.stop_reason == "killed"
    # Who: the `loopwise kill` process, not the run's own; why: its --reason.
    assert killer_pid(received) not in (proc.pid, os.getpid()) and "@" in received.by
    assert received.reason == "operator says stop"
    assert finished.reason == f"killed by {received.by}: operator says stop"
    # The halt, from the stored request to the run's end, read from the log.
    assert 0 <= finished.ts - received.requested_ts < 2.0
    tool_end = next(e for e in events if e.kind == "tool_call_finished")
    assert tool_end.outcome == "cancelled"
    if agent == "thread_sleeper":
        assert "thread_abandoned" in kinds
    # `runs` shows it finished, `show` prints who and why.
    out = _cli("show", run_id, "--db", str(db), tmp_path=tmp_path)
    assert out.returncode == 0 and "operator says stop" in out.stdout


def killer_pid(received) -> int:
    return int(received.by.rsplit(" ", 1)[1])


def test_kill_by_tag_across_two_processes(tmp_path):
    db = tmp_path / "lw.db"
    a = _start(tmp_path, "sleeper", db, "--task", "a", "--tag", "batch-7")
    b = _start(tmp_path, "sleeper", db, "--task", "b", "--tag", "batch-7")
    c = _start(tmp_path, "sleeper", db, "--task", "c", "--tag", "other")
    try:
        ids = _running_ids(db, 3)
        out = _cli("kill", "--tag", "batch-7", "--reason", "bad batch", "--db", str(db), tmp_path=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "kill sent to 2 runs" in out.stdout
        a.wait(timeout=20)
        b.wait(timeout=20)
        time.sleep(0.5)
        assert c.poll() is None, "the run with another tag must go on"
        stopped = {r for r in ids if _events(db, r)[-1].kind == "run_finished"}
        assert len(stopped) == 2
        for r in stopped:
            started, finished = _events(db, r)[0], _events(db, r)[-1]
            assert "batch-7" in started.tags and finished.stop_reason == "killed" and "bad batch" in finished.reason
        out = _cli("kill", "--all", "--db", str(db), tmp_path=tmp_path)
        assert "kill sent to 1 run" in out.stdout
        c.wait(timeout=20)
    finally:
        for p in (a, b, c):
            p.kill()
    assert all(_events(db, r)[-1].stop_reason == "killed" for r in ids)


def test_sigterm_stops_the_runs_as_killed_and_exits(tmp_path):
    db = tmp_path / "lw.db"
    with _napping(tmp_path, db) as (proc, run_id):
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 143, _output(proc)
    finished = _events(db, run_id)[-1]
    assert finished.kind == "run_finished" and finished.stop_reason == "killed"
    assert "shutdown (SIGTERM)" in finished.reason


def test_a_second_signal_exits_at_once(tmp_path):
    # The tool blocks the event loop, so the first SIGTERM's kill cannot be handled:
    # the process waits its grace period, unless a second signal comes.
    db = tmp_path / "lw.db"
    proc = _start(tmp_path, "loop_blocker", db, "--task", "block")
    try:
        _wait_for(tmp_path / "napping", proc)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None, "one signal waits for the runs to stop (up to the grace period)"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
    assert proc.returncode == 143


def test_kill_an_unknown_or_finished_run(tmp_path, capsys):
    db = tmp_path / "lw.db"
    store = lw.SQLiteStore(db)
    agent = lw.Agent(FunctionModel(lambda r: ModelResponse(text="hi")), store=store, limits=lw.Limits(budget_usd=None))
    result = agent.run_sync("hello")
    with pytest.raises(lw.UserError, match="no run with id 'nope'"):
        lw.kill("nope", store=store)
    assert lw.kill(result.run_id, store=store) == 0  # finished: a no-op
    assert lw.kill(all=True, store=store) == 0
    store.close()
    assert main(["kill", result.run_id, "--db", str(db)]) == 0
    assert "already finished (done); nothing to kill" in capsys.readouterr().out
    assert main(["kill", "nope", "--db", str(db)]) == 2
    assert "no run with id 'nope'" in capsys.readouterr().err
    assert main(["kill", "--db", str(db)]) == 2
    assert "exactly one of: RUN_ID, --tag TAG, --all" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "exactly one of"),
        (("r1",), {"all": True}, "exactly one of"),
        ((), {"tag": ""}, "tag must be a non-empty str"),
        (("",), {}, "run_id must be a non-empty str"),
        (("r1",), {"reason": 3}, "reason must be a str"),
    ],
)
def test_kill_arguments(args, kwargs, message):
    with pytest.raises(lw.UserError, match=message):
        lw.kill(*args, store=lw.MemoryStore(), **kwargs)


def _hanging_agent(store, **kwargs):
    @lw.tool(timeout=60)
    async def hang() -> str:
        await anyio.sleep(60)
        return "never"

    def fn(request: ModelRequest) -> ModelResponse:
        return ModelResponse(tool_calls=[ToolCall("hang", {})])

    return lw.Agent(FunctionModel(fn), tools=[hang], store=store, limits=lw.Limits(budget_usd=None), **kwargs)


async def _until_running(n: int, timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while len(local_runs()) < n:
            await anyio.sleep(0.01)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_1000_concurrent_runs_kill_one_only_that_one_stops(tmp_path, backend):
    store = lw.MemoryStore() if backend == "memory" else lw.SQLiteStore(tmp_path / "lw.db")
    agent = _hanging_agent(store)
    results: dict[int, lw.RunResult] = {}

    async def one(i: int) -> None:
        results[i] = await agent.run(f"task {i}", run_id=f"run-{i:04d}", tags=[f"t{i % 2}"])

    async with anyio.create_task_group() as tg:
        for i in range(1000):
            tg.start_soon(one, i)
        await _until_running(1000)
        await anyio.sleep(0.2)  # the leases reach the database
        signalled = await anyio.to_thread.run_sync(lambda: lw.kill("run-0500", reason="just this one", store=store))
        assert signalled == 1
        with anyio.fail_after(10):
            while 500 not in results:
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)
        assert len(results) == 1, "only the killed run may stop"
        assert results[500].stop_reason == "killed"
        # Then by tag (half of them), then all.
        n = await anyio.to_thread.run_sync(lambda: lw.kill(tag="t1", reason="odd ones", store=store))
        assert n == 500
        with anyio.fail_after(30):
            while len(results) < 501:
                await anyio.sleep(0.02)
        assert {i for i in results if i != 500} == {i for i in range(1000) if i % 2 == 1}
        n = await anyio.to_thread.run_sync(lambda: lw.kill(all=True, store=store))
        assert n == 499
    assert len(results) == 1000 and all(r.stop_reason == "killed" for r in results.values())
    events = store.load("run-0500")
    assert events[-2].kind == "kill_received" and events[-2].reason == "just this one"
    if backend == "sqlite":
        # No lease is left behind once the runs end.
        await anyio.sleep(0.3)
        assert control_for(store).leases() == {}
        store.close()


async def test_kill_during_the_model_call_cancels_the_request():
    store = lw.MemoryStore()
    started = anyio.Event()
    cancelled = []

    async def fn(request: ModelRequest) -> ModelResponse:
        started.set()
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise
        return ModelResponse(text="never")

    agent = lw.Agent(FunctionModel(fn), store=store, limits=lw.Limits(budget_usd=None))
    async with anyio.create_task_group() as tg:
        result = {}

        async def go():
            result["r"] = await agent.run("t", run_id="thinking")

        tg.start_soon(go)
        await started.wait()
        assert lw.kill("thinking", reason="enough", store=store) == 1
    assert result["r"].stop_reason == "killed" and cancelled == [True]
    finished_call = [e for e in store.load("thinking") if e.kind == "model_call_finished"][-1]
    assert finished_call.error is not None and finished_call.error.type == "Cancelled"


async def test_kill_during_the_final_answer_call():
    store = lw.MemoryStore()
    in_final = anyio.Event()

    @lw.tool
    def lookup() -> str:
        return "data"

    async def fn(request: ModelRequest) -> ModelResponse:
        if not request.tools:  # the best-effort answer after the iteration limit
            in_final.set()
            await anyio.sleep(60)
        return ModelResponse(tool_calls=[ToolCall("lookup", {})])

    agent = lw.Agent(FunctionModel(fn), tools=[lookup], store=store,
                     limits=lw.Limits(max_iterations=2, budget_usd=None))
    result = {}
    async with anyio.create_task_group() as tg:
        async def go():
            result["r"] = await agent.run("t", run_id="final")

        tg.start_soon(go)
        await in_final.wait()
        lw.kill("final", reason="no time for a summary", store=store)
    r = result["r"]
    assert r.stop_reason == "killed" and r.output is None and r.iterations == 2
    kinds = [e.kind for e in store.load("final")]
    assert kinds.count("run_finished") == 1 and kinds[-2] == "kill_received"
    assert "limit_hit" in kinds  # the limit came first; the kill ended the best-effort call


async def test_a_kill_before_a_run_reaches_its_next_iteration_is_seen_there():
    # The seed's rule: the kill switch is checked between iterations too. A run whose
    # tool ignores cancellation (shielded) still stops at the next iteration.
    store = lw.MemoryStore()
    calls = []

    @lw.tool
    async def stubborn() -> str:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.3)
        calls.append(1)
        return "finished anyway"

    agent = lw.Agent(FunctionModel(lambda r: ModelResponse(tool_calls=[ToolCall("stubborn", {})])), tools=[stubborn],
                     store=store, limits=lw.Limits(budget_usd=None))
    result = {}
    async with anyio.create_task_group() as tg:
        async def go():
            result["r"] = await agent.run("t", run_id="stubborn")

        tg.start_soon(go)
        await _until_running(1)
        await anyio.sleep(0.1)
        lw.kill("stubborn", store=store)
    assert result["r"].stop_reason == "killed" and result["r"].iterations == 1 and calls == [1]


def test_runs_tells_running_from_orphaned(tmp_path):
    db = tmp_path / "lw.db"
    with _napping(tmp_path, db) as (proc, run_id):
        out = _cli("runs", "--json", "--db", str(db), tmp_path=tmp_path)
        assert '"status": "running"' in out.stdout
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    out = _cli("runs", "--json", "--db", str(db), tmp_path=tmp_path)
    assert '"status": "orphaned"' in out.stdout, out.stdout
    out = _cli("kill", run_id, "--db", str(db), tmp_path=tmp_path)
    assert out.returncode == 0 and "is not running" in out.stdout and "loopwise resume" in out.stdout


def test_a_killed_run_being_resumed_shows_as_running_and_can_be_killed_again(tmp_path):
    db = tmp_path / "lw.db"
    with _napping(tmp_path, db) as (proc, run_id):
        assert _cli("kill", run_id, "--db", str(db), tmp_path=tmp_path).returncode == 0
        proc.wait(timeout=20)
    (tmp_path / "napping").unlink()
    resumer = _start(tmp_path, "sleeper", db, run_id, command="resume")
    try:
        _wait_for(tmp_path / "napping", resumer)  # the resumed segment sits in its tool again
        out = _cli("runs", "--json", "--db", str(db), tmp_path=tmp_path)
        [row] = [r for r in json.loads(out.stdout) if r["run_id"] == run_id]
        assert row["status"] == "running" and row["stop_reason"] is None
        killer = _cli("kill", run_id, "--reason", "again", "--db", str(db), tmp_path=tmp_path)
        assert "kill sent to 1 run" in killer.stdout, killer.stdout + killer.stderr
        resumer.wait(timeout=20)
    finally:
        resumer.kill()
    events = _events(db, run_id)
    assert [e.kind for e in events].count("run_finished") == 2
    assert events[-1].stop_reason == "killed" and events[-1].reason.endswith(": again")


YOUNG_CHILD = """
import asyncio, sys
from pathlib import Path
import loopwise as lw
from loopwise._control import local as _control_local
from loopwise.models import ScriptedModel, ToolCall

# Its runs never get a lease: they stay as young as a run a poll old, for as long as the test needs.
_control_local.LocalControl._turn = lambda self, now: False

db, flag = sys.argv[1], Path(sys.argv[2])
if sys.argv[3:] == ["empty-journal"]:  # its journal emptied after every copy (as a busy process's is)
    from loopwise._stores import sqlite as _sqlite
    from loopwise._stores import sqlite_write as _sqlite_write
    _sqlite_write.TRUNCATE_AT = 1

@lw.tool
async def nap() -> str:
    flag.touch()
    await asyncio.sleep(30)
    return "rested"

store = lw.SQLiteStore(db)
first = lw.Agent(ScriptedModel([ToolCall("nap", {}), "done"]), tools=[nap], store=store)
print("first", first.run_sync("go", run_id="young-1", tags=["young"]).stop_reason, flush=True)
later = lw.Agent(ScriptedModel(["done"]), store=store)  # started after the kill: not its target
print("later", later.run_sync("go", run_id="young-2", tags=["young"]).stop_reason, flush=True)
store.close()
"""


def _young_child(tmp_path: Path, db: Path, *args: str) -> subprocess.Popen:
    """`YOUNG_CHILD` on `db`, once its first run is in its tool."""
    lw.SQLiteStore(db).close()
    flag = tmp_path / "napping"
    proc = subprocess.Popen([sys.executable, "-c", YOUNG_CHILD, str(db), str(flag), *args], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not flag.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the child's run never reached its tool: {proc.communicate()}")
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("how", [{"tag": "young"}, {"all": True}])
def test_a_kill_by_tag_or_all_stops_a_run_too_young_for_a_lease(tmp_path, how):
    """The other process's run holds no lease (it never gets one here): the kill still stops it, and only it."""
    db = tmp_path / "lw.db"
    proc = _young_child(tmp_path, db)
    try:
        store = lw.SQLiteStore(db)
        try:
            plane = LocalControl(db)
            try:
                assert plane.leases() == {}  # nothing names it
            finally:
                plane.close()
            assert lw.kill(**how, reason="young batch", store=store) == 0  # (it is not counted)
        finally:
            store.close()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["first killed", "later done"]
    finished = _events(db, "young-1")[-1]
    assert finished.stop_reason == "killed" and "young batch" in finished.reason


@pytest.mark.parametrize("journal", ["kept", "empty-journal"])
def test_a_run_too_young_for_a_lease_is_not_resumed_elsewhere(tmp_path, journal):
    """Resuming another process's brand-new run (no lease yet) is refused; once that process is dead, it resumes.

    Also when the other process's journal no longer holds the run's events (a busy
    process empties it every few milliseconds, once its batches are in SQLite).
    """
    db = tmp_path / "lw.db"
    proc = _young_child(tmp_path, db, journal)
    if journal == "empty-journal":
        deadline = time.monotonic() + 10
        while journal_events(db, "young-1"):  # only SQLite has its events now
            assert time.monotonic() < deadline, "the child's journal was never emptied"
            time.sleep(0.01)

    @lw.tool
    async def nap() -> str:
        raise AssertionError("the call that may have happened is reported, not run again")

    try:
        store = lw.SQLiteStore(db)
        try:
            agent = lw.Agent(ScriptedModel([ToolCall("nap", {}), "resumed"]), tools=[nap], store=store)
            with pytest.raises(lw.UserError, match="being executed by another process"):
                agent.resume_sync("young-1")
            proc.kill()
            proc.wait(timeout=30)
            result = agent.resume_sync("young-1")  # its journal is a dead process's now
        finally:
            store.close()
    finally:
        proc.kill()
        proc.communicate()
    assert result.stop_reason == "done" and result.output == "resumed"
