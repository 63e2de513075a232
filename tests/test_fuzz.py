"""Property tests: whatever a model returns, the run stops with exactly one stop reason,
within the iteration cap, with a complete log and a valid transcript."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loopwise as lw
from loopwise._events import STOP_REASONS, dump_lines, load_events
from loopwise._stores.journal import json_array
from loopwise.models import FunctionModel, ModelResponse, ToolCall, Usage

from .test_loop import assert_valid_log, assert_valid_transcript


@lw.tool
async def search(query: str, limit: int = 5) -> list:
    """Search."""
    await asyncio.sleep(0)
    return [query] * min(limit, 3)


@lw.tool
def flaky(n: int) -> int:
    """Fails on odd numbers."""
    if n % 2:
        raise ValueError("odd")
    return n


# (None, numbers, lists: what only a Python model can send, the protocol has no room for them.)
names = st.sampled_from(["search", "flaky", "nope", "", "search "]) | st.text(max_size=8) | st.none() | st.integers()
json_args = st.dictionaries(st.sampled_from(["query", "limit", "n", "x"]),
                            st.integers() | st.text(max_size=5) | st.none() | st.lists(st.integers(), max_size=2),
                            max_size=3)
arguments = (
    json_args
    | st.sampled_from(['{"query": "a"}', '{"n": 2}', '{"query": ', "", "null", "[]", "{}}", '{"limit": "x"}'])
    | st.text(max_size=10)
    | st.none() | st.integers() | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.none() | st.integers(0, 3), st.integers(), max_size=2)
)
tool_calls = st.builds(ToolCall, name=names, arguments=arguments,
                       id=st.none() | st.sampled_from(["a", "b", "a", ""]) | st.integers(0, 2))
usages = st.none() | st.builds(Usage, st.integers(-5, 500), st.integers(-5, 200))
responses = st.builds(
    ModelResponse,
    text=st.none() | st.text(max_size=20),
    tool_calls=st.lists(tool_calls, max_size=4),
    usage=usages,
    finish_reason=st.sampled_from([None, "stop", "length", "tool_calls", 0]),
)
steps = st.lists(responses | st.sampled_from(["raise", "junk"]), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=steps, max_iterations=st.integers(1, 5), final_answer=st.booleans())
def test_any_model_behaviour_ends_in_one_stop_reason(script, max_iterations, final_answer):
    seen = []

    def fn(request):
        seen.append(request)
        step = script[(len(seen) - 1) % len(script)]
        if step == "raise":
            raise RuntimeError("provider exploded")
        if step == "junk":
            return {"not": "a response"}
        return step

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(fn), tools=[search, flaky], store=store,
                     limits=lw.Limits(max_iterations=max_iterations, final_answer_on_limit=final_answer))
    result = agent.run_sync("fuzz")
    assert result.stop_reason in STOP_REASONS
    assert result.stop_reason in ("done", "max_iterations", "runaway", "error")
    assert 1 <= result.iterations <= max_iterations
    assert result.model_calls <= max_iterations + 1
    assert len(seen) == result.model_calls
    events = store.load(result.run_id)
    end = assert_valid_log(events)
    assert lw.RunResult.from_events(events) == result
    # The log reads back from the JSON the SQLite store keeps, whatever the model sent.
    assert lw.RunResult.from_events(load_events(json_array([dump_lines(events)]))) == result
    assert end.usage.input_tokens >= 0 and end.usage.output_tokens >= 0
    for request in seen:
        assert_valid_transcript(request.messages)
    if result.stop_reason == "done":
        assert result.output and result.output.strip()
