"""`evolve(state, event)`: how each event changes a run's state. The one place it changes.

The live driver passes every event it emits through `evolve` (the event as made, with
its real content; the log gets it redacted), and `fold` passes a run's logged events
through it in order: a resumed run holds what the live one held, by the same rules.

Dispatch is by the event's type through a dict (`EVOLVE`); kinds that change nothing
(attempts, fallbacks, breaker changes, kills, the run's end) have no entry.

The rules that live here, and nowhere else:

- a THINK's tool calls get ids unique in the run (`assign_ids`: the ids of every call
  the run starts), and join the transcript with the assistant message;
- tool messages join the transcript in the model's order once every call of the
  iteration has an outcome (a cancelled call has none: it runs again or is settled);
- a THINK's answer cut by ``finish_reason == "length"`` is kept in the transcript but is
  not a final answer; an empty one adds nothing; the best-effort answer after a limit is
  taken as it comes (it is the last call either way);
- an iteration below the cap that did not answer is observed by the runaway monitor
  once it is complete; its verdict waits in `State.verdict` until acted on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .._events import (
    ContextFolded,
    Event,
    IterationStarted,
    LimitHit,
    ModelCallFinished,
    ModelCallStarted,
    Nudge,
    RunResumed,
    RunStarted,
    ToolCallFinished,
)
from .._messages import ToolCall, new_message
from .state import NO_CALLS, State

if TYPE_CHECKING:
    from .._policies.context import ContextPolicy
    from .._policies.runaway import RunawayDetector

__all__ = ["EVOLVE", "RUNAWAY_REASON", "assign_ids", "evolve", "fold"]

#: How a runaway nudge's `reason` begins (the nudge acts on the monitor's verdict).
RUNAWAY_REASON = "runaway: "


def evolve(state: State, event: Event) -> None:
    """Apply `event` to `state`."""
    fn = EVOLVE.get(type(event))
    if fn is not None:
        fn(state, event)


def fold(events: Iterable[Event], context: ContextPolicy, runaway: RunawayDetector | None,
         max_iterations: int) -> State:
    """The state of the run whose log is `events` (from its `run_started`), through `evolve`.

    Also sets `State.active_s`: the active time of its segments, from the timestamps
    (each segment runs from its first event to its last).
    """
    it = iter(events)
    started = next(it)
    if type(started) is not RunStarted:
        raise ValueError(f"a run's log begins with run_started, not {started.kind}")
    state = State.start(started, context, runaway, max_iterations)
    segment_start = previous_ts = started.ts
    active = 0.0
    table = EVOLVE
    for event in it:
        if type(event) is RunResumed:
            active += previous_ts - segment_start
            segment_start = event.ts
        fn = table.get(type(event))
        if fn is not None:
            fn(state, event)
        previous_ts = event.ts
    active += previous_ts - segment_start
    state.active_s = max(0.0, active)
    return state


def assign_ids(state: State, iteration: int, calls: list[ToolCall]) -> list[ToolCall]:
    """Give every call an id unique in the run: tools use it as an idempotency key.

    Provider ids are kept unless missing or already used (some servers repeat ids
    across turns); replacements are deterministic, so a replay assigns the same.
    """
    seen = state.call_ids
    out = []
    for index, call in enumerate(calls):
        call_id = call.id if isinstance(call.id, str) and call.id else f"lw-{iteration}-{index}"
        if call_id in seen:
            base = f"{call_id}-{iteration}-{index}"
            call_id, n = base, 1
            while call_id in seen:
                n += 1
                call_id = f"{base}-{n}"
        seen.add(call_id)
        out.append(call if call_id == call.id else ToolCall(call.name, call.arguments, call_id))
    return out


def _observe(state: State, calls: Any, contents: list[str]) -> None:
    """CHECK's runaway part: the monitor sees each iteration below the cap that did not answer."""
    monitor = state.monitor
    if monitor is not None and state.iteration < state.max_iterations:
        state.verdict = monitor.observe_iteration(calls, contents, state.think_input_tokens, state.iteration_cost)


def _iteration_started(state: State, e: IterationStarted) -> None:
    state.iteration = e.iteration
    state.iteration_cost = 0.0
    state.limit = None
    state.verdict = None


def _model_call_started(state: State, e: ModelCallStarted) -> None:
    state.open_call = e
    state.model_calls += 1


def _model_call_finished(state: State, e: ModelCallFinished) -> None:
    state.open_call = None
    usage = e.usage
    if usage is not None:
        state.usage.add(usage)
    cost = e.cost_usd
    if cost:
        state.cost_usd += cost
        state.iteration_cost += cost
    purpose = e.purpose
    if purpose == "summary":
        if e.error is None:
            context = state.context
            context.summary_calls += 1
            if usage is not None:
                context.usage.add(usage)
            context.cost_usd += cost
        return
    if e.error is not None:
        return
    think = purpose == "think"
    if think and usage is not None:
        state.think_input_tokens = usage.input_tokens
    calls = e.tool_calls
    text = e.text
    if calls and think:
        assigned = assign_ids(state, e.iteration, calls)
        state.calls = assigned
        state.results = {}
        state.outcomes = 0
        state.transcript.append(new_message("assistant", text, tuple(assigned)))
        return
    if think and e.finish_reason == "length":  # cut short: kept, but not a final answer
        if text:
            state.transcript.append(new_message("assistant", text))
    elif text is not None and text.strip():
        state.transcript.append(new_message("assistant", text))
        state.output = text
        if think:
            state.done = True
        else:  # the best-effort answer after a limit (tools were disabled)
            state.final_answered = True
        return
    if think:
        _observe(state, NO_CALLS, [])


def _tool_call_finished(state: State, e: ToolCallFinished) -> None:
    cost = e.cost_usd
    if cost:
        state.cost_usd += cost
        state.iteration_cost += cost
    results = state.results
    if results is None:
        return
    if e.outcome == "cancelled":  # no outcome: it runs again, or a resume settles it
        results.setdefault(e.call_id, None)
        return
    if results.get(e.call_id) is None:
        state.outcomes += 1
    results[e.call_id] = e.content
    calls = state.calls
    if state.outcomes >= len(calls):
        # OBSERVE: the tool messages join the transcript in the model's order.
        contents = [results.get(c.id) or "" for c in calls]  # type: ignore[arg-type]
        transcript = state.transcript
        for call, content in zip(calls, contents):
            transcript.append(new_message("tool", content, (), call.id))
        state.calls = NO_CALLS
        state.results = None
        state.outcomes = 0
        _observe(state, calls, contents)


def _nudge(state: State, e: Nudge) -> None:
    state.transcript.append(new_message("user", e.content))
    if e.reason.startswith(RUNAWAY_REASON):
        state.verdict = None


def _context_folded(state: State, e: ContextFolded) -> None:
    context = state.context
    n = len(e.units)
    context.folded += n
    context.start += e.n_messages
    if e.outcome == "summarized":
        context.summary = e.summary
        context.summarized += n
    else:
        context.dropped += n


def _limit_hit(state: State, e: LimitHit) -> None:
    state.limit = e
    state.verdict = None


def _run_resumed(state: State, e: RunResumed) -> None:
    # What was in flight is settled: a model call charged at its reservation, tool
    # calls charged at their worst case (so never charged again), run again or told.
    state.cost_usd += e.charged_usd
    state.charged_tokens += e.charged_tokens
    state.open_call = None
    state.segment = e.segment
    results = state.results
    if results is not None:
        for call in e.interrupted_calls:
            results.setdefault(call["call_id"], None)


EVOLVE: dict[type, Callable[[State, Any], None]] = {
    IterationStarted: _iteration_started,
    ModelCallStarted: _model_call_started,
    ModelCallFinished: _model_call_finished,
    ToolCallFinished: _tool_call_finished,
    Nudge: _nudge,
    ContextFolded: _context_folded,
    LimitHit: _limit_hit,
    RunResumed: _run_resumed,
}
