"""Hostile values from users, models and tools: every run that starts ends with one end, in the log.

Each test runs on a real SQLite file and reads the run back with a fresh `SQLiteStore`
(what `loopwise show` does): exactly one `run_finished`, seqs 0, 1, 2... from
`run_started`, and a `RunResult` equal to the stored end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

import loopwise as lw
from loopwise._stores.storable import MAX_DEPTH, REPLACEMENT
from loopwise import ModelHTTPError
from loopwise.models import FunctionModel, ModelPolicy, ModelRequest, ModelResponse, ToolCall, Usage

SURROGATE = "\ud800"


_opened: list[lw.SQLiteStore] = []


def sqlite(path):
    """A store on `path`, closed when the test ends (each holds connections and journal files open)."""
    store = lw.SQLiteStore(path)
    _opened.append(store)
    return store


@pytest.fixture(autouse=True)
def _close_stores():
    """The stores a test opened, and their control planes (cached per file): closed, so ~40
    tests leave no connections or files open for the rest of the suite."""
    from loopwise._control import plane as _control_plane

    yield
    while _opened:
        store = _opened.pop()
        store.close()
        with _control_plane._controls_lock:
            plane = _control_plane._controls.pop(("local", str(store.path.resolve())), None)
        if plane is not None:
            plane.close()


def read_back(path, run_id):
    """The run as a new process's `loopwise show` reads it: a fresh store on the same file."""
    store = lw.SQLiteStore(path)
    try:
        return store.load(run_id)
    finally:
        store.close()


def assert_whole_log(path, result):
    """One end, gap-free from run_started, and the result is the stored end; returns the events."""
    events = read_back(path, result.run_id)
    assert events[0].kind == "run_started"
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.kind for e in events].count("run_finished") == 1 and events[-1].kind == "run_finished"
    assert lw.RunResult.from_events(events) == result
    return events


def strings(value):
    """Every str in an event (field values, dict keys, nested)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from strings(getattr(value, f.name))


def answer_after_tool(calls):
    """A model that asks for `calls` once, then answers with the last tool message it read."""

    def model(request: ModelRequest) -> ModelResponse:
        if request.messages[-1].role == "tool":
            return ModelResponse(text=f"saw: {request.messages[-1].content[:200]}", usage=Usage(10, 5))
        return ModelResponse(tool_calls=calls, usage=Usage(10, 5))

    return model


@lw.tool
def echo(text: str = "") -> str:
    """Echo."""
    return f"echo {text}"


# -- text UTF-8 cannot encode ------------------------------------------------------------


def _tool_returns_surrogate() -> str:
    return f"result {SURROGATE}"


def _tool_raises_surrogate() -> str:
    raise ValueError(f"bad {SURROGATE} input")


SURROGATE_CASES = {
    # name: (task, model function, tools, tags, where the first replacement is named)
    "task str": (f"hi {SURROGATE}", lambda r: "ok", [], (), ("run_started", "task[0].content")),
    "task message": ([lw.Message("user", f"a{SURROGATE}b")], lambda r: "ok", [], (),
                     ("run_started", "task[0].content")),
    "tags": ("hi", lambda r: "ok", [], ("ok", f"t{SURROGATE}"), ("run_started", "tags[1]")),
    "model text": ("hi", lambda r: ModelResponse(text=f"done {SURROGATE}", usage=Usage(1, 1)), [], (),
                   ("model_call_finished", "text")),
    "model text, no usage": ("hi", lambda r: f"done {SURROGATE}", [], (), ("model_call_finished", "text")),
    "tool name": ("hi", answer_after_tool([ToolCall(f"ec{SURROGATE}ho", {})]), [echo], (),
                  ("model_call_finished", "tool_calls[0].name")),
    "argument value": ("hi", answer_after_tool([ToolCall("echo", {"text": f"x{SURROGATE}"})]), [echo], (),
                       ("model_call_finished", "tool_calls[0].arguments.text")),
    "argument key": ("hi", answer_after_tool([ToolCall("echo", {f"te{SURROGATE}xt": "x"})]), [echo], (),
                     ("model_call_finished", "tool_calls[0].arguments.<key>")),
    "raw arguments": ("hi", answer_after_tool([ToolCall("echo", '{"text": "' + SURROGATE + '"}')]), [echo], (),
                      ("model_call_finished", "tool_calls[0].arguments")),
    "call id": ("hi", answer_after_tool([ToolCall("echo", {}, f"id{SURROGATE}")]), [echo], (),
                ("model_call_finished", "tool_calls[0].id")),
    "tool result": ("hi", answer_after_tool([ToolCall("t", {})]), [lw.tool(_tool_returns_surrogate, name="t")], (),
                    ("tool_call_finished", "content")),
    "tool error": ("hi", answer_after_tool([ToolCall("t", {})]), [lw.tool(_tool_raises_surrogate, name="t")], (),
                   ("tool_call_finished", "content")),
}


@pytest.mark.parametrize("case", list(SURROGATE_CASES))
def test_text_utf8_cannot_encode_is_replaced_and_said_so(tmp_path, case):
    task, fn, tools, tags, (kind, field) = SURROGATE_CASES[case]
    path = tmp_path / "runs.db"
    agent = lw.Agent(FunctionModel(fn), tools=tools, store=sqlite(path))
    result = agent.run_sync(task, tags=tags)
    assert result.stop_reason == "done", result.reason
    events = assert_whole_log(path, result)
    for event in events:
        assert not any(SURROGATE in s for s in strings(event)), event
    marked = [e for e in events if e.replaced]
    assert any(e.kind == kind and field in e.replaced for e in marked), marked
    assert REPLACEMENT in json.dumps([dataclasses.asdict(e) for e in marked], ensure_ascii=False)


def test_text_no_edge_caught_is_replaced_when_the_store_cannot_encode_it(tmp_path):
    """A field no edge cleans (the agent's own name, a kill reason...): the write's last resort."""
    path = tmp_path / "runs.db"
    agent = lw.Agent(FunctionModel(lambda r: "ok"), name=f"agent {SURROGATE}", store=sqlite(path))
    result = agent.run_sync("hi")
    events = assert_whole_log(path, result)
    assert events[0].agent["name"] == f"agent {REPLACEMENT}" and events[0].replaced == ["agent.name"]


def test_a_kill_reason_utf8_cannot_encode_reaches_the_log(tmp_path):
    path = tmp_path / "runs.db"
    store = sqlite(path)

    @lw.tool
    def stop_me(ctx: lw.RunContext) -> str:
        """Asks for its own run's kill."""
        lw.kill(ctx.run_id, reason=f"why {SURROGATE}", store=store)
        return "asked"

    agent = lw.Agent(FunctionModel(answer_after_tool([ToolCall("stop_me", {})])), tools=[stop_me], store=store)
    result = agent.run_sync("hi")
    assert result.stop_reason == "killed" and f"why {REPLACEMENT}" in result.reason
    assert_whole_log(path, result)


# -- nesting too deep, values that contain themselves ------------------------------------


def nested(depth, make=lambda inner: {"a": inner}):
    value = {}
    for _ in range(depth):
        value = make(value)
    return value


def cyclic_dict():
    d = {}
    d["self"] = d
    return d


DEEP_ARGUMENTS = {
    "dict 100,000 deep": nested(100_000),
    "JSON text 100,000 deep": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "list 100,000 deep": {"a": nested(100_000, lambda inner: [inner])},
    "just past the limit": nested(MAX_DEPTH + 1),
    "a dict that contains itself": cyclic_dict(),
}


@pytest.mark.parametrize("case", list(DEEP_ARGUMENTS))
def test_arguments_nested_too_deep_are_an_observation_and_the_run_goes_on(tmp_path, case):
    path = tmp_path / "runs.db"
    model = FunctionModel(answer_after_tool([ToolCall("echo", DEEP_ARGUMENTS[case])]))
    result = lw.Agent(model, tools=[echo], store=sqlite(path)).run_sync("hi")
    assert result.stop_reason == "done", result.reason
    events = assert_whole_log(path, result)
    (finished,) = [e for e in events if e.kind == "tool_call_finished"]
    assert finished.outcome == "invalid_arguments"
    assert f"arguments nest deeper than {MAX_DEPTH} levels" in finished.content
    assert "arguments nest deeper" in result.output


def test_arguments_at_the_depth_limit_reach_the_tool(tmp_path):
    path = tmp_path / "runs.db"
    seen = []

    @lw.tool
    def take(a: dict) -> str:
        """Takes a nested dict."""
        seen.append(a)
        return "taken"

    deep = nested(MAX_DEPTH - 1)
    model = FunctionModel(answer_after_tool([ToolCall("take", deep)]))
    result = lw.Agent(model, tools=[take], store=sqlite(path)).run_sync("hi")
    assert result.output == "saw: taken" and seen == [deep["a"]]
    assert_whole_log(path, result)


def _self_containing_list():
    x = [1]
    x.append(x)
    return x


@pytest.mark.parametrize("value", [_self_containing_list(), cyclic_dict(), nested(100_000)],
                         ids=["list", "dict", "100,000 deep"])
def test_a_tool_result_without_text_is_a_tool_error_and_the_run_goes_on(tmp_path, value):
    path = tmp_path / "runs.db"
    tool = lw.tool(lambda: value, name="t")
    model = FunctionModel(answer_after_tool([ToolCall("t", {})]))
    result = lw.Agent(model, tools=[tool], store=sqlite(path)).run_sync("hi")
    assert result.stop_reason == "done", result.reason
    events = assert_whole_log(path, result)
    (finished,) = [e for e in events if e.kind == "tool_call_finished"]
    assert finished.outcome == "error" and finished.error.type == "UnusableResult"
    assert "cannot be made into text" in finished.content


def test_a_fallback_value_without_text_does_not_answer(tmp_path):
    path = tmp_path / "runs.db"

    def broken() -> str:
        raise RuntimeError("down")

    tool = lw.tool(broken, name="t", fallback=[lambda: _self_containing_list(), "static answer"])
    model = FunctionModel(answer_after_tool([ToolCall("t", {})]))
    result = lw.Agent(model, tools=[tool], store=sqlite(path)).run_sync("hi")
    events = assert_whole_log(path, result)
    fallbacks = [e for e in events if e.kind == "tool_fallback"]
    assert [f.ok for f in fallbacks] == [False, True] and "cannot be made into text" in fallbacks[0].reason


# -- exceptions that are not Exceptions -------------------------------------------------


class Boom(BaseException):
    pass


def _raise(exc):
    """A tool (or fallback) that raises `exc`."""

    def fn():
        raise exc

    return fn


def _async_raise(exc):
    async def fn():
        raise exc

    return fn


def _model_raise(exc):
    def fn(request):
        raise exc

    return fn


def _async_model_raise(exc):
    async def fn(request):
        raise exc

    return fn


def _boom_agent(where, exc, path):
    store = sqlite(path)
    calls = answer_after_tool([ToolCall("t", {})])
    if where == "sync tool":
        return lw.Agent(FunctionModel(calls), tools=[lw.tool(_raise(exc), name="t")], store=store)
    if where == "async tool":
        return lw.Agent(FunctionModel(calls), tools=[lw.tool(_async_raise(exc), name="t")], store=store)
    if where == "fallback callable":
        tool = lw.tool(_raise(RuntimeError("down")), name="t", fallback=[_raise(exc)])
        return lw.Agent(FunctionModel(calls), tools=[tool], store=store)
    if where == "model":
        return lw.Agent(FunctionModel(_model_raise(exc)), store=store)
    if where == "async model":
        return lw.Agent(FunctionModel(_async_model_raise(exc)), store=store)
    if where == "fallback model":
        primary = FunctionModel(_model_raise(ModelHTTPError("down", status_code=400)))
        return lw.Agent(primary, fallback_models=[FunctionModel(_model_raise(exc))], store=store)
    if where == "summarizer":
        context = lw.SlidingWindow(keep_last=1, summary_model=FunctionModel(_model_raise(exc), name="summarizer"))

        def model(request: ModelRequest) -> ModelResponse:
            turns = sum(1 for m in request.messages if m.role == "assistant")
            if turns < 3:
                return ModelResponse(tool_calls=[ToolCall("echo", {"text": str(turns)})])
            return ModelResponse(text="done")

        return lw.Agent(FunctionModel(model), tools=[echo], context=context, store=store)
    raise AssertionError(where)


@pytest.mark.parametrize("exc", [Boom("boom"), GeneratorExit("closing")], ids=["Boom", "GeneratorExit"])
@pytest.mark.parametrize("where", ["sync tool", "async tool", "fallback callable", "model", "async model",
                                   "fallback model", "summarizer"])
def test_a_base_exception_ends_the_run_as_error_then_propagates(tmp_path, where, exc):
    path = tmp_path / "runs.db"
    agent = _boom_agent(where, exc, path)
    with pytest.raises(type(exc)):
        agent.run_sync("hi", run_id="boom")
    events = read_back(path, "boom")
    assert events[0].kind == "run_started"
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.kind for e in events].count("run_finished") == 1
    end = events[-1]
    assert end.kind == "run_finished" and end.stop_reason == "error"
    assert end.reason.startswith(f"interrupted: {type(exc).__name__}") and end.error.type == type(exc).__name__
    # A model call cut by it has its end too (the call's error), so the log reads as any other.
    started = [e for e in events if e.kind == "model_call_started"]
    assert len(started) == len([e for e in events if e.kind == "model_call_finished"])


# -- a store that cannot be written -------------------------------------------------------

# A child process whose files cannot grow (RLIMIT_FSIZE, with SIGXFSZ ignored: writes fail
# with EFBIG), which is what a full disk looks like to SQLite and the journal.
_CHILD = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    import loopwise as lw
    from loopwise.models import FunctionModel
    try:
        result = lw.Agent(FunctionModel(lambda r: "ok"), store=lw.SQLiteStore(sys.argv[1])).run_sync("hi")
    except lw.StoreError as exc:
        print("StoreError:", exc)
    else:
        print("result:", result.stop_reason)
""")


def _run_child(path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


needs_rlimit = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SQLite's shm as on Linux")


@needs_rlimit
def test_a_full_disk_when_the_control_tables_are_made_is_a_store_error(tmp_path):
    path = tmp_path / "runs.db"
    store = sqlite(path)
    store.list_runs()  # this process keeps the database open: its -wal and -shm exist, the child need not grow them
    said = _run_child(path)
    assert said.startswith(f"StoreError: cannot create the control tables (lw_leases, lw_kills) in the loopwise "
                           f"database {path}: OperationalError: "), said
    assert "bytes free on that filesystem" in said


@needs_rlimit
def test_a_full_disk_when_the_database_is_opened_is_a_store_error_not_a_foreign_file(tmp_path):
    path = tmp_path / "runs.db"
    sqlite(path).close()
    said = _run_child(path)
    assert said.startswith(f"StoreError: cannot open the loopwise database {path}: OperationalError: "), said


@needs_rlimit
def test_a_full_disk_at_the_first_journal_write_is_a_store_error_and_no_result(tmp_path):
    path = tmp_path / "runs.db"
    store = sqlite(path)
    lw.Agent(FunctionModel(lambda r: "ok"), store=store).run_sync("make the control tables")
    store.list_runs()  # kept open, as above
    said = _run_child(path)
    assert said.startswith("StoreError: run ") and "could not be written to the event store" in said, said
    assert "cannot append to the loopwise journal" in said and "File too large" in said
    assert len(store.list_runs()) == 1  # nothing of the child's run, and no end claimed for it


# -- a sync model function that blocks ---------------------------------------------------


def test_a_blocking_sync_model_function_is_bounded_by_the_model_timeout(tmp_path):
    import threading

    release = threading.Event()

    def stuck(request: ModelRequest) -> str:
        release.wait(30)
        return "late"

    path = tmp_path / "runs.db"
    agent = lw.Agent(FunctionModel(stuck), model_policy=ModelPolicy(timeout=0.5, retries=0),
                     store=sqlite(path))
    try:
        result = agent.run_sync("hi")
    finally:
        release.set()
    assert result.stop_reason == "error" and "ModelTimeoutError" in result.reason
    assert result.duration_s < 10  # bounded by the 0.5 s timeout, not the function's 30 s
    assert_whole_log(path, result)
