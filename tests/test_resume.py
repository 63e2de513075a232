"""Resume: a run killed or crashed (SIGKILL of a real process) continues from its log.

Every completed step is done exactly once, the cost equals one uninterrupted run's, a
non-idempotent call in flight is reported as unknown (never silently re-run), and
limits continue where they were.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loopwise as lw
from loopwise.cli import main
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ToolCall, Usage

from .test_kill import _cli, _events, _napping, _output, _running_ids, _start, _wait_for


def _effects(tmp_path: Path) -> list[str]:
    path = tmp_path / "effects.txt"
    return path.read_text().splitlines() if path.exists() else []


def _reference(tmp_path: Path, monkeypatch, tool: str = "step") -> lw.RunResult:
    """One uninterrupted run of the stepper agent, in its own folder and database."""
    ref = tmp_path / "reference"
    ref.mkdir()
    monkeypatch.setenv("LW_TEST_DIR", str(ref))
    monkeypatch.setenv("LW_TOOL", tool)
    monkeypatch.delenv("LW_PAUSE_AT", raising=False)
    from tests.durable_agents import stepper

    stepper._store = lw.SQLiteStore(ref / "lw.db")
    try:
        return stepper.run_sync("go")
    finally:
        stepper._store.close()
        stepper._store = None


def _crash_at(tmp_path: Path, pause_at: str, tool: str = "step") -> tuple[Path, str]:
    """Run the stepper in a child process and SIGKILL it where it pauses; (db, run id)."""
    db = tmp_path / "lw.db"
    proc = _start(tmp_path, "stepper", db, "--task", "go", LW_PAUSE_AT=pause_at, LW_TOOL=tool)
    try:
        _wait_for(tmp_path / pause_at, proc)
        [run_id] = _running_ids(db, 1)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert _events(db, run_id)[-1].kind != "run_finished"
    return db, run_id


def _resume_in_a_fresh_process(tmp_path: Path, db: Path, run_id: str, tool: str = "step") -> None:
    proc = _start(tmp_path, "stepper", db, run_id, command="resume", LW_TOOL=tool)
    proc.wait(timeout=60)
    assert proc.returncode == 0, _output(proc)


def test_sigkill_mid_tool_then_resume_does_each_step_once_at_the_cost_of_one_run(tmp_path, monkeypatch):
    reference = _reference(tmp_path, monkeypatch)
    db, run_id = _crash_at(tmp_path, "step-3")
    assert _effects(tmp_path) == ["step 1", "step 2"]
    out = _cli("runs", "--json", "--db", str(db), tmp_path=tmp_path)
    assert '"status": "orphaned"' in out.stdout
    _resume_in_a_fresh_process(tmp_path, db, run_id)

    assert _effects(tmp_path) == ["step 1", "step 2", "step 3", "step 4"]  # each exactly once
    events = _events(db, run_id)
    resumed = next(e for e in events if e.kind == "run_resumed")
    assert resumed.previous_end == "crashed" and resumed.segment == 1
    assert resumed.interrupted_calls == [{"call_id": "lw-3-0", "name": "step", "action": "rerun"}]
    finished = events[-1]
    assert finished.kind == "run_finished" and finished.stop_reason == "done"
    assert finished.output == reference.output
    assert finished.iterations == reference.iterations == 5
    assert finished.cost_usd == pytest.approx(reference.cost_usd, rel=1e-9)
    assert finished.model_calls == reference.model_calls
    assert [e.seq for e in events] == list(range(len(events)))  # one log, one sequence


def test_sigkill_during_a_non_idempotent_call_reports_it_unknown(tmp_path, monkeypatch):
    db, run_id = _crash_at(tmp_path, "step-2", tool="charge")
    assert _effects(tmp_path) == ["charge 1 began", "charge 1", "charge 2 began"]
    _resume_in_a_fresh_process(tmp_path, db, run_id, tool="charge")
    effects = _effects(tmp_path)
    assert effects.count("charge 2 began") == 1 and "charge 2" not in effects, "never silently re-run"
    events = _events(db, run_id)
    resumed = next(e for e in events if e.kind == "run_resumed")
    assert resumed.interrupted_calls == [{"call_id": "lw-2-0", "name": "charge", "action": "unknown"}]
    unknown = [e for e in events if e.kind == "tool_call_finished" and e.call_id == "lw-2-0"]
    assert [e.outcome for e in unknown] == ["unknown"]
    assert "outcome unknown" in unknown[0].content and "not marked idempotent" in unknown[0].content
    # The model read it: its final answer lists what it was told.
    assert events[-1].stop_reason == "done" and "outcome unknown" in events[-1].output


def test_sigkill_during_a_model_call_charges_its_reservation(tmp_path, monkeypatch):
    reference = _reference(tmp_path, monkeypatch)
    db, run_id = _crash_at(tmp_path, "think-3")
    _resume_in_a_fresh_process(tmp_path, db, run_id)
    events = _events(db, run_id)
    in_flight = [e for e in events if e.kind == "model_call_started"][2]
    resumed = next(e for e in events if e.kind == "run_resumed")
    assert in_flight.reserved_usd > 0 and resumed.charged_usd == pytest.approx(in_flight.reserved_usd)
    finished = events[-1]
    assert finished.stop_reason == "done" and _effects(tmp_path) == ["step 1", "step 2", "step 3", "step 4"]
    # The interrupted THINK counts as an iteration and is charged; nothing else differs.
    assert finished.iterations == reference.iterations + 1
    assert finished.cost_usd == pytest.approx(reference.cost_usd + in_flight.reserved_usd, rel=1e-9)


def test_resume_refuses_while_a_live_process_holds_the_lease(tmp_path):
    db = tmp_path / "lw.db"
    with _napping(tmp_path, db) as (proc, run_id):
        out = _cli("resume", run_id, "--agent", "tests.durable_agents:sleeper", "--db", str(db), tmp_path=tmp_path)
        assert out.returncode == 2
        assert "is being executed by" in out.stderr and f"pid {proc.pid}" in out.stderr
        assert "loopwise kill" in out.stderr


def _counting_model(seen: list[list[str]]):
    """Calls `work(n)` four times, then answers; records the messages of every request."""

    def fn(request: ModelRequest) -> ModelResponse:
        seen.append([f"{m.role}:{m.content}" for m in request.messages])
        # The last result says how far it got (a sliding window keeps only the last ones).
        results = [m.content for m in request.messages if m.role == "tool"]
        n = int(results[-1].split()[-1]) if results else 0
        if not request.tools:
            return ModelResponse(text="best effort", usage=Usage(50, 5))
        if n < 4:
            return ModelResponse(text=f"thinking {n}", tool_calls=[ToolCall("work", {"n": n + 1})],
                                 usage=Usage(100 + n, 10))
        return ModelResponse(text="all done", usage=Usage(200, 10))

    return FunctionModel(fn, price=Price(1.0, 2.0))


@pytest.mark.parametrize("context", [None, lw.SlidingWindow(keep_last=1, summarize=False)])
async def test_a_killed_run_resumes_with_exactly_the_context_it_would_have_had(context):
    # Reference: uninterrupted. Then the same run killed during iteration 3's tool and
    # resumed: every request after the resume is the one the reference made.
    gate = anyio.Event()

    def make(seen, pause):
        @lw.tool(idempotent=True)
        async def work(n: int) -> str:
            if pause and n == 3 and not gate.is_set():
                gate.set()
                await anyio.sleep(60)
            return f"result {n}"

        return lw.Agent(_counting_model(seen), tools=[work], store=lw.MemoryStore(), context=context,
                        limits=lw.Limits(budget_usd=1.0))

    ref_seen: list[list[str]] = []
    reference = await make(ref_seen, False).run("go", run_id="ref")
    seen: list[list[str]] = []
    agent = make(seen, True)
    async with anyio.create_task_group() as tg:
        async def go():
            await agent.run("go", run_id="r")

        tg.start_soon(go)
        await gate.wait()
        lw.kill("r", reason="test", store=agent.store)
    result = await agent.resume("r")
    assert result.stop_reason == "done" and result.output == reference.output
    assert seen == ref_seen  # 3 requests before the kill, 2 after, identical to the reference's
    assert result.cost_usd == pytest.approx(reference.cost_usd)
    assert result.iterations == reference.iterations


async def test_limits_continue_across_resume():
    # Iterations: a run killed at iteration 3 of 4 has one left after resume.
    gate = anyio.Event()

    @lw.tool(idempotent=True)
    async def work(n: int) -> str:
        if n == 3 and not gate.is_set():
            gate.set()
            await anyio.sleep(60)
        return f"result {n}"

    def fn(request: ModelRequest) -> ModelResponse:
        if not request.tools:
            return ModelResponse(text="best effort", usage=Usage(10, 5))
        n = sum(1 for m in request.messages if m.role == "tool")
        return ModelResponse(tool_calls=[ToolCall("work", {"n": n + 1})], usage=Usage(100, 10))

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(fn, price=Price(10.0, 10.0)), tools=[work], store=store, max_tokens=100,
                     limits=lw.Limits(max_iterations=4, budget_usd=0.05))
    async with anyio.create_task_group() as tg:
        async def go():
            await agent.run("go", run_id="capped")

        tg.start_soon(go)
        await gate.wait()
        lw.kill("capped", store=store)
    result = await agent.resume("capped")
    assert result.iterations == 4 and result.stop_reason in ("max_iterations", "budget")
    assert result.cost_usd <= 0.05
    think = [e for e in store.load("capped") if e.kind == "model_call_finished" and e.purpose == "think"]
    assert len(think) == 4


async def test_a_crash_cannot_buy_a_fresh_budget():
    # Each THINK costs $0.011; the budget is $0.05: four THINKs fit in one run, and in
    # any number of segments together.
    calls = []

    @lw.tool(idempotent=True)
    async def work(n: int) -> str:
        calls.append(n)
        if len(calls) == 2:
            await anyio.sleep(60)  # killed here
        return "ok"

    def fn(request: ModelRequest) -> ModelResponse:
        n = sum(1 for m in request.messages if m.role == "tool")
        return ModelResponse(tool_calls=[ToolCall("work", {"n": n + 1})], usage=Usage(1000, 100))

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(fn, price=Price(10.0, 10.0)), tools=[work], store=store, max_tokens=100,
                     limits=lw.Limits(max_iterations=50, budget_usd=0.05, final_answer_on_limit=False))
    async with anyio.create_task_group() as tg:
        async def go():
            await agent.run("go", run_id="spender")

        tg.start_soon(go)
        while len(calls) < 2:
            await anyio.sleep(0.01)
        lw.kill("spender", store=store)
    result = await agent.resume("spender")
    assert result.stop_reason == "budget" and result.cost_usd <= 0.05
    total = sum(e.cost_usd for e in store.load("spender") if e.kind == "model_call_finished")
    assert total == pytest.approx(result.cost_usd) and total <= 0.05


async def test_the_deadline_counts_active_time_only():
    gate = anyio.Event()

    @lw.tool(idempotent=True)
    async def work(n: int) -> str:
        if n == 2 and not gate.is_set():
            gate.set()
            await anyio.sleep(60)
        await anyio.sleep(0.2)
        return f"ok {n}"

    def fn(request: ModelRequest) -> ModelResponse:
        if not request.tools:
            return ModelResponse(text="best effort")
        n = sum(1 for m in request.messages if m.role == "tool")
        return ModelResponse(tool_calls=[ToolCall("work", {"n": n + 1})])

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(fn), tools=[work], store=store,
                     limits=lw.Limits(max_iterations=100, budget_usd=None, deadline_s=3.0))
    async with anyio.create_task_group() as tg:
        async def go():
            await agent.run("go", run_id="timed")

        tg.start_soon(go)
        await gate.wait()
        await anyio.sleep(0.3)
        lw.kill("timed", store=store)
    await anyio.sleep(1.5)  # idle time between the kill and the resume does not count
    result = await agent.resume("timed")
    assert result.stop_reason == "deadline"
    events = store.load("timed")
    resumed = next(e for e in events if e.kind == "run_resumed")
    second = events[-1].ts - resumed.ts
    assert 0.3 < resumed.active_s < 2.5
    # The second segment had what the first left, not a fresh 3 s, and not nothing.
    assert second < 3.0 - resumed.active_s + 1.0
    assert result.duration_s == pytest.approx(resumed.active_s + second, abs=0.5)


def test_resume_refusals(tmp_path, capsys):
    db = tmp_path / "lw.db"
    store = lw.SQLiteStore(db)
    agent = lw.Agent(FunctionModel(lambda r: ModelResponse(text="hi")), store=store, limits=lw.Limits(budget_usd=None))
    done = agent.run_sync("hello")
    with pytest.raises(lw.UserError, match="finished with stop reason 'done'; a completed run cannot be resumed"):
        agent.resume_sync(done.run_id)
    with pytest.raises(lw.UserError, match="no run with id 'nope'"):
        agent.resume_sync("nope")
    with pytest.raises(lw.UserError, match="run_id must be a non-empty str"):
        agent.resume_sync("")
    store.close()
    assert main(["resume", done.run_id[:10], "--agent", "tests.durable_agents:sleeper", "--db", str(db)]) == 2
    assert "a completed run cannot be resumed" in capsys.readouterr().err


async def test_a_run_cannot_be_resumed_while_it_runs_in_this_process():
    store = lw.MemoryStore()
    started = anyio.Event()

    async def fn(request: ModelRequest) -> ModelResponse:
        if not started.is_set():
            started.set()
            await anyio.sleep(60)
        return ModelResponse(text="answered after resume")

    agent = lw.Agent(FunctionModel(fn), store=store, limits=lw.Limits(budget_usd=None))
    async with anyio.create_task_group() as tg:
        async def go():
            await agent.run("t", run_id="busy")

        tg.start_soon(go)
        await started.wait()
        with pytest.raises(lw.UserError, match="being executed in this process"):
            await agent.resume("busy")
        lw.kill("busy", store=store)
    result = await agent.resume("busy")
    assert result.stop_reason == "done" and result.output == "answered after resume"
    assert result.iterations == 2  # the THINK cancelled by the kill counts


# -- kill anywhere, resume, repeat: the invariants hold ------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kill_at=st.lists(st.integers(1, 40), max_size=4, unique=True),
       window=st.sampled_from([None, 1]))
def test_killed_anywhere_and_resumed_every_call_runs_at_most_once_and_the_run_completes(kill_at, window):
    # Steps are numbered as they happen (each model call, each tool call start); a kill
    # is sent at the chosen steps, from inside the run, and the run is resumed until done.
    store = lw.MemoryStore()
    run_id = "fuzzed"
    step = [0]
    completed: dict[str, int] = {}

    def maybe_kill() -> None:
        step[0] += 1
        if step[0] in kill_at:
            lw.kill(run_id, reason=f"step {step[0]}", store=store)

    async def body(kind: str, n: int, ctx: lw.RunContext) -> str:
        maybe_kill()
        await anyio.sleep(0)  # a kill lands here: the call does not complete
        completed[ctx.call_id] = completed.get(ctx.call_id, 0) + 1
        return f"{kind} {n} done"

    @lw.tool
    async def write(n: int, ctx: lw.RunContext) -> str:
        return await body("write", n, ctx)

    @lw.tool(idempotent=True)
    async def read(n: int, ctx: lw.RunContext) -> str:
        return await body("read", n, ctx)

    requests: list[ModelRequest] = []

    async def fn(request: ModelRequest) -> ModelResponse:
        requests.append(request)
        maybe_kill()
        await anyio.sleep(0)
        k = sum(1 for m in request.messages if m.role == "assistant" and m.tool_calls)
        if not request.tools:
            return ModelResponse(text="best effort", usage=Usage(10, 2))
        if k < 4:
            return ModelResponse(tool_calls=[ToolCall("write", {"n": k}), ToolCall("read", {"n": k})],
                                 usage=Usage(10 + k, 2))
        return ModelResponse(text="all done", usage=Usage(20, 2))

    context = None if window is None else lw.SlidingWindow(keep_last=window, summarize=False)
    agent = lw.Agent(FunctionModel(fn, price=Price(1.0, 1.0)), tools=[write, read], store=store,
                     context=context, runaway=lw.RunawayDetector(enabled=False),
                     limits=lw.Limits(max_iterations=12, budget_usd=1.0))

    async def main() -> lw.RunResult:
        result = await agent.run("go", run_id=run_id)
        for _ in range(len(kill_at) + 1):
            if result.stop_reason != "killed":
                break
            result = await agent.resume(run_id)
        return result

    result = anyio.run(main)
    events = store.load(run_id)
    assert result.stop_reason in ("done", "max_iterations"), (result.stop_reason, result.reason)
    kills = sum(1 for e in events if e.kind == "kill_received")
    sent = [k for k in kill_at if k <= step[0]]
    assert (kills >= 1) == bool(sent) and kills <= len(sent)  # the fuzzing did kill the run
    # No tool body completed twice; a non-idempotent call that was cut short never ran again.
    assert all(n == 1 for n in completed.values()), completed
    starts = [e for e in events if e.kind == "tool_call_started"]
    for e in events:
        if e.kind == "tool_call_finished" and e.outcome == "ok":
            assert completed.get(e.call_id) == 1
    for call_id in {e.call_id for e in starts if e.name == "write"}:
        attempts = [e for e in starts if e.call_id == call_id]
        assert len(attempts) == 1, f"non-idempotent {call_id} started {len(attempts)} times"
    # One log: gap-free, one end per segment, the last one is the result.
    assert [e.seq for e in events] == list(range(len(events)))
    ends = [e for e in events if e.kind == "run_finished"]
    assert len(ends) == 1 + sum(1 for e in events if e.kind == "run_resumed")
    # The model was never shown a tool call without its result.
    for request in requests:
        answered = {m.tool_call_id for m in request.messages if m.role == "tool"}
        asked = [c.id for m in request.messages if m.role == "assistant" for c in m.tool_calls]
        assert set(asked) <= answered, (asked, answered)
    # Costs add up across segments: every model call, plus in-flight charges (none here:
    # a kill cancels a call, which is not billed).
    billed = sum(e.cost_usd for e in events if e.kind == "model_call_finished")
    assert result.cost_usd == pytest.approx(billed)


async def test_a_run_that_ended_in_error_resumes_once_the_provider_is_back():
    # The provider fails every attempt of the second THINK: the run ends `error`. Later
    # the provider is back: resume goes on from the completed first iteration.
    from loopwise.models import ModelPolicy

    down = [True]
    calls: list[int] = []

    @lw.tool
    def lookup(n: int) -> str:
        calls.append(n)
        return f"record {n}"

    def fn(request: ModelRequest) -> ModelResponse:
        n = sum(1 for m in request.messages if m.role == "tool")
        if n == 0:
            return ModelResponse(tool_calls=[ToolCall("lookup", {"n": 1})], usage=Usage(10, 2))
        if down[0]:
            raise lw.ModelHTTPError("overloaded", status_code=503)
        return ModelResponse(text=f"answer from {n} records", usage=Usage(10, 2))

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(fn, price=Price(1.0, 1.0)), tools=[lookup], store=store,
                     model_policy=ModelPolicy(retries=1, backoff_initial_s=0.01))
    failed = await agent.run("go", run_id="flaky")
    assert failed.stop_reason == "error" and failed.iterations == 2
    down[0] = False
    result = await agent.resume("flaky")
    assert result.stop_reason == "done" and result.output == "answer from 1 records"
    assert calls == [1]  # the completed tool call is not repeated
    assert result.iterations == 3  # the failed THINK counted
    resumed = next(e for e in store.load("flaky") if e.kind == "run_resumed")
    assert resumed.previous_end == "error" and resumed.interrupted_calls == []
    assert result.cost_usd == pytest.approx(sum(e.cost_usd for e in store.load("flaky")
                                                 if e.kind == "model_call_finished"))


async def test_killed_during_the_best_effort_answer_resume_asks_for_it_again():
    in_final = anyio.Event()
    answered = []

    @lw.tool
    def lookup() -> str:
        return "data"

    async def fn(request: ModelRequest) -> ModelResponse:
        if not request.tools:
            if not in_final.is_set():
                in_final.set()
                await anyio.sleep(60)  # killed here, the first time
            answered.append(True)
            return ModelResponse(text="best effort: data")
        return ModelResponse(tool_calls=[ToolCall("lookup", {})])

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(fn), tools=[lookup], store=store,
                     limits=lw.Limits(max_iterations=1, budget_usd=None))
    async with anyio.create_task_group() as tg:
        async def go():
            await agent.run("t", run_id="stopping")

        tg.start_soon(go)
        await in_final.wait()
        lw.kill("stopping", store=store)
    result = await agent.resume("stopping")
    # The limit was already hit: the resumed segment only asks for the answer, then stops for it.
    assert result.stop_reason == "max_iterations" and result.output == "best effort: data"
    assert result.iterations == 1 and answered == [True]
    kinds = [e.kind for e in store.load("stopping")]
    assert kinds.count("limit_hit") == 1 and kinds.count("iteration_started") == 1
