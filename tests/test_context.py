from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import loopwise as lw
from loopwise._policies.context import (
    SUMMARY_PREFIX,
    ContextState,
    FullContext,
    SlidingWindow,
    split_units,
)
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ToolCall, Usage

HEAD = [lw.Message("system", "You are a support agent."), lw.Message("user", "I've been waiting 3 weeks...")]


def iteration(n: int, *, calls: int = 1, result: str | None = None, nudge: str | None = None) -> list[lw.Message]:
    """One iteration as the loop appends it: an assistant message, its tool messages, a nudge."""
    tool_calls = tuple(ToolCall("lookup", {"n": n, "k": k}, f"c{n}-{k}") for k in range(calls))
    out = [lw.Message("assistant", f"thinking {n}", tool_calls)]
    out += [lw.Message("tool", result or f"result {n}/{k}", tool_call_id=c.id) for k, c in enumerate(tool_calls)]
    if nudge:
        out.append(lw.Message("user", nudge))
    return out


def transcript_of(n: int, **kw) -> list[lw.Message]:
    out = list(HEAD)
    for i in range(n):
        out += iteration(i, **kw)
    return out


def reference_units(transcript: list[lw.Message], head: int) -> list[list[lw.Message]]:
    """Units computed independently: a new one starts at each assistant message after the head."""
    units: list[list[lw.Message]] = []
    for m in transcript[head:]:
        if m.role == "assistant" or not units:
            units.append([])
        units[-1].append(m)
    return units


def summarizer(requests: list[ModelRequest]):
    def fn(request: ModelRequest) -> ModelResponse:
        requests.append(request)
        steps = re.findall(r"^Step (\d+):", request.messages[1].content, re.M)
        return ModelResponse(text=f"summary through step {steps[-1]}", usage=Usage(100, 20))

    return fn


async def refine(policy, transcript, state, model):
    plan = policy.plan(transcript, state)
    result = await policy.fold(plan.fold, model, state, reason=plan.reason) if plan.fold else None
    return policy.messages(transcript, state), result


def assert_calls_paired(messages: list[lw.Message]) -> None:
    """Every assistant tool call is followed by its tool messages; no tool message is orphaned."""
    i = 0
    while i < len(messages):
        m = messages[i]
        assert m.role != "tool", f"orphaned tool message at {i}: {m}"
        i += 1
        if m.role == "assistant" and m.tool_calls:
            for call in m.tool_calls:
                assert i < len(messages) and messages[i].role == "tool", f"call {call.id} lost its result"
                assert messages[i].tool_call_id == call.id
                i += 1


# -- the window ------------------------------------------------------------------------


async def test_keeps_head_and_last_two_iterations_and_summarizes_the_rest():
    requests: list[ModelRequest] = []
    model = FunctionModel(summarizer(requests))
    policy = SlidingWindow(keep_last=2)
    transcript = list(HEAD)
    state = policy.start(head=len(transcript))
    for n in range(5):
        transcript += iteration(n)
        messages, _ = await refine(policy, transcript, state, model)
    assert messages[:2] == HEAD
    assert messages[2] == lw.Message("system", SUMMARY_PREFIX + "summary through step 3")
    assert messages[3:] == iteration(3) + iteration(4)
    assert len(requests) == 3 and state.folded == state.summarized == 3


async def test_nothing_changes_until_the_window_is_full():
    policy = SlidingWindow(keep_last=3)
    transcript = transcript_of(3)
    state = policy.start(head=2)
    assert policy.plan(transcript, state).fold == ()
    assert policy.messages(transcript, state) == transcript


async def test_summary_request_has_no_tools_and_carries_previous_summary_and_unit():
    policy = SlidingWindow(keep_last=1, summary_max_tokens=200)
    transcript = transcript_of(2)
    state = policy.start(head=2)
    plan = policy.plan(transcript, state)
    request = policy.summary_request("customer is CUS-4821", plan.fold)
    assert request.tools == []
    assert request.max_tokens == 200
    assert request.messages[0].role == "system"
    for word in ("fact", "identifier", "number", "decision", "failure"):
        assert word in request.messages[0].content
    user = request.messages[1].content
    assert "customer is CUS-4821" in user
    assert 'lookup({"k": 0, "n": 0}) [id c0-0]' in user
    assert "result of lookup [id c0-0]: result 0/0" in user
    assert "thinking 1" not in user  # the kept unit is not summarized


async def test_each_unit_is_summarized_exactly_once_across_a_long_run():
    requests: list[ModelRequest] = []
    model = FunctionModel(summarizer(requests))
    policy = SlidingWindow(keep_last=2)
    transcript = list(HEAD)
    state = policy.start(head=2)
    results = []
    for n in range(40):
        transcript += iteration(n, calls=1 + n % 3)
        _, result = await refine(policy, transcript, state, model)
        if result is not None:
            results.append(result)
    # 40 iterations, 2 kept: 38 folds, one summary call each, one unit each, in order.
    assert len(requests) == 38 == state.summary_calls
    steps = [re.findall(r"^Step (\d+):", r.messages[1].content, re.M) for r in requests]
    assert steps == [[str(i + 1)] for i in range(38)]
    assert [r.units for r in results] == [(i,) for i in range(38)]
    # Each request builds on the previous answer: nothing is re-read.
    for before, request in zip(requests, requests[1:]):
        previous = re.findall(r"^Step (\d+):", before.messages[1].content, re.M)[-1]
        assert f"Previous summary:\nsummary through step {previous}\n" in request.messages[1].content
    assert state.usage == Usage(100 * 38, 20 * 38)


async def test_fold_counts_cost_and_prefers_summary_model():
    loop_model = FunctionModel(lambda r: pytest.fail("the loop's model must not summarize"))
    cheap = FunctionModel(lambda r: ModelResponse(text="s", usage=Usage(1_000_000, 0)), price=Price(0.5, 1.0))
    policy = SlidingWindow(keep_last=1, summary_model=cheap)
    transcript = transcript_of(2)
    state = policy.start(head=2)
    _, result = await refine(policy, transcript, state, loop_model)
    assert result.cost_usd == pytest.approx(0.5) and state.cost_usd == pytest.approx(0.5)
    assert result.usage == Usage(1_000_000, 0)
    assert result.outcome == "summarized" and result.summary == "s" and result.tool_call_ids == ("c0-0",)


async def test_missing_usage_is_estimated():
    policy = SlidingWindow(keep_last=1)
    state = policy.start(head=2)
    transcript = transcript_of(2)
    _, result = await refine(policy, transcript, state, FunctionModel(lambda r: "a summary"))
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0


async def test_nudges_stay_with_their_iteration_and_leading_nudges_form_a_unit():
    policy = SlidingWindow(keep_last=1, summarize=False)
    empty = lw.Message("user", "Your last response was empty.")
    transcript = [*HEAD, empty, *iteration(0, nudge="answer shorter"), *iteration(1)]
    state = policy.start(head=2)
    units = split_units(transcript, 2)
    assert [len(u.messages) for u in units] == [1, 3, 2]
    plan = policy.plan(transcript, state)
    assert [u.index for u in plan.fold] == [0, 1]
    policy.apply_drop(state, plan.fold, plan.reason)
    assert policy.messages(transcript, state)[3:] == iteration(1)


async def test_head_with_a_conversation_is_kept_whole():
    head = [
        lw.Message("system", "instr"),
        lw.Message("user", "q1"),
        lw.Message("assistant", None, (ToolCall("t", {}, "old"),)),
        lw.Message("tool", "r", tool_call_id="old"),
        lw.Message("assistant", "a1"),
        lw.Message("user", "q2"),
    ]
    policy = SlidingWindow(keep_last=1, summarize=False)
    transcript = head + iteration(0) + iteration(1) + iteration(2)
    state = policy.start(head=len(head))
    policy.apply_drop(state, policy.plan(transcript, state).fold)
    messages = policy.messages(transcript, state)
    assert messages[: len(head)] == head
    assert messages[len(head)].role == "system"
    assert messages[len(head) + 1 :] == iteration(2)


async def test_without_summaries_evicted_iterations_are_dropped_with_a_note():
    model = FunctionModel(lambda r: pytest.fail("summarize=False makes no model call"))
    policy = SlidingWindow(keep_last=2, summarize=False)
    transcript = list(HEAD)
    state = policy.start(head=2)
    for n in range(5):
        transcript += iteration(n)
        messages, result = await refine(policy, transcript, state, model)
    assert result.outcome == "dropped" and result.summary is None
    assert messages[2] == lw.Message(
        "system", "3 earlier iterations were dropped from the context to keep it small; "
        "their details are no longer available.")
    assert messages[3:] == iteration(3) + iteration(4)
    assert state.dropped == 3 and state.summary_calls == 0


async def test_blank_summary_drops_the_unit_and_keeps_the_previous_summary():
    answers = iter(["first summary", "   "])
    model = FunctionModel(lambda r: next(answers))
    policy = SlidingWindow(keep_last=1)
    transcript = list(HEAD)
    state = policy.start(head=2)
    for n in range(3):
        transcript += iteration(n)
        messages, result = await refine(policy, transcript, state, model)
    assert result.outcome == "dropped" and result.reason == "the summary model returned no text"
    assert state.summary == "first summary" and state.summarized == 1 and state.dropped == 1
    note = messages[2].content
    assert note.startswith(SUMMARY_PREFIX + "first summary") and "1 earlier iteration was dropped" in note


async def test_a_failing_summary_model_leaves_the_state_unchanged():
    def fail(request):
        raise lw.ModelTimeoutError("too slow")

    policy = SlidingWindow(keep_last=1)
    transcript = transcript_of(2)
    state = policy.start(head=2)
    plan = policy.plan(transcript, state)
    with pytest.raises(lw.ModelTimeoutError):
        await policy.fold(plan.fold, FunctionModel(fail), state)
    assert state == policy.start(head=2)
    # The loop's way out: drop them, and say why.
    result = policy.apply_drop(state, plan.fold, "summary call failed: ModelTimeoutError")
    assert result.reason == "summary call failed: ModelTimeoutError" and state.dropped == 1


def test_units_are_folded_once_each_oldest_first():
    policy = SlidingWindow(keep_last=1)
    transcript = transcript_of(3)
    state = policy.start(head=2)
    plan = policy.plan(transcript, state)
    assert [u.index for u in plan.fold] == [0, 1]
    with pytest.raises(ValueError, match="not the next one to fold"):
        policy.apply_summary(state, "s", plan.fold[1:])
    policy.apply_summary(state, "s", plan.fold)
    with pytest.raises(ValueError, match="not the next one to fold"):
        policy.apply_summary(state, "again", plan.fold)
    assert policy.plan(transcript, state).fold == ()


def test_max_context_tokens_evicts_more_but_keeps_the_last_iteration():
    big = "x" * 4_000  # ~1,000 tokens per tool result
    transcript = transcript_of(4, result=big)
    loose = SlidingWindow(keep_last=4)
    assert loose.plan(transcript, loose.start(head=2)).fold == ()
    # Each unit ~1,015 tokens, the head ~20, the summary budgeted at 300.
    capped = SlidingWindow(keep_last=4, max_context_tokens=2_500, summary_max_tokens=300)
    plan = capped.plan(transcript, capped.start(head=2))
    assert [u.index for u in plan.fold] == [0, 1]
    assert "over max_context_tokens=2,500" in plan.reason
    capped = SlidingWindow(keep_last=4, max_context_tokens=2_000, summary_max_tokens=300)
    assert [u.index for u in capped.plan(transcript, capped.start(head=2)).fold] == [0, 1, 2]
    tiny = SlidingWindow(keep_last=4, max_context_tokens=10)
    assert len(tiny.plan(transcript, tiny.start(head=2)).fold) == 3  # the last one always stays


def test_custom_token_estimator():
    transcript = transcript_of(4)
    policy = SlidingWindow(keep_last=4, max_context_tokens=1_000, token_estimator=lambda m: 200, summarize=False)
    # head 2x200 + note 40 + units of 400 each: only one unit fits under 1,000.
    assert len(policy.plan(transcript, policy.start(head=2)).fold) == 3


def test_full_context_keeps_everything():
    policy = FullContext()
    transcript = transcript_of(30)
    state = policy.start(head=2)
    assert policy.plan(transcript, state).fold == ()
    assert policy.messages(transcript, state) == transcript
    assert policy == FullContext() and repr(policy) == "FullContext()"


def test_state_round_trips_through_a_dict():
    policy = SlidingWindow(keep_last=1)
    transcript = transcript_of(3)
    state = policy.start(head=2)
    policy.apply_summary(state, "s", policy.plan(transcript, state).fold, usage=Usage(5, 6), cost_usd=0.1)
    again = ContextState.from_dict(state.to_dict())
    assert again == state
    assert policy.messages(transcript, again) == policy.messages(transcript, state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last=0"),
        ({"keep_last": -1}, "must be an int >= 1"),
        ({"keep_last": True}, "keep_last=True"),
        ({"keep_last": "2"}, "keep_last='2'"),
        ({"summarize": "yes"}, "summarize='yes'"),
        ({"summary_model": 3}, "must be a Model instance"),
        ({"summary_model": "gpt-4o-mini"}, "no provider prefix"),
        ({"summary_model": FunctionModel(lambda r: "s"), "summarize": False}, "summarize=False"),
        ({"max_context_tokens": 0}, "max_context_tokens=0"),
        ({"max_context_tokens": 1.5}, "max_context_tokens=1.5"),
        ({"summary_max_tokens": 5}, "summary_max_tokens=5"),
        ({"token_estimator": 3}, "token_estimator"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(lw.UserError, match=re.escape(message)):
        SlidingWindow(**kwargs)


def test_settings_are_keyword_only_after_keep_last_and_described():
    with pytest.raises(TypeError):
        SlidingWindow(2, False)  # type: ignore[misc]
    policy = SlidingWindow(3, summarize=False, max_context_tokens=8_000)
    assert policy.describe() == {
        "class": "SlidingWindow", "keep_last": 3, "summarize": False, "summary_model": None,
        "max_context_tokens": 8_000, "summary_max_tokens": 300,
    }
    assert repr(policy).startswith("SlidingWindow(keep_last=3, summarize=False")
    assert policy == SlidingWindow(3, summarize=False, max_context_tokens=8_000)


# -- properties over random transcripts -------------------------------------------------

# One iteration as the loop writes it: ("calls", n, nudges) an assistant message with n tool
# calls (n=0: text only) then its tool messages and nudges; ("empty", 0, 1) a nudge alone.
iterations = st.lists(
    st.one_of(
        st.tuples(st.just("calls"), st.integers(0, 3), st.integers(0, 2), st.integers(0, 3_000)),
        st.tuples(st.just("empty"), st.just(0), st.just(1), st.just(0)),
    ),
    min_size=0,
    max_size=25,
)


def grow(transcript: list[lw.Message], n: int, item) -> None:
    kind, calls, nudges, size = item
    if kind == "calls":
        tool_calls = tuple(ToolCall("t", {"i": n, "k": k}, f"id{n}-{k}") for k in range(calls))
        transcript.append(lw.Message("assistant", f"a{n}", tool_calls))
        transcript.extend(lw.Message("tool", "r" * size, tool_call_id=c.id) for c in tool_calls)
    transcript.extend(lw.Message("user", f"nudge {n}") for _ in range(nudges))


@settings(max_examples=300, deadline=None)
@given(
    head=st.lists(st.sampled_from(["system", "user"]), min_size=1, max_size=3),
    items=iterations,
    keep_last=st.integers(1, 4),
    summarize=st.booleans(),
    cap=st.one_of(st.none(), st.integers(1, 3_000)),
)
def test_window_properties_hold_for_random_transcripts(head, items, keep_last, summarize, cap):
    head_messages = [lw.Message(role, f"h{i}") for i, role in enumerate(head)]
    transcript = list(head_messages)
    policy = SlidingWindow(keep_last, summarize=summarize, max_context_tokens=cap)
    state = policy.start(head=len(transcript))
    folded: list[int] = []
    calls = 0
    for n, item in enumerate(items):
        grow(transcript, n, item)
        plan = policy.plan(transcript, state)
        if plan.fold:
            if summarize:
                request = policy.summary_request(state.summary, plan.fold)
                assert request.tools == []
                calls += 1
                result = policy.apply_summary(state, f"sum{calls}", plan.fold)
            else:
                result = policy.apply_drop(state, plan.fold, plan.reason)
            folded.extend(result.units)
        messages = policy.messages(transcript, state)
        # The head always stays, first and unchanged.
        assert messages[: len(head_messages)] == head_messages
        # A call and its results are never split.
        assert_calls_paired(messages[len(head_messages):])
        # The rest is a note (once anything was folded), then a verbatim suffix of whole units.
        rest = messages[len(head_messages):]
        if state.folded:
            assert rest[0].role == "system"
            rest = rest[1:]
        units = reference_units(transcript, len(head_messages))
        kept = units[state.folded:]
        assert rest == [m for u in kept for m in u]
        # The last keep_last units (at least the last one under a token cap) stay verbatim.
        assert len(kept) == min(len(units), keep_last) or (cap is not None and 1 <= len(kept) < keep_last)
        # Each unit leaves once, in order; a summary call per fold.
        assert folded == list(range(state.folded))
        assert calls == state.summary_calls
