"""A real OTLP/HTTP trace receiver on 127.0.0.1 for the tests: what a collector sees.

`POST /v1/traces` with a protobuf `ExportTraceServiceRequest` (gzip or deflate when the
request says so) is decoded with `opentelemetry-proto` and kept; the answer is a
protobuf `ExportTraceServiceResponse`, as the OTLP specification asks. `status` makes
it refuse (401, say, like a collector missing its API key).
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["OTLPReceiver", "ReceivedSpan", "attribute_value"]


def attribute_value(value: AnyValue) -> Any:
    """A protobuf `AnyValue` as the Python value it carries."""
    which = value.WhichOneof("value")
    if which == "array_value":
        return [attribute_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: attribute_value(kv.value) for kv in value.kvlist_value.values}
    return None if which is None else getattr(value, which)


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    status_code: int
    status_message: str
    resource: dict[str, Any]
    scope: str


@dataclass
class OTLPReceiver:
    """Start with `start()`; `url` is its base URL; `spans` what it received; `stop()` at the end."""

    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    spans: list[ReceivedSpan] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OTLPReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                with receiver._lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers.items()),
                                              "bytes": len(body)})
                if self.path != "/v1/traces":
                    return self._answer(404, b"not found", "text/plain")
                if receiver.status != 200:
                    return self._answer(receiver.status, b"refused by the test", "text/plain")
                if self.headers.get("Content-Type") != "application/x-protobuf":
                    return self._answer(415, b"want application/x-protobuf", "text/plain")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._keep(request)
                self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: attribute_value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={kv.key: attribute_value(kv.value) for kv in span.attributes},
                        events=[(ev.name, ev.time_unix_nano, {kv.key: attribute_value(kv.value)
                                                               for kv in ev.attributes}) for ev in span.events],
                        status_code=span.status.code,
                        status_message=span.status.message,
                        resource=resource,
                        scope=scope_spans.scope.name,
                    ))
        with self._lock:
            self.spans.extend(received)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
