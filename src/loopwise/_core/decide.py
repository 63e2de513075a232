"""The loop's rules as steps: from the state after an input, what comes next.

Each function takes the state (already changed by the input's events, through `evolve`)
and returns a `Step`: ``(events, command)``. The events are the ones the rule itself
produces (an iteration starts, a nudge, a limit hit, tool calls not executed at the
cap, an outcome a resume cannot know); the driver stamps their `seq` and `ts` (they are
made with 0), passes each through `evolve` and logs it, then performs the command:

- `CallModel(purpose, iteration)`: THINK (after REFINE), or the best-effort answer after
  a limit (tools disabled);
- `RunTools(iteration, calls)`: ACT, then CHECK (`check`) once the outcomes are applied;
- `Check(iteration)`: CHECK once this step's events are applied;
- `CONTINUE`: CHECK passed: the driver gives the time spent (`start_iteration`);
- `Stop(reason, detail, error)`: the run ends.

Inputs and their functions: a new or resumed run (`begin`), the next iteration with the
time spent (`start_iteration`), a model call answered (`answered`) or failed or refused
by a budget (`model_failed`), tool calls finished (`check`), the deadline reached
(`deadline_reached`), a kill received (`kill_received`). No I/O, no clock: the same
inputs give the same steps, with or without an event loop.

`Rules` is what they read of the configuration; an `Agent` is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .._events import (
    ErrorInfo,
    Event,
    KillReceived,
    LimitHit,
    Nudge,
    StopReason,
    new_iteration_started,
    new_tool_call_finished,
    new_tool_call_started,
)
from .._tools.expect import NO_VALUE, judge, split_expectation
from .._messages import ToolCall
from .evolve import RUNAWAY_REASON
from .state import State

if TYPE_CHECKING:
    from .._policies.limits import Limits
    from .._tools.tool import Tool

__all__ = [
    "CONTINUE", "CallModel", "Check", "Rules", "RunTools", "Step", "Stop", "answered", "begin", "check",
    "deadline_reached", "kill_received", "model_failed", "start_iteration", "tool_finished", "tool_started",
]

NOT_EXECUTED = "not executed: iteration limit reached"
FINAL_ANSWER_PROMPT = (
    "You have reached the limit of {limit} iterations, so tools are disabled now. "
    "Give your best final answer from what you already know."
)
RUNAWAY_FINAL_PROMPT = (
    "You keep repeating yourself without getting closer to an answer, so tools are disabled now. "
    "Give your best final answer from what you already know."
)
LIMIT_FINAL_PROMPT = (
    "The run has reached its {limit} limit, so tools are disabled now. "
    "Give your best final answer from what you already know."
)
EMPTY_RESPONSE_NUDGE = (
    "Your last response was empty (no text and no tool calls). "
    "Call a tool or give your final answer."
)
LENGTH_NUDGE = (
    "Your last answer was cut off by the max_tokens limit, so it is not a final answer. "
    "Give a shorter complete answer."
)
UNKNOWN_OUTCOME = (
    "outcome unknown: the run was interrupted while this call was in flight, and {name} is not "
    "marked idempotent, so it was not run again. It may or may not have taken effect; check before "
    "relying on it or repeating it."
)


class Rules(Protocol):
    """What the rules read of the configuration (an `Agent` has these)."""

    limits: Limits
    expectations: bool
    tools_by_name: dict[str, Tool]


class CallModel:
    """Make one model call: ``think`` (REFINE first, tools offered) or ``final_answer`` (no tools)."""

    __slots__ = ("iteration", "purpose")

    def __init__(self, purpose: str, iteration: int) -> None:
        self.purpose = purpose
        self.iteration = iteration

    def __repr__(self) -> str:
        return f"CallModel({self.purpose!r}, {self.iteration})"


class RunTools:
    """Run these tool calls of `iteration` (ACT); their outcomes are events."""

    __slots__ = ("calls", "iteration")

    def __init__(self, iteration: int, calls: Sequence[ToolCall]) -> None:
        self.iteration = iteration
        self.calls = calls

    def __repr__(self) -> str:
        return f"RunTools({self.iteration}, {[c.id for c in self.calls]})"


class Stop:
    """End the run with `reason`."""

    __slots__ = ("detail", "error", "reason")

    def __init__(self, reason: StopReason, detail: str | None = None, error: ErrorInfo | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.error = error

    def __repr__(self) -> str:
        return f"Stop({self.reason!r}, {self.detail!r})"


class Check:
    """CHECK `iteration` once the step's events are applied (`check`)."""

    __slots__ = ("iteration",)

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def __repr__(self) -> str:
        return f"Check({self.iteration})"


class _Continue:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CONTINUE"


#: CHECK passed: start the next iteration (`start_iteration`, with the time spent).
CONTINUE = _Continue()

Command = CallModel | RunTools | Check | Stop | _Continue
Step = tuple[Sequence[Event], Command]

_NONE: tuple[Event, ...] = ()
_DONE: Step = (_NONE, Stop("done"))
_GO_ON: Step = (_NONE, CONTINUE)


def begin(state: State, rules: Rules, interrupted: Sequence[tuple[ToolCall, bool]] | None = None) -> Step:
    """The first step of a new run (`interrupted` None), or of a resumed one.

    A resumed run settles what its previous segment left: its answer is in the log
    (done); a limit was hit (the best-effort answer, if not given yet, then stop); its
    last ACT was cut short (each call without an outcome runs again if its tool is
    idempotent, else the model is told the outcome is unknown); then CHECK.
    """
    if interrupted is None:
        return _GO_ON
    if state.done:
        return _DONE
    hit = state.limit
    if hit is not None:
        if not state.final_answered and rules.limits.final_answer_on_limit:
            return _NONE, CallModel("final_answer", hit.iteration)
        return _NONE, Stop(hit.limit, hit.detail)
    iteration = state.iteration
    if state.calls:
        events: list[Event] = []
        rerun = []
        for call, again in interrupted:
            if again:
                rerun.append(call)
            else:
                content = UNKNOWN_OUTCOME.format(name=call.name)
                events.append(tool_finished(state.run_id, 0, 0.0, rules, iteration, call, "unknown", content,
                                            ErrorInfo(type="OutcomeUnknown", message=content)))
        if rerun:
            return events, RunTools(iteration, rerun)
        # (these outcomes complete the iteration once applied: CHECK comes after)
        return events, Check(iteration)
    return check(state, rules, iteration)


def start_iteration(state: State, rules: Rules, spent_s: float | None) -> Step:
    """The next iteration, unless it would not fit before the deadline.

    `spent_s`: active time spent so far (None: no deadline). Another iteration must fit,
    and still leave time for the best-effort answer, judged by the iterations so far.
    """
    iteration = state.iteration + 1
    if spent_s is not None and iteration >= 2:
        deadline_s = rules.limits.deadline_s
        per_iteration = spent_s / (iteration - 1)
        left = deadline_s - spent_s  # type: ignore[operator]
        if left < 2 * per_iteration:
            why = (f"deadline of {deadline_s:g} s: {left:.2f} s left, an iteration has "
                   f"taken {per_iteration:.2f} s and the answer needs time too")
            return limit(state, rules, state.iteration, "deadline", why)
    return [new_iteration_started(state.run_id, 0, 0.0, iteration)], CallModel("think", iteration)


def answered(state: State, rules: Rules, command: CallModel, finish_reason: str | None) -> Step:
    """The model call of `command` answered (its `model_call_finished` applied)."""
    if command.purpose != "think":  # the best-effort answer after a limit
        hit = state.limit
        return _NONE, Stop(hit.limit, hit.detail)  # type: ignore[union-attr]
    if state.done:
        return _DONE
    iteration = command.iteration
    calls = state.calls
    if calls:
        max_iterations = rules.limits.max_iterations
        if iteration < max_iterations:
            return _NONE, RunTools(iteration, calls)
        events = _skipped(state, rules, iteration, calls)
        step = limit(state, rules, iteration, "max_iterations",
                     f"iteration limit of {max_iterations} reached with tool calls pending")
        events.extend(step[0])
        return events, step[1]
    if finish_reason == "length":
        nudge = _nudge(state, iteration, LENGTH_NUDGE, "the answer was cut by max_tokens")
    else:
        nudge = _nudge(state, iteration, EMPTY_RESPONSE_NUDGE, "the model returned an empty response")
    checked, command_ = check(state, rules, iteration)
    return [nudge, *checked], command_


def model_failed(state: State, rules: Rules, command: CallModel, reason: StopReason, detail: str,
                 error: ErrorInfo | None) -> Step:
    """The model call of `command` failed (`reason` ``error``) or a budget refused it (``budget``)."""
    if command.purpose != "think":  # no best-effort answer: the run still stops for its limit
        hit = state.limit
        return _NONE, Stop(hit.limit, hit.detail)  # type: ignore[union-attr]
    if reason == "budget":
        return [LimitHit(run_id=state.run_id, seq=0, ts=0.0, iteration=command.iteration, limit="budget",
                         detail=detail)], Stop("budget", detail)
    return _NONE, Stop(reason, detail, error)


def check(state: State, rules: Rules, iteration: int) -> Step:
    """CHECK after an iteration's OBSERVE: the iteration cap, then the runaway monitor's verdict."""
    max_iterations = rules.limits.max_iterations
    if iteration >= max_iterations:
        return limit(state, rules, iteration, "max_iterations",
                     f"iteration limit of {max_iterations} reached without a final answer")
    verdict = state.verdict
    if verdict is None:
        return _GO_ON
    if verdict.action == "stop":
        return limit(state, rules, iteration, "runaway", verdict.message)
    return [_nudge(state, iteration, verdict.nudge, f"{RUNAWAY_REASON}{verdict.message}")], CONTINUE


def limit(state: State, rules: Rules, iteration: int, which: StopReason, detail: str) -> Step:
    """A limit is hit: say so, then ask for a best-effort answer (tools disabled) or stop."""
    hit = LimitHit(run_id=state.run_id, seq=0, ts=0.0, iteration=iteration, limit=which, detail=detail)
    limits = rules.limits
    if not limits.final_answer_on_limit:
        return [hit], Stop(which, detail)
    prompt = (FINAL_ANSWER_PROMPT.format(limit=limits.max_iterations) if which == "max_iterations"
              else RUNAWAY_FINAL_PROMPT if which == "runaway" else LIMIT_FINAL_PROMPT.format(limit=which))
    return [hit, _nudge(state, iteration, prompt, "best-effort answer after a limit")], \
        CallModel("final_answer", iteration)


def deadline_reached(state: State, rules: Rules) -> Step:
    """The deadline cancelled what was in flight: the run stops (no best-effort call: no time)."""
    detail = f"deadline of {rules.limits.deadline_s:g} s reached during iteration {state.iteration}"
    return [LimitHit(run_id=state.run_id, seq=0, ts=0.0, iteration=state.iteration, limit="deadline",
                     detail=detail)], Stop("deadline", detail)


def kill_received(state: State, by: str, reason: str, requested_ts: float) -> Step:
    """A kill request cancelled what was in flight: the run stops."""
    return [KillReceived(run_id=state.run_id, seq=0, ts=0.0, iteration=state.iteration, by=by, reason=reason,
                         requested_ts=requested_ts)], Stop("killed", f"killed by {by}: {reason}")


def _nudge(state: State, iteration: int, content: str, reason: str) -> Nudge:
    return Nudge(run_id=state.run_id, seq=0, ts=0.0, iteration=iteration, content=content, reason=reason)


def _skipped(state: State, rules: Rules, iteration: int, calls: Sequence[ToolCall]) -> list[Event]:
    """Tool calls asked for at the iteration cap: logged, each answered `NOT_EXECUTED`."""
    events: list[Event] = []
    for call in calls:
        events.append(tool_started(state.run_id, 0, 0.0, rules, iteration, call)[0])
        events.append(tool_finished(state.run_id, 0, 0.0, rules, iteration, call, "not_executed", NOT_EXECUTED, None))
    return events


def tool_started(run_id: str, seq: int, ts: float, rules: Rules, iteration: int,
                 call: ToolCall) -> tuple[Event, dict[str, Any] | str | None]:
    """A tool call's start, and the arguments for the tool (less the model's expectation).

    The one place both are made: by the rules (calls not executed at the cap, with seq and
    ts 0 for the driver to stamp) and by the driver's ACT (stamped as made).
    """
    arguments: dict[str, Any] | str | None = call.arguments
    expected = None
    if rules.expectations:
        expected, arguments = split_expectation(arguments)
    # (run_id, seq, ts, iteration, call_id, name, arguments, expected)
    return new_tool_call_started(run_id, seq, ts, iteration, call.id, str(call.name), arguments, expected), arguments


def tool_finished(run_id: str, seq: int, ts: float, rules: Rules, iteration: int, call: ToolCall, outcome: str,
                  content: str, error: ErrorInfo | None, latency: float = 0.0, attempts: int = 0,
                  fallback: str | None = None, cost_usd: float = 0.0, value: Any = NO_VALUE) -> Event:
    """A tool call's end with, when expectations are on, whether the result matched what the
    model expected (the content and error as given: storable ones, `_runtime.act` sees to it)."""
    match = match_by = note = None
    if rules.expectations:  # did the result match the model's expectation?
        tool = rules.tools_by_name.get(call.name) if isinstance(call.name, str) else None
        match, match_by, note = judge(tool, split_expectation(call.arguments)[0], outcome, content, fallback, value)
    # (run_id, seq, ts, iteration, call_id, name, outcome, content, latency_s, error, attempts,
    #  fallback, cost_usd, match, match_by, match_note)
    return new_tool_call_finished(run_id, seq, ts, iteration, call.id, str(call.name), outcome, content,
                                  latency, error, attempts, fallback, cost_usd, match, match_by, note)

