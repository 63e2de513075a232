"""The decision log: per iteration, what the model thought, did and expected, what
actually happened, whether they matched, and why the runtime did what it did.

The seed post's fix for "400 lines of JSON, zero insight" was a log of, per iteration,
``{iteration, thought, action, expected, actual, match}``. Here it is not a second
store: `decisions(events)` derives it from the event log, so it exists for every run
already recorded, including runs stopped by a limit, a kill or an error, and runs whose
process died (their last iteration shows what was recorded before the end).

- `thought`: the THINK response's text when it asked for tools (the model's *why*).
- `action`: what it did: its tool calls, a final answer, or what went wrong with THINK.
- per call: `expected` (from ``loopwise_expect``, `Agent(expectations=True)`),
  `actual` (the outcome and the text the model read), `match` (recorded when the call
  ended: the tool's ``check`` or the default comparison of `loopwise._tools.expect`).
- `match` of the iteration: False if any call's is False, True if every call's is
  True, else None (unknown: never a guess presented as fact).
- `why`: the runtime's own decisions in that iteration, in the order they happened:
  retries, fallbacks, breaker changes, abandoned threads, context folds, nudges,
  limits, kills, the best-effort answer, and on the last iteration how the run ended.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._events import (
    BreakerChanged,
    ContextFolded,
    Event,
    IterationStarted,
    KillReceived,
    LimitHit,
    ModelAttemptFailed,
    ModelCallFinished,
    Nudge,
    RunFinished,
    RunResumed,
    RunStarted,
    ThreadAbandoned,
    ToolAttemptFailed,
    ToolCallFinished,
    ToolCallStarted,
    ToolFallback,
)
from .._tools.expect import EXPECT_KEY, default_match, split_expectation

__all__ = ["ActionKind", "CallDecision", "Decision", "decisions", "expectations_on"]

#: What an iteration's THINK led to.
ActionKind = Literal["tool_calls", "answer", "cut_off", "empty", "model_failed", "no_response"]


@dataclass(kw_only=True, slots=True)
class CallDecision:
    """One tool call of an iteration: what was expected, what happened, whether they matched."""

    call_id: str
    name: str
    #: The arguments the tool received (the model's expectation taken out).
    arguments: dict[str, Any] | str | None = None
    #: What the model expected the call to return; None: no expectation.
    expected: Any = None
    #: ``ok``, ``fallback``, ``error``, ...; None when no result was recorded (the run died).
    outcome: str | None = None
    #: The text the model read back.
    actual: str | None = None
    match: bool | None = None
    #: ``"check"`` (the tool's own), ``"default"``, or None (nothing to compare).
    match_by: str | None = None
    #: Why `match` is unknown, when there is more to say than "no expectation".
    match_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id, "name": self.name, "arguments": self.arguments, "expected": self.expected,
            "outcome": self.outcome, "actual": self.actual, "match": self.match, "match_by": self.match_by,
            "match_note": self.match_note,
        }


@dataclass(kw_only=True, slots=True)
class Decision:
    """One iteration of a run, as the decision log tells it."""

    iteration: int
    #: The model's reasoning text when it asked for tools; None if it gave none.
    thought: str | None = None
    #: What the iteration did, in words: its tool calls, "final answer", ...
    action: str = ""
    action_kind: ActionKind = "no_response"
    calls: list[CallDecision] = field(default_factory=list)
    #: The final answer, when this iteration's THINK gave one.
    answer: str | None = None
    match: bool | None = None
    #: The runtime's decisions in this iteration, in order.
    why: list[str] = field(default_factory=list)

    @property
    def expected(self) -> list[Any]:
        """Each call's expectation, in the model's order."""
        return [c.expected for c in self.calls]

    @property
    def actual(self) -> list[str | None]:
        """Each call's result as the model read it, in the model's order."""
        return [c.actual for c in self.calls]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (``loopwise show --decisions --json``)."""
        return {
            "iteration": self.iteration, "thought": self.thought, "action": self.action,
            "action_kind": self.action_kind, "expected": self.expected, "actual": self.actual,
            "match": self.match, "answer": self.answer, "why": list(self.why),
            "calls": [c.to_dict() for c in self.calls],
        }


def expectations_on(events: Sequence[Event]) -> bool:
    """Whether the run asked its model for expectations (or any call recorded one)."""
    for e in events:
        if isinstance(e, RunStarted) and e.agent.get("expectations") is True:
            return True
        if isinstance(e, ToolCallStarted) and e.expected is not None:
            return True
    return False


def decisions(events: Sequence[Event]) -> list[Decision]:
    """The decision log of one run, one `Decision` per iteration, read from its events.

    Works on any prefix of a run's log (still going, or its process died) and on logs
    written before expectations existed (every `expected` and `match` is then None).
    """
    by_iteration: dict[int, Decision] = {}
    calls: dict[int, dict[str, CallDecision]] = {}

    def at(iteration: int) -> Decision | None:
        if iteration < 1:
            return None
        d = by_iteration.get(iteration)
        if d is None:
            d = by_iteration[iteration] = Decision(iteration=iteration)
            calls[iteration] = {}
        return d

    finished: RunFinished | None = None
    last_iteration = 0
    for e in events:
        if isinstance(e, RunFinished):
            finished = e
            continue
        iteration = getattr(e, "iteration", None)
        if not isinstance(iteration, int):
            continue
        last_iteration = max(last_iteration, iteration)
        d = at(iteration)
        if d is None:
            continue
        if isinstance(e, IterationStarted):
            continue
        if isinstance(e, ModelCallFinished):
            _model_call(d, e)
        elif isinstance(e, ToolCallStarted):
            if e.call_id not in calls[iteration]:  # a call re-run after resume keeps its first start
                calls[iteration][e.call_id] = _started(e)
        elif isinstance(e, ToolCallFinished):
            call = calls[iteration].get(e.call_id)
            if call is None:
                call = calls[iteration][e.call_id] = CallDecision(call_id=e.call_id, name=e.name)
            _finished(call, e)
        else:
            line = _why(e)
            if line is not None:
                d.why.append(line)
    out = [by_iteration[i] for i in sorted(by_iteration)]
    for d in out:
        d.calls = list(calls[d.iteration].values())
        for call in d.calls:
            if call.outcome is None:
                call.match_note = "no result recorded: the run ended while the call was in flight"
        if d.calls:
            verdicts = [c.match for c in d.calls]
            d.match = False if False in verdicts else True if all(v is True for v in verdicts) else None
            if d.action_kind == "no_response":  # the THINK that asked for them is not in the log
                d.action_kind = "tool_calls"
                d.action = _calls_text(d.calls)
    if out:
        last = out[-1]
        if finished is not None:
            stop = f"run stopped: {finished.stop_reason}"
            if finished.reason:
                stop += f" ({finished.reason})"
            elif finished.error is not None:
                stop += f" ({finished.error.type}: {finished.error.message})"
            last.why.append(stop)
        else:
            last.why.append("the log ends here: the run is still going, or its process died")
    return out


# -- one event at a time -----------------------------------------------------------------


def _model_call(d: Decision, e: ModelCallFinished) -> None:
    if e.purpose == "summary":
        if e.error is not None:
            d.why.append(f"summary call failed: {e.error.type}: {e.error.message}")
        return
    if e.purpose == "final_answer":
        if e.error is not None:
            d.why.append(f"best-effort answer (tools off) failed: {e.error.type}: {e.error.message}")
        else:
            d.why.append(f"best-effort answer, tools off: {e.text or '(empty)'}")
        return
    if e.error is not None:
        d.action_kind = "model_failed"
        d.action = f"model call failed: {e.error.type}: {e.error.message}"
        return
    if e.tool_calls:
        d.thought = e.text if e.text and e.text.strip() else None
        d.action_kind = "tool_calls"
        d.action = ", ".join(_call_text(str(c.name), split_expectation(c.arguments)[1]) for c in e.tool_calls)
    elif e.finish_reason == "length":
        d.action_kind = "cut_off"
        d.action = "answer cut off by max_tokens"
        d.answer = e.text
    elif e.text and e.text.strip():
        d.action_kind = "answer"
        d.action = "final answer"
        d.answer = e.text
    else:
        d.action_kind = "empty"
        d.action = "empty response"


def _started(e: ToolCallStarted) -> CallDecision:
    expected, arguments = e.expected, e.arguments
    if expected is None and isinstance(arguments, (dict, str)) and EXPECT_KEY in arguments:
        expected, arguments = split_expectation(arguments)  # a log that kept the raw arguments
    return CallDecision(call_id=e.call_id, name=e.name, arguments=arguments, expected=expected)


def _finished(call: CallDecision, e: ToolCallFinished) -> None:
    call.outcome = e.outcome
    call.actual = e.content
    if e.match_by is not None:  # decided when the call ended (the tool's check, or the default)
        call.match, call.match_by, call.match_note = e.match, e.match_by, e.match_note
    elif call.expected is not None:  # recompute the default: the log is all it needs
        call.match = default_match(call.expected, e.outcome, e.content, e.fallback)
        call.match_by = "default"
    else:
        call.match = call.match_by = call.match_note = None


def _why(e: Event) -> str | None:
    if isinstance(e, ModelAttemptFailed):
        then = ("; next model" if e.will_fallback else
                f"; retried after {e.retry_in_s:.2g} s" if e.retry_in_s is not None else "; gave up")
        return f"model {e.model} attempt {e.attempt} failed: {e.error.type}: {e.error.message}{then}"
    if isinstance(e, ToolAttemptFailed):
        then = f"; retried after {e.retry_in_s:.2g} s" if e.retry_in_s is not None else ""
        return f"{e.name} attempt {e.attempt} failed: {e.error.message or e.error.type}{then}"
    if isinstance(e, ToolFallback):
        if e.ok:
            return f"{e.name}: answered from fallback {e.fallback} ({e.reason})"
        return f"{e.name}: fallback {e.fallback} did not answer ({e.reason})"
    if isinstance(e, BreakerChanged):
        return f"circuit breaker of {e.name}: {e.old} -> {e.new} ({e.reason})"
    if isinstance(e, ThreadAbandoned):
        return f"{e.name}: thread {e.thread} abandoned after a timeout (it runs on detached)"
    if isinstance(e, ContextFolded):
        n = len(e.units)
        return f"context: {n} earlier iteration{'s' if n != 1 else ''} {e.outcome}" + (
            f" ({e.reason})" if e.reason else "")
    if isinstance(e, Nudge):
        return f"nudge ({e.reason}): {e.content}"
    if isinstance(e, LimitHit):
        return f"limit {e.limit}: {e.detail}"
    if isinstance(e, KillReceived):
        return f"kill received from {e.by}: {e.reason}"
    if isinstance(e, RunResumed):
        return f"resumed (segment {e.segment}) after the previous segment {e.previous_end}"
    return None


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _call_text(name: str, arguments: dict[str, Any] | str | None) -> str:
    if isinstance(arguments, dict):
        return f"{name}({', '.join(f'{k}={_json(v)}' for k, v in arguments.items())})"
    return f"{name}({arguments or ''})"


def _calls_text(calls: list[CallDecision]) -> str:
    return ", ".join(_call_text(c.name, c.arguments) for c in calls)
