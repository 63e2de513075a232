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

The parts, by role: `_views.otel_names` (the conventions' attribute names and message
JSON), `_views.otel_plan` (the span tree and its ids, from the log alone), `_views.otel_emit`
(through a tracer), `_views.otel_send` (to a collector over OTLP/HTTP). Prompts, task,
output, tool arguments and results are sensitive and only exported with
`include_content=True` (the conventions' opt-in attributes). The OpenTelemetry API
and SDK are imported lazily: without the extra, a `UserError` says what to install.
"""

from __future__ import annotations

from .otel_emit import export_otel
from .otel_plan import PlannedSpan, SpanEvent, plan_spans, span_id_of, trace_id_of
from .otel_send import OTLPExportError, post_otlp, require_sdk, resolve_endpoint, send_otlp

__all__ = ["OTLPExportError", "PlannedSpan", "SpanEvent", "export_otel", "plan_spans", "post_otlp",
           "require_sdk", "resolve_endpoint", "send_otlp", "span_id_of", "trace_id_of"]
