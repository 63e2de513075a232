"""The pure core (`loopwise._core`): the loop's rules without an event loop, and the fold.

Folding a run's logged events through `evolve` gives the state the live run ended with:
resume starts from exactly what the live run held, by the same rules.
"""

from __future__ import annotations

import anyio
import pytest

import loopwise as lw
from loopwise._core import decide as core
from loopwise._core.evolve import evolve, fold
from loopwise._core.state import State
from loopwise._events import ModelCallFinished, ModelCallStarted, RunStarted, ToolCallFinished, ToolCallStarted
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


# -- the rules with no event loop: inputs in, events and commands out ---------------------


class _Rules:
    def __init__(self, **limits):
        self.limits = lw.Limits(**limits)
        self.expectations = False
        self.tools_by_name = {"lookup": lookup}


class _State(State):
    __slots__ = ("rules",)  # (the test's own: which rules its helpers decide by)


def _fresh(rules: _Rules, runaway: lw.RunawayDetector | None = None) -> State:
    started = RunStarted(run_id="r1", seq=0, ts=0.0, task=[lw.Message("user", "where is A?")], instructions="Be brief.")
    state = _State.start(started, lw.FullContext(), runaway, rules.limits.max_iterations)
    state.rules = rules
    return state


def _apply(state: State, step) -> object:
    """What a driver does with a step's events: apply each; return the command."""
    events, command = step
    for event in events:
        evolve(state, event)
    return command


def _model(state: State, command, text=None, calls=(), finish_reason=None, cost=0.0):
    """The model call of `command` answered: its two events applied; the core's next step."""
    evolve(state, ModelCallStarted(run_id="r1", seq=0, ts=0.0, iteration=command.iteration, purpose=command.purpose,
                                   model="m", n_messages=len(state.transcript), n_tools=1))
    evolve(state, ModelCallFinished(run_id="r1", seq=0, ts=0.0, iteration=command.iteration, purpose=command.purpose,
                                    text=text, tool_calls=list(calls), finish_reason=finish_reason,
                                    usage=Usage(10, 2), cost_usd=cost))
    return core.answered(state, state.rules, command, finish_reason)


def _start(rules: _Rules, runaway=None) -> tuple[State, object]:
    state = _fresh(rules, runaway)
    assert _apply(state, core.begin(state, rules)) is core.CONTINUE
    step = core.start_iteration(state, rules, None)
    assert [e.kind for e in step[0]] == ["iteration_started"]
    return state, _apply(state, step)


def _tools_done(state: State, command, content="A: shipped") -> object:
    for call in command.calls:
        evolve(state, ToolCallStarted(run_id="r1", seq=0, ts=0.0, iteration=command.iteration, call_id=call.id,
                                      name=call.name))
        evolve(state, ToolCallFinished(run_id="r1", seq=0, ts=0.0, iteration=command.iteration, call_id=call.id,
                                       name=call.name, outcome="ok", content=content))
    return core.check(state, state.rules, command.iteration)


def test_core_a_run_that_answers():
    state, command = _start(_Rules())
    assert isinstance(command, core.CallModel) and (command.purpose, command.iteration) == ("think", 1)
    events, command = _model(state, command, text="A is shipped.")
    assert events == () and isinstance(command, core.Stop) and command.reason == "done"
    assert state.output == "A is shipped." and state.done
    assert [m.role for m in state.transcript] == ["system", "user", "assistant"]


def test_core_tool_calls_then_the_iteration_cap_with_a_best_effort_answer():
    rules = _Rules(max_iterations=2)
    state, command = _start(rules)
    events, command = _model(state, command, calls=[ToolCall("lookup", {"order": "A"}, "c1")])
    assert events == () and isinstance(command, core.RunTools) and [c.id for c in command.calls] == ["c1"]
    step = _tools_done(state, command)
    assert _apply(state, step) is core.CONTINUE
    assert [m.role for m in state.transcript][-2:] == ["assistant", "tool"]
    command = _apply(state, core.start_iteration(state, rules, None))
    # The same provider id again: a run-unique one; at the cap the call is not executed.
    step = _model(state, command, calls=[ToolCall("lookup", {"order": "B"}, "c1")])
    assert [e.kind for e in step[0]] == ["tool_call_started", "tool_call_finished", "limit_hit", "nudge"]
    assert step[0][0].call_id == "c1-2-0" and step[0][1].content == core.NOT_EXECUTED
    command = _apply(state, step)
    assert isinstance(command, core.CallModel) and command.purpose == "final_answer"
    assert state.transcript[-1].content == core.FINAL_ANSWER_PROMPT.format(limit=2)
    events, command = _model(state, command, text="Probably shipped.")
    assert isinstance(command, core.Stop) and command.reason == "max_iterations"
    assert state.output == "Probably shipped." and state.final_answered


def test_core_a_cut_answer_and_an_empty_one_get_nudges():
    rules = _Rules()
    state, command = _start(rules)
    step = _model(state, command, text="A is", finish_reason="length")
    assert [e.kind for e in step[0]] == ["nudge"] and step[0][0].content == core.LENGTH_NUDGE
    assert _apply(state, step) is core.CONTINUE
    assert not state.done and state.output is None
    assert [(m.role, m.content) for m in state.transcript[-2:]] == [("assistant", "A is"), ("user", core.LENGTH_NUDGE)]
    command = _apply(state, core.start_iteration(state, rules, None))
    step = _model(state, command, text="  ")
    assert [e.content for e in step[0]] == [core.EMPTY_RESPONSE_NUDGE] and step[1] is core.CONTINUE


def test_core_a_runaway_gets_a_nudge_then_a_stop():
    rules = _Rules(final_answer_on_limit=False)
    state, command = _start(rules, lw.RunawayDetector(repeat_calls=2, stale_iterations=None, growth_factor=None))
    kinds = []
    for _ in range(6):
        _, command = _model(state, command, calls=[ToolCall("lookup", {"order": "A"})])
        events, command = _tools_done(state, command)
        kinds += [e.kind for e in events]
        for event in events:
            evolve(state, event)
        if isinstance(command, core.Stop):
            break
        command = _apply(state, core.start_iteration(state, rules, None))
    assert kinds == ["nudge", "limit_hit"]
    assert isinstance(command, core.Stop) and command.reason == "runaway"


def test_core_a_budget_refusal_a_kill_and_the_deadline():
    rules = _Rules(deadline_s=10.0)
    state, command = _start(rules)
    events, stop = core.model_failed(state, rules, command, "budget", "budget of $0.01 exhausted", None)
    assert [e.limit for e in events] == ["budget"] and stop.reason == "budget"
    events, stop = core.kill_received(state, "ops", "runaway spend", 5.0)
    assert [e.kind for e in events] == ["kill_received"] and stop.reason == "killed"
    events, stop = core.deadline_reached(state, rules)
    assert [e.limit for e in events] == ["deadline"] and stop.reason == "deadline"
    # Another iteration, and the answer after it, must fit before the deadline: one took
    # 3 s with 7 s left (it fits), or 8 s with 2 s left (it does not).
    _, command = _model(state, command, calls=[ToolCall("lookup", {"order": "A"})])
    assert _apply(state, _tools_done(state, command)) is core.CONTINUE
    assert core.start_iteration(state, rules, 3.0)[1].purpose == "think"
    events, command = core.start_iteration(state, rules, 8.0)
    assert [e.kind for e in events] == ["limit_hit", "nudge"] and events[0].limit == "deadline"
    assert isinstance(command, core.CallModel) and command.purpose == "final_answer"


def test_core_a_resume_settles_what_was_in_flight():
    rules = _Rules()
    state, command = _start(rules)
    _, command = _model(state, command, calls=[ToolCall("lookup", {"order": "A"}, "c1"),
                                               ToolCall("charge", {"amount": 1}, "c2")])
    evolve(state, ToolCallFinished(run_id="r1", seq=0, ts=0.0, iteration=1, call_id="c1", name="lookup",
                                   outcome="cancelled", content="cancelled"))
    # c1 (idempotent here) runs again, c2 is answered "outcome unknown".
    events, command = core.begin(state, rules, [(command.calls[0], True), (command.calls[1], False)])
    assert [(e.kind, e.call_id, e.outcome) for e in events] == [("tool_call_finished", "c2", "unknown")]
    assert isinstance(command, core.RunTools) and [c.id for c in command.calls] == ["c1"]
    for event in events:
        evolve(state, event)
    assert _apply(state, _tools_done(state, command)) is core.CONTINUE
    assert [m.tool_call_id for m in state.transcript if m.role == "tool"] == ["c1", "c2"]  # the model's order
