"""OpenTelemetry export of runs (extra ``loopwise[otel]``), following the GenAI semantic conventions.

Each run becomes one trace: ``invoke_agent {agent}`` → ``iteration {n}`` →
``chat {model}`` and ``execute_tool {tool}`` spans, with the runtime's decisions
(limits, nudges, retries, fallbacks, breakers, folds) as span events. The spans are
computed from the run's event log, so a run exported next week, from its SQLite
file, gives the same tree as one exported as soon as it ended. See docs/otel.md.

```python
from loopwise.otel import export_run, send_run

export_run(run_id, store=store, tracer_provider=provider)    # through your own tracer provider
send_run(run_id, store=store, endpoint="http://localhost:4318")  # straight to a collector over OTLP/HTTP
```

Prompts, outputs, tool arguments and results are sensitive: they are exported only
with ``include_content=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ._errors import UserError
from ._events import Event
from ._views.otel import OTLPExportError, export_otel, resolve_endpoint, send_otlp
from ._stores.base import EventStore

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["OTLPExportError", "export_events", "export_run", "resolve_endpoint", "send_run"]


def _load(run_id: str, store: EventStore | None) -> list[Event]:
    if not isinstance(run_id, str) or not run_id:
        raise UserError(f"run_id must be a non-empty str, got {run_id!r}")
    if store is None:
        from ._stores.sqlite import default_store as _default_store

        store = _default_store()
    elif not isinstance(store, EventStore):
        raise UserError(f"store must be a loopwise EventStore (lw.SQLiteStore(path), lw.MemoryStore()), "
                        f"got {type(store).__name__}")
    return store.load(run_id)


def export_events(
    events: Iterable[Event],
    tracer_provider: TracerProvider | None = None,
    *,
    include_content: bool = False,
) -> int:
    """Make the spans of one run's events through `tracer_provider`; return how many spans.

    Args:
        events: One run's events, in log order (``store.load(run_id)``, or those of
            ``agent.stream(...)``). A run still in flight exports what it has.
        tracer_provider: Where the spans go (its processors and exporters). Default: the
            global provider; none configured is a `UserError`, never spans dropped silently.
        include_content: Also export the task, instructions, model output, tool
            arguments and results (off by default: they may hold personal data).
    """
    return export_otel(events, tracer_provider, include_content=include_content)


def export_run(
    run_id: str,
    *,
    store: EventStore | None = None,
    tracer_provider: TracerProvider | None = None,
    include_content: bool = False,
) -> int:
    """Make the spans of a stored run through `tracer_provider`; return how many spans.

    `store` defaults to the default SQLite store (``$LOOPWISE_DB`` or
    ``.loopwise/loopwise.db``); an unknown run id is a `UserError`.
    """
    return export_otel(_load(run_id, store), tracer_provider, include_content=include_content)


def send_run(
    run_id: str,
    *,
    store: EventStore | None = None,
    endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    include_content: bool = False,
) -> int:
    """Send a stored run's spans to an OTLP/HTTP collector in one request; return how many.

    Args:
        endpoint: The collector's base URL (``http://localhost:4318``); ``/v1/traces`` is
            appended unless the URL ends with it. Default: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
            (as is), else ``OTEL_EXPORTER_OTLP_ENDPOINT``; none set is a `UserError`.
        headers: Extra request headers (added to ``OTEL_EXPORTER_OTLP_HEADERS``).
        timeout_s: How long to keep trying (default: the SDK's, 10 s).

    Raises:
        OTLPExportError: the collector could not be reached or refused the spans.
    """
    events = _load(run_id, store)
    return send_otlp(events, endpoint=endpoint, headers=headers, timeout_s=timeout_s,
                     include_content=include_content)
