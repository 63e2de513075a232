"""SlidingWindow in the loop: old iterations leave the context, folded into a summary once each."""

from __future__ import annotations

import pytest

import loopwise as lw
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ToolCall, Usage

from .test_loop import assert_valid_log, assert_valid_transcript


@lw.tool
async def read_page(n: int) -> str:
    """A 2 KB page of a long document."""
    return f"page {n}: " + "lorem ipsum " * 170


def make_model(pages: int, seen: list[ModelRequest]) -> FunctionModel:
    def fn(request: ModelRequest) -> ModelResponse:
        seen.append(request)
        size = sum(len(m.content or "") for m in request.messages) // 4
        if not request.tools:  # a summary call (or the best-effort answer)
            return ModelResponse(text=f"summary after {len(seen)} calls", usage=Usage(size, 20))
        done = sum(1 for m in request.messages if m.role == "tool")
        think = sum(1 for r in seen if r.tools)
        if think > pages:
            return ModelResponse(text="read everything", usage=Usage(size, 5))
        return ModelResponse(tool_calls=[ToolCall("read_page", {"n": think})], usage=Usage(size, 10 + done))

    return FunctionModel(fn, price=Price(1, 2))


def test_the_window_keeps_the_last_iterations_and_folds_the_rest_once():
    seen: list[ModelRequest] = []
    store = lw.MemoryStore()
    agent = lw.Agent(make_model(12, seen), tools=[read_page], store=store, instructions="Read it all.",
                     context=lw.SlidingWindow(keep_last=2), limits=lw.Limits(max_iterations=20))
    result = agent.run_sync("read the document")
    assert result.stop_reason == "done"
    events = store.load(result.run_id)
    assert_valid_log(events)
    thinks = [r for r in seen if r.tools]
    summaries = [r for r in seen if not r.tools]
    for request in thinks:
        assert_valid_transcript(request.messages)
        assert request.messages[0].content == "Read it all."  # instructions and task always stay
        assert request.messages[1].content == "read the document"
        assert sum(1 for m in request.messages if m.role == "tool") <= 2  # keep_last=2 iterations
    folded = [e for e in events if e.kind == "context_folded"]
    units = [u for e in folded for u in e.units]
    assert units == sorted(set(units))  # each iteration folded once, in order
    assert len(summaries) == len(folded) and all(e.outcome == "summarized" for e in folded)
    # Flat: the last THINK is no bigger than the fourth (within 1.5x), the summaries included.
    sizes = [sum(len(m.content or "") for m in r.messages) for r in thinks]
    assert sizes[-1] <= 1.5 * sizes[3]
    # The summary calls are model calls, counted in the totals, not iterations.
    summary_calls = [e for e in events if e.kind == "model_call_finished" and e.purpose == "summary"]
    assert len(summary_calls) == len(summaries)
    assert result.model_calls == result.iterations + len(summary_calls)
    assert result.cost_usd == pytest.approx(sum(e.cost_usd for e in events if e.kind == "model_call_finished"))


def test_without_summaries_old_iterations_are_dropped_with_a_note():
    seen: list[ModelRequest] = []
    store = lw.MemoryStore()
    agent = lw.Agent(make_model(6, seen), tools=[read_page], store=store,
                     context=lw.SlidingWindow(keep_last=1, summarize=False))
    result = agent.run_sync("read")
    assert result.stop_reason == "done"
    assert all(r.tools for r in seen)  # no summary calls
    notes = [m.content for m in seen[-1].messages if m.role == "system"]
    assert any("earlier iterations were dropped" in n for n in notes)
    assert all(e.outcome == "dropped" for e in store.load(result.run_id) if e.kind == "context_folded")
