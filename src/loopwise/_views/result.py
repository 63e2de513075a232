"""`RunResult`: what a run returns, computed from its events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .._errors import UserError
from .._events import ErrorInfo, Event, RunFinished, RunStarted, StopReason
from .._messages import Usage

__all__ = ["RunResult"]


@dataclass(kw_only=True, slots=True)
class RunResult:
    """The outcome of one run. Every field is read from the run's event log."""

    run_id: str
    output: str | None
    stop_reason: StopReason
    iterations: int
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    duration_s: float = 0.0
    model_calls: int = 0
    tags: tuple[str, ...] = ()
    #: Why the run stopped, in words (for limits, kills and errors).
    reason: str | None = None
    #: The exception that ended the run, when `stop_reason == "error"`.
    error: ErrorInfo | None = None

    @classmethod
    def from_events(cls, events: Sequence[Event]) -> RunResult:
        """Fold a finished run's events into its result."""
        started: RunStarted | None = None
        finished: RunFinished | None = None
        for event in events:
            if event.kind == "run_started":
                started = started or event
            elif event.kind == "run_finished":
                finished = event
        if started is None:
            raise UserError("these events hold no run_started event: they are not a run's log")
        if finished is None:
            raise UserError(f"run {started.run_id!r} has not finished: its log has no run_finished event")
        return cls.of(started, finished)

    @classmethod
    def of(cls, started: RunStarted, finished: RunFinished) -> RunResult:
        """The result of a run from its first and its last event."""
        return cls(
            run_id=finished.run_id,
            output=finished.output,
            stop_reason=finished.stop_reason,
            iterations=finished.iterations,
            usage=finished.usage,
            cost_usd=finished.cost_usd,
            duration_s=finished.duration_s,
            model_calls=finished.model_calls,
            tags=tuple(started.tags),
            reason=finished.reason,
            error=finished.error,
        )
