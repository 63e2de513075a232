"""The pure core (`loopwise._core`): the loop's rules without an event loop, and the fold.

Folding a run's logged events through `evolve` gives the state the live run ended with:
resume starts from exactly what the live run held, by the same rules.
"""

from __future__ import annotations

import anyio
import pytest

import loopwise as lw
from loopwise._core.evolve import fold
from loopwise._core.state import State
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ToolCall, Usage


@lw.tool
def lookup(order: str) -> str:
    """Look an order up."""
    return f"{order}: shipped on day {len(order)}"


@lw.tool(cost_usd=0.01)
def charge(amount: int) -> str:
    """A paid tool."""
    return f"charged {amount}"


def _snapshot(state: State) -> dict:
    monitor = state.monitor
    return {
        "transcript": list(state.transcript),
        "context": state.context.to_dict(),
        "iteration": state.iteration,
        "model_calls": state.model_calls,
        "usage": state.usage,
        "cost_usd": round(state.cost_usd, 12),
        "output": state.output,
        "call_ids": sorted(state.call_ids),
        "think_input_tokens": state.think_input_tokens,
        "calls": list(state.calls),
        "done": state.done,
        "limit": None if state.limit is None else (state.limit.limit, state.limit.detail),
        "final_answered": state.final_answered,
        "monitor": None if monitor is None else (monitor.iterations, monitor.warned_at, monitor.stopped),
    }


def _script(*responses: ModelResponse):
    """A model that answers `responses` in order, and summaries with a fixed text."""
    queue = list(responses)

    def fn(request: ModelRequest) -> ModelResponse:
        if not request.tools and request.messages[0].content.startswith("You keep the running summary"):
            return ModelResponse(text="orders A and B are shipped", usage=Usage(40, 8))
        return queue.pop(0)

    return FunctionModel(fn, price=Price(1, 2))


def _live_and_folded(tmp_path, agent: lw.Agent, task: str) -> tuple[lw.RunResult, dict, dict]:
    run = agent._prepare(task, None, (), None, None)

    async def go():
        return await agent._execute(run)

    result = anyio.run(go)
    events = agent.store.load(run.run_id)
    folded = fold(events, agent.context, agent.runaway, agent.limits.max_iterations)
    return result, _snapshot(run.state), _snapshot(folded)


def _agent(tmp_path, model, **kwargs) -> lw.Agent:
    return lw.Agent(model, tools=[lookup, charge], store=lw.SQLiteStore(tmp_path / "lw.db"), **kwargs)


def test_folding_the_log_gives_the_state_the_live_run_ended_with(tmp_path):
    # Tool calls (one unknown tool, one paid), a cut answer (length), an empty answer,
    # a context that folds old iterations into a summary, and a final answer.
    model = _script(
        ModelResponse(tool_calls=[ToolCall("lookup", {"order": "A"}, "c1"), ToolCall("charge", {"amount": 3}, "c2")],
                      usage=Usage(100, 10)),
        ModelResponse(text="The orders are", finish_reason="length", usage=Usage(150, 5)),
        ModelResponse(text="  ", usage=Usage(160, 1)),
        ModelResponse(tool_calls=[ToolCall("lookup", {"order": "B"}, "c1"), ToolCall("nope", {}, None)],
                      usage=Usage(170, 12)),
        ModelResponse(text="A and B are shipped.", usage=Usage(200, 9)),
    )
    agent = _agent(tmp_path, model, context=lw.SlidingWindow(keep_last=1, summarize=True),
                   runaway=lw.RunawayDetector())
    result, live, folded = _live_and_folded(tmp_path, agent, "where are my orders?")
    assert result.stop_reason == "done"
    assert live["context"]["folded"] >= 1 and live["context"]["summary_calls"] >= 1  # the fold happened
    assert "c1-4-0" in live["call_ids"]  # a repeated provider id got a run-unique one
    assert live["monitor"][0] == 4  # every iteration that did not answer was observed
    assert folded == live


def test_folding_a_run_stopped_at_the_iteration_cap_with_a_best_effort_answer(tmp_path):
    model = _script(
        ModelResponse(tool_calls=[ToolCall("lookup", {"order": "A"})], usage=Usage(100, 10)),
        ModelResponse(tool_calls=[ToolCall("lookup", {"order": "A"})], usage=Usage(120, 10)),
        ModelResponse(text="Probably shipped.", usage=Usage(130, 5)),
    )
    agent = _agent(tmp_path, model, limits=lw.Limits(max_iterations=2))
    result, live, folded = _live_and_folded(tmp_path, agent, "where is order A?")
    assert result.stop_reason == "max_iterations" and result.output == "Probably shipped."
    assert live["final_answered"] and live["limit"][0] == "max_iterations"
    assert folded == live


def test_folding_a_runaway_stop(tmp_path):
    # The same call again and again: a nudge, then a stop; the monitor's history folds too.
    repeated = [ModelResponse(tool_calls=[ToolCall("lookup", {"order": "A"})], usage=Usage(100, 10))
                for _ in range(6)]
    model = _script(*repeated, ModelResponse(text="A is shipped.", usage=Usage(100, 5)))
    agent = _agent(tmp_path, model, runaway=lw.RunawayDetector(repeat_calls=2))
    result, live, folded = _live_and_folded(tmp_path, agent, "where is order A?")
    assert result.stop_reason == "runaway"
    assert live["monitor"][2] is True
    assert folded == live


def test_fold_refuses_a_log_that_does_not_begin_with_run_started(tmp_path):
    model = _script(ModelResponse(text="hi"))
    agent = _agent(tmp_path, model)
    result = agent.run_sync("hello")
    events = agent.store.load(result.run_id)
    with pytest.raises(ValueError, match="begins with run_started"):
        fold(events[1:], agent.context, agent.runaway, 8)
