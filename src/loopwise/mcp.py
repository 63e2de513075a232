"""MCP tools: the tools of a Model Context Protocol server, as loopwise tools.

```python
import loopwise as lw
from loopwise.mcp import MCPServer

server = MCPServer.stdio("python", args=["my_server.py"], timeout=10)
# or: MCPServer.http("http://127.0.0.1:8000/mcp", headers={"Authorization": "..."})

async with server:                           # start, handshake, list the tools
    tools = await server.tools(prefix="crm", exclude=["delete_customer"])
    agent = lw.Agent(model, tools=tools)
    result = await agent.run("Who is customer C-1?")
```

Each MCP tool becomes a `loopwise.Tool` under the same policies as any other: pass
`@tool`'s options (retries, fallback, breaker, ...) to `tools()`. The model sees the
server's input schema as is; arguments are validated against it (JSON Schema, via
``jsonschema``) before the call, and a wrong argument becomes a correctable tool error
like any other. Every call is bounded by a timeout (default: the server's `timeout`): a
server that does not answer in time is cut off, the call fails with an error naming
the tool, the server and the limit (retried, or answered by a fallback, as the policy
says), and the run goes on. A result with ``isError`` is a failure too; text content
is joined, other content (images, audio, resources) is summarised.

Connecting (start or reach the server, handshake, list the tools) is bounded by the
same `timeout`. Enter and leave ``async with server:`` in one task. The connection is
held by a task of loopwise's own inside the block (the SDK's transports keep their task
groups in the task that connects), so tools can be called from any task while the
server is connected: `agent.run` inside the ``async with`` block is the way to use them
(not `run_sync`, which starts an event loop of its own).

A server that dies or restarts while connected does not take the host with it. The calls
in flight on the lost connection fail with `MCPConnectionError` ("MCP server 'crm' is
gone: the connection was lost (...)"), an error observation the model reads, retried or
answered by a fallback as the policy says; the run goes on. The loss is logged (a warning
on the ``loopwise`` logger), and the next use connects again, within that call's timeout:
an HTTP server that is back answers, a stdio server is started again; one still down
fails that call the same way. A request refused because a restarted HTTP server no
longer knows the session (a 404, legacy protocol) never ran, and is sent once more on a
new session. Errors raised inside the ``async with`` block come out as themselves, and
the SDK's transport errors never leave it.

Errors, all `loopwise.LoopwiseError`:

```
MCPServerError            something went wrong talking to an MCP server
├── MCPConnectionError      it could not be started or reached, is gone, or is not connected
├── MCPTimeoutError         it did not answer in time (also a TimeoutError)
└── MCPToolError            a tool answered with an error (isError, or a protocol error)
```

Needs the extra: ``pip install 'loopwise[mcp]'`` (the official ``mcp`` SDK, 2.x).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import LoopwiseError, UserError
from ._messages import ToolSpec
from ._tools.policy import ToolPolicy
from ._tools.tool import Tool, ToolArgumentsError, parse_arguments

__all__ = [
    "MCPConnectionError",
    "MCPServer",
    "MCPServerError",
    "MCPTimeoutError",
    "MCPTool",
    "MCPToolError",
]

_log = logging.getLogger("loopwise")
T = TypeVar("T")

_INSTALL = "pip install 'loopwise[mcp]'"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_ERRORS = 5  # validation errors shown to the model per call
_REASON_WAIT_S = 1.0  # how long a call cut off by a lost connection waits to learn why
_BACKSTOP_S = 1.0  # how far the policy's per-attempt timeout sits behind the MCP call's own
# @tool's options that make sense for a tool living in another process (not `isolation`;
# `timeout` is `MCPServer.tools`'s own).
_POLICY_OPTIONS = frozenset(("total_timeout", "retries", "retry_on", "backoff", "fallback", "idempotent",
                             "cost_usd", "max_result_chars", "alternatives", "secret", "breaker", "check"))


class MCPServerError(LoopwiseError):
    """Something went wrong talking to an MCP server."""


class MCPConnectionError(MCPServerError):
    """The server could not be started or reached, closed the connection, or is not connected."""


class MCPTimeoutError(MCPServerError, TimeoutError):
    """The server did not answer within the timeout."""


class MCPToolError(MCPServerError):
    """An MCP tool answered with an error (a result with ``isError``, or a protocol error)."""


def _import_mcp() -> Any:
    """The ``mcp`` package, or a `UserError` naming the extra to install."""
    try:
        import mcp
    except ImportError as exc:
        raise UserError(f"MCP tools need the official `mcp` SDK: {_INSTALL}") from exc
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("mcp")
    except PackageNotFoundError:  # an unpackaged checkout: trust it
        return mcp
    if installed.split(".")[0] != "2":
        raise UserError(f"loopwise.mcp needs mcp 2.x, found mcp {installed}: {_INSTALL}")
    return mcp


def _tool_name(remote: str, prefix: str | None) -> str:
    """A name valid for every provider (``^[A-Za-z0-9_-]{1,64}$``), close to the server's."""
    name = f"{prefix}__{remote}" if prefix else remote
    if _NAME_RE.match(name):
        return name
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", name) or "tool"
    if len(clean) > 64:  # keep it unique: a digest of the full name replaces the tail
        clean = f"{clean[:55]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return clean


def _result_text(result: Any) -> str:
    """The text of a ``CallToolResult``: text blocks joined, other blocks summarised."""
    parts: list[str] = []
    for block in result.content:
        kind = getattr(block, "type", type(block).__name__)
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            size = len(block.data) * 3 // 4  # base64
            parts.append(f"[{kind} content: {block.mime_type}, about {size} bytes, not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource link: {block.uri}{f' ({block.name})' if block.name else ''}]")
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            if text is not None:
                parts.append(f"[resource {resource.uri}]\n{text}")
            else:
                parts.append(f"[resource {resource.uri}: {resource.mime_type or 'binary'} content, not shown]")
        else:
            parts.append(f"[{kind} content, not shown]")
    if not parts and result.structured_content is not None:
        from pydantic_core import to_json

        return to_json(result.structured_content).decode()
    return "\n".join(parts)


@dataclass(kw_only=True, slots=True, eq=False)
class MCPTool(Tool):
    """A tool of an MCP server; get them from `MCPServer.tools`.

    Its arguments are checked against the server's JSON schema, and a call goes to
    the server through `MCPServer`, bounded by `call_timeout` seconds.
    """

    server: MCPServer
    remote_name: str
    call_timeout: float
    _schema_validator: Any = field(repr=False, default=None)

    def validate(self, arguments: dict[str, Any] | str | None) -> dict[str, Any]:
        """The arguments as a dict if they match the schema, or `ToolArgumentsError` saying what is wrong."""
        arguments = parse_arguments(arguments)
        if self._schema_validator is not None:
            from referencing.exceptions import (
                Unresolvable,  # a dependency of jsonschema
            )

            try:
                errors = sorted(self._schema_validator.iter_errors(arguments), key=lambda e: e.json_path)
            except Unresolvable:  # a $ref to elsewhere: the server judges the arguments itself
                errors = []
            if errors:
                shown = "; ".join(
                    f"{'.'.join(str(p) for p in e.absolute_path) or 'arguments'}: {e.message}"
                    for e in errors[:_MAX_ERRORS]
                )
                more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
                raise ToolArgumentsError(f"invalid arguments: {shown}{more}")
        return arguments


def _schema_validator(schema: Mapping[str, Any]) -> Any:
    """A ``jsonschema`` validator for `schema`, or None when the schema itself is invalid."""
    from jsonschema import exceptions, validators

    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError:
        return None  # the server's problem: let it judge the arguments itself
    return cls(schema)


def _without_userinfo(url: str) -> str:
    """`url` without any ``user:password@``, for messages."""
    return re.sub(r"^(https?://)[^/@]*@", r"\1", url)


async def _list_tools(client: Any, *, cache_mode: str) -> list[Any]:
    """Every page of the server's tool list (at most 100 pages: a paginator that never ends cannot hang)."""
    listing: list[Any] = []
    cursor = None
    for _ in range(100):
        page = await client.list_tools(cursor=cursor, cache_mode=cache_mode)
        listing.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return listing


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or `exc` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


class _Link:
    """One connection to the server, held open by `MCPServer._keep` in a task of its own.

    `ready` is set when connecting ends (`client` set, or `failure` saying why not);
    `dropped`, when the connection is to be closed: by ``async with``'s exit, or because
    a call found it lost (`reason` says why). `calls` are the cancel scopes of requests
    in flight on it, cut off when it goes down. `session_lost`: the HTTP server answered
    404 to a request carrying the session id (it restarted, or expired the session).
    """

    __slots__ = ("calls", "client", "closing", "dropped", "ended", "failure", "ready", "reason", "session_lost", "vague")

    def __init__(self) -> None:
        self.client: Any = None
        self.failure: MCPServerError | None = None
        self.ready = anyio.Event()
        self.dropped = anyio.Event()
        self.reason = ""
        self.vague = False  # `reason` is only what a call saw; the transport's own error says more
        self.closing = False  # dropped by the user leaving ``async with``
        self.ended = anyio.Event()
        self.session_lost = False
        self.calls: set[anyio.CancelScope] = set()

    def drop(self, reason: str, *, vague: bool = False) -> None:
        if not self.dropped.is_set():
            self.reason, self.vague = reason, vague
            self.dropped.set()

    def end(self, reason: str) -> None:
        """The connection is closed: what still waits on it is cut off."""
        self.drop(reason)
        self.ended.set()
        self.ready.set()
        for scope in self.calls:
            scope.cancel()


def _describe(exc: BaseException) -> str:
    """What went wrong, from the leaves of the (nested) exception groups the SDK's task groups raise."""
    return "; ".join(dict.fromkeys(
        f"{type(e).__name__}: {e}" if str(e) else type(e).__name__ for e in _leaves(exc)))


class MCPServer:
    """A connection to an MCP server. Make one with `MCPServer.stdio` or `MCPServer.http`.

    Use it as ``async with server:``, entered and left in the same task; its tools work
    while it is connected and can be reused after connecting again. A connection lost
    inside the block (the server died or restarted) fails the calls in flight with an
    `MCPConnectionError`, is logged, and is made again on the next use.
    """

    def __init__(self, *, transport: Literal["stdio", "http"], target: Any, timeout: float, name: str | None) -> None:
        self._mcp = _import_mcp()
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise UserError(f"MCPServer timeout must be a positive number of seconds, got {timeout!r}")
        self.transport = transport
        self.timeout = float(timeout)
        self._name_given = bool(name)
        self.name = name or self._default_name(transport, target)
        self._target = target
        self._listing: list[Any] = []
        self._link: _Link | None = None  # the current connection (or attempt)
        self._tasks: TaskGroup | None = None  # holds `_keep`, inside ``async with``
        self._requests: MemoryObjectSendStream[_Link] | None = None  # connections for `_keep` to make
        self._owner: object = None

    @classmethod
    def stdio(cls, command: str, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None, timeout: float = 30.0, name: str | None = None) -> MCPServer:
        """A server run as a subprocess, spoken to over its stdin and stdout.

        Args:
            command: The executable, like ``"python"`` or ``"npx"``.
            args: Its arguments.
            env: Extra environment variables (over a safe default set: PATH, HOME, ...).
            cwd: Its working directory.
            timeout: Seconds allowed to connect, and for each tool call by default.
            name: The name used in messages (default: the name the server gives when it
                connects; before that, the script or command).
        """
        if isinstance(args, str):
            raise UserError("MCPServer.stdio args must be a list of strings, not one string")
        params = _import_mcp().StdioServerParameters(
            command=command, args=list(args), env=dict(env) if env is not None else None, cwd=cwd)
        return cls(transport="stdio", target=params, timeout=timeout, name=name)

    @classmethod
    def http(cls, url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 30.0,
             name: str | None = None) -> MCPServer:
        """A server reached over streamable HTTP at `url` (like ``http://127.0.0.1:8000/mcp``).

        Args:
            url: The server's MCP endpoint.
            headers: Sent with every request (authorization, for instance).
            timeout: Seconds allowed to connect, and for each tool call by default.
            name: The name used in messages (default: the name the server gives when it
                connects; before that, the URL's host and port).
        """
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UserError(f"MCPServer.http needs an http:// or https:// URL, got {url!r}")
        return cls(transport="http", target=(url, dict(headers or {})), timeout=timeout, name=name)

    @staticmethod
    def _default_name(transport: str, target: Any) -> str:
        if transport == "http":
            from urllib.parse import urlsplit

            return urlsplit(_without_userinfo(target[0])).netloc or "mcp-server"
        scripts = [a for a in target.args if re.search(r"\.(py|js|mjs|cjs|ts)$", a)]
        return Path(scripts[0]).stem if scripts else Path(target.command).name

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"MCPServer(name={self.name!r}, transport={self.transport!r}, {state})"

    @property
    def connected(self) -> bool:
        """Whether the server is connected: inside ``async with server:``, and not lost since."""
        link = self._link
        return self._tasks is not None and link is not None and link.client is not None and not link.dropped.is_set()

    async def __aenter__(self) -> Self:
        if self._tasks is not None:
            raise UserError(f"MCP server {self.name!r} is already connected")
        # The SDK's transports run task groups in the task that connects, and an error in
        # one of their tasks (an httpx ReadError when an HTTP server dies) cancels that
        # task. So connections are made and held in `_keep`, a task of ours that contains
        # such failures, never in the task running the user's block.
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        requests, incoming = anyio.create_memory_object_stream[_Link](math.inf)
        link = _Link()
        requests.send_nowait(link)
        tasks.start_soon(self._keep, incoming)
        try:
            await link.ready.wait()
        except BaseException as exc:  # cancelled while connecting
            requests.close()
            link.drop("the connection was closed")
            if not await tasks.__aexit__(type(exc), exc, exc.__traceback__):
                raise
            return self  # pragma: no cover - the cancellation was not ours to see
        if link.failure is not None:
            requests.close()
            await tasks.__aexit__(None, None, None)
            raise link.failure
        self._tasks, self._requests, self._link = tasks, requests, link
        self._owner = anyio.get_current_task().id
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        tasks, requests, link = self._tasks, self._requests, self._link
        if tasks is None or requests is None:
            return None
        if anyio.get_current_task().id != self._owner:
            raise UserError(f"MCP server {self.name!r} must be closed in the task that connected it "
                            "(use `async with server:` in one task)")
        self._tasks = self._requests = None
        requests.close()
        if link is not None:
            link.closing = True
            link.drop("the connection was closed")
            if not link.ready.is_set():  # still connecting again: nothing to say goodbye to
                tasks.cancel_scope.cancel()
        if isinstance(exc, anyio.get_cancelled_exc_class()):  # cancelled from outside: let it through
            return await tasks.__aexit__(exc_type, exc, tb)
        # Not passed on: a task group would wrap it in an ExceptionGroup. The block's
        # own error comes out as itself, after the connection is closed.
        await tasks.__aexit__(None, None, None)
        return None

    async def _keep(self, incoming: MemoryObjectReceiveStream[_Link]) -> None:
        """Make and hold each connection asked for, one at a time, until ``async with`` ends."""
        with incoming:
            async for link in incoming:
                if link.dropped.is_set():  # asked for, then ``async with`` ended before its turn
                    link.end(link.reason)
                else:
                    await self._hold(link)

    async def _hold(self, link: _Link) -> None:
        """Connect for `link` (bounded by `timeout`), hold the connection until it is dropped or lost, close it."""
        deadline = anyio.CancelScope(deadline=anyio.current_time() + self.timeout)
        error: Exception | None = None
        try:
            async with AsyncExitStack() as stack:
                # The scope stays open (disarmed) until the end: it nests around the transport's task group.
                stack.enter_context(deadline)
                link.client = await self._open(stack, link)
                deadline.deadline = math.inf
                link.ready.set()
                await link.dropped.wait()
                deadline.deadline = anyio.current_time() + self.timeout  # the goodbye is bounded too
        except Exception as exc:  # the SDK's errors, often in ExceptionGroups from its task groups
            error = exc
        except BaseException as exc:  # cancelled from outside (or KeyboardInterrupt): it goes on, alone
            link.end("the connection was closed")
            if isinstance(exc, BaseExceptionGroup):  # not with the SDK's errors, which would make a group of ours
                raise next(e for e in _leaves(exc) if not isinstance(e, Exception)) from None
            raise
        if link.client is None:
            if deadline.cancelled_caught:
                link.failure = MCPTimeoutError(f"MCP server {self.name!r} did not connect within {self.timeout} s")
            else:
                link.failure = self._connect_error(error or RuntimeError("no reason given"))
                if link.failure is not error:
                    link.failure.__cause__ = error
            link.end(str(link.failure))
            return
        if error is not None and (link.vague or not link.dropped.is_set()):
            link.reason, link.vague = f"the connection was lost ({_describe(error)})", False
        link.end(link.reason)
        if not link.closing:
            _log.warning("MCP server %r is gone: %s; it is reconnected on next use", self.name, link.reason)

    async def _open(self, stack: AsyncExitStack, link: _Link) -> Any:
        """A connected, handshaken client whose tools are listed; `stack` closes it."""
        if self.transport == "stdio":
            target: Any = self._target
        else:
            import httpx2
            from mcp.client.streamable_http import MCP_SESSION_ID, streamable_http_client

            async def watch(response: httpx2.Response) -> None:
                # The spec's sign that the session is gone; the SDK hands on only the body's error.
                if response.status_code == 404 and MCP_SESSION_ID in response.request.headers:
                    link.session_lost = True

            url, headers = self._target
            http = await stack.enter_async_context(httpx2.AsyncClient(
                headers=headers, timeout=httpx2.Timeout(self.timeout, read=300.0), event_hooks={"response": [watch]}))
            target = streamable_http_client(url, http_client=http)
        client = await stack.enter_async_context(self._mcp.Client(target, read_timeout_seconds=self.timeout))
        self._listing = await _list_tools(client, cache_mode="use")
        info = client.server_info
        if not self._name_given and info is not None and info.name:
            self.name = info.name
        return client

    def _connect_error(self, exc: Exception) -> MCPServerError:
        """`exc`, raised while connecting, as an `MCPConnectionError` saying what and why."""
        if isinstance(exc, MCPServerError):
            return exc
        from mcp_types import CONNECTION_CLOSED

        if self.transport == "stdio":
            what = " ".join([self._target.command, *self._target.args])
        else:
            what = _without_userinfo(self._target[0])
        reasons = [
            "it closed the connection (did the server exit? its stderr may say why)"
            if isinstance(e, self._mcp.MCPError) and e.code == CONNECTION_CLOSED
            else str(e) or type(e).__name__
            for e in _leaves(exc)
        ]
        return MCPConnectionError(
            f"could not connect to MCP server {self.name!r} ({what}): {'; '.join(dict.fromkeys(reasons))}")

    async def _live(self) -> _Link:
        """The connection, made again first if it was lost; `MCPConnectionError` if it cannot be."""
        if self._requests is None:
            raise MCPConnectionError(
                f"MCP server {self.name!r} is not connected: call its tools inside `async with server:`")
        link = self._link
        if link is None or link.dropped.is_set():
            link = self._link = _Link()
            self._requests.send_nowait(link)
        await link.ready.wait()
        if link.failure is not None:
            raise type(link.failure)(f"MCP server {self.name!r} is gone: {link.failure}")
        if link.client is None:  # ``async with`` ended first
            raise MCPConnectionError(f"MCP server {self.name!r} is not connected: {link.reason}")
        return link

    async def _request(self, request: Callable[[Any], Awaitable[T]]) -> T:
        """`request(client)` on the live connection, cut off with an `MCPConnectionError` if it goes down meanwhile.

        A request refused because the server no longer knows the session (it restarted)
        never ran: it is sent once more, on a new connection.
        """
        from mcp_types import CONNECTION_CLOSED

        for attempt in (1, 2):
            link = await self._live()
            with anyio.CancelScope() as guard:
                link.calls.add(guard)
                if link.ended.is_set():
                    guard.cancel()
                try:
                    return await request(link.client)
                except self._mcp.MCPError as exc:
                    if link.session_lost:
                        link.drop("it no longer knows this connection's session (was it restarted?)")
                        if attempt == 1:
                            continue
                    elif exc.code == CONNECTION_CLOSED:
                        said = exc.error.message
                        vague = said == "Connection closed"  # the SDK's word for any end of its streams
                        link.drop("it closed the connection" + (
                            " (did the server exit? its stderr may say why)" if self.transport == "stdio"
                            else "" if vague else f" ({said})"), vague=vague)
                    else:
                        raise
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream) as exc:
                    link.drop(f"the connection was lost ({_describe(exc)})")
                finally:
                    link.calls.discard(guard)
            break
        if link.vague:  # the transport's error, if any, is at hand once the connection is closed
            with anyio.move_on_after(_REASON_WAIT_S):
                await link.ended.wait()
        raise MCPConnectionError(f"MCP server {self.name!r} is gone: {link.reason or 'the connection was lost'}; "
                                 "it is reconnected on next use")

    async def tools(self, *, include: Sequence[str] | None = None, exclude: Sequence[str] = (),
                    prefix: str | None = None, timeout: float | None = None,
                    refresh: bool = False, **policy: Any) -> list[Tool]:
        """The server's tools as loopwise tools, for `Agent(tools=...)`.

        Call it once per group of tools that should share a policy:
        ``await server.tools(include=["lookup"], retries=2, fallback=lw.Template(...))``.

        Args:
            include: Only these tools (the server's names); an unknown name is an error.
            exclude: Not these tools (the server's names).
            prefix: Name the tools ``{prefix}__{name}``, to keep servers apart.
            timeout: Seconds one call (one attempt) may take (default: the server's `timeout`).
            refresh: List the tools again instead of using the list made when connecting.
            **policy: The options of `@loopwise.tool` (`retries`, `retry_on`, `backoff`,
                `fallback`, `total_timeout`, `breaker`, `max_result_chars`, `cost_usd`,
                `idempotent`, `alternatives`, `secret`, `check`), applied to each tool.
        """
        unknown = sorted(set(policy) - _POLICY_OPTIONS)
        if unknown:
            raise UserError(f"MCPServer.tools() got unknown option(s) {', '.join(unknown)}; options: include, "
                            f"exclude, prefix, timeout, refresh, {', '.join(sorted(_POLICY_OPTIONS))}")
        if self._tasks is None:
            raise UserError(f"MCP server {self.name!r} is not connected: use `async with server:` first")
        timeout = self.timeout if timeout is None else timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise UserError(f"MCP tool timeout must be a positive number of seconds, got {timeout!r}")
        if prefix is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise UserError(f"MCP tool prefix {prefix!r} may only hold letters, digits, '_' and '-'")
        if refresh:
            try:
                with anyio.fail_after(self.timeout):
                    self._listing = await self._request(lambda client: _list_tools(client, cache_mode="refresh"))
            except MCPServerError:
                raise
            except TimeoutError:
                raise MCPTimeoutError(
                    f"MCP server {self.name!r} did not list its tools within {self.timeout} s") from None
        available = [t.name for t in self._listing]
        for label, names in (("include", include or ()), ("exclude", exclude)):
            if isinstance(names, str):
                raise UserError(f"{label}= takes a list of tool names, not one string")
            unknown = sorted(set(names) - set(available))
            if unknown:
                raise UserError(f"{label}= names tools that MCP server {self.name!r} does not have: "
                                f"{', '.join(unknown)}; it has: {', '.join(available) or '(none)'}")
        tools: list[Tool] = []
        seen: dict[str, str] = {}
        for remote in self._listing:
            if (include is not None and remote.name not in include) or remote.name in exclude:
                continue
            name = _tool_name(remote.name, prefix)
            if name in seen:
                raise UserError(f"MCP tools {seen[name]!r} and {remote.name!r} of server {self.name!r} both "
                                f"become {name!r}; use include= or exclude= to keep one")
            seen[name] = remote.name
            tools.append(self._make_tool(remote, name, float(timeout), policy))
        return tools

    def _make_tool(self, remote: Any, name: str, timeout: float, policy: dict[str, Any]) -> MCPTool:
        schema = dict(remote.input_schema)
        description = remote.description or remote.title or ""
        server, remote_name = self, remote.name

        async def call_mcp_tool(**arguments: Any) -> str:
            return await server._call(remote_name, arguments, timeout)

        call_mcp_tool.__name__ = call_mcp_tool.__qualname__ = name
        call_mcp_tool.__doc__ = description
        return MCPTool(
            fn=call_mcp_tool,
            name=name,
            description=description,
            spec=ToolSpec(name=name, description=description, parameters=schema),
            is_async=True,
            context_param=None,
            # The call bounds itself (with a message naming the server); the policy's
            # per-attempt timeout is a backstop behind it.
            policy=ToolPolicy.build(name, timeout=timeout + _BACKSTOP_S, **policy),
            _validator=None,
            server=self,
            remote_name=remote_name,
            call_timeout=timeout,
            _schema_validator=_schema_validator(schema),
        )

    async def _call(self, tool: str, arguments: dict[str, Any], timeout: float) -> str:
        mcp = self._mcp
        try:
            # Making the connection again, if it was lost, counts in the call's time.
            with anyio.fail_after(timeout):
                result = await self._request(
                    lambda client: client.call_tool(tool, arguments, read_timeout_seconds=timeout))
        except MCPServerError:
            raise
        except TimeoutError:
            link = self._link
            if link is not None and not link.ready.is_set():
                raise MCPTimeoutError(f"MCP server {self.name!r} was not connected again within {timeout} s, "
                                      f"for a call of tool {tool!r}") from None
            raise MCPTimeoutError(
                f"MCP tool {tool!r} on server {self.name!r} did not answer within {timeout} s") from None
        except mcp.MCPError as exc:
            from mcp_types import REQUEST_TIMEOUT

            if exc.code == REQUEST_TIMEOUT:
                raise MCPTimeoutError(
                    f"MCP tool {tool!r} on server {self.name!r} did not answer within {timeout} s") from None
            raise MCPToolError(f"MCP server {self.name!r} refused tool {tool!r}: {exc}") from None
        text = _result_text(result)
        if result.is_error:
            raise MCPToolError(text or f"MCP tool {tool!r} on server {self.name!r} reported an error")
        return text
