"""The event store interface, and the in-memory store.

A store keeps each run's events in order. `write` is called by the loop with the
events since its last call; it returns `None` when the events are already durable,
or an awaitable that completes when they are (the SQLite store journals them with
one append and returns `None`, then copies them into SQLite within milliseconds). Every view
reads runs back with `load` and `list_runs`; `prune` deletes whole runs past their
retention.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Collection
from dataclasses import dataclass

from ._control_plane import ControlPlane, MemoryControl, local_runs
from ._errors import UserError
from ._events import STOP_REASONS, Event, RunFinished, RunStarted

__all__ = ["EventStore", "MemoryStore", "PruneResult", "RunSummary"]

#: What `prune(statuses=...)` accepts: a stop reason, or a run without an end.
PRUNE_STATUSES: tuple[str, ...] = (*STOP_REASONS, "unfinished")


@dataclass(kw_only=True, slots=True, frozen=True)
class PruneResult:
    """What `EventStore.prune` removed (or, with `dry_run`, would remove)."""

    #: The runs removed, whole: every event, and their rows in the control tables.
    run_ids: tuple[str, ...]
    events: int
    dry_run: bool = False
    #: Runs old enough and matching, left alone because they have no end (crashed, or
    #: still running): `statuses=["unfinished"]` asks for those. Runs being executed
    #: (a live lease, or attached in this process) are never removed.
    unfinished_kept: int = 0

    @property
    def runs(self) -> int:
        return len(self.run_ids)


def check_prune_args(before: object, statuses: object, tags: object) -> tuple[float, frozenset[str], frozenset[str]]:
    """`prune`'s arguments, checked: (before, statuses, tags). Raises `UserError`."""
    if isinstance(before, bool) or not isinstance(before, (int, float)) or not math.isfinite(before):
        raise UserError(f"prune(before=...) must be a time in seconds since the epoch, got {before!r}")
    if statuses is None:
        wanted = frozenset(STOP_REASONS)
    else:
        if isinstance(statuses, str) or not isinstance(statuses, Collection):
            raise UserError(f"prune(statuses=...) must be a list of statuses, got {statuses!r}")
        wanted = frozenset(statuses)
        unknown = sorted(str(x) for x in wanted - set(PRUNE_STATUSES))
        if unknown or not wanted:
            raise UserError(f"unknown status {', '.join(unknown) or '(none given)'}; choose among "
                            f"{', '.join(PRUNE_STATUSES)}")
    if isinstance(tags, str) or not isinstance(tags, Collection) or not all(isinstance(t, str) for t in tags):
        raise UserError(f"prune(tags=...) must be a list of tags (str), got {tags!r}")
    return float(before), wanted, frozenset(tags)


def running_here() -> set[str]:
    """Run ids being executed in this process (their last events may not be written yet)."""
    return {r.run_id for r in local_runs()}


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

    def prune(self, *, before: float, statuses: Collection[str] | None = None, tags: Collection[str] = (),
              dry_run: bool = False) -> PruneResult:
        """Delete whole runs whose last event is older than `before` (seconds since the epoch).

        Args:
            before: Runs whose last event happened before this wall-clock time.
            statuses: Only runs that ended so (stop reasons such as ``"error"``), or
                ``"unfinished"`` for runs without an end (crashed or interrupted).
                Default: every finished run, and never an unfinished one.
            tags: Only runs carrying at least one of these tags.
            dry_run: Say what would be removed; remove nothing.

        A run being executed (a live lease, or attached in this process) is never
        removed. Each run goes whole: all of its events, or none.
        """
        raise UserError(f"{type(self).__name__} does not support prune; implement EventStore.prune to prune it")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (flush pending writes)."""

    def control_plane(self) -> ControlPlane | None:
        """The control plane that kills of this store's runs go through, or None if it has none.

        Each store says where its runs' leases and kill requests live: an `SQLiteStore`,
        in tables beside its events (`LocalControl`: every process on this machine); a
        `MemoryStore`, in this process (`MemoryControl`). The default, None, declares
        none: a kill from another process (`loopwise.kill`, `loopwise kill`) then raises
        `UserError` rather than silently reaching nobody; `Agent(control="redis://...")`
        or `$LOOPWISE_REDIS_URL` give such a store's runs a plane. Called once per
        process and store by `Agent` and `kill`; return the same plane each time.
        """
        return None

    def written_elsewhere(self, run_id: str) -> bool:
        """Whether another process that is still alive wrote `run_id`'s latest events.

        `resume` asks when a run has no end and no lease: a run that started in another
        process a moment ago holds no lease yet. A store that cannot tell says False.
        """
        return False

    def _unknown(self, run_id: str) -> UserError:
        return UserError(f"no run with id {run_id!r} in {self.describe()}; `loopwise runs` lists the stored runs")

    def describe(self) -> str:
        return type(self).__name__


class MemoryStore(EventStore):
    """Keeps events in this process's memory: for tests and throwaway runs."""

    def __init__(self) -> None:
        self._runs: dict[str, list[Event]] = {}
        self._control = MemoryControl()

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

    def control_plane(self) -> ControlPlane:
        """`MemoryControl`: kills reach this store's runs from this process only (as its events)."""
        return self._control

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

    def prune(self, *, before: float, statuses: Collection[str] | None = None, tags: Collection[str] = (),
              dry_run: bool = False) -> PruneResult:
        cutoff, wanted, tag_set = check_prune_args(before, statuses, tags)
        busy = running_here()
        chosen: list[str] = []
        events = kept = 0
        for run_id, log in self._runs.items():
            started, last = log[0], log[-1]
            if not isinstance(started, RunStarted) or last.ts >= cutoff or run_id in busy:
                continue
            if tag_set and tag_set.isdisjoint(started.tags):
                continue
            status = last.stop_reason if isinstance(last, RunFinished) else "unfinished"
            if status not in wanted:
                kept += status == "unfinished"
                continue
            chosen.append(run_id)
            events += len(log)
        if not dry_run:
            for run_id in chosen:
                del self._runs[run_id]
        return PruneResult(run_ids=tuple(chosen), events=events, dry_run=dry_run, unfinished_kept=kept)

    def describe(self) -> str:
        return "the in-memory store"


