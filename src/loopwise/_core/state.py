"""A run's state: everything the loop's rules read, and nothing the driver needs alone.

One `State` per run, built from its `run_started` event (`State.start`) and changed
only by `evolve`. It holds few containers on purpose (the transcript, the call ids, the
current iteration's calls and results): 5,000 runs in flight must not feed the cyclic
GC, and none of these objects refers back to the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._messages import Message, ToolCall, Usage, new_message

if TYPE_CHECKING:
    from .._policies.context import ContextPolicy, ContextState
    from .._events import LimitHit, ModelCallStarted, RunStarted
    from .._policies.runaway import RunawayDetector, RunawayMonitor, RunawayVerdict

__all__ = ["NO_CALLS", "State"]

#: The calls of an iteration that has none in flight (shared: no list per iteration).
NO_CALLS: tuple[ToolCall, ...] = ()


class State:
    """What one run holds between events.

    Attributes:
        run_id: The run's id (the events the core makes carry it).
        transcript: Every message so far, append-only (the context policy chooses what
            each model call is shown).
        context: The context policy's state for this run (folds so far, the summary).
        monitor: The runaway monitor, or None when detection is off.
        max_iterations: The iteration cap (the monitor observes only iterations below it).
        iteration: The current iteration (0 before the first).
        model_calls: Model calls started, summary and best-effort calls included.
        usage: Tokens of every finished model call.
        cost_usd: Dollars spent: model calls, tool calls, and in-flight calls a resume
            charged at their reservation.
        charged_tokens: Tokens a resume charged for model calls that were in flight.
        output: The final answer (or the best-effort answer after a limit), once given.
        call_ids: Every tool call id used in the run (ids are unique per run).
        think_input_tokens: The input tokens of the last THINK call.
        calls: The current iteration's tool calls (ids assigned) until each has an
            outcome, then `NO_CALLS`.
        results: Their outcomes so far by call id (None: ended without one: cancelled,
            or charged by a resume while in flight).
        outcomes: How many of `calls` have an outcome.
        iteration_cost: What the current iteration cost so far (for the runaway monitor).
        open_call: The model call started and not finished, if any.
        verdict: The runaway monitor's verdict on the last iteration, until acted on.
        limit: The limit the run hit and is stopping for, if any.
        final_answered: The best-effort answer after that limit was given.
        done: The run's final answer was given.
        segment: The segment the log is in: 0 for the first, then each `run_resumed`'s.
        active_s: Active time of the segments before the last (set by `fold`).
    """

    __slots__ = (
        "active_s",
        "call_ids",
        "calls",
        "charged_tokens",
        "context",
        "cost_usd",
        "done",
        "final_answered",
        "iteration",
        "iteration_cost",
        "limit",
        "max_iterations",
        "model_calls",
        "monitor",
        "open_call",
        "outcomes",
        "output",
        "results",
        "run_id",
        "segment",
        "think_input_tokens",
        "transcript",
        "usage",
        "verdict",
    )

    def __init__(self, run_id: str, transcript: list[Message], context: ContextState,
                 monitor: RunawayMonitor | None, max_iterations: int) -> None:
        self.run_id = run_id
        self.transcript = transcript
        self.context = context
        self.monitor = monitor
        self.max_iterations = max_iterations
        self.iteration = 0
        self.model_calls = 0
        self.usage = Usage()
        self.cost_usd = 0.0
        self.charged_tokens = 0
        self.output: str | None = None
        self.call_ids: set[str] = set()
        self.think_input_tokens = 0
        self.calls: list[ToolCall] | tuple[ToolCall, ...] = NO_CALLS
        self.results: dict[str, str | None] | None = None
        self.outcomes = 0
        self.iteration_cost = 0.0
        self.open_call: ModelCallStarted | None = None
        self.verdict: RunawayVerdict | None = None
        self.limit: LimitHit | None = None
        self.final_answered = False
        self.done = False
        self.segment = 0
        self.active_s = 0.0

    @classmethod
    def start(cls, started: RunStarted, context: ContextPolicy, runaway: RunawayDetector | None,
              max_iterations: int) -> State:
        """The state of a run right after `started`: the instructions and the task."""
        instructions = started.instructions
        task = started.task
        transcript = [new_message("system", instructions), *task] if instructions else list(task)
        return cls(started.run_id, transcript, context.start(head=len(transcript)),
                   runaway.start() if runaway is not None else None, max_iterations)

    @property
    def tokens(self) -> int:
        """Tokens counted against a token budget: every call's, and what resumes charged."""
        return self.usage.input_tokens + self.usage.output_tokens + self.charged_tokens

    def in_flight(self) -> list[ToolCall]:
        """The current iteration's tool calls that have no outcome yet (model order)."""
        results = self.results
        if results is None:
            return list(self.calls)
        return [c for c in self.calls if results.get(c.id) is None]  # type: ignore[arg-type]
