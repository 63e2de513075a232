"""Exports of a run's event log: raw JSON lines, and Chrome trace JSON for Perfetto.

`to_jsonl(events)` yields one JSON object per event (what `load_event` reads back).

`to_perfetto(events)` builds a Chrome Trace Event Format document that
ui.perfetto.dev (and chrome://tracing) opens. One process, the run; its tracks:

```
tid 0      iterations   the run, and one complete event per iteration; the runtime's
                        decisions (limit_hit, nudge, breaker_changed, context_folded) as instants
tid 1      model        one complete event per model call (start = finished.ts - latency_s)
tid 10+k   tool k+1     tool calls; a call takes the lowest-numbered tool track free at its
                        start, so calls that run together get tracks of their own
counters   cost_usd (cumulative) and context_tokens (input tokens of each model call)
```

Complete events (`ph: "X"`) never overlap on one track, which the format requires
(events on a thread must nest strictly). Timestamps are microseconds since the
run's start. A run still in flight exports what it has: unfinished spans end at
its last event.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .._events import (
    BreakerChanged,
    ContextFolded,
    Event,
    IterationStarted,
    LimitHit,
    ModelAttemptFailed,
    ModelCallFinished,
    ModelCallStarted,
    Nudge,
    RunFinished,
    RunStarted,
    ThreadAbandoned,
    ToolAttemptFailed,
    ToolCallFinished,
    ToolCallStarted,
    ToolFallback,
    event_to_dict,
)

__all__ = ["to_jsonl", "to_perfetto"]

PID = 1
ITERATIONS_TID = 0
MODEL_TID = 1
TOOL_TID_BASE = 10
#: Model calls that overlap (they should not, in one run) get tracks from here on.
MODEL_OVERFLOW_TID_BASE = 1_000_000
#: Clock jitter tolerated when a model call starts just before the previous one ended
#: (its start is derived: `ts` is wall time, latencies are measured apart): the start
#: is clamped. Tool calls use logged wall times on both ends, so they get none.
_JITTER_US = 1000.0


def to_jsonl(events: Iterable[Event]) -> Iterator[str]:
    """Each event as one line of JSON (no newline), in order; `load_event` reads it back."""
    for event in events:
        yield json.dumps(event_to_dict(event), ensure_ascii=False, separators=(",", ":"))


@dataclass(slots=True)
class _Span:
    name: str
    start: float  # µs since the origin
    end: float
    args: dict[str, Any]
    cat: str
    call_id: str | None = None
    iteration: int | None = None
    tid: int = -1


@dataclass(slots=True)
class _Lanes:
    """Tracks on which complete events never overlap; a span takes the lowest free one."""

    jitter_us: float = 0.0
    ends: list[float] = field(default_factory=list)

    def place(self, span: _Span) -> int:
        for lane, end in enumerate(self.ends):
            if end <= span.start:
                self.ends[lane] = span.end
                return lane
            if end - span.start <= self.jitter_us and end <= span.end:
                span.start = end  # jitter, not concurrency
                self.ends[lane] = span.end
                return lane
        self.ends.append(span.end)
        return len(self.ends) - 1


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def to_perfetto(events: Iterable[Event]) -> dict[str, Any]:
    """The run as Chrome Trace Event Format JSON (a dict ready for `json.dump`)."""
    events = list(events)
    if not events:
        return {"traceEvents": [], "displayTimeUnit": "ms"}
    run_id = events[0].run_id
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    finished = next((e for e in reversed(events) if isinstance(e, RunFinished)), None)

    # Wall-clock seconds of every span first; the origin is the earliest moment seen.
    model_started: dict[tuple[int, str], ModelCallStarted] = {}
    model_spans: list[tuple[float, float, ModelCallFinished, ModelCallStarted | None]] = []
    # Tool calls paired by (iteration, call_id), first in first out: ids are only
    # unique within one model response, and scripted models reuse them.
    open_tools: dict[tuple[int, str], list[ToolCallStarted]] = defaultdict(list)
    tool_calls: list[tuple[ToolCallStarted | None, ToolCallFinished | None]] = []
    iteration_starts: list[IterationStarted] = []
    for e in events:
        if isinstance(e, ModelCallStarted):
            model_started[(e.iteration, e.purpose)] = e
        elif isinstance(e, ModelCallFinished):
            start = e.ts - max(e.latency_s, 0.0)
            model_spans.append((start, e.ts, e, model_started.pop((e.iteration, e.purpose), None)))
        elif isinstance(e, ToolCallStarted):
            open_tools[(e.iteration, e.call_id)].append(e)
        elif isinstance(e, ToolCallFinished):
            pending = open_tools.get((e.iteration, e.call_id))
            tool_calls.append((pending.pop(0) if pending else None, e))
        elif isinstance(e, IterationStarted):
            iteration_starts.append(e)

    last_ts = max(e.ts for e in events)
    origin = min([e.ts for e in events] + [s for s, _, _, _ in model_spans])
    tool_calls.extend((s, None) for pending in open_tools.values() for s in pending)
    for s, f in tool_calls:
        if s is None and f is not None:
            origin = min(origin, f.ts - max(f.latency_s, 0.0))
    in_flight = finished is None

    def rel(ts: float) -> float:
        return _us(ts - origin)

    trace: list[dict[str, Any]] = []
    thread_names: dict[int, str] = {ITERATIONS_TID: "iterations", MODEL_TID: "model"}

    def complete(span: _Span) -> None:
        trace.append({"name": span.name, "cat": span.cat, "ph": "X", "pid": PID, "tid": span.tid,
                      "ts": span.start, "dur": round(max(span.end - span.start, 0.0), 3), "args": span.args})

    def instant(name: str, ts: float, tid: int, cat: str, args: dict[str, Any]) -> None:
        trace.append({"name": name, "cat": cat, "ph": "i", "s": "t", "pid": PID, "tid": tid,
                      "ts": rel(ts), "args": args})

    def counter(name: str, ts: float, values: dict[str, float]) -> None:
        trace.append({"name": name, "ph": "C", "pid": PID, "tid": ITERATIONS_TID, "ts": rel(ts), "args": values})

    # -- tid 0: the run and its iterations
    end_ts = finished.ts if finished is not None else last_ts
    run_args: dict[str, Any] = {"run_id": run_id, "in_flight": in_flight}
    if started is not None:
        run_args["agent"] = started.agent.get("name")
        run_args["tags"] = list(started.tags)
    if finished is not None:
        run_args.update(stop_reason=finished.stop_reason, iterations=finished.iterations,
                        cost_usd=finished.cost_usd, model_calls=finished.model_calls)
    run_start = rel(started.ts if started is not None else events[0].ts)
    run_end = rel(last_ts)
    complete(_Span(f"run {run_id}", run_start, max(run_end, run_start), run_args, "run", tid=ITERATIONS_TID))
    for i, it in enumerate(iteration_starts):
        nxt = iteration_starts[i + 1].ts if i + 1 < len(iteration_starts) else end_ts
        start, end = rel(it.ts), rel(max(nxt, it.ts))
        complete(_Span(f"iteration {it.iteration}", max(start, run_start), min(end, run_end),
                       {"iteration": it.iteration}, "iteration", tid=ITERATIONS_TID))

    # -- tid 1: model calls
    model_lanes = _Lanes(jitter_us=_JITTER_US)
    for start_s, end_s, mf, ms in sorted(model_spans, key=lambda m: (m[0], m[1])):
        model = mf.model or (ms.model if ms is not None else None) or "?"
        args: dict[str, Any] = {
            "iteration": mf.iteration,
            "model": model,
            "input_tokens": mf.usage.input_tokens,
            "output_tokens": mf.usage.output_tokens,
            "cached_input_tokens": mf.usage.cached_input_tokens,
            "usage_estimated": mf.usage_estimated,
            "cost_usd": mf.cost_usd,
            "finish_reason": mf.finish_reason,
            "latency_s": mf.latency_s,
            "tool_calls": [c.name for c in mf.tool_calls],
        }
        if mf.error is not None:
            args["error"] = f"{mf.error.type}: {mf.error.message}"
        span = _Span(f"{mf.purpose} {model}", rel(start_s), rel(end_s), args, "model")
        lane = model_lanes.place(span)
        span.tid = MODEL_TID if lane == 0 else MODEL_OVERFLOW_TID_BASE + lane
        if lane:
            thread_names[span.tid] = f"model (overlapping {lane})"
        complete(span)

    # -- tid 10+: tool calls, each on the lowest-numbered track free at its start
    tool_spans: list[tuple[_Span, tuple[int, str]]] = []  # each with its call's (iteration, call_id)
    for s, f in tool_calls:
        if f is not None:
            start_s = s.ts if s is not None else f.ts - max(f.latency_s, 0.0)
            end_s = max(f.ts, start_s)
        else:
            assert s is not None
            start_s, end_s = s.ts, max(last_ts, s.ts)
        first = f if f is not None else s
        assert first is not None
        args = {"call_id": first.call_id, "iteration": first.iteration}
        if f is not None:
            args.update(outcome=f.outcome, latency_s=f.latency_s, attempts=f.attempts, cost_usd=f.cost_usd)
            if f.fallback is not None:
                args["fallback"] = f.fallback
            if f.error is not None:
                args["error"] = f"{f.error.type}: {f.error.message}"
        else:
            args["outcome"] = "in_flight" if in_flight else "unfinished"
        span = _Span(first.name, rel(start_s), rel(end_s), args, "tool", call_id=first.call_id,
                     iteration=first.iteration)
        tool_spans.append((span, (first.iteration, first.call_id)))
    tool_lanes = _Lanes()
    spans_of_call: dict[tuple[int, str], list[_Span]] = defaultdict(list)
    for span, call in sorted(tool_spans, key=lambda t: (t[0].start, t[0].end)):
        span.tid = TOOL_TID_BASE + tool_lanes.place(span)
        thread_names[span.tid] = f"tool {span.tid - TOOL_TID_BASE + 1}"
        spans_of_call[call].append(span)
        complete(span)

    def tid_of_call(iteration: int, call_id: str, ts: float) -> int:
        """The track of the tool call an attempt event belongs to (the iterations track if none)."""
        spans = spans_of_call.get((iteration, call_id))
        if not spans:
            return ITERATIONS_TID
        t = rel(ts)
        return next((sp.tid for sp in spans if sp.start <= t <= sp.end), spans[0].tid)

    # -- instants and counters, in log order
    cost = 0.0
    counter("cost_usd", events[0].ts, {"cost_usd": 0.0})
    for e in events:
        if isinstance(e, ModelCallFinished):
            cost += e.cost_usd
            counter("cost_usd", e.ts, {"cost_usd": round(cost, 12)})
            counter("context_tokens", e.ts, {"input_tokens": e.usage.input_tokens})
        elif isinstance(e, ToolCallFinished):
            if e.cost_usd:
                cost += e.cost_usd
                counter("cost_usd", e.ts, {"cost_usd": round(cost, 12)})
        elif isinstance(e, LimitHit):
            instant(f"limit_hit {e.limit}", e.ts, ITERATIONS_TID, "runtime",
                    {"iteration": e.iteration, "limit": e.limit, "detail": e.detail})
        elif isinstance(e, Nudge):
            instant("nudge", e.ts, ITERATIONS_TID, "runtime",
                    {"iteration": e.iteration, "reason": e.reason, "content": e.content})
        elif isinstance(e, BreakerChanged):
            instant(f"breaker {e.name} {e.old}->{e.new}", e.ts, ITERATIONS_TID, "runtime",
                    {"iteration": e.iteration, "tool": e.name, "old": e.old, "new": e.new, "reason": e.reason})
        elif isinstance(e, ContextFolded):
            instant(f"context_folded {e.outcome}", e.ts, ITERATIONS_TID, "runtime",
                    {"iteration": e.iteration, "outcome": e.outcome, "units": list(e.units),
                     "n_messages": e.n_messages, "reason": e.reason})
        elif isinstance(e, ModelAttemptFailed):
            instant(f"model_attempt_failed {e.model}", e.ts, MODEL_TID, "retry",
                    {"iteration": e.iteration, "model": e.model, "attempt": e.attempt,
                     "error": f"{e.error.type}: {e.error.message}", "latency_s": e.latency_s,
                     "retry_in_s": e.retry_in_s, "will_fallback": e.will_fallback, "reason": e.reason})
        elif isinstance(e, ToolAttemptFailed):
            instant(f"tool_attempt_failed {e.name}", e.ts, tid_of_call(e.iteration, e.call_id, e.ts), "retry",
                    {"iteration": e.iteration, "call_id": e.call_id, "attempt": e.attempt,
                     "error": f"{e.error.type}: {e.error.message}", "latency_s": e.latency_s,
                     "retry_in_s": e.retry_in_s})
        elif isinstance(e, ToolFallback):
            instant(f"tool_fallback {e.name}", e.ts, tid_of_call(e.iteration, e.call_id, e.ts), "retry",
                    {"iteration": e.iteration, "call_id": e.call_id, "fallback": e.fallback, "ok": e.ok,
                     "reason": e.reason})
        elif isinstance(e, ThreadAbandoned):
            instant(f"thread_abandoned {e.name}", e.ts, tid_of_call(e.iteration, e.call_id, e.ts), "runtime",
                    {"iteration": e.iteration, "call_id": e.call_id, "thread": e.thread})
        elif isinstance(e, RunFinished):
            instant(f"run_finished {e.stop_reason}", e.ts, ITERATIONS_TID, "run",
                    {"stop_reason": e.stop_reason, "reason": e.reason, "cost_usd": e.cost_usd,
                     "duration_s": e.duration_s})

    trace.sort(key=lambda ev: ev["ts"])  # stable: a span before the instants at its start
    metadata: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "ts": 0, "args": {"name": f"loopwise run {run_id}"}},
    ]
    for tid in sorted(thread_names):
        metadata.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "ts": 0,
                         "args": {"name": thread_names[tid]}})
        metadata.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "ts": 0,
                         "args": {"sort_index": tid}})
    return {
        "traceEvents": metadata + trace,
        "displayTimeUnit": "ms",
        "otherData": {"run_id": run_id, "in_flight": in_flight, "origin_unix_s": origin},
    }
