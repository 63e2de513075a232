"""Sending: one run's spans to an OTLP/HTTP collector, in one request."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from .._errors import LoopwiseError, UserError
from .._events import Event
from .otel_emit import export_otel
from .otel_names import INSTALL_HINT

__all__ = ["OTLPExportError", "post_otlp", "require_sdk", "resolve_endpoint", "send_otlp"]


class OTLPExportError(LoopwiseError):
    """The OTLP collector could not be reached, or did not accept the spans."""


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
