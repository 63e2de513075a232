"""Emitting: a planned span tree through an OpenTelemetry tracer, with the planned ids.

The planned ids (`_views.otel_plan.trace_id_of`, `span_id_of`) reach the spans through the
tracer's id generator: an OpenTelemetry SDK tracer (`opentelemetry.sdk.trace`) gets a
`PlannedIds` wrapped around its own, which hands out the planned id of the span being
started on this thread and defers to the original for every other span. A tracer
provider of another make keeps its own ids (each export is then a new trace).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .._errors import UserError
from .._events import Event
from .otel_names import INSTALL_HINT
from .otel_plan import PlannedSpan, plan_spans

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = ["PlannedIds", "export_otel"]

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
    from .. import __version__

    if tracer_provider is None:
        tracer_provider = trace.get_tracer_provider()
        if isinstance(tracer_provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            raise UserError(
                "no OpenTelemetry tracer provider is configured, so the spans would go nowhere: pass "
                "tracer_provider=... or set one with opentelemetry.trace.set_tracer_provider(...); "
                "`loopwise export RUN_ID --format otlp` sends to a collector without one"
            )
    return tracer_provider.get_tracer("loopwise", __version__)


class PlannedIds:
    """An SDK id generator that hands out the next planned ids on this thread, else defers to `fallback`."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback
        self.next = threading.local()

    def generate_trace_id(self) -> int:
        trace_id = getattr(self.next, "trace_id", 0)
        if trace_id:
            self.next.trace_id = 0
            return trace_id
        return self.fallback.generate_trace_id()

    def generate_span_id(self) -> int:
        span_id = getattr(self.next, "span_id", 0)
        if span_id:
            self.next.span_id = 0
            return span_id
        return self.fallback.generate_span_id()

    def is_trace_id_random(self) -> bool:
        # A derived trace id is not random (W3C Trace Context level 2's flag): say so.
        return False if getattr(self.next, "span_id", 0) else bool(self.fallback.is_trace_id_random())


def _planned_ids(tracer: Any) -> PlannedIds | None:
    """The tracer's `PlannedIds`, installed on first use; None for a tracer without an id generator."""
    ids = getattr(tracer, "id_generator", None)
    if ids is None or not callable(getattr(ids, "generate_span_id", None)):
        return None
    if not isinstance(ids, PlannedIds):
        ids = tracer.id_generator = PlannedIds(ids)
    return ids


def _emit(tracer: Tracer, plan: PlannedSpan, parent: Any, ids: PlannedIds | None) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    kind = SpanKind.CLIENT if plan.kind == "client" else SpanKind.INTERNAL
    if ids is not None:
        ids.next.trace_id, ids.next.span_id = plan.trace_id, plan.span_id
    try:
        span = tracer.start_span(plan.name, context=parent, kind=kind, attributes=plan.attributes,
                                 start_time=_ns(plan.start))
    finally:
        if ids is not None:
            ids.next.trace_id = ids.next.span_id = 0
    for event in plan.events:
        span.add_event(event.name, event.attributes, timestamp=_ns(event.ts))
    if plan.error is not None:
        span.set_status(Status(StatusCode.ERROR, plan.error))
    context = trace.set_span_in_context(span)
    for child in plan.children:
        _emit(tracer, child, context, ids)
    span.end(end_time=_ns(plan.end))


def export_otel(
    events: Iterable[Event],
    tracer_provider: TracerProvider | None = None,
    *,
    include_content: bool = False,
) -> int:
    """Make one run's spans through `tracer_provider` (default: the global one); return how many.

    The root span is always a new trace's root, whatever span is current: the run
    happened earlier, elsewhere, and is read back from its log. Through an SDK tracer
    provider, the ids are the planned ones: the same run exported again is the same
    trace, with the same span ids.
    """
    tracer = _tracer(tracer_provider)
    plan = plan_spans(events, include_content=include_content)
    if plan is None:
        return 0
    from opentelemetry.context import Context

    _emit(tracer, plan, Context(), _planned_ids(tracer))
    return plan.count()
