"""The journal's JSON lines (msgspec) are pydantic's bytes, and pydantic's errors where msgspec has none."""

from __future__ import annotations

import io
import json
import math
import sqlite3

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_core import PydanticSerializationError
from rich.console import Console

import loopwise as lw
from loopwise._demo import scenario as _demo
from loopwise._events import ErrorInfo, ModelCallFinished, dump_events, dump_lines, new_tool_call_started
from loopwise.models import ModelResponse, ToolCall, Usage


def pydantic_lines(events) -> bytes:
    return b"".join(line + b"\n" for line in dump_events(events))


def test_every_event_of_the_demo_is_written_as_pydantic_writes_it():
    store = lw.MemoryStore()
    assert _demo.main(Console(file=io.StringIO()), speed=0, store=store) == 0
    runs = [store.load(summary.run_id) for summary in store.list_runs(limit=100)]
    kinds = {e.kind for events in runs for e in events}
    # The demo's scenarios make most kinds of events: retries, fallbacks, breakers, limits, kills.
    assert {"run_started", "model_call_finished", "tool_call_finished", "tool_attempt_failed",
            "limit_hit", "run_finished"} <= kinds
    for events in runs:
        assert dump_lines(events) == pydantic_lines(events)


# JSON as a model sends it; floats below 1e16, whose exponent both write alike.
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False, max_value=1e15, min_value=-1e15),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(arguments=st.dictionaries(st.text(max_size=10), _json, max_size=5), content=st.text())
def test_arguments_and_text_are_written_byte_for_byte_alike(arguments, content):
    call = ToolCall("t", arguments, "c1")
    events = [
        new_tool_call_started("r", 1, 1.5, 1, "c1", "t", arguments, None),
        ModelCallFinished(run_id="r", seq=2, ts=2.0, iteration=1, text=content, tool_calls=[call],
                             usage=Usage(3, 4), error=ErrorInfo(type="E", message=content)),
    ]
    assert dump_lines(events) == pydantic_lines(events)


def test_large_floats_differ_only_in_the_exponent_sign_and_read_back_the_same():
    events = [new_tool_call_started("r", 1, 1.5, 1, "c", "t", {"big": 1.5e20, "huge": 1.7976931348623157e308}, None)]
    ours, theirs = dump_lines(events), pydantic_lines(events)
    assert ours.replace(b"e20", b"e+20").replace(b"e308", b"e+308") == theirs
    assert json.loads(ours) == json.loads(theirs)


class Point(pydantic.BaseModel):
    x: int


def test_what_msgspec_cannot_encode_is_written_by_pydantic():
    # A dict keyed by None (msgspec refuses it) and a pydantic model (msgspec asks pydantic).
    events = [new_tool_call_started("r", 1, 1.5, 1, "c", "t", {"k": {None: 1}, "p": Point(x=2)}, None)]
    assert dump_lines(events) == pydantic_lines(events)
    assert b'{"None":1}' in dump_lines(events) and b'"p":{"x":2}' in dump_lines(events)


def test_what_nothing_can_encode_raises_pydantics_error():
    events = [new_tool_call_started("r", 1, 1.5, 1, "c", "t", {"o": object()}, None)]
    with pytest.raises(PydanticSerializationError, match="Unable to serialize unknown type"):
        dump_lines(events)


def test_a_foreign_object_in_a_batch_goes_through_pydantics_union_and_its_warnings():
    batch = [ModelResponse(text="not an event")]
    with pytest.warns(UserWarning, match="failed to get discriminator value"):
        ours = dump_lines(batch)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="failed to get discriminator value"):
        assert ours == pydantic_lines(batch)


def test_non_finite_numbers_are_null_in_both():
    events = [new_tool_call_started("r", 1, 1.5, 1, "c", "t", {"a": math.inf, "b": math.nan}, None)]
    assert dump_lines(events) == pydantic_lines(events)
    assert b'"a":null,"b":null' in dump_lines(events)


def test_the_sqlite_store_journals_and_stores_these_lines(tmp_path):
    store = lw.SQLiteStore(tmp_path / "l.db")
    try:
        agent = lw.Agent(lw.models.ScriptedModel([ModelResponse(text="hi é \u2028 \x00")]), store=store)
        result = agent.run_sync("task \ud7ff", run_id="lines")
        events = store.load("lines")
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "l.db") as conn:
        rows = conn.execute("SELECT data FROM events WHERE run_id = 'lines' ORDER BY seq").fetchall()
    assert result.output == "hi é \u2028 \x00"
    assert [r[0].encode() + b"\n" for r in rows] == [pydantic_lines([e]) for e in events]
