"""The event store interface, and the in-memory store.

A store keeps each run's events in order. `write` is called by the loop with the
events since its last call; it returns `None` when the events are already durable,
or an awaitable that completes when they are (the SQLite store journals them with
one append and returns `None`, then copies them into SQLite within milliseconds). Every view
reads runs back with `load` and `list_runs`, or follows a live one with `tail`;
`prune` deletes whole runs past their retention. `control_plane` says where kills of
the store's runs go.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass

from .._control.plane import ControlPlane, MemoryControl, local_runs
from .._errors import UserError
from .._events import STOP_REASONS, Event, RunFinished, RunStarted

__all__ = ["EventStore", "MemoryStore", "PruneResult", "RunPage", "RunSummary"]

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


#: The default `EventStore.tail` (a store with no way to be woken) reads the run again this often.
TAIL_POLL_S = 0.5


def check_after_seq(after_seq: object) -> int:
    if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < -1:
        raise UserError(f"tail(after_seq=...) must be an int >= -1 (the seq of the last event seen), got {after_seq!r}")
    return after_seq


async def follow(read: Callable[[int], Awaitable[list[Event]]], arm: Callable[[], Awaitable[None]],
                 after_seq: int) -> AsyncIterator[Event]:
    """`tail`'s loop, for any store: `read(seq)` gives the run's stored events after `seq`,
    in order; `arm()`, called before each read, is awaited after it: it completes once
    something may have been written since it was called (so no write between the read and
    the wait is missed). Ends after a `run_finished` that is the last event read."""
    last = after_seq
    while True:
        woken = arm()
        try:
            events = await read(last)
            for event in events:
                if event.seq <= last:
                    continue
                last = event.seq
                yield event
            if events and isinstance(events[-1], RunFinished) and events[-1].seq == last:
                return
            await woken
        finally:
            if asyncio.iscoroutine(woken):
                woken.close()  # (if never awaited: it was never started)
            elif isinstance(woken, asyncio.Future):
                woken.cancel()


def running_here() -> set[str]:
    """Run ids being executed in this process (their last events may not be written yet)."""
    return {r.run_id for r in local_runs()}


#: What `list_runs(status=...)` accepts: as the log says (`RunSummary.status`).
LIST_STATUSES: tuple[str, ...] = ("running", "finished")


@dataclass(slots=True, frozen=True)
class RunQuery:
    """`list_runs`'s arguments, checked (`check_list_args`)."""

    status: str | None
    stop_reason: str | None
    tag: str | None
    since: float | None
    limit: int
    #: Only runs older than this (started_at, run_id), from the cursor.
    before: tuple[float, str] | None

    def matches(self, s: RunSummary) -> bool:
        return ((self.status is None or s.status == self.status)
                and (self.stop_reason is None or s.stop_reason == self.stop_reason)
                and (self.tag is None or self.tag in s.tags)
                and (self.since is None or s.started_at >= self.since)
                and (self.before is None or (s.started_at, s.run_id) < self.before))


def check_list_args(status: object, stop_reason: object, tag: object, since: object, limit: object,
                    cursor: object) -> RunQuery:
    """`list_runs`'s arguments, checked. Raises `UserError` (one line) for a bad one."""
    if status is not None and status not in LIST_STATUSES:
        raise UserError(f"list_runs(status={status!r}): choose among {', '.join(LIST_STATUSES)} (a run has "
                        "ended, or not yet; `stop_reason=` picks how it ended)")
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise UserError(f"list_runs(stop_reason={stop_reason!r}): choose among {', '.join(STOP_REASONS)}")
    if tag is not None and (not isinstance(tag, str) or not tag):
        raise UserError(f"list_runs(tag=...) must be a non-empty str, got {tag!r}")
    if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))
                              or not math.isfinite(since)):
        raise UserError(f"list_runs(since=...) must be a time in seconds since the epoch, got {since!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UserError(f"list_runs(limit=...) must be an int >= 1, got {limit!r}")
    return RunQuery(status, stop_reason, tag, None if since is None else float(since), limit,
                    None if cursor is None else _decode_cursor(cursor))


# A cursor: where the previous page ended, (started_at, run_id), as opaque text. Runs are
# ordered by that pair, newest first; it names one run, so a page never repeats a run of
# an earlier page, and runs that start meanwhile (newer) never push older ones off a page.
_CURSOR_VERSION = 1


def encode_cursor(started_at: float, run_id: str) -> str:
    raw = json.dumps([_CURSOR_VERSION, started_at, run_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: object) -> tuple[float, str]:
    bad = UserError(f"list_runs(cursor={cursor!r:.60}) is not a cursor list_runs returned (its next_cursor)")
    if not isinstance(cursor, str) or not cursor:
        raise bad
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:
        raise bad from None
    if (not isinstance(value, list) or len(value) != 3 or value[0] != _CURSOR_VERSION
            or isinstance(value[1], bool) or not isinstance(value[1], (int, float)) or not isinstance(value[2], str)):
        raise bad
    return float(value[1]), value[2]


class RunPage(list["RunSummary"]):
    """A page of `list_runs`: a list of `RunSummary`, newest first, and where the next page starts."""

    #: Pass as `list_runs(cursor=...)` (with the same filters) for the next page; None: this was the last.
    next_cursor: str | None = None

    @classmethod
    def of(cls, summaries: list[RunSummary], limit: int) -> RunPage:
        """The first `limit` of `summaries` (fetched `limit + 1`: one more says there is a next page)."""
        page = cls(summaries[:limit])
        if len(summaries) > limit:
            last = page[-1]
            page.next_cursor = encode_cursor(last.started_at, last.run_id)
        return page


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
    def list_runs(self, *, status: str | None = None, stop_reason: str | None = None, tag: str | None = None,
                  since: float | None = None, limit: int = 20, cursor: str | None = None) -> list[RunSummary]:
        """The most recently started runs that match, newest first: a `RunPage`.

        Args:
            status: ``"running"`` (no end in the log yet: running, or its process died;
                `loopwise runs` tells those apart by leases) or ``"finished"``.
            stop_reason: Only runs that ended so (``"error"``, ``"killed"``, ...).
            tag: Only runs with this tag.
            since: Only runs started at or after this time (seconds since the epoch).
            limit: At most this many runs.
            cursor: The `next_cursor` of the previous page: the runs started before
                that page's last run (ordered by start time, then run id). Paging with
                the same filters visits every run present at the first page once: runs
                that start meanwhile are newer and never shift a page.

        Raises:
            UserError: a bad argument (one line).
        """

    def tail(self, run_id: str, after_seq: int = -1) -> AsyncIterator[Event]:
        """Follow a run: its events with a seq above `after_seq` as they are written, in order.

        An async iterator (``async for event in store.tail(run_id): ...``) that ends after
        the run's end: a `run_finished` that is the last event stored when it is read. A
        run that ended ``killed`` or ``error`` may be resumed later, maybe never: its
        tail ends at that end all the same, and ``tail(run_id, after_seq=end.seq)``
        follows the resumed segment (from ``run_resumed``, ended by its own
        ``run_finished``); a tail started after a resume began follows it to its end.
        A run whose process died has no end: its tail waits (cancel it, or give it a
        timeout). Cancelling the iterator, or leaving its loop, releases what it holds.

        The SQLite store follows runs written by any process on the machine (woken by
        SQLite's change counter), the in-memory store is woken by its writes; this
        default reads the run again every `TAIL_POLL_S`.

        Raises:
            UserError: an unknown run id, or a bad `after_seq` (at the first step).
        """
        after = check_after_seq(after_seq)

        async def read(seq: int) -> list[Event]:
            events = await asyncio.to_thread(self.load, run_id)
            return [e for e in events if e.seq > seq]

        return follow(read, lambda: asyncio.sleep(TAIL_POLL_S), after)

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
        # `tail`s waiting for a write: each future is resolved (in its loop) by the next one.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def write(self, events: list[Event]) -> None:
        runs = self._runs
        for event in events:
            log = runs.get(event.run_id)
            if log is None:
                log = runs[event.run_id] = []
            log.append(event)
        if self._waiters:
            self._wake()
        return None

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # its loop closed: nobody waits
                pass

    def tail(self, run_id: str, after_seq: int = -1) -> AsyncIterator[Event]:
        """`EventStore.tail`, woken by each write to this store (from any thread)."""
        after = check_after_seq(after_seq)

        async def read(seq: int) -> list[Event]:
            log = self._runs.get(run_id)
            if log is None:
                raise self._unknown(run_id)
            # (a run's seqs are its events' places in the log: start there, check all the same)
            start = seq + 1 if 0 <= seq < len(log) and log[seq].seq == seq else 0
            return [e for e in log[start:] if e.seq > seq]

        def arm() -> asyncio.Future[None]:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._waiters.append((loop, future))
            return future

        return follow(read, arm, after)

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

    def list_runs(self, *, status: str | None = None, stop_reason: str | None = None, tag: str | None = None,
                  since: float | None = None, limit: int = 20, cursor: str | None = None) -> RunPage:
        query = check_list_args(status, stop_reason, tag, since, limit, cursor)
        summaries = []
        for events in list(self._runs.values()):
            started = events[0]
            if not isinstance(started, RunStarted):
                continue
            finished = next((e for e in reversed(events) if isinstance(e, RunFinished)), None)
            summary = RunSummary.from_events(started, finished)
            if query.matches(summary):
                summaries.append(summary)
        summaries.sort(key=lambda s: (s.started_at, s.run_id), reverse=True)
        return RunPage.of(summaries, query.limit)

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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


