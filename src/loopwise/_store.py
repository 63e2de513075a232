"""The event store interface, and the in-memory store.

A store keeps each run's events in order. `write` is called by the loop with the
events since its last call; it returns `None` when the events are already durable,
or an awaitable that completes when they are (the SQLite store commits on a writer
thread, so the event loop does no I/O). Every view reads runs back with `load`
and `list_runs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass

from ._errors import UserError
from ._events import Event, RunFinished, RunStarted

__all__ = ["EventStore", "MemoryStore", "RunSummary"]


@dataclass(kw_only=True, slots=True, frozen=True)
class RunSummary:
    """One line of `loopwise runs`: read from a run's first and last events."""

    run_id: str
    started_at: float
    agent: str
    tags: tuple[str, ...]
    status: str  # "running" or "finished"
    stop_reason: str | None
    iterations: int | None
    cost_usd: float | None
    duration_s: float | None
    output: str | None

    @classmethod
    def from_events(cls, started: RunStarted, finished: RunFinished | None) -> RunSummary:
        return cls(
            run_id=started.run_id,
            started_at=started.ts,
            agent=str(started.agent.get("name", "")),
            tags=tuple(started.tags),
            status="finished" if finished is not None else "running",
            stop_reason=finished.stop_reason if finished else None,
            iterations=finished.iterations if finished else None,
            cost_usd=finished.cost_usd if finished else None,
            duration_s=finished.duration_s if finished else None,
            output=finished.output if finished else None,
        )


class EventStore(ABC):
    """Where runs' events are kept. Implement it to put the log elsewhere."""

    @abstractmethod
    def write(self, events: list[Event]) -> Awaitable[None] | None:
        """Append `events` (of one run, in order). Await the result for durability."""

    @abstractmethod
    def load(self, run_id: str) -> list[Event]:
        """All events of a run, in order. Raises `UserError` for an unknown run id."""

    @abstractmethod
    def has_run(self, run_id: str) -> bool:
        """Whether any event of `run_id` is stored."""

    @abstractmethod
    def list_runs(self, *, limit: int = 20) -> list[RunSummary]:
        """The most recently started runs, newest first."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (flush pending writes)."""

    def _unknown(self, run_id: str) -> UserError:
        return UserError(f"no run with id {run_id!r} in {self.describe()}; `loopwise runs` lists the stored runs")

    def describe(self) -> str:
        return type(self).__name__


class MemoryStore(EventStore):
    """Keeps events in this process's memory: for tests and throwaway runs."""

    def __init__(self) -> None:
        self._runs: dict[str, list[Event]] = {}

    def write(self, events: list[Event]) -> None:
        runs = self._runs
        for event in events:
            log = runs.get(event.run_id)
            if log is None:
                log = runs[event.run_id] = []
            log.append(event)
        return None

    def load(self, run_id: str) -> list[Event]:
        try:
            return list(self._runs[run_id])
        except KeyError:
            raise self._unknown(run_id) from None

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def list_runs(self, *, limit: int = 20) -> list[RunSummary]:
        summaries = []
        for events in self._runs.values():
            started = events[0]
            if not isinstance(started, RunStarted):
                continue
            finished = next((e for e in reversed(events) if isinstance(e, RunFinished)), None)
            summaries.append(RunSummary.from_events(started, finished))
        summaries.sort(key=lambda s: s.started_at, reverse=True)
        return summaries[:limit]

    def describe(self) -> str:
        return "the in-memory store"


