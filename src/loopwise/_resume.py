"""Resume: rebuild a run's state from its event log and continue it as a new segment.

The log is the only input. Walking it in order gives back everything the loop held in
memory: the transcript the model saw (assistant messages, tool results, nudges), the
context policy's state (folds), the runaway monitor's history, the counters (iterations,
model calls, usage, cost), the call ids already used, and the active time spent.

What was in flight when the previous segment ended is settled here, never silently:

- a model call started but not finished (a crash) is charged at its reservation, and a
  paid tool call started but not finished at its worst case (`ToolPolicy.max_cost_usd`,
  what its reservation was);
- a tool call started without an outcome, or cancelled by a kill, is run again only if
  its tool is ``idempotent=True`` (with the same call id, its idempotency key);
  otherwise the model is told its outcome is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._errors import UserError
from ._events import (
    ContextFolded,
    Event,
    IterationStarted,
    KillReceived,
    LimitHit,
    ModelCallFinished,
    ModelCallStarted,
    Nudge,
    RunFinished,
    RunResumed,
    RunStarted,
    ToolCallFinished,
    ToolCallStarted,
)
from ._messages import Message, ToolCall, Usage

if TYPE_CHECKING:
    from ._budget import Budget
    from ._run import Run

__all__ = ["RESUMABLE", "Resumption", "check_resumable", "restore"]

#: Stop reasons after which a run may be resumed (besides a crash: no end in the log).
RESUMABLE = ("killed", "error")

UNKNOWN_OUTCOME = (
    "outcome unknown: the run was interrupted while this call was in flight, and {name} is not "
    "marked idempotent, so it was not run again. It may or may not have taken effect; check before "
    "relying on it or repeating it."
)


@dataclass(slots=True)
class _Iteration:
    """What the log says about one iteration, for the transcript and the runaway monitor."""

    number: int
    calls: list[ToolCall] = field(default_factory=list)
    contents: dict[str, str] = field(default_factory=dict)
    think_input_tokens: int = 0
    cost_usd: float = 0.0
    #: The THINK's model call ended (with a response or an error).
    thought: bool = False


@dataclass(slots=True)
class Resumption:
    """Where the resumed segment picks up."""

    previous_end: str
    segment: int
    #: The last iteration's tool calls that have no usable outcome: (call, tool runs again?).
    interrupted: list[tuple[ToolCall, bool]] = field(default_factory=list)
    #: The iteration whose ACT must be completed first (0: none), its calls in the model's
    #: order, and the results already in the log.
    act_iteration: int = 0
    act_calls: list[ToolCall] = field(default_factory=list)
    act_contents: dict[str, str] = field(default_factory=dict)
    #: A limit was hit and the run was stopping for it.
    limit: LimitHit | None = None
    #: The best-effort answer after that limit is already in the log.
    final_answered: bool = False
    #: The run's final answer is already in the log (it ended between the answer and its end event).
    done: bool = False
    carried_usd: float = 0.0
    carried_tokens: int = 0
    active_s: float = 0.0


def check_resumable(run_id: str, events: list[Event]) -> str:
    """How the run's last segment ended (``crashed`` if it has no end), or `UserError` if it cannot resume."""
    if not events or not isinstance(events[0], RunStarted):
        raise UserError(f"no run with id {run_id!r} in the store; `loopwise runs` lists the runs there")
    last = events[-1]
    if isinstance(last, RunFinished):
        if last.stop_reason not in RESUMABLE:
            raise UserError(
                f"run {run_id} finished with stop reason {last.stop_reason!r}; a completed run cannot be resumed "
                f"(only runs that crashed, were killed or ended in error can). Start a new run instead."
            )
        return last.stop_reason
    return "crashed"


def restore(run: Run, events: list[Event], own_budget: Budget | None) -> Resumption:
    """Load the state of the run `events` describe into `run` (made for this agent and run id).

    `own_budget` (the run's budget from its limits) is charged with what the earlier
    segments spent, so a crash never buys a fresh budget.
    """
    started = events[0]
    assert isinstance(started, RunStarted)
    previous_end = check_resumable(started.run_id, events)
    segment = 1 + sum(1 for e in events if isinstance(e, RunResumed))
    plan = Resumption(previous_end=previous_end, segment=segment)

    transcript: list[Message] = (
        [Message("system", started.instructions), *started.task] if started.instructions else list(started.task)
    )
    state = run.agent.context.start(head=len(transcript))
    iterations: dict[int, _Iteration] = {}
    current: _Iteration | None = None
    open_call: ModelCallStarted | None = None
    cost = 0.0
    tokens = 0
    usage = Usage()
    model_calls = 0
    last_limit: LimitHit | None = None
    segment_start = started.ts
    active = 0.0
    previous_ts = started.ts
    call_ids = run.call_ids
    ended: set[str] = set()  # tool calls with an outcome in the log (a cancelled one logs what it spent)

    def flush_tool_messages() -> None:
        # Tool messages join the transcript in the order the model asked, once all are known.
        it = current
        if it is None or not it.calls or it.number in flushed:
            return
        if all(c.id in it.contents for c in it.calls):
            flushed.add(it.number)
            for c in it.calls:
                transcript.append(Message("tool", it.contents[c.id], tool_call_id=c.id))

    flushed: set[int] = set()
    for e in events[1:]:
        if isinstance(e, RunResumed):
            active += previous_ts - segment_start
            segment_start = e.ts
            cost += e.charged_usd  # in-flight calls that resume charged at their reservation
            tokens += e.charged_tokens
            last_limit = None
        elif isinstance(e, IterationStarted):
            flush_tool_messages()
            current = iterations.setdefault(e.iteration, _Iteration(e.iteration))
            last_limit = None
        elif isinstance(e, ModelCallStarted):
            flush_tool_messages()
            open_call = e
            model_calls += 1
        elif isinstance(e, ModelCallFinished):
            open_call = None
            if e.usage is not None:
                usage.add(e.usage)
                tokens += e.usage.input_tokens + e.usage.output_tokens
            cost += e.cost_usd
            it = iterations.setdefault(e.iteration, _Iteration(e.iteration))
            it.cost_usd += e.cost_usd
            if e.purpose == "summary":
                state.summary_calls += 1
                if e.usage is not None:
                    state.usage.add(e.usage)
                state.cost_usd += e.cost_usd
                continue
            if e.purpose == "think":
                it.thought = True
            if e.error is not None:
                continue
            if e.purpose == "think" and e.usage is not None:
                it.think_input_tokens = e.usage.input_tokens
                run.think_input_tokens = e.usage.input_tokens
            calls = list(e.tool_calls)
            if calls and e.purpose == "think":
                it.calls = run._assign_ids(e.iteration, calls)
                transcript.append(Message("assistant", e.text, tuple(it.calls)))
            elif e.finish_reason == "length":
                if e.text:
                    transcript.append(Message("assistant", e.text))
            elif e.text is not None and e.text.strip():
                transcript.append(Message("assistant", e.text))
                if e.purpose == "final_answer":
                    plan.final_answered = True
                    run.output = e.text
                elif not calls:
                    plan.done = True
                    run.output = e.text
        elif isinstance(e, ToolCallStarted):
            call_ids.add(e.call_id)
        elif isinstance(e, ToolCallFinished):
            ended.add(e.call_id)
            cost += e.cost_usd
            it = iterations.setdefault(e.iteration, _Iteration(e.iteration))
            it.cost_usd += e.cost_usd
            if e.outcome != "cancelled":
                it.contents[e.call_id] = e.content
        elif isinstance(e, Nudge):
            flush_tool_messages()
            transcript.append(Message("user", e.content))
        elif isinstance(e, ContextFolded):
            flush_tool_messages()
            n = len(e.units)
            state.folded += n
            state.start += e.n_messages
            if e.outcome == "summarized":
                state.summary = e.summary
                state.summarized += n
            else:
                state.dropped += n
        elif isinstance(e, LimitHit):
            last_limit = e
        elif isinstance(e, (RunFinished, KillReceived)):
            pass
        previous_ts = e.ts
    active += previous_ts - segment_start

    # The iteration the previous segment was in, and what of it is unfinished.
    last = max(iterations.values(), key=lambda it: it.number, default=None)
    if last is not None and last.calls and last.number not in flushed:
        tools = run.agent.tools_by_name
        for c in last.calls:
            if c.id in last.contents:
                continue
            tool = tools.get(c.name) if isinstance(c.name, str) else None
            plan.interrupted.append((c, tool is not None and tool.policy.idempotent))
            if tool is not None and c.id not in ended:  # in flight when the process died: it may have been billed
                plan.carried_usd += tool.policy.max_cost_usd()
        plan.act_iteration = last.number
        plan.act_calls = list(last.calls)
        plan.act_contents = dict(last.contents)
    if open_call is not None:  # a model call in flight when the process died: charged as reserved
        plan.carried_usd += open_call.reserved_usd or 0.0
        plan.carried_tokens = (open_call.estimated_input_tokens or 0) + (open_call.max_tokens or 0) \
            if open_call.reserved_usd is not None else 0
    cost += plan.carried_usd
    if last_limit is not None and not plan.done:
        plan.limit = last_limit
    plan.active_s = max(0.0, active)

    # Load it into the run.
    run.transcript = transcript
    run.context = state
    run.iteration = max((it.number for it in iterations.values()), default=0)
    run.model_calls = model_calls
    run.current.model_calls = model_calls
    run.usage = usage
    run.cost_usd = cost
    run.seq = events[-1].seq + 1
    if run.monitor is not None:
        for it in sorted(iterations.values(), key=lambda it: it.number):
            if it.number == plan.act_iteration or not it.thought:
                continue
            contents = [it.contents.get(c.id, "") for c in it.calls]
            run.monitor.observe_iteration(it.calls, contents, it.think_input_tokens, it.cost_usd)
    if own_budget is not None:
        own_budget._charge(cost, tokens + plan.carried_tokens)
    return plan

