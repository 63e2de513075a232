"""A real HTTP server that speaks the OpenAI chat-completions protocol, scripted by tests.

It runs `http.server.ThreadingHTTPServer` on 127.0.0.1 (a free port) in a background
thread and keeps connections alive (HTTP/1.1) as a real server does. A test queues what
the next requests get, then reads the JSON bodies the server received:

```python
with OpenAIServer() as server:
    server.reply(tool_calls=[("call_1", "lookup", {"q": "x"})], usage=(12, 3))
    server.reply(text="done")
    server.reply_error(500, {"error": {"message": "boom"}})
    server.reply(text="late", delay=2.0)
    ...  # OpenAIModel("gpt-4o-mini", base_url=server.base_url, api_key="test")
    server.requests[0]["messages"]
```

A request that finds the queue empty gets a 500 whose message says so.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["OpenAIServer", "completion"]


def completion(
    *,
    text: str | None = None,
    tool_calls: list[tuple[str, str, dict[str, Any] | str]] = (),  # type: ignore[assignment]
    usage: tuple[int, int] | tuple[int, int, int, int] | None = (10, 5),
    finish_reason: str | None = None,
    model: str = "gpt-4o-mini",
) -> dict[str, Any]:
    """A chat-completion body. `tool_calls` are (id, name, arguments); dict arguments
    are JSON-encoded, a str is sent as is (possibly malformed JSON). `usage` is
    (prompt, completion) or (prompt, completion, cached, reasoning); None leaves it out."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
            for call_id, name, arguments in tool_calls
        ]
    body: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop"),
            }
        ],
    }
    if usage is not None:
        prompt, completion_tokens, *details = usage
        body["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }
        if details:
            cached, reasoning = details
            body["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
            body["usage"]["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return body


@dataclass(slots=True)
class _Reply:
    status: int
    body: Any
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.owner._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        reply = owner._record(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        if reply.delay and owner._closing.wait(reply.delay):
            self.close_connection = True
            return  # the server is shutting down: answer nothing
        if isinstance(reply.body, (dict, list)):
            payload = json.dumps(reply.body).encode()
            content_type = "application/json"
        else:
            payload = str(reply.body).encode()
            content_type = "text/plain"
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (its timeout): fine


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True

    def __init__(self, owner: OpenAIServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.owner._closing.is_set():
            return  # connections cut by close()
        super().handle_error(request, client_address)


class OpenAIServer:
    """A scripted chat-completions server on 127.0.0.1; use it as a context manager."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: deque[_Reply] = deque()
        self._connections: set[socket.socket] = set()
        self._closing = threading.Event()
        #: The JSON bodies of the requests received, in order.
        self.requests: list[Any] = []
        #: The headers of each request received (names in lower case).
        self.headers: list[dict[str, str]] = []
        #: The path of each request received.
        self.paths: list[str] = []
        self._httpd = _HTTPServer(self)
        self.port: int = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="openai-test-server", daemon=True)
        self._thread.start()

    # -- scripting -----------------------------------------------------------------

    def reply(self, body: dict[str, Any] | None = None, *, delay: float = 0.0, **completion_kw: Any) -> None:
        """Queue a 200 answer: `body` as is, or `completion(**completion_kw)`."""
        if body is None:
            body = completion(**completion_kw)
        elif completion_kw:
            raise TypeError("pass either a body or completion() keywords, not both")
        self._push(_Reply(200, body, delay))

    def reply_error(self, status: int, body: Any = None, *, delay: float = 0.0,
                    headers: dict[str, str] | None = None) -> None:
        """Queue an error answer: `status` with a JSON (dict) or text body."""
        if body is None:
            body = {"error": {"message": f"scripted error {status}", "type": "server_error", "code": None}}
        self._push(_Reply(status, body, delay, dict(headers or {})))

    def _push(self, reply: _Reply) -> None:
        with self._lock:
            self._replies.append(reply)

    @property
    def pending(self) -> int:
        """Queued replies not yet sent."""
        with self._lock:
            return len(self._replies)

    # -- called from handler threads ------------------------------------------------

    def _record(self, path: str, headers: dict[str, str], body: Any) -> _Reply:
        with self._lock:
            self.paths.append(path)
            self.headers.append(headers)
            self.requests.append(body)
            if path.rstrip("/") != "/v1/chat/completions":
                return _Reply(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
            if not self._replies:
                return _Reply(500, {"error": {"message": f"the test server has no reply queued for request "
                                                         f"#{len(self.requests)}", "type": "server_error"}})
            return self._replies.popleft()

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, cut kept-alive connections, and join every thread."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()  # joins the handler threads
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
