"""MCP over streamable HTTP when the server dies: a real server process (tests/mcp_http_server.py), SIGKILLed.

Each test runs against both protocol eras the SDK speaks: the modern one (stateless
requests) and the legacy initialize handshake with a session id (``--legacy``), which a
restarted server no longer knows.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import loopwise as lw
from loopwise.mcp import MCPConnectionError, MCPServer
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ToolCall

pytest.importorskip("mcp")

SERVER = str(Path(__file__).with_name("mcp_http_server.py"))
LIMIT_S = 90  # a test that hangs fails here, inside pytest's 120 s


class ServerProcess:
    """tests/mcp_http_server.py on a fixed port, which a test can SIGKILL and start again."""

    def __init__(self, log: Path, *, legacy: bool) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.legacy = legacy
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start the server and wait until it accepts connections on its port."""
        args = [sys.executable, SERVER, str(self.port), *(["--legacy"] if self.legacy else [])]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the MCP HTTP server exited: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the MCP HTTP server did not accept connections within 60 s")
                time.sleep(0.05)

    async def restart(self) -> None:
        await anyio.to_thread.run_sync(self.start)

    def kill(self) -> None:
        """SIGKILL: no goodbye, connections just break."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()

    async def call_started(self) -> None:
        """Wait for the `block` tool to say that a call reached it."""
        assert self.proc is not None
        line = await anyio.to_thread.run_sync(self.proc.stdout.readline)
        assert line == "block started\n", f"the server said {line!r}; its log: {self.log.read_text()}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture(params=["modern", "legacy"])
def http(request, tmp_path):
    server = ServerProcess(tmp_path / "server.log", legacy=request.param == "legacy")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def reader(first: ToolCall):
    """A model that calls `first`, then answers with what the tool said (so the test sees what it read)."""

    def respond(request: ModelRequest) -> ModelResponse:
        said = [m.content for m in request.messages if m.role == "tool"]
        if not said:
            return ModelResponse(tool_calls=[first])
        return ModelResponse(text=f"the tool said: {said[-1]}")

    return FunctionModel(respond)


def finished(store: lw.MemoryStore, result: lw.RunResult) -> dict[str, object]:
    return {e.call_id: e for e in store.load(result.run_id) if e.kind == "tool_call_finished"}


def gone_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "loopwise" and "is gone" in r.getMessage()]


async def test_killed_while_idle_the_call_is_a_tool_error_and_the_run_ends(http, store, caplog):
    caplog.set_level(logging.WARNING, logger="loopwise")
    with anyio.fail_after(LIMIT_S):
        async with MCPServer.http(http.url, timeout=20) as server:
            tools = await server.tools()
            http.kill()
            agent = lw.Agent(reader(ToolCall("add", {"a": 1, "b": 2}, id="c-add")), tools=tools, store=store)
            result = await agent.run("Add 1 and 2")
            assert not server.connected
    assert result.stop_reason == "done"
    call = finished(store, result)["c-add"]
    assert call.outcome == "error"
    assert "MCPConnectionError" in call.content
    assert "MCP server 'loopwise-test-server' is gone" in call.content
    assert result.output.startswith("the tool said: ") and "is gone" in result.output  # the model read it
    assert gone_records(caplog), "the lost connection is logged"


async def test_killed_mid_call_the_call_fails_and_the_run_goes_on_after_a_restart(http, store, caplog):
    caplog.set_level(logging.WARNING, logger="loopwise")
    restarted = anyio.Event()

    async def model(request: ModelRequest) -> ModelResponse:
        said = [m.content for m in request.messages if m.role == "tool"]
        if not said:
            return ModelResponse(tool_calls=[ToolCall("block", {}, id="c-block")])
        if len(said) == 1:
            await restarted.wait()  # the next call goes to the server started again
            return ModelResponse(tool_calls=[ToolCall("add", {"a": 20, "b": 22}, id="c-add")])
        return ModelResponse(text=" | ".join(said))

    results: list[lw.RunResult] = []
    with anyio.fail_after(LIMIT_S):
        async with MCPServer.http(http.url, timeout=60) as server:
            agent = lw.Agent(FunctionModel(model), tools=await server.tools(), store=store)

            async def run() -> None:
                results.append(await agent.run("Block, then add"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await http.call_started()
                http.kill()
                await http.restart()
                restarted.set()
    (result,) = results
    assert result.stop_reason == "done"
    events = finished(store, result)
    blocked = events["c-block"]
    assert blocked.outcome == "error"
    assert "MCP server 'loopwise-test-server' is gone" in blocked.content
    assert blocked.latency_s < 60  # cut off by the lost connection, not by the call's 60 s timeout
    assert (events["c-add"].outcome, events["c-add"].content) == ("ok", "42")  # reconnected
    assert "is gone" in result.output and result.output.endswith("42")
    assert gone_records(caplog)


async def test_a_restarted_server_is_reconnected_on_next_use(http, caplog):
    caplog.set_level(logging.WARNING, logger="loopwise")
    with anyio.fail_after(LIMIT_S):
        async with MCPServer.http(http.url, timeout=20) as server:
            (add,) = await server.tools(include=["add"])
            assert await add.call({"a": 1, "b": 1}, None) == "2"
            # Killed and back before anyone noticed: the next call goes through.
            http.kill()
            await http.restart()
            assert await add.call({"a": 2, "b": 2}, None) == "4"
            assert server.connected
            # Killed, noticed by a call, then back: the call after it reconnects.
            http.kill()
            with pytest.raises(MCPConnectionError, match="'loopwise-test-server' is gone"):
                await add.call({"a": 3, "b": 3}, None)
            assert not server.connected
            with pytest.raises(MCPConnectionError, match="is gone: could not connect"):  # still down
                await add.call({"a": 3, "b": 3}, None)
            await http.restart()
            assert await add.call({"a": 4, "b": 4}, None) == "8"
            assert server.connected
            assert len(await server.tools(refresh=True)) == 8
    assert gone_records(caplog)


class Boom(Exception):
    pass


async def test_errors_inside_the_block_come_out_as_themselves(http, tmp_path):
    other = ServerProcess(tmp_path / "other.log", legacy=http.legacy)
    other.start()
    try:
        with anyio.fail_after(LIMIT_S):
            with pytest.raises(Boom) as raised:
                async with MCPServer.http(http.url, timeout=20), MCPServer.http(other.url, timeout=20):
                    raise Boom("mine")
            assert type(raised.value) is Boom
            # Also once a server died under a call, with two servers nested.
            with pytest.raises(Boom) as raised:
                async with MCPServer.http(http.url, timeout=20) as first, MCPServer.http(other.url, timeout=20):
                    (add,) = await first.tools(include=["add"])
                    http.kill()
                    with pytest.raises(MCPConnectionError, match="is gone"):
                        await add.call({"a": 1, "b": 1}, None)
                    raise Boom("mine")
            assert type(raised.value) is Boom
            # And the block ends quietly when it raises nothing.
            async with MCPServer.http(other.url, timeout=20) as server:
                (add,) = await server.tools(include=["add"])
                other.kill()
                with pytest.raises(MCPConnectionError, match="is gone"):
                    await add.call({"a": 1, "b": 1}, None)
            # A cancellation from outside still goes through.
            await http.restart()
            with anyio.CancelScope() as scope:
                async with MCPServer.http(http.url, timeout=20):
                    scope.cancel()
                    await anyio.sleep_forever()
            assert scope.cancelled_caught
    finally:
        other.stop()


async def test_leaving_the_block_while_connecting_again_does_not_wait_for_it(http):
    errors: list[Exception] = []
    with anyio.fail_after(LIMIT_S), socket.socket() as silent:
        async with anyio.create_task_group() as tg:
            async with MCPServer.http(http.url, timeout=60) as server:
                (add,) = await server.tools(include=["add"])
                http.kill()
                with pytest.raises(MCPConnectionError, match="is gone"):
                    await add.call({"a": 1, "b": 1}, None)
                # The port now takes connections and never answers: connecting again hangs.
                silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                silent.bind(("127.0.0.1", http.port))
                silent.listen()

                async def call() -> None:
                    try:
                        await add.call({"a": 1, "b": 1}, None)
                    except MCPConnectionError as exc:
                        errors.append(exc)

                tg.start_soon(call)
                conn, _ = await anyio.to_thread.run_sync(silent.accept)  # it is connecting again
                left = time.monotonic()
            left_s = time.monotonic() - left
            conn.close()
    assert left_s < 30  # not the 60 s the connection attempt may take
    assert len(errors) == 1 and "is not connected" in str(errors[0])
