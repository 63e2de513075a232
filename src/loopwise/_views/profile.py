"""Latency profiles: where the time of one or many runs went, read from their events only.

`phase_times(events)` adds up one run's THINK, ACT and overhead. `profile(runs)` goes
further over any number of runs:

- per phase: THINK (model-call latency, one sample per call), ACT (per iteration, wall
  time from its first tool start to its last tool end) and overhead (per run, its
  duration minus THINK minus ACT: the loop and its event log);
- per model and per tool: count, p50, p95 and max latency; per tool also timeouts
  (attempts that failed with `TimeoutError`), retries (failed attempts followed by
  another attempt) and fallbacks (calls a fallback answered);
- per iteration: its critical path (its model-call time plus its slowest tool call)
  and its wall time; the slowest iterations;
- the latency trap: runs where consecutive iterations each ran a single tool call,
  one after another. Whether a call depended on the previous result cannot be read
  from the log, so this is a hint, not a verdict.

A run killed and resumed later has segments: the time between them (from the end of one
segment to its `run_resumed`) is not the run's, and no wall-clock span here counts it.

Percentiles interpolate linearly between the closest ranks (numpy's default):
p50 of 1, 2, 3, 4 is 2.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._events import (
    Event,
    IterationStarted,
    ModelCallFinished,
    ModelCallStarted,
    RunFinished,
    RunResumed,
    ToolAttemptFailed,
    ToolCallFinished,
    ToolCallStarted,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "IterationTime",
    "LatencyStats",
    "Phases",
    "Profile",
    "SequentialStreak",
    "ToolStats",
    "percentile",
    "phase_times",
    "profile",
    "render_profile",
]

#: How many of the slowest iterations a profile keeps.
SLOWEST = 5


# -- one run's phases ------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class Phases:
    """Where a run's time went, read from its events."""

    model_calls: int
    tool_calls: int
    #: Iterations in which tools ran.
    act_phases: int
    #: Time in model calls (THINK, and any best-effort answer).
    think_s: float
    #: Wall time of the ACT phases: per iteration, first tool start to last tool end.
    act_s: float
    #: The tools' own time added up, however it overlapped.
    tool_s: float
    #: The run's duration.
    total_s: float

    @property
    def overhead_s(self) -> float:
        """What is neither THINK nor ACT: the runtime's own work (the log, the loop)."""
        return max(self.total_s - self.think_s - self.act_s, 0.0)


def inactive_gaps(events: Sequence[Event]) -> list[tuple[float, float]]:
    """The wall-clock intervals in which a resumed run was not running: from the last event
    of a segment (its `run_finished`, or whatever a crash left last) to the `run_resumed`
    that starts the next one."""
    gaps = []
    for before, event in zip(events, events[1:], strict=False):
        if isinstance(event, RunResumed) and event.ts > before.ts:
            gaps.append((before.ts, event.ts))
    return gaps


def active_time(start: float, end: float, gaps: Sequence[tuple[float, float]]) -> float:
    """Seconds from `start` to `end` in which the run was running (`gaps` left out)."""
    inactive = sum(max(min(end, g_end) - max(start, g_start), 0.0) for g_start, g_end in gaps)
    return max(end - start - inactive, 0.0)


def act_times(events: Sequence[Event]) -> dict[int, float]:
    """Per iteration that ran tools: its ACT time, first tool start to last tool end, less the
    time the run was not running (killed, then resumed later)."""
    gaps = inactive_gaps(events)
    return {i: active_time(start, end, gaps) for i, (start, end) in act_spans(events).items()}


def act_spans(events: Sequence[Event]) -> dict[int, tuple[float, float]]:
    """Per iteration that ran tools: (first tool start, last tool end), wall-clock seconds."""
    spans: dict[int, list[float]] = {}
    for event in events:
        if isinstance(event, ToolCallStarted):
            span = spans.setdefault(event.iteration, [event.ts, event.ts])
            span[0] = min(span[0], event.ts)
        elif isinstance(event, ToolCallFinished):
            span = spans.setdefault(event.iteration, [event.ts, event.ts])
            span[1] = max(span[1], event.ts)
    return {i: (start, end) for i, (start, end) in spans.items()}


def run_duration(events: Sequence[Event]) -> float:
    """The run's `duration_s` (its active time over all its segments); for a run still going
    (no `run_finished` after its last `run_resumed`), first to last event less the gaps."""
    for event in reversed(events):
        if isinstance(event, RunFinished):
            return event.duration_s
        if isinstance(event, RunResumed):
            break
    return active_time(events[0].ts, events[-1].ts, inactive_gaps(events)) if events else 0.0


def phase_times(events: Sequence[Event]) -> Phases:
    """Add up a run's THINK and ACT time from `model_call_*` and `tool_call_*` events."""
    think = tool_time = 0.0
    model_calls = tool_calls = 0
    for event in events:
        if isinstance(event, ModelCallFinished):
            model_calls += 1
            think += event.latency_s
        elif isinstance(event, ToolCallFinished):
            tool_calls += 1
            tool_time += event.latency_s
    spans = act_times(events)
    act = sum(spans.values())
    return Phases(model_calls=model_calls, tool_calls=tool_calls, act_phases=len(spans), think_s=think,
                  act_s=act, tool_s=tool_time, total_s=run_duration(events))


# -- statistics --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, linear between the closest ranks; 0 if empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(kw_only=True, slots=True, frozen=True)
class LatencyStats:
    """count, total, p50, p95 and max of a set of durations (seconds)."""

    count: int
    total_s: float
    p50_s: float
    p95_s: float
    max_s: float

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencyStats:
        return cls(count=len(values), total_s=sum(values), p50_s=percentile(values, 50),
                   p95_s=percentile(values, 95), max_s=max(values, default=0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "total_s": self.total_s, "p50_s": self.p50_s, "p95_s": self.p95_s,
                "max_s": self.max_s}


@dataclass(kw_only=True, slots=True, frozen=True)
class ToolStats:
    latency: LatencyStats
    #: Attempts that failed with `TimeoutError`.
    timeouts: int
    #: Failed attempts followed by another attempt.
    retries: int
    #: Calls a fallback answered.
    fallbacks: int
    #: Calls that ended in an error (after retries and fallbacks).
    errors: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.latency.to_dict(), "timeouts": self.timeouts, "retries": self.retries,
                "fallbacks": self.fallbacks, "errors": self.errors}


@dataclass(kw_only=True, slots=True, frozen=True)
class IterationTime:
    """One iteration's timings."""

    run_id: str
    iteration: int
    #: Wall time, from its `iteration_started` to the next iteration's (or the run's end).
    duration_s: float
    #: Its model calls' latency.
    think_s: float
    #: Its ACT phase: first tool start to last tool end (0 without tools).
    act_s: float
    #: think + the slowest tool call: the least this iteration could take.
    critical_path_s: float
    tool_calls: int
    #: The slowest tool call's name and latency, when tools ran.
    slowest_tool: str | None = None
    slowest_tool_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "iteration": self.iteration, "duration_s": self.duration_s,
                "think_s": self.think_s, "act_s": self.act_s, "critical_path_s": self.critical_path_s,
                "tool_calls": self.tool_calls, "slowest_tool": self.slowest_tool,
                "slowest_tool_s": self.slowest_tool_s}


@dataclass(kw_only=True, slots=True, frozen=True)
class SequentialStreak:
    """Consecutive iterations of a run that each ran exactly one tool call."""

    run_id: str
    first_iteration: int
    last_iteration: int
    tools: tuple[str, ...]
    #: The ACT time of these iterations together.
    act_s: float

    @property
    def iterations(self) -> int:
        return self.last_iteration - self.first_iteration + 1

    @property
    def message(self) -> str:
        return (f"{self.iterations} iterations each ran a single tool call: if independent, asking for them "
                "in one response would run them concurrently (the latency trap)")

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "first_iteration": self.first_iteration,
                "last_iteration": self.last_iteration, "iterations": self.iterations, "tools": list(self.tools),
                "act_s": self.act_s, "message": self.message}


@dataclass(kw_only=True, slots=True)
class Profile:
    """Where the time of some runs went (see the module's docstring)."""

    run_ids: list[str]
    #: The runs' durations added up.
    total_s: float
    #: THINK: one sample per model call.
    think: LatencyStats
    #: ACT: one sample per iteration that ran tools.
    act: LatencyStats
    #: Overhead: one sample per run.
    overhead: LatencyStats
    models: dict[str, LatencyStats]
    tools: dict[str, ToolStats]
    iterations: list[IterationTime]
    sequential: list[SequentialStreak] = field(default_factory=list)

    @property
    def slowest(self) -> list[IterationTime]:
        """The slowest iterations, slowest first (at most `SLOWEST`)."""
        return sorted(self.iterations, key=lambda i: i.duration_s, reverse=True)[:SLOWEST]

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": len(self.run_ids),
            "run_ids": list(self.run_ids),
            "total_s": self.total_s,
            "phases": {"think": self.think.to_dict(), "act": self.act.to_dict(),
                       "overhead": self.overhead.to_dict()},
            "models": {name: s.to_dict() for name, s in self.models.items()},
            "tools": {name: s.to_dict() for name, s in self.tools.items()},
            "iterations": [i.to_dict() for i in self.iterations],
            "slowest_iterations": [i.to_dict() for i in self.slowest],
            "sequential": [s.to_dict() for s in self.sequential],
        }


# -- profiling ---------------------------------------------------------------------------


def _iteration_times(events: Sequence[Event]) -> list[IterationTime]:
    if not events:
        return []
    run_id = events[0].run_id
    starts: dict[int, float] = {}
    think: dict[int, float] = {}
    tools: dict[int, list[tuple[str, float]]] = {}
    for event in events:
        if isinstance(event, IterationStarted):
            starts.setdefault(event.iteration, event.ts)
        elif isinstance(event, ModelCallFinished):
            think[event.iteration] = think.get(event.iteration, 0.0) + event.latency_s
        elif isinstance(event, ToolCallFinished):
            tools.setdefault(event.iteration, []).append((event.name, event.latency_s))
    end = next((e.ts for e in reversed(events) if isinstance(e, RunFinished)), events[-1].ts)
    act = act_times(events)
    gaps = inactive_gaps(events)
    order = sorted(starts)
    out = []
    for n, iteration in enumerate(order):
        stop = starts[order[n + 1]] if n + 1 < len(order) else end
        calls = tools.get(iteration, [])
        slowest = max(calls, key=lambda c: c[1], default=None)
        t = think.get(iteration, 0.0)
        out.append(IterationTime(
            run_id=run_id, iteration=iteration, duration_s=active_time(starts[iteration], stop, gaps), think_s=t,
            act_s=act.get(iteration, 0.0), critical_path_s=t + (slowest[1] if slowest else 0.0),
            tool_calls=len(calls), slowest_tool=slowest[0] if slowest else None,
            slowest_tool_s=slowest[1] if slowest else 0.0,
        ))
    return out


def _sequential_streaks(events: Sequence[Event], iterations: list[IterationTime]) -> list[SequentialStreak]:
    """Runs of >= 2 consecutive iterations that each ran exactly one tool call."""
    if not events:
        return []
    run_id = events[0].run_id
    names: dict[int, str] = {}
    for event in events:
        if isinstance(event, ToolCallStarted):
            names[event.iteration] = event.name
    streaks: list[SequentialStreak] = []
    current: list[IterationTime] = []

    def close() -> None:
        if len(current) >= 2:
            streaks.append(SequentialStreak(
                run_id=run_id, first_iteration=current[0].iteration, last_iteration=current[-1].iteration,
                tools=tuple(names.get(i.iteration, "?") for i in current), act_s=sum(i.act_s for i in current)))
        current.clear()

    for it in iterations:
        if it.tool_calls == 1 and (not current or it.iteration == current[-1].iteration + 1):
            current.append(it)
            continue
        close()
        if it.tool_calls == 1:
            current.append(it)
    close()
    return streaks


def profile(runs: Sequence[Sequence[Event]]) -> Profile:
    """The latency profile of `runs` (each a run's events, in order), from the events alone."""
    think: list[float] = []
    act: list[float] = []
    overhead: list[float] = []
    total = 0.0
    model_latency: dict[str, list[float]] = {}
    tool_latency: dict[str, list[float]] = {}
    tool_counts: dict[str, dict[str, int]] = {}
    iterations: list[IterationTime] = []
    sequential: list[SequentialStreak] = []
    run_ids: list[str] = []

    def counts(name: str) -> dict[str, int]:
        return tool_counts.setdefault(name, {"timeouts": 0, "retries": 0, "fallbacks": 0, "errors": 0})

    for events in runs:
        if not events:
            continue
        run_ids.append(events[0].run_id)
        phases = phase_times(events)
        total += phases.total_s
        overhead.append(phases.overhead_s)
        act.extend(act_times(events).values())
        started_model: dict[tuple[int, str], str] = {}
        for event in events:
            if isinstance(event, ModelCallStarted):
                started_model[(event.iteration, event.purpose)] = event.model
            elif isinstance(event, ModelCallFinished):
                think.append(event.latency_s)
                name = event.model or started_model.get((event.iteration, event.purpose), "?")
                model_latency.setdefault(name, []).append(event.latency_s)
            elif isinstance(event, ToolCallFinished):
                tool_latency.setdefault(event.name, []).append(event.latency_s)
                c = counts(event.name)
                if event.outcome == "fallback":
                    c["fallbacks"] += 1
                elif event.outcome != "ok":
                    c["errors"] += 1
            elif isinstance(event, ToolAttemptFailed):
                c = counts(event.name)
                if event.error.type == "TimeoutError":
                    c["timeouts"] += 1
                if event.retry_in_s is not None:
                    c["retries"] += 1
        its = _iteration_times(events)
        iterations.extend(its)
        sequential.extend(_sequential_streaks(events, its))

    tools = {}
    for name in sorted(set(tool_latency) | set(tool_counts)):
        c = counts(name)
        tools[name] = ToolStats(latency=LatencyStats.of(tool_latency.get(name, [])), **c)
    return Profile(
        run_ids=run_ids, total_s=total, think=LatencyStats.of(think), act=LatencyStats.of(act),
        overhead=LatencyStats.of(overhead),
        models={name: LatencyStats.of(v) for name, v in sorted(model_latency.items())},
        tools=tools, iterations=iterations, sequential=sequential,
    )


# -- rendering ---------------------------------------------------------------------------


def render_profile(prof: Profile, console: Console) -> None:
    """The profile on one screen: phases, models, tools, slowest iterations, the latency trap
    (`_views.profile_render`: nothing cut, whatever the width)."""
    from .profile_render import render

    render(prof, console)
