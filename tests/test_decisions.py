"""Expectations and the decision log: what the model sees, what tools see, `match`, and
one decision per iteration for runs however they end."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
import pytest

import loopwise as lw
from loopwise._views.decisions import Decision, decisions, expectations_on
from loopwise._events import dump_events, event_to_dict, load_event
from loopwise._tools.expect import EXPECT_KEY, EXPECT_PROMPT, augment_spec, default_match, split_expectation
from loopwise.cli import main
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ScriptedModel, ToolCall

ROOT = Path(__file__).resolve().parent.parent


def expect(arguments: dict[str, Any], expected: Any) -> dict[str, Any]:
    return {**arguments, EXPECT_KEY: expected}


@lw.tool
def lookup(order_id: str) -> dict:
    """Look up an order."""
    return {"order_id": order_id, "status": "shipped"}


def agent(model: Any, store: lw.MemoryStore, tools: list = (lookup,), **options: Any) -> lw.Agent:  # type: ignore[assignment]
    return lw.Agent(model, tools=list(tools), store=store, expectations=True, **options)


def kinds_of(store: lw.EventStore, run_id: str, kind: str) -> list:
    return [e for e in store.load(run_id) if e.kind == kind]


# -- what the model sees ------------------------------------------------------------------


def test_every_tool_schema_gains_a_nullable_optional_property(store):
    a = agent(ScriptedModel(["ok"]), store)
    (spec,) = a.tool_specs
    prop = spec.parameters["properties"][EXPECT_KEY]
    assert prop["type"] == ["string", "null"] and "expect" in prop["description"]
    assert spec.parameters["required"] == ["order_id"]  # a lax schema keeps it optional
    assert EXPECT_KEY not in lookup.spec.parameters["properties"]  # the tool's own spec is untouched
    off = lw.Agent(ScriptedModel(["ok"]), tools=[lookup], store=store)
    assert off.tool_specs == [lookup.spec] and off.system_prompt is None
    assert a.describe()["expectations"] is True and off.describe()["expectations"] is False


def test_a_strict_schema_stays_strict():
    jsonschema = pytest.importorskip("jsonschema")
    strict = lw.ToolSpec("refund", "", {"type": "object", "additionalProperties": False,
                                        "properties": {"amount": {"type": "number"}}, "required": ["amount"]})
    schema = augment_spec(strict).parameters
    assert schema["required"] == ["amount", EXPECT_KEY]
    assert set(schema["required"]) == set(schema["properties"]) and schema["additionalProperties"] is False
    jsonschema.validate({"amount": 1, EXPECT_KEY: None}, schema)  # null: no expectation
    jsonschema.validate({"amount": 1, EXPECT_KEY: '{"status": "refunded"}'}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"amount": 1}, schema)
    assert strict.parameters["required"] == ["amount"]  # not changed in place
    # additionalProperties false but an optional property: not strict-style, the key stays optional.
    lax = lw.ToolSpec("x", "", {"type": "object", "additionalProperties": False,
                                "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a"]})
    assert augment_spec(lax).parameters["required"] == ["a"]


@pytest.mark.parametrize("raw", [{}, {"type": "object"}, {"type": "object", "properties": {}},
                                 {"type": "object", "properties": {"q": {"type": "string"}}, "$defs": {"X": {}}}])
def test_raw_schemas_from_mcp_servers_get_the_property(raw):
    schema = augment_spec(lw.ToolSpec("t", "", raw)).parameters
    assert schema["type"] == "object" and EXPECT_KEY in schema["properties"]
    assert "required" not in schema or EXPECT_KEY not in schema["required"]
    assert schema.get("$defs") == raw.get("$defs")


def test_a_tool_parameter_named_like_the_reserved_one_is_refused(store):
    @lw.tool
    def sneaky(loopwise_expect: str) -> str:
        """A tool with the reserved name."""
        return loopwise_expect

    with pytest.raises(lw.UserError, match=r"tool 'sneaky' has a parameter named 'loopwise_expect'.*rename"):
        agent(ScriptedModel(["ok"]), store, tools=[sneaky])
    lw.Agent(ScriptedModel(["ok"]), tools=[sneaky], store=store)  # fine with expectations off


def test_expectations_must_be_a_bool(store):
    with pytest.raises(lw.UserError, match="expectations must be True or False, got 'yes'"):
        lw.Agent(ScriptedModel(["ok"]), store=store, expectations="yes")


def test_the_instructions_say_how_and_the_log_records_what_was_sent(store):
    seen: list[ModelRequest] = []

    def model(request: ModelRequest) -> ModelResponse:
        seen.append(request)
        return ModelResponse(text="ok")

    result = agent(FunctionModel(model), store, instructions="You are a support agent.").run_sync("hi")
    sent = seen[0].messages[0]
    assert sent.role == "system" and sent.content == f"You are a support agent.\n\n{EXPECT_PROMPT}"
    assert store.load(result.run_id)[0].instructions == sent.content
    assert EXPECT_KEY in seen[0].tools[0].parameters["properties"]
    seen.clear()
    agent(FunctionModel(model), store).run_sync("hi")  # no instructions: the paragraph alone
    assert seen[0].messages[0].content == EXPECT_PROMPT


async def test_mcp_tools_get_the_property_and_never_see_it(store):
    pytest.importorskip("mcp")
    from loopwise.mcp import MCPServer

    model = ScriptedModel([
        [ToolCall("add", expect({"a": 2, "b": 3}, "5"), id="c-dict"),
         ToolCall("add", json.dumps(expect({"a": 1, "b": 1}, "3")), id="c-str")],
        "2 + 3 = 5.",
    ])
    async with MCPServer.stdio(sys.executable, args=[str(ROOT / "tests" / "mcp_server.py")]) as server:
        tools = await server.tools(include=["add"])
        a = agent(model, store, tools=tools)
        assert EXPECT_KEY in a.tool_specs[0].parameters["properties"]
        assert EXPECT_KEY not in tools[0].spec.parameters["properties"]
        result = await a.run("What is 2 + 3?")
    assert result.stop_reason == "done"
    started = {e.call_id: e for e in kinds_of(store, result.run_id, "tool_call_started")}
    done = {e.call_id: e for e in kinds_of(store, result.run_id, "tool_call_finished")}
    assert started["c-dict"].arguments == {"a": 2, "b": 3} and started["c-dict"].expected == "5"
    assert started["c-str"].arguments == {"a": 1, "b": 1} and started["c-str"].expected == "3"
    assert (done["c-dict"].outcome, done["c-dict"].content, done["c-dict"].match) == ("ok", "5", True)
    assert (done["c-str"].outcome, done["c-str"].content, done["c-str"].match) == ("ok", "2", False)


# -- what the tools see -----------------------------------------------------------------


def spy(tool: lw.Tool, seen: list) -> lw.Tool:
    """`tool`, recording the arguments each validation receives."""

    class Spy(type(tool)):  # type: ignore[misc]
        def validate(self, arguments):
            seen.append(arguments)
            return super().validate(arguments)

    return Spy(**{f.name: getattr(tool, f.name) for f in fields(tool)})


def test_the_key_is_stripped_before_validation_and_the_tool_never_gets_it(store):
    received: list[dict] = []

    @lw.tool
    def record(order_id: str, note: str = "") -> str:
        """Record the arguments."""
        received.append({"order_id": order_id, "note": note})
        return "ok"

    validated: list = []
    model = ScriptedModel([
        [ToolCall("record", expect({"order_id": "1"}, "ok"), id="c-dict"),
         ToolCall("record", json.dumps(expect({"order_id": "2", "note": "n"}, None)), id="c-str"),
         ToolCall("record", '{"order_id": "3"}', id="c-plain")],
        "done",
    ])
    result = agent(model, store, tools=[spy(record, validated)]).run_sync("go")
    assert result.stop_reason == "done"
    assert all(EXPECT_KEY not in (v if isinstance(v, dict) else json.loads(v)) for v in validated)
    assert sorted(received, key=lambda r: r["order_id"]) == [
        {"order_id": "1", "note": ""}, {"order_id": "2", "note": "n"}, {"order_id": "3", "note": ""}]
    started = {e.call_id: e for e in kinds_of(store, result.run_id, "tool_call_started")}
    assert (started["c-dict"].arguments, started["c-dict"].expected) == ({"order_id": "1"}, "ok")
    assert (started["c-str"].arguments, started["c-str"].expected) == ({"order_id": "2", "note": "n"}, None)
    assert (started["c-plain"].arguments, started["c-plain"].expected) == ('{"order_id": "3"}', None)
    # The call as the model sent it stays in the log.
    (think, _) = kinds_of(store, result.run_id, "model_call_finished")
    assert think.tool_calls[0].arguments == expect({"order_id": "1"}, "ok")


def test_malformed_arguments_stay_malformed_and_errors_never_mention_the_key(store):
    raw = '{"order_id": "1", "loopwise_expect": "shipped"'  # cut off: not valid JSON
    calls = [ToolCall("lookup", raw, id="c-bad"), ToolCall("lookup", expect({}, "shipped"), id="c-missing")]
    contents = {}
    for on in (True, False):
        s = lw.MemoryStore()
        result = lw.Agent(ScriptedModel([calls, "done"]), tools=[lookup], store=s, expectations=on).run_sync("go")
        contents[on] = {e.call_id: (e.outcome, e.content) for e in kinds_of(s, result.run_id, "tool_call_finished")}
        started = {e.call_id: e for e in kinds_of(s, result.run_id, "tool_call_started")}
        assert started["c-bad"].arguments == raw and started["c-bad"].expected is None
    assert contents[True]["c-bad"] == contents[False]["c-bad"]
    assert contents[True]["c-bad"][0] == "invalid_arguments" and "not valid JSON" in contents[True]["c-bad"][1]
    outcome, content = contents[True]["c-missing"]
    assert outcome == "invalid_arguments" and "order_id" in content and EXPECT_KEY not in content


@pytest.mark.parametrize(("arguments", "expected", "rest"), [
    ({"a": 1, EXPECT_KEY: "x"}, "x", {"a": 1}),
    ({"a": 1}, None, {"a": 1}),
    (f'{{"a": 1, "{EXPECT_KEY}": {{"n": 2}}}}', {"n": 2}, {"a": 1}),
    (f'["{EXPECT_KEY}"]', None, f'["{EXPECT_KEY}"]'),  # not an object: untouched
    (f'{{"{EXPECT_KEY}": "x"', None, f'{{"{EXPECT_KEY}": "x"'),  # malformed: untouched
    (None, None, None),
])
def test_split_expectation(arguments, expected, rest):
    assert split_expectation(arguments) == (expected, rest)
    if isinstance(arguments, dict) and EXPECT_KEY in arguments:
        assert EXPECT_KEY in arguments  # the caller's dict is not changed


# -- match: the tool's check --------------------------------------------------------------


@pytest.mark.parametrize("verdict", [True, False, None])
def test_a_check_decides_on_the_value_the_tool_returned(store, verdict):
    seen = []

    def check(expected, actual):
        seen.append((expected, actual))
        return verdict

    @lw.tool(check=check)
    def refund(amount: float) -> dict:
        """Refund."""
        return {"status": "refunded", "amount": amount}

    model = ScriptedModel([ToolCall("refund", expect({"amount": 65}, '{"amount": 95}')), "done"])
    result = agent(model, store, tools=[refund]).run_sync("go")
    (done,) = kinds_of(store, result.run_id, "tool_call_finished")
    assert (done.match, done.match_by, done.match_note) == (verdict, "check", None)
    assert seen == [('{"amount": 95}', {"status": "refunded", "amount": 65.0})]
    assert refund.policy.describe()["check"].endswith("check")


@pytest.mark.parametrize(("check", "note"), [
    (lambda e, a: 1 / 0, "check raised ZeroDivisionError: division by zero"),
    (lambda e, a: "yes", "check returned str, not True, False or None"),
])
def test_a_check_that_fails_gives_an_unknown_match_and_the_run_goes_on(store, check, note):
    t = lw.tool(check=check, name="ship")(lambda order_id: "shipped")
    model = ScriptedModel([ToolCall("ship", expect({"order_id": "1"}, "shipped")), "done"])
    result = agent(model, store, tools=[t]).run_sync("go")
    assert result.stop_reason == "done"
    (done,) = kinds_of(store, result.run_id, "tool_call_finished")
    assert (done.match, done.match_by, done.match_note) == (None, "check", note)


def test_a_check_is_not_called_without_a_value_or_an_expectation(store):
    calls = []

    @lw.tool(check=lambda e, a: calls.append((e, a)) or True)
    def broken(order_id: str) -> dict:
        """Fails."""
        raise RuntimeError("db down")

    model = ScriptedModel([
        [ToolCall("broken", expect({"order_id": "1"}, '{"status": "shipped"}'), id="c-err"),
         ToolCall("broken", {"order_id": "2"}, id="c-none")],
        "done",
    ])
    result = agent(model, store, tools=[broken]).run_sync("go")
    done = {e.call_id: e for e in kinds_of(store, result.run_id, "tool_call_finished")}
    assert calls == []
    # An error where a value was expected: the default says so.
    assert (done["c-err"].outcome, done["c-err"].match, done["c-err"].match_by) == ("error", False, "default")
    assert (done["c-none"].match, done["c-none"].match_by) == (None, None)


@pytest.mark.parametrize(("check", "message"), [
    ("yes", "check= must be a function check"),
    (int, "check= must be a function check"),
    (lambda e: True, r"check= must take two arguments, \(expected, actual\)"),
])
def test_a_bad_check_is_a_user_error_naming_the_tool(check, message):
    with pytest.raises(lw.UserError, match=rf"tool 'f': {message}"):
        lw.tool(check=check, name="f")(lambda x: x)


def test_an_async_check_is_refused():
    async def check(expected, actual):
        return True

    with pytest.raises(lw.UserError, match="tool 'f': check= must be a plain \\(sync\\) function"):
        lw.tool(check=check, name="f")(lambda x: x)


# -- match: the default, as the docs' table says -------------------------------------------


def _doc_rows() -> list[tuple[str, str, str, str]]:
    text = (ROOT / "docs" / "decisions.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and all(c.startswith("`") and c.endswith("`") for c in cells[:4]):
            rows.append(tuple(c[1:-1] for c in cells[:4]))
    return rows


DOC_ROWS = _doc_rows()


def test_the_docs_table_has_its_rows():
    assert len(DOC_ROWS) >= 15


@pytest.mark.parametrize(("expected", "outcome", "actual", "match"), DOC_ROWS)
def test_the_default_comparison_is_the_documented_one(expected, outcome, actual, match):
    fallback = None
    if outcome == "fallback":
        fallback = re.search(r"; answered from (.+?): ", actual).group(1)  # type: ignore[union-attr]
    want = {"True": True, "False": False, "None": None}[match]
    assert default_match(None if expected == "null" else expected, outcome, actual, fallback) is want


@pytest.mark.parametrize(("expected", "actual", "want"), [
    ({"count": 3}, '{"count": 3.0}', True),  # an expectation sent as JSON, not a string
    ([1, 2], "[2, 1]", True),
    ({"a": {"b": [1]}}, '{"a": {"b": [1, 2], "c": 0}}', True),
    ({"a": {"b": [3]}}, '{"a": {"b": [1, 2]}}', False),
    ({"a": 1}, "[1]", False),
    (True, "true", True),
    ("null", "anything", None),
    ("   ", "anything", None),
    ("!!!", "anything", None),  # no words to look for
    ("ORD-7", '{"orders": ["ORD-7"]}', True),
])
def test_more_default_comparisons(expected, actual, want):
    assert default_match(expected, "ok", actual) is want


# -- the decision log, however a run ends ---------------------------------------------------


def test_a_done_run_with_parallel_calls(store):
    model = ScriptedModel([
        ModelResponse(text="Checking both orders.", tool_calls=[
            ToolCall("lookup", expect({"order_id": "1"}, "shipped"), id="a"),
            ToolCall("lookup", expect({"order_id": "2"}, "delivered"), id="b")]),
        ModelResponse(text="Checking again.", tool_calls=[
            ToolCall("lookup", expect({"order_id": "1"}, "shipped"), id="c"),
            ToolCall("lookup", {"order_id": "2"}, id="d")]),
        ModelResponse(tool_calls=[ToolCall("lookup", expect({"order_id": "3"}, '{"status": "shipped"}'), id="e")]),
        "Order 1 shipped.",
    ])
    result = agent(model, store).run_sync("where are my orders?")
    log = decisions(store.load(result.run_id))
    assert [d.iteration for d in log] == [1, 2, 3, 4]
    first, second, third, last = log
    assert first.thought == "Checking both orders." and first.action_kind == "tool_calls"
    assert first.action == 'lookup(order_id="1"), lookup(order_id="2")'
    assert first.expected == ["shipped", "delivered"]
    assert [c.match for c in first.calls] == [True, False] and first.match is False
    assert [c.match for c in second.calls] == [True, None] and second.match is None  # one call had no expectation
    assert third.thought is None and third.match is True
    assert json.loads(third.actual[0]) == {"order_id": "3", "status": "shipped"}
    assert (last.action_kind, last.action, last.answer, last.match) == ("answer", "final answer", "Order 1 shipped.",
                                                                       None)
    assert last.why == ["run stopped: done"]
    assert expectations_on(store.load(result.run_id))
    as_json = json.loads(json.dumps([d.to_dict() for d in log]))
    assert as_json[0]["calls"][1] == {"call_id": "b", "name": "lookup", "arguments": {"order_id": "2"},
                                      "expected": "delivered", "outcome": "ok",
                                      "actual": '{"order_id":"2","status":"shipped"}', "match": False,
                                      "match_by": "default", "match_note": None}
    assert set(as_json[0]) == {"iteration", "thought", "action", "action_kind", "expected", "actual", "match",
                               "answer", "why", "calls"}


def test_a_run_stopped_by_max_iterations(store):
    def never_done(request: ModelRequest) -> ModelResponse:
        if not request.tools:
            return ModelResponse(text="Best effort: shipped.")
        if len(request.messages) < 3:
            return ModelResponse(text="")  # empty: the runtime nudges
        return ModelResponse(text="more", tool_calls=[ToolCall("lookup", expect({"order_id": "1"}, "shipped"))])

    a = agent(FunctionModel(never_done), store, limits=lw.Limits(max_iterations=3),
              runaway=lw.RunawayDetector(enabled=False))
    result = a.run_sync("go")
    assert result.stop_reason == "max_iterations"
    log = decisions(store.load(result.run_id))
    assert [d.iteration for d in log] == [1, 2, 3]
    assert log[0].action_kind == "empty" and any(w.startswith("nudge (the model returned an empty response)")
                                                 for w in log[0].why)
    assert log[1].match is True
    (skipped,) = log[2].calls
    assert (skipped.outcome, skipped.match, skipped.expected) == ("not_executed", None, "shipped")
    why = log[2].why
    assert why[0].startswith("limit max_iterations: iteration limit of 3 reached")
    assert any(w.startswith("nudge (best-effort answer after a limit)") for w in why)
    assert "best-effort answer, tools off: Best effort: shipped." in why
    assert why[-1].startswith("run stopped: max_iterations (iteration limit of 3")


def test_a_run_stopped_by_its_budget(store):
    def model(request: ModelRequest) -> ModelResponse:
        return ModelResponse(text="more", tool_calls=[ToolCall("lookup", expect({"order_id": "1"}, "shipped"))])

    a = agent(FunctionModel(model, price=Price(1000, 1000)), store, max_tokens=100,
              limits=lw.Limits(budget_usd=1.5, final_answer_on_limit=False), runaway=lw.RunawayDetector(enabled=False))
    result = a.run_sync("go")
    assert result.stop_reason == "budget"
    log = decisions(store.load(result.run_id))
    assert len(log) == result.iterations >= 2
    assert all(d.match is True for d in log[:-1])
    refused = log[-1]
    assert refused.action_kind == "no_response" and refused.calls == []  # the THINK was never made
    assert refused.why[0].startswith("limit budget: ") and refused.why[-1].startswith("run stopped: budget")


def test_a_run_stopped_by_its_deadline(store):
    @lw.tool(timeout=None)
    async def slow(order_id: str) -> str:
        """Never answers in time."""
        await anyio.sleep_forever()
        return "never"

    def model(request: ModelRequest) -> ModelResponse:
        if not request.tools:
            return ModelResponse(text="It is taking too long.")
        return ModelResponse(tool_calls=[ToolCall("slow", expect({"order_id": "1"}, "shipped"))])

    result = agent(FunctionModel(model), store, tools=[slow], limits=lw.Limits(deadline_s=0.2)).run_sync("go")
    assert result.stop_reason == "deadline"
    (only,) = decisions(store.load(result.run_id))
    (call,) = only.calls
    assert (call.outcome, call.expected, call.match) == ("cancelled", "shipped", None)
    assert only.why[0].startswith("limit deadline: deadline of 0.2 s reached during iteration 1")
    assert only.why[-1].startswith("run stopped: deadline")


def test_a_run_that_ends_in_error(store):
    def model(request: ModelRequest) -> ModelResponse:
        if len(request.messages) > 2:
            raise ValueError("the provider broke")
        return ModelResponse(tool_calls=[ToolCall("lookup", expect({"order_id": "1"}, "shipped"))])

    result = agent(FunctionModel(model), store).run_sync("go")
    assert result.stop_reason == "error"
    first, second = decisions(store.load(result.run_id))
    assert first.match is True
    assert second.action_kind == "model_failed" and "ValueError: the provider broke" in second.action
    assert second.why[-1].startswith("run stopped: error (model call failed: ValueError: the provider broke")


async def test_a_run_killed_by_its_caller(store):
    started = anyio.Event()

    @lw.tool(timeout=None)
    async def wait(order_id: str) -> str:
        """Waits until cancelled."""
        started.set()
        await anyio.sleep_forever()
        return "never"

    a = agent(ScriptedModel([ToolCall("wait", expect({"order_id": "1"}, "shipped"), id="w")]), store, tools=[wait])
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: a.run("go", run_id="killed-1"))
        await started.wait()
        tg.cancel_scope.cancel()
    (only,) = decisions(store.load("killed-1"))
    (call,) = only.calls
    assert (call.outcome, call.expected, call.match) == ("cancelled", "shipped", None)
    assert only.why[-1] == "run stopped: killed (cancelled by caller)"


def test_retries_and_fallbacks_are_in_why(store):
    attempts = []

    @lw.tool(retries=1, backoff=lw.Backoff(initial_s=0, jitter=False), fallback=lw.Template("cached: {order_id}"))
    def flaky(order_id: str) -> str:
        """Fails twice."""
        attempts.append(order_id)
        raise ConnectionError("db down")

    model = ScriptedModel([ToolCall("flaky", expect({"order_id": "7"}, "cached 7")), "done"])
    result = agent(model, store, tools=[flaky]).run_sync("go")
    first = decisions(store.load(result.run_id))[0]
    assert len(attempts) == 2
    assert first.why[0] == "flaky attempt 1 failed: db down; retried after 0 s"
    assert first.why[1] == "flaky attempt 2 failed: db down"
    assert first.why[2].startswith("flaky: answered from fallback a template (flaky raised ConnectionError")
    assert first.calls[0].outcome == "fallback" and first.match is True  # the fallback's answer: "cached: 7"


def test_a_crashed_run_ends_where_its_log_ends(store):
    model = ScriptedModel([ToolCall("lookup", expect({"order_id": "1"}, "shipped")), "done"])
    result = agent(model, store).run_sync("go")
    events = store.load(result.run_id)
    cut = next(i for i, e in enumerate(events) if e.kind == "tool_call_finished")
    (only,) = decisions(events[:cut])
    (call,) = only.calls
    assert (call.outcome, call.actual, call.match, call.expected) == (None, None, None, "shipped")
    assert call.match_note.startswith("no result recorded")
    assert only.why == ["the log ends here: the run is still going, or its process died"]
    assert decisions(events[:1]) == []  # not even an iteration yet


def test_old_logs_without_the_new_fields_still_load(store):
    result = lw.Agent(ScriptedModel([ToolCall("lookup", {"order_id": "1"}), "done"]), tools=[lookup],
                      store=store).run_sync("go")
    old = []
    for raw in dump_events(store.load(result.run_id)):
        data = json.loads(raw)
        for key in ("expected", "match", "match_by", "match_note"):
            data.pop(key, None)
        data.get("agent", {}).pop("expectations", None)
        old.append(load_event(json.dumps(data)))
    log = decisions(old)
    assert [d.iteration for d in log] == [1, 2]
    assert log[0].calls[0].expected is None and log[0].match is None
    assert not expectations_on(old)
    # A log that kept the raw arguments (no `expected` field): the expectation is read from them.
    raw_args = [e if e.kind != "tool_call_started" else load_event(json.dumps(
        {**event_to_dict(e), "arguments": expect({"order_id": "1"}, "delivered")})) for e in old]
    call = decisions(raw_args)[0].calls[0]
    assert (call.arguments, call.expected, call.match, call.match_by) == ({"order_id": "1"}, "delivered", False,
                                                                          "default")


def test_decisions_are_plain_data():
    d = Decision(iteration=1)
    assert d.to_dict()["calls"] == [] and d.expected == [] and d.match is None


# -- the command line, on a real SQLite file --------------------------------------------------


def test_show_mismatches_reads_the_log_from_sqlite(tmp_path, capsys):
    path = tmp_path / "runs.db"
    store = lw.SQLiteStore(path)
    try:
        model = ScriptedModel([
            ModelResponse(text="Checking.", tool_calls=[ToolCall("lookup", expect({"order_id": "1"}, "shipped"))]),
            ModelResponse(text="Once more.", tool_calls=[ToolCall("lookup", expect({"order_id": "2"}, "lost"))]),
            ModelResponse(text="And again.", tool_calls=[ToolCall("lookup", expect({"order_id": "3"}, "in transit"))]),
            "Shipped.",
        ])
        run_id = agent(model, store).run_sync("go").run_id
        plain = lw.Agent(ScriptedModel(["hi"]), store=store).run_sync("go").run_id
    finally:
        store.close()
    assert main(["show", run_id, "--mismatches", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "2 mismatches, first at iteration 2" in flat
    assert re.findall(r"^iteration (\d+)", out, re.MULTILINE) == ["2", "3"]
    assert "◀ first mismatch" in out and out.index("◀ first mismatch") < out.index("iteration 3")
    assert 'lookup(order_id="2")' in out and "expected lost" in flat and "✗ no" in out

    assert main(["show", run_id, "--decisions", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^iteration (\d+)", out, re.MULTILINE) == ["1", "2", "3", "4"]
    assert "thought Checking." in " ".join(out.split()) and "run stopped: done" in out

    assert main(["show", run_id, "--mismatches", "--json", "--db", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["iteration"] for d in data] == [2, 3] and data[0]["expected"] == ["lost"]
    assert main(["show", run_id, "--decisions", "--json", "--db", str(path)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4

    assert main(["show", plain, "--mismatches", "--db", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "this run recorded no expectations (run it with Agent(expectations=True))" in out


def test_show_mismatches_when_everything_matched(tmp_path, capsys):
    path = tmp_path / "runs.db"
    store = lw.SQLiteStore(path)
    try:
        model = ScriptedModel([ToolCall("lookup", expect({"order_id": "1"}, "shipped")),
                               ToolCall("lookup", {"order_id": "2"}), "Shipped."])
        run_id = agent(model, store).run_sync("go").run_id
    finally:
        store.close()
    assert main(["show", run_id, "--mismatches", "--db", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no mismatches: 1 of 1 expectation matched, 0 could not be checked" in out
