"""Planning: a run's span tree, from its event log alone (no OpenTelemetry needed).

```
invoke_agent {agent}     INTERNAL  the run: agent, conversation id = run id, totals, stop reason
  iteration {n}          INTERNAL  one THINK → ACT → OBSERVE step; the runtime's decisions as events
    chat {model}         CLIENT    one model call (think, summary, best-effort answer); failed attempts as events
    execute_tool {tool}  INTERNAL  one tool call; calls run together are overlapping siblings
```

Every span's id is derived from the run id and the `seq` of the event that opened it,
and the trace id from the run id (`trace_id_of`), so exporting a run again gives the
same ids: a backend sees the same trace, not a new copy of it. With `include_content`,
each chat span holds the messages its call was shown (`gen_ai.input.messages`,
rebuilt from the log by `_views.seen`) and the answer (`gen_ai.output.messages`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlsplit

from .._errors import UserError
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
)
from .otel_names import (
    ERROR_OUTCOMES,
    ERROR_TYPE,
    GEN_AI_AGENT_NAME,
    GEN_AI_CONVERSATION_ID,
    GEN_AI_INPUT_MESSAGES,
    GEN_AI_OPERATION_NAME,
    GEN_AI_OUTPUT_MESSAGES,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_SYSTEM_INSTRUCTIONS,
    GEN_AI_TOOL_CALL_ARGUMENTS,
    GEN_AI_TOOL_CALL_ID,
    GEN_AI_TOOL_CALL_RESULT,
    GEN_AI_TOOL_NAME,
    GEN_AI_TOOL_TYPE,
    GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    GEN_AI_USAGE_COST,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    LW_COST_USD,
    LW_INCOMPLETE,
    LW_ITERATION,
    LW_ITERATIONS,
    LW_LATENCY_S,
    LW_MODEL_CALLS,
    LW_OVERRUN_USD,
    LW_PURPOSE,
    LW_REASONING_TOKENS,
    LW_RESERVED_USD,
    LW_RUN_ID,
    LW_STOP_DETAIL,
    LW_STOP_REASON,
    LW_TAGS,
    LW_TOOL_ATTEMPTS,
    LW_TOOL_CALLS,
    LW_TOOL_COST_USD,
    LW_TOOL_FALLBACK,
    LW_TOOL_OUTCOME,
    LW_USAGE_ESTIMATED,
    OP_CHAT,
    OP_EXECUTE_TOOL,
    OP_INVOKE_AGENT,
    OTHER_PROVIDER,
    SERVER_ADDRESS,
    SERVER_PORT,
    AttrValue,
    _clean,
    _json,
    _output_messages,
    _parts,
    input_messages,
    split_model,
)
from .seen import seen_calls

__all__ = ["PlannedSpan", "SpanEvent", "plan_spans", "span_id_of", "trace_id_of"]

@dataclass(slots=True)
class SpanEvent:
    name: str
    ts: float
    attributes: dict[str, AttrValue]


@dataclass(slots=True)
class PlannedSpan:
    """A span to be made: what `export_otel` hands to the tracer (times in wall seconds)."""

    name: str
    kind: Literal["internal", "client"]
    start: float
    end: float
    attributes: dict[str, AttrValue]
    events: list[SpanEvent] = field(default_factory=list)
    children: list[PlannedSpan] = field(default_factory=list)
    #: The status description when the span ended in an error (None: status unset).
    error: str | None = None
    #: Its span id, from the run id and the seq of the event that opened it (`span_id_of`).
    span_id: int = 0
    #: The trace's id, on the root (`trace_id_of`); 0 on the others.
    trace_id: int = 0

    def count(self) -> int:
        return 1 + sum(c.count() for c in self.children)


def _server_of(description: Mapping[str, Any]) -> dict[str, Any]:
    """`server.address` / `server.port` from a model's recorded `base_url`, if it has one."""
    base_url = description.get("base_url")
    if not isinstance(base_url, str) or not base_url:
        return {}
    try:
        parts = urlsplit(base_url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return {}
    if not parts.hostname:
        return {}
    return {SERVER_ADDRESS: parts.hostname, SERVER_PORT: port}


def _error_text(error: Any) -> str:
    return f"{error.type}: {error.message}"


def _generic_event(event: Event) -> SpanEvent:
    """An event kind this exporter does not know (a newer log): its scalar fields, as is."""
    attributes: dict[str, AttrValue] = {}
    for f in fields(event):
        if f.name in ("kind", "run_id", "seq", "ts"):
            continue
        value = getattr(event, f.name)
        if isinstance(value, (str, bool, int, float)):
            attributes[f"loopwise.{f.name}"] = value
    return SpanEvent(event.kind, event.ts, attributes)


def trace_id_of(run_id: str) -> int:
    """The trace id of a run's export: the run id itself when it is one (32 hex digits, as
    loopwise makes them), else the first 16 bytes of its SHA-256. Never 0 (an invalid id)."""
    if len(run_id) == 32:
        try:
            value = int(run_id, 16)
        except ValueError:
            pass
        else:
            if value:
                return value
    return int.from_bytes(hashlib.sha256(b"loopwise trace\0" + run_id.encode()).digest()[:16], "big") or 1


def span_id_of(run_id: str, seq: int, role: str) -> int:
    """The id of the span of `role` that the run's event `seq` opened: 8 bytes of a SHA-256. Never 0."""
    digest = hashlib.sha256(f"loopwise span\0{run_id}\0{seq}\0{role}".encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


def plan_spans(events: Iterable[Event], *, include_content: bool = False) -> PlannedSpan | None:
    """The span tree of one run's events (None for no events); no OpenTelemetry needed."""
    events = list(events)
    if not events:
        return None
    run_ids = sorted({e.run_id for e in events})
    if len(run_ids) > 1:
        shown = ", ".join(repr(r) for r in run_ids[:3]) + (", ..." if len(run_ids) > 3 else "")
        raise UserError(f"these events belong to {len(run_ids)} runs ({shown}); export one run at a time")
    planner = _Planner(events, include_content=include_content)
    for event in events:
        planner.add(event)
    return planner.finish()


class _Planner:
    """Walks a run's log once, in order, growing its span tree.

    One handler per event kind (`_on_<kind>`); a kind without one (a newer log) becomes
    an event on its iteration's span. The state is what is open: the iteration in
    progress, model and tool calls started and not yet finished (paired by iteration and
    call id, first in first out: scripted models reuse ids), and the resumed segment
    the walk is in.
    """

    def __init__(self, events: list[Event], *, include_content: bool) -> None:
        self.content = include_content
        # What each model call was shown, by its start's seq (None: not recorded, an older log).
        self.seen = {c.event.seq: c.messages for c in seen_calls(events)} if include_content else {}
        self.seq = events[0].seq  # the event being walked: the ids of the spans it opens
        self.run_id = events[0].run_id
        self.last_ts = max(e.ts for e in events)
        self.started = next((e for e in events if isinstance(e, RunStarted)), None)
        # The run's end: its last run_finished, unless a resumed segment came after it.
        self.finished: RunFinished | None = None
        for e in events:
            if isinstance(e, RunFinished):
                self.finished = e
            elif e.kind == "run_resumed":
                self.finished = None
        agent: dict[str, Any] = dict(self.started.agent) if self.started is not None else {}
        name = agent.get("name") if isinstance(agent.get("name"), str) else None
        self.models: dict[str, Mapping[str, Any]] = {}
        for d in [agent.get("model"), *(agent.get("fallback_models") or [])]:
            if isinstance(d, Mapping) and isinstance(d.get("name"), str):
                self.models.setdefault(d["name"], d)
        primary = agent["model"].get("name") if isinstance(agent.get("model"), Mapping) else None
        provider, model = split_model(primary) if isinstance(primary, str) else (OTHER_PROVIDER, None)
        self.common = _clean({GEN_AI_CONVERSATION_ID: self.run_id, GEN_AI_AGENT_NAME: name})
        started = self.started
        self.root = PlannedSpan(
            name=f"{OP_INVOKE_AGENT} {name}" if name else OP_INVOKE_AGENT,
            kind="internal",
            start=started.ts if started is not None else events[0].ts,
            end=self.finished.ts if self.finished is not None else self.last_ts,
            attributes=_clean({
                GEN_AI_OPERATION_NAME: OP_INVOKE_AGENT,
                GEN_AI_PROVIDER_NAME: provider,
                **self.common,
                GEN_AI_REQUEST_MODEL: model,
                GEN_AI_REQUEST_MAX_TOKENS: agent.get("max_tokens") if isinstance(agent.get("max_tokens"), int) else None,
                LW_RUN_ID: self.run_id,
                LW_TAGS: [str(t) for t in started.tags] if started is not None and started.tags else None,
            }),
        )
        if include_content and started is not None:
            if started.instructions:
                self.root.attributes[GEN_AI_SYSTEM_INSTRUCTIONS] = _json(
                    [{"type": "text", "content": started.instructions}])
            self.root.attributes[GEN_AI_INPUT_MESSAGES] = _json(
                [{"role": m.role, "parts": _parts(m)} for m in started.task])
        self.root.span_id = self.span_id("run", started.seq if started is not None else None)
        self.root.trace_id = trace_id_of(self.run_id)
        self.iterations: dict[int, PlannedSpan] = {}
        self.segment_of: dict[int, int] = {}  # iteration number -> the segment its span belongs to
        self.current: PlannedSpan | None = None  # the iteration in progress
        self.segment = 0  # resumed segments so far
        self.open_models: list[tuple[ModelCallStarted, PlannedSpan]] = []
        self.open_tools: dict[tuple[int, str], list[PlannedSpan]] = {}
        self.done_tools: dict[tuple[int, str], PlannedSpan] = {}
        self.input_tokens = self.output_tokens = 0
        self.cost = 0.0
        self.now = self.previous_ts = events[0].ts

    def span_id(self, role: str, seq: int | None = None) -> int:
        return span_id_of(self.run_id, self.seq if seq is None else seq, role)

    # -- where things go

    def holder(self, iteration: int) -> PlannedSpan:
        """The span an iteration's event goes under (the root when there is no such iteration).

        A resumed segment continues an interrupted iteration in a span of its own, rather
        than stretching the first one over the time the run lay dead.
        """
        span = self.iterations.get(iteration)
        if span is None:
            return self.root
        if self.segment_of[iteration] != self.segment:
            span = PlannedSpan(span.name, "internal", self.now, self.now,
                               {LW_ITERATION: iteration, "loopwise.resumed": True, **self.common},
                               span_id=self.span_id("resumed iteration"))
            self._begin_iteration(iteration, span)
        return span

    def _begin_iteration(self, iteration: int, span: PlannedSpan) -> None:
        if self.current is not None:
            self.current.end = max(self.current.end, span.start)
        self.current = self.iterations[iteration] = span
        self.segment_of[iteration] = self.segment
        self.root.children.append(span)

    def tool_span(self, iteration: int, call_id: str) -> PlannedSpan:
        pending = self.open_tools.get((iteration, call_id))
        if pending:
            return pending[0]
        return self.done_tools.get((iteration, call_id)) or self.holder(iteration)

    def _interrupt(self, at: float) -> None:
        """A segment ended without its end (a crash, a kill): close what it left open, where its log ends."""
        self.segment += 1
        for span in [s for _, s in self.open_models] + [s for spans in self.open_tools.values() for s in spans]:
            span.end = max(span.end, at)
            span.attributes[LW_INCOMPLETE] = True
        self.open_models.clear()
        self.open_tools.clear()
        if self.current is not None:
            self.current.end = max(self.current.end, at)
            self.current = None

    # -- the walk

    def add(self, e: Event) -> None:
        self.seq = e.seq
        if e.kind == "run_resumed":  # a new segment (`agent.resume`)
            self._interrupt(self.previous_ts)
            self.root.events.append(_generic_event(e))
            self.previous_ts = self.now = e.ts
            return
        self.previous_ts = max(self.previous_ts, e.ts)
        self.now = e.ts
        handler = getattr(self, f"_on_{e.kind}", None)
        if handler is not None:
            handler(e)
        else:
            self.holder(getattr(e, "iteration", 0)).events.append(_generic_event(e))

    def _on_run_started(self, e: RunStarted) -> None:
        if e is not self.started:
            self.root.events.append(_generic_event(e))

    def _on_iteration_started(self, e: IterationStarted) -> None:
        self._begin_iteration(e.iteration, PlannedSpan(f"iteration {e.iteration}", "internal", e.ts, e.ts,
                                                       {LW_ITERATION: e.iteration, **self.common},
                                                       span_id=self.span_id("iteration")))

    def _chat(self, model: str, start: float, iteration: int, purpose: str, **more: Any) -> PlannedSpan:
        provider, name = split_model(model)
        span = PlannedSpan(f"{OP_CHAT} {name}", "client", start, start, _clean({
            GEN_AI_OPERATION_NAME: OP_CHAT, GEN_AI_PROVIDER_NAME: provider, GEN_AI_REQUEST_MODEL: name, **more,
            **self.common, **_server_of(self.models.get(model, {})), LW_PURPOSE: purpose, LW_ITERATION: iteration}),
            span_id=self.span_id("chat"))
        self.holder(iteration).children.append(span)
        return span

    def _on_model_call_started(self, e: ModelCallStarted) -> None:
        span = self._chat(e.model, e.ts, e.iteration, e.purpose, **{GEN_AI_REQUEST_MAX_TOKENS: e.max_tokens,
                                                                     LW_RESERVED_USD: e.reserved_usd})
        if self.content and (messages := self.seen.get(e.seq)) is not None:
            span.attributes[GEN_AI_INPUT_MESSAGES] = input_messages(messages)
        self.open_models.append((e, span))

    def _on_model_call_finished(self, e: ModelCallFinished) -> None:
        match = next((i for i, (s, _) in enumerate(self.open_models)
                      if s.iteration == e.iteration and s.purpose == e.purpose), None)
        if match is None:  # a finish with no start (a cut log): the span from its latency
            span = self._chat(e.model or "?", e.ts - max(e.latency_s, 0.0), e.iteration, e.purpose)
        else:
            _, span = self.open_models.pop(match)
        span.end = e.ts
        self.input_tokens += e.usage.input_tokens
        self.output_tokens += e.usage.output_tokens
        self.cost += e.cost_usd
        span.attributes.update(_clean({
            GEN_AI_RESPONSE_MODEL: split_model(e.model)[1] if e.model else None,
            GEN_AI_RESPONSE_FINISH_REASONS: [e.finish_reason] if e.finish_reason else None,
            GEN_AI_USAGE_INPUT_TOKENS: e.usage.input_tokens,
            GEN_AI_USAGE_OUTPUT_TOKENS: e.usage.output_tokens,
            GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: e.usage.cached_input_tokens or None,
            LW_REASONING_TOKENS: e.usage.reasoning_tokens or None,
            GEN_AI_USAGE_COST: e.cost_usd,
            LW_USAGE_ESTIMATED: e.usage_estimated,
            LW_LATENCY_S: e.latency_s,
            LW_TOOL_CALLS: len(e.tool_calls),
            LW_OVERRUN_USD: e.overrun_usd or None,
        }))
        if e.error is not None:
            span.error = _error_text(e.error)
            span.attributes[ERROR_TYPE] = e.error.type
        elif self.content:
            span.attributes[GEN_AI_OUTPUT_MESSAGES] = _output_messages(e.text, e.tool_calls, e.finish_reason)

    def _on_model_attempt_failed(self, e: ModelAttemptFailed) -> None:
        target = next((span for s, span in reversed(self.open_models)
                       if s.iteration == e.iteration and s.purpose == e.purpose), None) or self.holder(e.iteration)
        target.events.append(SpanEvent("model_attempt_failed", e.ts, _clean({
            GEN_AI_REQUEST_MODEL: split_model(e.model)[1], "loopwise.attempt": e.attempt,
            ERROR_TYPE: e.error.type, "loopwise.error": e.error.message, LW_LATENCY_S: e.latency_s,
            "loopwise.retry_in_s": e.retry_in_s, "loopwise.will_fallback": e.will_fallback,
            "loopwise.reason": e.reason or None})))

    def _tool(self, name: str, call_id: str, start: float, iteration: int, **more: Any) -> PlannedSpan:
        span = PlannedSpan(f"{OP_EXECUTE_TOOL} {name}", "internal", start, start, _clean({
            GEN_AI_OPERATION_NAME: OP_EXECUTE_TOOL, GEN_AI_TOOL_NAME: name, GEN_AI_TOOL_CALL_ID: call_id,
            GEN_AI_TOOL_TYPE: "function", **self.common, LW_ITERATION: iteration, **more}),
            span_id=self.span_id("tool"))
        self.holder(iteration).children.append(span)
        return span

    def _on_tool_call_started(self, e: ToolCallStarted) -> None:
        arguments = None
        if self.content and e.arguments is not None:
            arguments = e.arguments if isinstance(e.arguments, str) else _json(e.arguments)
        span = self._tool(e.name, e.call_id, e.ts, e.iteration, **{GEN_AI_TOOL_CALL_ARGUMENTS: arguments})
        self.open_tools.setdefault((e.iteration, e.call_id), []).append(span)

    def _on_tool_call_finished(self, e: ToolCallFinished) -> None:
        key = (e.iteration, e.call_id)
        pending = self.open_tools.get(key)
        span = pending.pop(0) if pending else self._tool(e.name, e.call_id, e.ts - max(e.latency_s, 0.0), e.iteration)
        self.done_tools[key] = span
        span.end = e.ts
        self.cost += e.cost_usd
        span.attributes.update(_clean({
            LW_TOOL_OUTCOME: e.outcome,
            LW_TOOL_ATTEMPTS: e.attempts,
            LW_TOOL_FALLBACK: e.fallback,
            LW_LATENCY_S: e.latency_s,
            LW_TOOL_COST_USD: e.cost_usd or None,
        }))
        if self.content:
            span.attributes[GEN_AI_TOOL_CALL_RESULT] = e.content
        if e.outcome in ERROR_OUTCOMES:
            span.attributes[ERROR_TYPE] = e.error.type if e.error is not None else e.outcome
            span.error = _error_text(e.error) if e.error is not None else f"{e.outcome}: {e.content}"

    def _on_tool_attempt_failed(self, e: ToolAttemptFailed) -> None:
        self.tool_span(e.iteration, e.call_id).events.append(SpanEvent("tool_attempt_failed", e.ts, _clean({
            GEN_AI_TOOL_NAME: e.name, "loopwise.attempt": e.attempt, ERROR_TYPE: e.error.type,
            "loopwise.error": e.error.message, LW_LATENCY_S: e.latency_s, "loopwise.retry_in_s": e.retry_in_s})))

    def _on_tool_fallback(self, e: ToolFallback) -> None:
        self.tool_span(e.iteration, e.call_id).events.append(SpanEvent("tool_fallback", e.ts, {
            GEN_AI_TOOL_NAME: e.name, LW_TOOL_FALLBACK: e.fallback, "loopwise.ok": e.ok, "loopwise.reason": e.reason}))

    def _on_thread_abandoned(self, e: ThreadAbandoned) -> None:
        self.tool_span(e.iteration, e.call_id).events.append(SpanEvent("thread_abandoned", e.ts, {
            GEN_AI_TOOL_NAME: e.name, "loopwise.thread": e.thread}))

    def _on_breaker_changed(self, e: BreakerChanged) -> None:
        self.holder(e.iteration).events.append(SpanEvent("breaker_changed", e.ts, {
            GEN_AI_TOOL_NAME: e.name, "loopwise.breaker.old": e.old, "loopwise.breaker.new": e.new,
            "loopwise.reason": e.reason}))

    def _on_nudge(self, e: Nudge) -> None:
        self.holder(e.iteration).events.append(SpanEvent("nudge", e.ts, {
            "loopwise.reason": e.reason, "loopwise.content": e.content}))

    def _on_context_folded(self, e: ContextFolded) -> None:
        attributes = _clean({"loopwise.outcome": e.outcome, "loopwise.units": list(e.units) or None,
                             "loopwise.n_messages": e.n_messages, "loopwise.reason": e.reason or None})
        if self.content and e.summary is not None:
            attributes["loopwise.summary"] = e.summary
        self.holder(e.iteration).events.append(SpanEvent("context_folded", e.ts, attributes))

    def _on_limit_hit(self, e: LimitHit) -> None:
        self.holder(e.iteration).events.append(SpanEvent("limit_hit", e.ts, {
            "loopwise.limit": e.limit, "loopwise.detail": e.detail}))

    def _on_run_finished(self, e: RunFinished) -> None:
        self.root.events.append(SpanEvent("run_finished", e.ts, _clean({
            LW_STOP_REASON: e.stop_reason, "loopwise.reason": e.reason,
            ERROR_TYPE: e.error.type if e.error is not None else None})))

    # -- the end

    def finish(self) -> PlannedSpan:
        root, finished = self.root, self.finished
        if finished is not None:  # the run's own totals
            root.attributes.update(_clean({
                GEN_AI_USAGE_INPUT_TOKENS: finished.usage.input_tokens,
                GEN_AI_USAGE_OUTPUT_TOKENS: finished.usage.output_tokens,
                LW_COST_USD: finished.cost_usd,
                LW_STOP_REASON: finished.stop_reason,
                LW_STOP_DETAIL: finished.reason,
                LW_ITERATIONS: finished.iterations,
                LW_MODEL_CALLS: finished.model_calls,
            }))
            if finished.stop_reason == "error":
                root.attributes[ERROR_TYPE] = finished.error.type if finished.error is not None else "_OTHER"
                root.error = finished.reason or (_error_text(finished.error) if finished.error else "the run failed")
            if self.content and finished.output is not None:
                root.attributes[GEN_AI_OUTPUT_MESSAGES] = _output_messages(finished.output, [], "stop")
        else:  # in flight, or its process died: what the log holds so far
            root.attributes.update({
                GEN_AI_USAGE_INPUT_TOKENS: self.input_tokens,
                GEN_AI_USAGE_OUTPUT_TOKENS: self.output_tokens,
                LW_COST_USD: self.cost,
                LW_ITERATIONS: max(self.iterations, default=0),
                LW_INCOMPLETE: True,
            })
        # Whatever is still open ends where the log ends.
        if self.current is not None:
            self.current.end = max(self.current.end, root.end)
        for span in [s for _, s in self.open_models] + [s for spans in self.open_tools.values() for s in spans]:
            span.end = self.last_ts
            span.attributes[LW_INCOMPLETE] = True
        _nest(root)
        return root


def _nest(span: PlannedSpan) -> None:
    """Children inside their parent in time (wall clocks can step back; derived starts can jitter)."""
    for child in span.children:
        child.start = max(child.start, span.start)
        child.end = max(child.end, child.start)
        _nest(child)
        span.end = max(span.end, child.end)
