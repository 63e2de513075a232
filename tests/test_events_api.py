"""`loopwise.events`: the public event classes and their codec, the stores' own bytes."""

from __future__ import annotations

import sqlite3
from typing import get_args

import pytest

import loopwise as lw
from loopwise import events as ev
from loopwise.models import Message, ScriptedModel, ToolCall, Usage

RUN = "all-kinds"
_ERR = ev.ErrorInfo(type="TimeoutError", message="no answer in 30 s ✗", traceback="Traceback...\n  line 1\n")


def one_of_each() -> list[ev.Event]:
    """One event of every kind, in a run's order, with every field set to something other than its default."""
    common = {"run_id": RUN, "seq": 0, "ts": 0.0}  # (seq and ts are set below)
    made = [
        ev.RunStarted(task=[Message("user", "book a flight, ünïcode")],
                      instructions="be brief", agent={"name": "a", "tools": ["search"]},
                      limits={"max_iterations": 5}, tags=["x", "y"], **common),
        ev.IterationStarted(iteration=1, **common),
        ev.ModelCallStarted(iteration=1, purpose="final_answer", model="gpt", n_messages=3, n_tools=2,
                            max_tokens=100, estimated_input_tokens=42, reserved_usd=0.01, **common),
        ev.ModelAttemptFailed(iteration=1, purpose="summary", model="gpt", attempt=2, error=_ERR, latency_s=0.5,
                              retry_in_s=1.5, will_fallback=True, reason="429", **common),
        ev.ModelCallFinished(iteration=1, text="hi", tool_calls=[ToolCall("search", {"q": [1, 2.5, None]}, "c1")],
                             finish_reason="tool_calls", usage=Usage(10, 20, 3, 4), usage_estimated=True,
                             cost_usd=0.002, latency_s=0.7, error=_ERR, model="fallback", overrun_usd=0.001,
                             replaced=["text"], **common),
        ev.ToolCallStarted(iteration=1, call_id="c1", name="search", arguments={"q": {"nested": True}},
                           expected={"rows": 3}, **common),
        ev.ToolAttemptFailed(iteration=1, call_id="c1", name="search", attempt=1, error=_ERR, latency_s=0.1,
                             retry_in_s=0.2, **common),
        ev.ToolFallback(iteration=1, call_id="c1", name="search", fallback="cache", ok=True, reason="timeout",
                        **common),
        ev.BreakerChanged(iteration=1, name="search", old="closed", new="open", reason="5 failures", **common),
        ev.ThreadAbandoned(iteration=1, call_id="c1", name="search", thread="lw-tool-1", **common),
        ev.ToolCallFinished(iteration=1, call_id="c1", name="search", outcome="fallback", content="3 rows",
                            latency_s=0.3, error=_ERR, attempts=2, fallback="cache", cost_usd=0.5, match=False,
                            match_by="check", match_note="rows differ", **common),
        ev.Nudge(iteration=1, content="answer now", reason="runaway", **common),
        ev.ContextFolded(iteration=1, outcome="summarized", units=[0, 1], n_messages=4, summary="so far",
                         reason="window", **common),
        ev.KillReceived(iteration=1, by="me@host pid 7", reason="stop", requested_ts=1.0, **common),
        ev.LimitHit(iteration=1, limit="killed", detail="killed by me", **common),
        ev.RunResumed(segment=1, previous_end="crashed", iteration=1, by="me@host pid 8",
                      interrupted_calls=[{"call_id": "c1", "name": "search", "action": "unknown"}],
                      cost_usd=0.5, charged_usd=0.1, charged_tokens=7, active_s=2.5, **common),
        ev.RunFinished(stop_reason="error", output="partial", iterations=1, model_calls=2, usage=Usage(1, 2),
                       cost_usd=0.6, duration_s=3.5, reason="boom", error=_ERR, **common),
    ]
    for seq, event in enumerate(made):
        event.seq, event.ts = seq, 1.25 + seq
    return made


def test_every_kind_is_public_and_round_trips():
    made = one_of_each()
    assert {type(e) for e in made} == set(get_args(ev.Event))  # one of each kind, no kind left out
    for event in made:
        line = ev.dumps(event)
        assert "\n" not in line
        back = ev.loads(line)
        assert type(back) is type(event)
        assert back == event
        assert ev.loads(line.encode()) == event
    text = ev.dumps_lines(made)
    assert text == "".join(ev.dumps(e) + "\n" for e in made)
    assert ev.loads_lines(text) == made
    assert ev.loads_lines(text.encode(), schema=ev.SCHEMA_VERSION) == made
    assert ev.loads_lines("\n" + text + "\n\n") == made  # blank lines are not events


def test_the_bytes_are_what_sqlite_store_writes(tmp_path):
    db = tmp_path / "runs.db"
    store = lw.SQLiteStore(db)
    store.write(one_of_each())

    @lw.tool
    def lookup(city: str) -> str:
        """Look a city up."""
        return f"{city}: 21 °C"

    agent = lw.Agent(ScriptedModel([ToolCall("lookup", {"city": "Zürich"}), "warm"]), tools=[lookup], store=store)
    agent.run_sync("weather?", run_id="real")
    loaded = {run_id: store.load(run_id) for run_id in (RUN, "real")}
    store.close()

    conn = sqlite3.connect(db)
    try:
        for run_id, events in loaded.items():
            rows = conn.execute("SELECT data FROM events WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
            assert [data for (data,) in rows] == [ev.dumps(e) for e in events]
            assert ev.loads_lines("\n".join(data for (data,) in rows)) == events
    finally:
        conn.close()
    assert loaded[RUN] == one_of_each()


def test_a_newer_major_schema_is_refused_in_one_line():
    line = ev.dumps(one_of_each()[1])
    major, minor = (int(part) for part in ev.SCHEMA_VERSION.split("."))
    assert ev.loads(line, schema=f"{major}.{minor + 3}") == one_of_each()[1]  # a newer minor only adds
    for read in (ev.loads, ev.loads_lines):
        with pytest.raises(ev.EventSchemaError) as info:
            read(line, schema=f"{major + 1}.0")
        message = str(info.value)
        assert "\n" not in message
        assert f"schema {major + 1}.0 are newer than this loopwise reads" in message
        assert "upgrade loopwise" in message
        assert isinstance(info.value, lw.LoopwiseError)
    for bad in ("1", "v1.0", "1.x", ""):
        with pytest.raises(ev.EventSchemaError, match="is not an event schema version"):
            ev.loads(line, schema=bad)


def test_an_unknown_kind_is_refused_with_the_stores_one_line_error():
    line = '{"kind":"teleported","run_id":"r","seq":3,"ts":1.0}'
    with pytest.raises(ev.EventSchemaError) as info:
        ev.loads(line)
    assert str(info.value) == ("not an event this loopwise can read (an event of unknown kind 'teleported'): "
                               "written by a newer loopwise, or edited")
    good = ev.dumps(one_of_each()[0])
    with pytest.raises(ev.EventSchemaError, match=r"^line 3 is not an event .*unknown kind 'teleported'"):
        ev.loads_lines(f"{good}\n\n{line}\n")
    with pytest.raises(ev.EventSchemaError, match=r"seq: .*valid integer"):
        ev.loads('{"kind":"iteration_started","run_id":"r","seq":"x","ts":1.0,"iteration":1}')
    with pytest.raises(ev.EventSchemaError, match="not an event"):
        ev.loads("not json")
