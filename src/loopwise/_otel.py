"""OpenTelemetry export of a run's event log, following the GenAI semantic conventions.

The conventions are those of semantic-conventions v1.41.1 (the GenAI pages have since
moved to `open-telemetry/semantic-conventions-genai`). One run becomes one trace:

```
invoke_agent {agent}     INTERNAL  the run: agent, conversation id = run id, totals, stop reason
  iteration {n}          INTERNAL  one THINK → ACT → OBSERVE step; the runtime's decisions as events
    chat {model}         CLIENT    one model call (think, summary, best-effort answer); failed attempts as events
    execute_tool {tool}  INTERNAL  one tool call; calls run together are overlapping siblings
```

Why a pure function of the log, and not spans made while the run happens: the log is
the one source of truth, so a run read back from SQLite next week exports the same
tree as the live one did, nothing slows the loop, and a run still in flight exports
what it has (open spans end at its last event, marked `loopwise.incomplete`). Span
times are the events' wall-clock timestamps (`ts`, seconds) in nanoseconds.

The attribute names are our own constants below: the official
`opentelemetry-semantic-conventions` package lags the GenAI pages. Prompts, task,
output, tool arguments and results are sensitive and only exported with
`include_content=True` (the conventions' opt-in attributes). The OpenTelemetry API
and SDK are imported lazily: without the extra, a `UserError` says what to install.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from ._errors import LoopwiseError, UserError
from ._events import (
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
from ._messages import Message, ToolCall

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = ["OTLPExportError", "export_otel", "plan_spans", "post_otlp", "resolve_endpoint", "send_otlp"]

INSTALL_HINT = "pip install 'loopwise[otel]'"

# -- attribute names (GenAI semantic conventions) --------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
#: Not in the conventions: the dollars of one model call, as Langfuse reads them.
GEN_AI_USAGE_COST = "gen_ai.usage.cost"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
# Opt-in (sensitive) content.
GEN_AI_TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT = "gen_ai.tool.call.result"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"

OP_INVOKE_AGENT = "invoke_agent"
OP_CHAT = "chat"
OP_EXECUTE_TOOL = "execute_tool"
#: `gen_ai.provider.name` of a model whose name has no `provider:` prefix.
OTHER_PROVIDER = "_OTHER"

# -- loopwise's own attributes ----------------------------------------------------------
LW_RUN_ID = "loopwise.run_id"
LW_STOP_REASON = "loopwise.stop_reason"
LW_STOP_DETAIL = "loopwise.stop_detail"
LW_ITERATIONS = "loopwise.iterations"
LW_MODEL_CALLS = "loopwise.model_calls"
#: The run's total dollars (models and tools). Not `gen_ai.usage.cost`: backends that sum
#: that attribute over a trace would count every model call twice.
LW_COST_USD = "loopwise.cost_usd"
LW_TAGS = "loopwise.tags"
LW_INCOMPLETE = "loopwise.incomplete"
LW_ITERATION = "loopwise.iteration"
LW_PURPOSE = "loopwise.purpose"
LW_LATENCY_S = "loopwise.latency_s"
LW_USAGE_ESTIMATED = "loopwise.usage_estimated"
LW_REASONING_TOKENS = "loopwise.usage.reasoning_tokens"
LW_RESERVED_USD = "loopwise.reserved_usd"
LW_OVERRUN_USD = "loopwise.overrun_usd"
LW_TOOL_CALLS = "loopwise.tool_calls"
LW_TOOL_OUTCOME = "loopwise.tool.outcome"
LW_TOOL_ATTEMPTS = "loopwise.tool.attempts"
LW_TOOL_FALLBACK = "loopwise.tool.fallback"
LW_TOOL_COST_USD = "loopwise.tool.cost_usd"

#: Tool outcomes that mark an `execute_tool` span as an error (a fallback that answered,
#: or a call skipped at the iteration limit, is not one).
ERROR_OUTCOMES = frozenset({"error", "invalid_arguments", "unknown_tool", "cancelled"})

AttrValue = str | bool | int | float | list[str] | list[int] | list[float] | list[bool]


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

    def count(self) -> int:
        return 1 + sum(c.count() for c in self.children)


class OTLPExportError(LoopwiseError):
    """The OTLP collector could not be reached, or did not accept the spans."""


# -- planning: the span tree, from the log alone ----------------------------------------


def _clean(attributes: Mapping[str, Any]) -> dict[str, AttrValue]:
    """Drop None values (OpenTelemetry refuses them); tuples become lists."""
    out: dict[str, AttrValue] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def split_model(name: str) -> tuple[str, str]:
    """`"openai:gpt-4o-mini"` → `("openai", "gpt-4o-mini")`; a name with no prefix → `("_OTHER", name)`."""
    provider, sep, model = name.partition(":")
    if sep and provider and model:
        return provider, model
    return OTHER_PROVIDER, name


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _parts(message: Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if message.role == "tool":
        parts.append({"type": "tool_call_response", "id": message.tool_call_id, "result": message.content})
        return parts
    if message.content:
        parts.append({"type": "text", "content": message.content})
    parts.extend(_call_part(c) for c in message.tool_calls)
    return parts


def _call_part(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments}


def _output_messages(text: str | None, calls: Iterable[ToolCall], finish_reason: str | None) -> str:
    calls = list(calls)
    parts: list[dict[str, Any]] = [{"type": "text", "content": text}] if text else []
    parts.extend(_call_part(c) for c in calls)
    reason = finish_reason or ("tool_call" if calls else "stop")
    return _json([{"role": "assistant", "parts": parts, "finish_reason": reason}])


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
    for f in fields(event):  # type: ignore[arg-type]
        if f.name in ("kind", "run_id", "seq", "ts"):
            continue
        value = getattr(event, f.name)
        if isinstance(value, (str, bool, int, float)):
            attributes[f"loopwise.{f.name}"] = value
    return SpanEvent(event.kind, event.ts, attributes)


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
                               {LW_ITERATION: iteration, "loopwise.resumed": True, **self.common})
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
                                                       {LW_ITERATION: e.iteration, **self.common}))

    def _chat(self, model: str, start: float, iteration: int, purpose: str, **more: Any) -> PlannedSpan:
        provider, name = split_model(model)
        span = PlannedSpan(f"{OP_CHAT} {name}", "client", start, start, _clean({
            GEN_AI_OPERATION_NAME: OP_CHAT, GEN_AI_PROVIDER_NAME: provider, GEN_AI_REQUEST_MODEL: name, **more,
            **self.common, **_server_of(self.models.get(model, {})), LW_PURPOSE: purpose, LW_ITERATION: iteration}))
        self.holder(iteration).children.append(span)
        return span

    def _on_model_call_started(self, e: ModelCallStarted) -> None:
        span = self._chat(e.model, e.ts, e.iteration, e.purpose, **{GEN_AI_REQUEST_MAX_TOKENS: e.max_tokens,
                                                                     LW_RESERVED_USD: e.reserved_usd})
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
            GEN_AI_TOOL_TYPE: "function", **self.common, LW_ITERATION: iteration, **more}))
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


# -- emitting: the tree through an OpenTelemetry tracer ---------------------------------


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _require_api() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        raise UserError(f"OpenTelemetry export needs the otel extra: {INSTALL_HINT}") from None
    return trace


def _tracer(tracer_provider: TracerProvider | None) -> Tracer:
    trace = _require_api()
    from . import __version__

    if tracer_provider is None:
        tracer_provider = trace.get_tracer_provider()
        if isinstance(tracer_provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            raise UserError(
                "no OpenTelemetry tracer provider is configured, so the spans would go nowhere: pass "
                "tracer_provider=... or set one with opentelemetry.trace.set_tracer_provider(...); "
                "`loopwise export RUN_ID --format otlp` sends to a collector without one"
            )
    return tracer_provider.get_tracer("loopwise", __version__)


def _emit(tracer: Tracer, plan: PlannedSpan, parent: Any) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    kind = SpanKind.CLIENT if plan.kind == "client" else SpanKind.INTERNAL
    span = tracer.start_span(plan.name, context=parent, kind=kind, attributes=plan.attributes,
                             start_time=_ns(plan.start))
    for event in plan.events:
        span.add_event(event.name, event.attributes, timestamp=_ns(event.ts))
    if plan.error is not None:
        span.set_status(Status(StatusCode.ERROR, plan.error))
    context = trace.set_span_in_context(span)
    for child in plan.children:
        _emit(tracer, child, context)
    span.end(end_time=_ns(plan.end))


def export_otel(
    events: Iterable[Event],
    tracer_provider: TracerProvider | None = None,
    *,
    include_content: bool = False,
) -> int:
    """Make one run's spans through `tracer_provider` (default: the global one); return how many.

    The root span is always a new trace's root, whatever span is current: the run
    happened earlier, elsewhere, and is read back from its log.
    """
    tracer = _tracer(tracer_provider)
    plan = plan_spans(events, include_content=include_content)
    if plan is None:
        return 0
    from opentelemetry.context import Context

    _emit(tracer, plan, Context())
    return plan.count()


# -- sending: OTLP over HTTP ------------------------------------------------------------

TRACES_PATH = "/v1/traces"
ENDPOINT_HELP = (
    "pass --endpoint URL (the collector's OTLP/HTTP address, e.g. http://localhost:4318 for Jaeger) "
    "or set OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, the full traces URL)"
)


def _check_url(url: str, origin: str) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise UserError(f"{origin} {url!r} is not a valid URL ({exc}); give one like http://localhost:4318") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{origin} {url!r} is not an http(s) URL; give one like http://localhost:4318")
    return url


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The OTLP/HTTP traces URL to send to.

    `endpoint`, like `OTEL_EXPORTER_OTLP_ENDPOINT`, is the collector's base URL:
    `/v1/traces` is appended unless it already ends so. Without it, the OpenTelemetry
    environment decides, as the SDK reads it: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
    used as is, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`. None of them set is
    a `UserError` (never a guess at localhost).
    """
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(name, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise UserError(f"{name}={protocol}: loopwise sends OTLP over HTTP as protobuf; set it to "
                                "http/protobuf (or unset it) and point the endpoint at the collector's HTTP port "
                                "(4318 by default)")
            break
    if endpoint is not None:
        url = _check_url(endpoint, "the endpoint")
        base = url.rstrip("/")
        return base if base.endswith(TRACES_PATH) else base + TRACES_PATH
    if traces := os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return _check_url(traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if base := os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return _check_url(base, "OTEL_EXPORTER_OTLP_ENDPOINT").rstrip("/") + TRACES_PATH
    raise UserError(f"no OTLP collector is configured: {ENDPOINT_HELP}")


class _Captured(logging.Handler):
    """The exporter's log lines during one export: they say why it failed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a malformed record must not hide the real failure
            self.messages.append(str(record.msg))


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_ANSWER = re.compile(r"code: (\S+), reason: (.*)", re.DOTALL)


def _why(messages: list[str]) -> str:
    """The exporter's reason, short: `Connection refused` rather than urllib3's repr chain.

    The SDK's wording differs between versions ("Failed to export batch code: 401, reason: ...",
    "... span batch code: ...", "... spans batch code: ..."): only its parts are relied on.
    """
    for message in reversed(messages):
        if message.startswith("Failed to export") and (answer := _ANSWER.search(message)):
            code, reason = answer.group(1), " ".join(answer.group(2).split())
            if code.isdigit():
                return f"the collector answered HTTP {code}" + (f": {reason}" if reason else "")
            if found := _ERRNO.search(reason):
                return found.group(1).strip().lower()
            return reason or message
    for message in reversed(messages):
        if found := _ERRNO.search(message):
            return found.group(1).strip().lower()
    for message in reversed(messages):
        if message.startswith("Transient error"):
            reason = message.split(" encountered", 1)[0].removeprefix("Transient error ").strip()
            return f"still failing when the time ran out (last answer: {reason}); retry later or raise --timeout"
    return messages[-1] if messages else "no reason given by the exporter"


def send_otlp(
    events: Iterable[Event],
    *,
    endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    include_content: bool = False,
) -> int:
    """Send one run's spans to an OTLP/HTTP collector in one request; return how many were sent.

    The endpoint is resolved by `resolve_endpoint`; `headers` add to those of
    `OTEL_EXPORTER_OTLP_HEADERS` (an API key for Langfuse, say). The exporter retries
    what a collector says is transient until `timeout_s` (default: the SDK's, 10 s).
    Raises `OTLPExportError` with a one-line reason when nothing was accepted.
    """
    return post_otlp(resolve_endpoint(endpoint), events, headers=headers, timeout_s=timeout_s,
                     include_content=include_content)


def require_sdk() -> None:
    """Raise `UserError` naming the extra when the OpenTelemetry SDK or OTLP exporter is missing."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise UserError(f"OTLP export needs the OpenTelemetry SDK and exporter: {INSTALL_HINT}") from None


def post_otlp(
    url: str,
    events: Iterable[Event],
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    include_content: bool = False,
) -> int:
    """`send_otlp` to an already resolved traces URL (used as is)."""
    if timeout_s is not None and not timeout_s > 0:
        raise UserError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    require_sdk()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    resource = Resource.create({})  # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, if set
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "loopwise"}))
    provider = SDKTracerProvider(resource=resource)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    try:
        export_otel(events, provider, include_content=include_content)
        spans = memory.get_finished_spans()
    finally:
        provider.shutdown()
    if not spans:
        return 0

    exporter = OTLPSpanExporter(endpoint=url, headers=dict(headers) if headers else None, timeout=timeout_s)
    captured = _Captured()
    logger = logging.getLogger("opentelemetry.exporter")
    propagate = logger.propagate
    logger.addHandler(captured)
    logger.propagate = False  # its failure is our one-line error, not a log dump on stderr
    try:
        result = exporter.export(spans)
    except Exception as exc:  # older exporters raise on a connection error; still one line
        found = _ERRNO.search(str(exc))
        why = found.group(1).strip().lower() if found else f"{type(exc).__name__}: {exc}"
        raise OTLPExportError(f"could not send {len(spans)} spans to {url}: {why}") from None
    finally:
        logger.removeHandler(captured)
        logger.propagate = propagate
        exporter.shutdown()
    if result is not SpanExportResult.SUCCESS:
        why = _why(captured.messages)
        if why.startswith("Failed to export") or why.startswith("no reason"):  # the exporter gave no cause
            why = _diagnose(url, timeout_s)
        raise OTLPExportError(f"could not send {len(spans)} spans to {url}: {why}")
    return len(spans)


def _diagnose(url: str, timeout_s: float | None) -> str:
    """Why nothing was accepted, when the exporter only says it gave up: can we even connect?"""
    import socket

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=min(timeout_s or 2.0, 2.0)):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"cannot connect to {parts.hostname}:{port} ({reason})"
    wait = f"{timeout_s:g} s" if timeout_s is not None else "the exporter's timeout"
    return f"no answer accepted within {wait} (a slow or overloaded collector? try --timeout)"
