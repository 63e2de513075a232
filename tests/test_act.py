"""ACT: one concurrency model for a response's tool calls (an anyio task group's).

Its cancellation is level-triggered: a tool that swallows one cancellation is cancelled
again at its next await, so it cannot hold a kill or the deadline up. With
`max_parallel_tools`, a call waiting for its turn holds no budget reservation.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import loopwise as lw
from loopwise.models import ScriptedModel, ToolCall

NO_RUNAWAY = lw.RunawayDetector(enabled=False)


@pytest.fixture(params=["asyncio-tasks", "task-group"])
def act_path(request, monkeypatch):
    """Both implementations of ACT: asyncio tasks, and the anyio task group (the reference)."""
    if request.param == "task-group":
        monkeypatch.setattr("loopwise._runtime.act._asyncio_loop", lambda: None)
    return request.param


def _stubborn_tools(entered: list[str], everyone_in: asyncio.Event, n: int):
    @lw.tool(timeout=None)
    async def stubborn(name: str) -> str:
        """Swallows the first cancellation, then goes on waiting."""
        entered.append(name)
        if len(entered) == n:
            everyone_in.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # (a second cancellation ends this one)
        return "finished"

    return stubborn


@pytest.mark.parametrize("max_parallel_tools", [None, 2])
def test_a_tool_that_swallows_a_cancellation_does_not_hold_up_a_kill(max_parallel_tools, act_path):
    calls = [ToolCall("stubborn", {"name": f"t{i}"}) for i in range(3)]
    store = lw.MemoryStore()

    async def main() -> tuple[lw.RunResult, float]:
        entered: list[str] = []
        everyone_in = asyncio.Event()
        tool = _stubborn_tools(entered, everyone_in, 2 if max_parallel_tools else 3)
        agent = lw.Agent(ScriptedModel([calls, "done"]), tools=[tool], store=store, runaway=NO_RUNAWAY,
                         max_parallel_tools=max_parallel_tools)
        task = asyncio.ensure_future(agent.run("go", run_id="stubborn"))
        await everyone_in.wait()
        started = time.monotonic()
        lw.kill("stubborn", reason="enough", store=store)
        result = await task
        return result, time.monotonic() - started

    result, took = asyncio.run(main())
    assert result.stop_reason == "killed"
    assert took < 20  # (each tool would hold it up 60 s more)
    outcomes = [e.outcome for e in store.load(result.run_id) if e.kind == "tool_call_finished"]
    assert outcomes == ["cancelled"] * 3


def test_a_tool_that_swallows_a_cancellation_does_not_hold_up_the_deadline(act_path):
    calls = [ToolCall("stubborn", {"name": f"t{i}"}) for i in range(2)]
    store = lw.MemoryStore()

    async def main() -> tuple[lw.RunResult, float]:
        tool = _stubborn_tools([], asyncio.Event(), 2)
        agent = lw.Agent(ScriptedModel([calls, "done"]), tools=[tool], store=store, runaway=NO_RUNAWAY,
                         limits=lw.Limits(deadline_s=1.0))
        started = time.monotonic()
        result = await agent.run("go")
        return result, time.monotonic() - started

    result, took = asyncio.run(main())
    assert result.stop_reason == "deadline"
    assert took < 20  # (the second tool would hold it up 60 s more)


def test_a_call_waiting_for_its_turn_holds_no_budget_reservation(act_path):
    # Each call may cost $0.03 (three attempts at $0.01) and costs $0.01. With one place,
    # the second call reserves only once the first has settled: $0.045 pays for both.
    spent: list[str] = []

    @lw.tool(cost_usd=0.01, retries=2)
    async def paid(name: str) -> str:
        """One paid attempt that answers."""
        spent.append(name)
        await asyncio.sleep(0)
        return f"{name}: ok"

    store = lw.MemoryStore()
    budget = lw.Budget(usd=0.045)
    calls = [ToolCall("paid", {"name": "first"}), ToolCall("paid", {"name": "second"})]
    agent = lw.Agent(ScriptedModel([calls, "done"]), tools=[paid], store=store, runaway=NO_RUNAWAY,
                     max_parallel_tools=1, limits=lw.Limits(budget_usd=None))
    result = agent.run_sync("go", budget=budget)
    assert result.stop_reason == "done"
    outcomes = [(e.outcome, e.content) for e in store.load(result.run_id) if e.kind == "tool_call_finished"]
    assert outcomes == [("ok", "first: ok"), ("ok", "second: ok")]
    assert spent == ["first", "second"]
    assert budget.spent_usd == pytest.approx(0.02) and budget.reserved_usd == 0
