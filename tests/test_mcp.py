"""MCP tools, against real MCP server processes (tests/mcp_server.py) started by the tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import loopwise as lw
from loopwise.mcp import (
    MCPConnectionError,
    MCPServer,
    MCPTimeoutError,
    MCPTool,
    MCPToolError,
    _tool_name,
)
from loopwise.models import ScriptedModel, ToolCall

pytest.importorskip("mcp")

SERVER = str(Path(__file__).with_name("mcp_server.py"))


def stdio_server(**options) -> MCPServer:
    return MCPServer.stdio(sys.executable, args=[SERVER], **options)


def finished(store: lw.MemoryStore, result: lw.RunResult) -> dict[str, object]:
    """The run's tool_call_finished events by call id."""
    return {e.call_id: e for e in store.load(result.run_id) if e.kind == "tool_call_finished"}


async def test_stdio_lists_the_tools_with_their_schemas():
    async with stdio_server() as server:
        assert server.connected and server.name == "loopwise-test-server"
        tools = await server.tools()
    assert not server.connected
    by_name = {t.name: t for t in tools}
    assert set(by_name) == {"add", "lookup", "fail", "hang", "freeze", "dotted_name", "pixel"}
    add = by_name["add"]
    assert isinstance(add, lw.Tool) and isinstance(add, MCPTool)
    assert add.description == "Add two integers."
    assert add.spec.name == "add"
    assert add.spec.parameters["required"] == ["a", "b"]
    assert add.spec.parameters["properties"]["a"]["type"] == "integer"
    # A name a provider would refuse is sanitised; the call still goes to the server's name.
    assert by_name["dotted_name"].remote_name == "dotted.name"


async def test_agent_runs_two_mcp_tools_of_one_response(store):
    model = ScriptedModel([
        [ToolCall("add", {"a": 2, "b": 3}, id="c-add"), ToolCall("lookup", '{"customer_id": "C-1"}', id="c-lookup")],
        [ToolCall("dotted_name", {}, id="c-dotted"), ToolCall("pixel", {}, id="c-pixel")],
        "Ada is on the pro plan.",
    ])
    async with stdio_server() as server:
        agent = lw.Agent(model, tools=await server.tools(), store=store)
        result = await agent.run("Who is C-1, and what is 2 + 3?")
    assert result.stop_reason == "done"
    assert result.output == "Ada is on the pro plan."
    events = finished(store, result)
    assert (events["c-add"].outcome, events["c-add"].content) == ("ok", "5")
    assert (events["c-lookup"].outcome, events["c-lookup"].content) == ("ok", "Ada (pro plan)")
    assert events["c-dotted"].content == "dotted ok"
    assert events["c-pixel"].content.startswith("[image content: image/png")


async def test_a_failing_tool_is_an_error_observation_and_the_run_goes_on(store):
    model = ScriptedModel([
        ToolCall("fail", {}, id="c-fail"),
        ToolCall("lookup", {"customer_id": "C-404"}, id="c-missing"),
        "Sorry, the database is down.",
    ])
    async with stdio_server() as server:
        agent = lw.Agent(model, tools=await server.tools(), store=store)
        result = await agent.run("Look it up")
    assert result.stop_reason == "done"
    events = finished(store, result)
    assert events["c-fail"].outcome == "error"
    assert "MCPToolError" in events["c-fail"].content
    assert "the database is on fire" in events["c-fail"].content
    assert events["c-missing"].outcome == "error"
    assert "no customer C-404" in events["c-missing"].content


@pytest.mark.parametrize("tool_name", ["hang", "freeze"])
async def test_a_hung_server_is_cut_off_by_its_timeout(store, tool_name):
    # hang sleeps cancellably; freeze blocks the server's event loop, so it answers nothing.
    model = ScriptedModel([
        ToolCall(tool_name, {"seconds": 30}, id="c-hung"),
        ToolCall("add", {"a": 1, "b": 1}, id="c-after"),
        "The slow tool did not answer.",
    ])
    async with stdio_server(timeout=10) as server:
        tools = await server.tools(include=[tool_name, "add"], timeout=1)
        agent = lw.Agent(model, tools=tools, store=store)
        started = time.monotonic()
        result = await agent.run("Try the slow tool")
        elapsed = time.monotonic() - started
    assert result.stop_reason == "done"
    events = finished(store, result)
    hung = events["c-hung"]
    assert hung.outcome == "error"
    assert f"MCP tool '{tool_name}' on server 'loopwise-test-server' did not answer within 1.0 s" in hung.content
    assert "MCPTimeoutError" in hung.content
    assert 0.9 <= hung.latency_s < 5
    assert elapsed < 15  # well under the 30 s the tool would take
    if tool_name == "hang":  # a cancellable server still answers the next call
        assert (events["c-after"].outcome, events["c-after"].content) == ("ok", "2")


async def test_wrong_arguments_are_correctable_invalid_arguments(store):
    model = ScriptedModel([
        [ToolCall("lookup", {}, id="c-missing"), ToolCall("add", {"a": "two", "b": 2}, id="c-type"),
         ToolCall("add", "{not json", id="c-json")],
        ToolCall("lookup", {"customer_id": "C-2"}, id="c-fixed"),
        "Grace.",
    ])
    async with stdio_server() as server:
        agent = lw.Agent(model, tools=await server.tools(), store=store)
        result = await agent.run("Look up C-2")
    assert result.stop_reason == "done"
    events = finished(store, result)
    assert events["c-missing"].outcome == "invalid_arguments"
    assert "'customer_id' is a required property" in events["c-missing"].content
    assert events["c-type"].outcome == "invalid_arguments"
    assert "a: 'two' is not of type 'integer'" in events["c-type"].content
    assert events["c-json"].outcome == "invalid_arguments"
    assert "not valid JSON" in events["c-json"].content
    assert (events["c-fixed"].outcome, events["c-fixed"].content) == ("ok", "Grace (free plan)")


async def test_prefix_include_exclude():
    async with stdio_server() as server:
        some = await server.tools(include=["add", "lookup"], prefix="crm")
        rest = await server.tools(exclude=["hang", "freeze"])
        with pytest.raises(lw.UserError, match="does not have: nope; it has: add, lookup"):
            await server.tools(include=["nope"])
        with pytest.raises(lw.UserError, match="list of tool names"):
            await server.tools(exclude="hang")
        with pytest.raises(lw.UserError, match="prefix"):
            await server.tools(prefix="a b")
        refreshed = await server.tools(refresh=True)
    assert [t.name for t in some] == ["crm__add", "crm__lookup"]
    assert [t.spec.name for t in some] == ["crm__add", "crm__lookup"]
    assert {t.name for t in rest} == {"add", "lookup", "fail", "dotted_name", "pixel"}
    assert len(refreshed) == 7


async def test_mcp_tools_take_the_policies_of_any_tool(store):
    model = ScriptedModel([
        [ToolCall("fail", {}, id="c-fail"), ToolCall("hang", {"seconds": 30}, id="c-hang")],
        "Answered from the fallbacks.",
    ])
    async with stdio_server() as server:
        flaky = await server.tools(include=["fail"], retries=1, backoff=lw.Backoff(initial_s=0.01),
                                   fallback="the CRM is down")
        slow = await server.tools(include=["hang"], timeout=0.5, fallback=lw.Template("no answer in {seconds} s"))
        with pytest.raises(lw.UserError, match="unknown option.*isolation"):
            await server.tools(isolation="process")
        agent = lw.Agent(model, tools=flaky + slow, store=store)
        result = await agent.run("Try both")
    assert result.stop_reason == "done"
    events = finished(store, result)
    failed, hung = events["c-fail"], events["c-hang"]
    assert (failed.outcome, failed.attempts) == ("fallback", 2)
    assert "the database is on fire" in failed.content and failed.content.endswith("the CRM is down")
    assert hung.outcome == "fallback"
    assert "did not answer within 0.5 s" in hung.content and hung.content.endswith("no answer in 30 s")
    assert hung.latency_s < 5


def test_tool_names_are_sanitised():
    assert _tool_name("add", None) == "add"
    assert _tool_name("add", "calc") == "calc__add"
    assert _tool_name("files/read file", None) == "files_read_file"
    long_a, long_b = _tool_name("x" * 70 + "a", None), _tool_name("x" * 70 + "b", None)
    assert len(long_a) == 64 and long_a != long_b
    assert all(c.isalnum() or c in "_-" for c in long_a)


async def test_tools_work_only_while_connected_and_again_after_reconnecting(store):
    server = stdio_server()
    with pytest.raises(lw.UserError, match="not connected"):
        await server.tools()
    async with server:
        (add,) = await server.tools(include=["add"])
    with pytest.raises(MCPConnectionError, match="not connected"):
        await add.call({"a": 1, "b": 2}, None)
    agent = lw.Agent(ScriptedModel([ToolCall("add", {"a": 1, "b": 2}, id="c1"), "ok"]), tools=[add], store=store)
    result = await agent.run("add")
    assert result.stop_reason == "done"
    assert finished(store, result)["c1"].outcome == "error"
    async with server:
        assert await add.call({"a": 1, "b": 2}, None) == "3"
        with pytest.raises(lw.UserError, match="already connected"):
            async with server:
                pass


DYING_SERVER = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from mcp_server import server

@server.tool()
def die() -> str:
    \"\"\"Exit the server process at once.\"\"\"
    os._exit(3)

server.run()
"""


async def test_a_stdio_server_that_exits_is_started_again_on_next_use(tmp_path, store):
    script = tmp_path / "dying_server.py"
    script.write_text(DYING_SERVER)
    model = ScriptedModel([ToolCall("die", {}, id="c-die"), ToolCall("add", {"a": 1, "b": 2}, id="c-add"), "3"])
    async with MCPServer.stdio(sys.executable, args=[str(script)], timeout=20) as server:
        result = await lw.Agent(model, tools=await server.tools(), store=store).run("Die, then add")
        assert server.connected
    assert result.stop_reason == "done"
    events = finished(store, result)
    assert events["c-die"].outcome == "error"
    assert "MCP server 'loopwise-test-server' is gone: it closed the connection" in events["c-die"].content
    assert (events["c-add"].outcome, events["c-add"].content) == ("ok", "3")


async def test_a_server_that_cannot_start_or_exits():
    with pytest.raises(MCPConnectionError, match="could not connect to MCP server 'nope'.*No such file"):
        async with MCPServer.stdio("/nonexistent/nope"):
            pass
    with pytest.raises(MCPConnectionError, match="closed the connection"):
        async with MCPServer.stdio(sys.executable, args=["-c", "pass"], name="quitter"):
            pass


async def test_a_server_that_never_answers_the_handshake_times_out():
    started = time.monotonic()
    with pytest.raises(MCPTimeoutError, match="'mute' did not connect within 1.0 s"):
        async with MCPServer.stdio(sys.executable, args=["-c", "import time; time.sleep(60)"], timeout=1, name="mute"):
            pass
    # 1 s, plus the SDK's bounded shutdown of a process that ignores its closed stdin.
    assert time.monotonic() - started < 10


# --- streamable HTTP ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server(tmp_path):
    """tests/mcp_server.py serving streamable HTTP on a free port; yields its /mcp URL."""
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, SERVER, "--http", "--port", str(port)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the MCP HTTP server exited: {(tmp_path / 'server.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the MCP HTTP server did not accept connections within 20 s")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def test_streamable_http(http_server, store):
    model = ScriptedModel([
        [ToolCall("add", {"a": 20, "b": 22}, id="c-add"), ToolCall("hang", {"seconds": 30}, id="c-hang")],
        ToolCall("fail", {}, id="c-fail"),
        "42, the slow one timed out, and the database is down.",
    ])
    server = MCPServer.http(http_server, headers={"X-Test": "1"}, timeout=10)
    assert server.name.startswith("127.0.0.1:")
    async with server:
        assert server.name == "loopwise-test-server"
        tools = await server.tools(timeout=1)
        assert {t.name for t in tools} >= {"add", "lookup", "hang"}
        agent = lw.Agent(model, tools=tools, store=store)
        result = await agent.run("Add and wait")
    assert result.stop_reason == "done"
    events = finished(store, result)
    assert (events["c-add"].outcome, events["c-add"].content) == ("ok", "42")
    assert events["c-hang"].outcome == "error"
    assert "did not answer within 1.0 s" in events["c-hang"].content
    assert events["c-hang"].latency_s < 5
    assert "the database is on fire" in events["c-fail"].content


async def test_http_server_not_listening():
    with pytest.raises(MCPConnectionError, match="could not connect to MCP server"):
        async with MCPServer.http(f"http://127.0.0.1:{_free_port()}/mcp", timeout=5):
            pass


# --- configuration --------------------------------------------------------------------------


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mcp", None)  # `import mcp` raises ImportError
    with pytest.raises(lw.UserError, match=r"pip install 'loopwise\[mcp\]'"):
        MCPServer.stdio("python")
    with pytest.raises(lw.UserError, match=r"pip install 'loopwise\[mcp\]'"):
        MCPServer.http("http://127.0.0.1:1/mcp")


def test_wrong_major_version_of_the_sdk(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.9.0")
    with pytest.raises(lw.UserError, match=r"needs mcp 2.x, found mcp 1.9.0: pip install 'loopwise\[mcp\]'"):
        MCPServer.stdio("python")


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), "5", True])
def test_bad_timeout(timeout):
    with pytest.raises(lw.UserError, match="timeout must be a positive number"):
        MCPServer.stdio("python", timeout=timeout)


def test_bad_arguments_to_the_factories():
    with pytest.raises(lw.UserError, match="list of strings"):
        MCPServer.stdio("python", args="server.py")
    with pytest.raises(lw.UserError, match="http:// or https://"):
        MCPServer.http("127.0.0.1:8000/mcp")


def test_mcp_tool_error_is_a_loopwise_error():
    assert issubclass(MCPToolError, lw.LoopwiseError)
    assert issubclass(MCPTimeoutError, TimeoutError)
