"""Budgets and paid tool calls: the whole call is reserved, fallback chain included.

The rule (docs/budgets.md): before a tool call runs, its worst case is reserved on every
budget the run draws from: each attempt of the tool, and each paid fallback its chain can
reach (a fallback tool's own attempts and fallbacks, nested as deep as they run). A call
whose worst case does not fit is not made. After the call the reservation is settled with
what its attempts cost. So neither a run's budget nor a shared one can be overspent by a
fallback, a retry or calls running at once, and the spend read back from the log is what
the budgets counted.
"""

from __future__ import annotations

import asyncio

import pytest

import loopwise as lw
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ToolCall

from .test_loop import assert_valid_log

NO_RUNAWAY = lw.RunawayDetector(enabled=False)
EPS = 1e-9


def log_spend(events) -> float:
    """What a run spent, summed from its log: model calls and tool calls."""
    return (sum(e.cost_usd for e in events if e.kind == "model_call_finished")
            + sum(e.cost_usd for e in events if e.kind == "tool_call_finished"))


def calls_each_turn(*names: str, turns: int | None = None) -> FunctionModel:
    """A free model that calls `names` at once every turn (for `turns` turns, then answers)."""

    def fn(request: ModelRequest) -> ModelResponse:
        made = sum(1 for m in request.messages if m.role == "assistant")
        if not request.tools or (turns is not None and made >= turns):
            return ModelResponse(text="done")
        return ModelResponse(tool_calls=[ToolCall(name, {"q": f"{made}-{i}"}) for i, name in enumerate(names)])

    return FunctionModel(fn, price=Price(0, 0))


def failing_tool_with_paid_fallback(cost: float, fallback_cost: float, billed: list[float]) -> lw.Tool:
    @lw.tool(cost_usd=fallback_cost, breaker=False)
    async def premium_lookup(q: str) -> str:
        """The expensive source."""
        billed.append(fallback_cost)
        return f"premium {q}"

    @lw.tool(cost_usd=cost, fallback=premium_lookup, breaker=False)
    async def lookup(q: str) -> str:
        """The cheap source, down today."""
        billed.append(cost)
        raise ConnectionError("down")

    return lookup


# -- the three numbers ------------------------------------------------------------


def test_a_run_budget_holds_when_every_call_falls_back_to_a_paid_tool():
    # Five calls per iteration, each falling back to a $0.40 tool, under $1.00: $4.00 spent before.
    billed: list[float] = []
    lookup = failing_tool_with_paid_fallback(0.0, 0.40, billed)
    store = lw.MemoryStore()
    agent = lw.Agent(calls_each_turn(*["lookup"] * 5), tools=[lookup], store=store, runaway=NO_RUNAWAY,
                     limits=lw.Limits(max_iterations=5, budget_usd=1.00))
    result = agent.run_sync("look it all up")
    events = store.load(result.run_id)
    assert_valid_log(events)
    assert sum(billed) <= 1.00 + EPS, billed
    assert log_spend(events) == pytest.approx(sum(billed))
    assert result.cost_usd == pytest.approx(sum(billed))
    assert sum(billed) == pytest.approx(0.80)  # two fit, at once; the others are refused, every turn
    refused = [e for e in events if e.kind == "tool_call_finished" and e.outcome == "not_executed"
               and e.error is not None and e.error.type == "BudgetExceeded"]
    assert len(refused) == 3 + 5 * 3  # three in the first turn, then all five, in the 4 turns with tools
    assert all("budget of $1.00 would be exceeded" in e.content for e in refused)
    # it says what the worst case was made of
    assert "(the worst case of lookup: $0 itself + up to $0.40 for fallback premium_lookup)" in refused[0].content


def test_a_call_whose_fallback_does_not_fit_is_not_made():
    # A $0.10 tool with a $0.40 fallback under $0.30: $0.50 spent before.
    billed: list[float] = []
    lookup = failing_tool_with_paid_fallback(0.10, 0.40, billed)
    store = lw.MemoryStore()
    agent = lw.Agent(calls_each_turn("lookup", turns=1), tools=[lookup], store=store, runaway=NO_RUNAWAY,
                     limits=lw.Limits(max_iterations=3, budget_usd=0.30))
    result = agent.run_sync("look it up")
    events = store.load(result.run_id)
    assert_valid_log(events)
    assert billed == []  # not even the $0.10 attempt: the call as a whole does not fit
    (finished,) = [e for e in events if e.kind == "tool_call_finished"]
    assert finished.outcome == "not_executed" and finished.cost_usd == 0
    assert "budget of $0.30 would be exceeded" in finished.content and "needs $0.50" in finished.content
    assert "lookup: 1 attempt of $0.10 + up to $0.40 for fallback premium_lookup" in finished.content
    assert result.stop_reason == "done"  # the model read why, and the run went on


async def test_concurrent_runs_on_a_shared_budget_cannot_overspend_through_fallbacks():
    # 20 concurrent runs on a shared $1.00, each call falling back to a paid tool: $4.50 spent before.
    billed: list[float] = []
    lookup = failing_tool_with_paid_fallback(0.0, 0.25, billed)
    shared = lw.Budget(usd=1.00, name="batch")
    store = lw.MemoryStore()
    agent = lw.Agent(calls_each_turn("lookup", "lookup"), tools=[lookup], store=store, runaway=NO_RUNAWAY,
                     limits=lw.Limits(max_iterations=4, budget_usd=None))
    results = await asyncio.gather(*(agent.run(f"task {i}", budget=shared) for i in range(20)))
    spent = 0.0
    for r in results:
        events = store.load(r.run_id)
        assert_valid_log(events)
        spent += log_spend(events)
    assert sum(billed) <= 1.00 + EPS
    assert spent == pytest.approx(sum(billed)) and shared.spent_usd == pytest.approx(spent)
    assert shared.reserved_usd == 0 and shared.overruns == 0
    assert sum(billed) == pytest.approx(1.00)  # four calls' worst case fit in $1.00, exactly


# -- each way a call can spend -------------------------------------------------------------


def test_every_retry_of_a_fallback_tool_is_in_the_worst_case():
    attempts: list[str] = []

    @lw.tool(cost_usd=0.10, retries=2, backoff=lw.Backoff(initial_s=0, jitter=False), breaker=False)
    def backup(q: str) -> str:
        """A flaky paid backup (sync: runs in a thread)."""
        attempts.append("backup")
        raise ToolFlake("again")

    @lw.tool(cost_usd=0.05, retries=1, backoff=lw.Backoff(initial_s=0, jitter=False),
             fallback=[backup, "nothing cached", backup], breaker=False)
    async def primary(q: str) -> str:
        """Flaky too."""
        attempts.append("primary")
        raise ToolFlake("no")

    # 2 × $0.05 + 3 × $0.10; the backup after the plain value is never reached.
    assert primary.policy.max_cost_usd() == pytest.approx(0.40)
    store = lw.MemoryStore()
    budget = lw.Budget(usd=0.40)
    agent = lw.Agent(calls_each_turn("primary", turns=2), tools=[primary], store=store, runaway=NO_RUNAWAY,
                     limits=lw.Limits(max_iterations=4, budget_usd=None))
    result = agent.run_sync("go", budget=budget)
    events = store.load(result.run_id)
    outcomes = [e.outcome for e in events if e.kind == "tool_call_finished"]
    assert outcomes == ["fallback", "not_executed"]  # the second call's $0.40 no longer fits
    assert attempts == ["primary", "primary", "backup", "backup", "backup"]
    assert log_spend(events) == pytest.approx(0.40) == pytest.approx(budget.spent_usd)
    assert budget.reserved_usd == 0 and budget.overruns == 0


class ToolFlake(Exception):
    pass


def test_the_worst_case_follows_the_chain_as_it_can_run():
    def tool(cost: float, *, retries: int = 0, fallback=None) -> lw.Tool:
        def fn(q: str) -> str:
            """A tool."""
            return q

        return lw.tool(fn, cost_usd=cost, retries=retries, fallback=fallback)

    def free_callable(q: str) -> str:
        return q

    leaf = tool(1.0)
    assert tool(0.5, retries=3).policy.max_cost_usd() == 2.0
    assert tool(0, fallback=leaf).policy.max_cost_usd() == 1.0  # a free tool with a paid fallback
    # a callable or a Template may fail, so the chain goes on after it; a plain value always answers
    assert tool(0, fallback=[free_callable, leaf]).policy.max_cost_usd() == 1.0
    assert tool(0, fallback=[lw.Template("{q:d}"), leaf]).policy.max_cost_usd() == 1.0
    assert tool(0, fallback=["cached", leaf]).policy.max_cost_usd() == 0.0
    assert tool(0, fallback=[leaf, "cached", leaf]).policy.max_cost_usd() == 1.0
    # each fallback tool brings its own retries and fallbacks, to the depth the chain runs
    d4 = tool(1000.0)  # would run at depth 4: skipped (fallbacks nest at most 3 deep)
    d3 = tool(8.0, fallback=d4)
    d2 = tool(4.0, retries=1, fallback=[d3, d3])
    d1 = tool(2.0, fallback=d2)
    top = tool(1.0, fallback=[d1, leaf])
    assert top.policy.max_cost_usd() == 1 + (2 + (2 * 4 + 8 + 8)) + 1
    assert d3.policy.max_cost_usd() == 1008.0  # called directly, its own fallback runs


def test_a_template_that_cannot_be_filled_passes_the_chain_on_and_the_run_goes_on():
    billed: list[float] = []

    @lw.tool(cost_usd=0.20, breaker=False)
    async def backup(q: str) -> str:
        """Paid backup."""
        billed.append(0.20)
        return "from the backup"

    # "{q:d}" cannot format the str it is given: that Template fails, and the chain goes on.
    @lw.tool(cost_usd=0.10, fallback=[lw.Template("item {q:d} unavailable"), backup], breaker=False)
    async def lookup(q: str) -> str:
        """Down."""
        raise ConnectionError("down")

    assert lookup.policy.max_cost_usd() == pytest.approx(0.30)
    store = lw.MemoryStore()
    budget = lw.Budget(usd=1)
    result = lw.Agent(calls_each_turn("lookup", turns=1), tools=[lookup], store=store,
                      limits=lw.Limits(budget_usd=None)).run_sync("go", budget=budget)
    events = store.load(result.run_id)
    assert_valid_log(events)
    assert result.stop_reason == "done"
    (finished,) = [e for e in events if e.kind == "tool_call_finished"]
    assert finished.outcome == "fallback" and finished.fallback == "backup"
    assert "fallback a template could not be filled: ValueError" in finished.content
    assert finished.cost_usd == pytest.approx(0.30) == pytest.approx(budget.spent_usd)
    assert billed == [0.20]


def test_a_cancelled_call_settles_what_its_attempts_cost():
    started = asyncio.Event()

    @lw.tool(cost_usd=0.25, timeout=60, breaker=False)
    async def slow_backup(q: str) -> str:
        """Paid, and slow today."""
        started.set()
        await asyncio.sleep(60)
        return "late"

    @lw.tool(cost_usd=0.10, retries=1, backoff=lw.Backoff(initial_s=0, jitter=False), fallback=slow_backup,
             breaker=False)
    async def lookup(q: str) -> str:
        """Down."""
        raise ConnectionError("down")

    store = lw.MemoryStore()
    budget = lw.Budget(usd=5)
    agent = lw.Agent(calls_each_turn("lookup"), tools=[lookup], store=store, runaway=NO_RUNAWAY,
                     limits=lw.Limits(max_iterations=3, budget_usd=None))

    async def main() -> lw.RunResult:
        task = asyncio.ensure_future(agent.run("go", run_id="cancel-me", budget=budget))
        await started.wait()
        lw.kill("cancel-me", reason="enough", store=store)
        return await task

    result = asyncio.run(main())
    assert result.stop_reason == "killed"
    events = store.load(result.run_id)
    assert_valid_log(events)
    (finished,) = [e for e in events if e.kind == "tool_call_finished"]
    # two attempts of lookup and the backup's attempt in flight: each may have been billed
    assert finished.outcome == "cancelled" and finished.cost_usd == pytest.approx(0.45)
    assert budget.spent_usd == pytest.approx(0.45) and budget.reserved_usd == 0
    assert result.cost_usd == pytest.approx(0.45)


# -- tools that run elsewhere: in a child process, on an MCP server ------------------------


def test_a_process_isolated_tool_and_its_paid_fallback_are_reserved_together():
    from .isolation_helpers import raise_value_error

    billed: list[float] = []

    def backup(message: str) -> str:
        billed.append(0.30)
        return f"backup: {message}"

    paid = lw.tool(backup, cost_usd=0.30, breaker=False)
    in_child = lw.tool(raise_value_error, isolation="process", cost_usd=0.10, retries=1, fallback=paid,
                       backoff=lw.Backoff(initial_s=0, jitter=False), breaker=False, timeout=60)
    assert in_child.policy.max_cost_usd() == pytest.approx(0.50)
    outcomes = []
    for usd in (0.45, 0.50):  # the worst case does not fit, then fits exactly
        store = lw.MemoryStore()
        model = lw.models.ScriptedModel([[ToolCall("raise_value_error", {"message": "m"})], "done"])
        result = lw.Agent(model, tools=[in_child], store=store, limits=lw.Limits(budget_usd=usd)).run_sync("go")
        events = store.load(result.run_id)
        assert_valid_log(events)
        (finished,) = [e for e in events if e.kind == "tool_call_finished"]
        outcomes.append((finished.outcome, finished.attempts, finished.cost_usd))
        assert log_spend(events) <= usd + EPS
    assert outcomes == [("not_executed", 0, 0.0), ("fallback", 2, pytest.approx(0.50))]
    assert billed == [0.30]


async def test_a_priced_mcp_tool_and_its_paid_fallback_are_reserved_together(store):
    pytest.importorskip("mcp")
    import sys
    from pathlib import Path

    from loopwise.mcp import MCPServer

    billed: list[float] = []

    @lw.tool(cost_usd=0.30, breaker=False)
    async def backup() -> str:
        """The paid backup source."""
        billed.append(0.30)
        return "from the backup"

    def model_fn(request: ModelRequest) -> ModelResponse:
        if not request.tools or any(m.role == "tool" for m in request.messages):
            return ModelResponse(text="done")
        return ModelResponse(tool_calls=[ToolCall("fail", {}), ToolCall("fail", {})])

    server = MCPServer.stdio(sys.executable, args=[str(Path(__file__).with_name("mcp_server.py"))])
    async with server:
        (fail,) = await server.tools(include=["fail"], cost_usd=0.10, retries=1, fallback=backup,
                                     backoff=lw.Backoff(initial_s=0, jitter=False), breaker=False)
        assert fail.policy.max_cost_usd() == pytest.approx(0.50)
        shared = lw.Budget(usd=0.90, name="mcp")
        agent = lw.Agent(FunctionModel(model_fn, price=Price(0, 0)), tools=[fail], store=store,
                         limits=lw.Limits(max_iterations=3, budget_usd=None))
        results = [await agent.run("go", budget=shared) for _ in range(2)]
    spent = sum(log_spend(store.load(r.run_id)) for r in results)
    assert billed == [0.30]  # one call's $0.50 fits in $0.90, no other
    assert spent == pytest.approx(0.50) == pytest.approx(shared.spent_usd)
    assert shared.reserved_usd == 0 and shared.overruns == 0


async def test_a_paid_call_in_flight_when_the_process_died_is_charged_its_worst_case_on_resume():
    started = asyncio.Event()

    def agent_on(store: lw.MemoryStore, hang: bool) -> lw.Agent:
        @lw.tool(name="premium", cost_usd=0.30, breaker=False)
        async def premium(q: str) -> str:
            """Paid backup."""
            return "premium"

        @lw.tool(name="book", cost_usd=0.10, retries=1, fallback=premium, breaker=False)
        async def book(q: str) -> str:
            """Books it (paid, not idempotent)."""
            if hang:
                started.set()
                await asyncio.sleep(60)
            return "booked"

        return lw.Agent(calls_each_turn("book", turns=1), tools=[book], store=store, runaway=NO_RUNAWAY,
                        limits=lw.Limits(max_iterations=4, budget_usd=1.00))

    crashed = lw.MemoryStore()
    task = asyncio.ensure_future(agent_on(crashed, hang=True).run("go", run_id="died"))
    await started.wait()
    # The process dies here: what reached the log is all that is left of the run.
    survived = lw.MemoryStore()
    survived.write(crashed.load("died"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    result = await agent_on(survived, hang=False).resume("died")
    events = survived.load("died")
    resumed = next(e for e in events if e.kind == "run_resumed")
    assert resumed.interrupted_calls == [{"call_id": "lw-1-0", "name": "book", "action": "unknown"}]
    assert resumed.charged_usd == pytest.approx(0.50)  # 2 attempts of $0.10 + the $0.30 fallback
    assert result.stop_reason == "done" and result.cost_usd == pytest.approx(0.50)
