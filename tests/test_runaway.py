from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import loopwise as lw
from loopwise._policies.runaway import RunawayDetector, canonical_call
from loopwise.models import FunctionModel, ModelResponse, ToolCall, Usage

ONLY_REPEATS = {"stale_iterations": None, "growth_factor": None}
ONLY_STALE = {"repeat_calls": None, "growth_factor": None}
ONLY_GROWTH = {"repeat_calls": None, "stale_iterations": None}


def drive(monitor, iterations):
    """Feed (calls, results, input_tokens, cost) tuples; return the verdicts, None included."""
    return [monitor.observe_iteration(calls, results, tokens, cost) for calls, results, tokens, cost in iterations]


def first_stop(verdicts) -> int | None:
    return next((i + 1 for i, v in enumerate(verdicts) if v is not None and v.action == "stop"), None)


# -- the seed's runaway loop ------------------------------------------------------------


def seed_loop(n: int, *, same_arguments: bool, same_results: bool, growth: float):
    """The seed's Saturday night: each loop "decided it needed more context", appended its
    output to the context and concluded there was more work to do."""
    tokens, cost = 1_200, 0.0003
    for i in range(n):
        arguments = {"id": "CUS-4821"} if same_arguments else {"id": "CUS-4821", "page": i}
        result = "3 tickets, last: 'where is my order'" if same_results else f"page {i}: 3 tickets"
        yield [ToolCall("get_customer_history", arguments, f"c{i}")], [result], int(tokens), cost
        tokens *= growth
        cost *= growth


@pytest.mark.parametrize(
    ("same_arguments", "same_results", "growth"),
    [
        (True, True, 1.0),     # the same call, the same answer, a window keeping tokens flat
        (True, True, 1.3),     # ... with a context that keeps growing
        (False, True, 1.0),    # new arguments every time, nothing new comes back
        (False, False, 2.0),   # new arguments, new text, the context doubling each loop
        (True, False, 1.0),    # the same call whose text changes (a timestamp): still a repeat
    ],
)
def test_the_seeds_never_done_loop_is_nudged_then_stopped_within_five_iterations(same_arguments, same_results, growth):
    monitor = RunawayDetector().start()
    verdicts = drive(monitor, seed_loop(12, same_arguments=same_arguments, same_results=same_results, growth=growth))
    stop = first_stop(verdicts)
    assert stop is not None and stop <= 5
    flagged = [v for v in verdicts[:stop] if v is not None]
    assert [v.action for v in flagged] == ["nudge", "stop"]
    assert flagged[0].iteration < flagged[1].iteration == stop


def test_nudge_names_what_is_repeated_and_asks_to_answer_or_change_approach():
    monitor = RunawayDetector().start()
    verdicts = drive(monitor, seed_loop(4, same_arguments=True, same_results=True, growth=1.0))
    assert verdicts[:2] == [None, None]
    nudge = verdicts[2]
    assert nudge.action == "nudge" and nudge.first_warning and nudge.signal == "repeated_call"
    assert nudge.message == 'get_customer_history was called 3 times with the same arguments {"id": "CUS-4821"}'
    assert "get_customer_history" in nudge.nudge and '{"id": "CUS-4821"}' in nudge.nudge
    assert "final answer" in nudge.nudge and "different approach" in nudge.nudge
    assert nudge.details == {"tool": "get_customer_history", "arguments": '{"id": "CUS-4821"}', "count": 3}
    stop = verdicts[3]
    assert stop.action == "stop" and not stop.first_warning
    assert stop.message.endswith("after a warning at iteration 3")
    assert monitor.warned_at == 3 and monitor.stopped


def test_a_model_that_changes_approach_after_the_nudge_is_not_stopped():
    monitor = RunawayDetector().start()
    verdicts = drive(monitor, seed_loop(3, same_arguments=True, same_results=True, growth=1.0))
    assert verdicts[2].action == "nudge"
    after = [monitor.observe_iteration([ToolCall("get_cached_history", {"id": "CUS-4821", "n": i})],
                                       [f"cached page {i}"], 1_500, 0.0003) for i in range(5)]
    assert after == [None] * 5
    # ... but going back to the call it was warned about stops the run.
    verdict = monitor.observe_iteration([ToolCall("get_customer_history", {"id": "CUS-4821"})], ["x"], 1_500, 0.0003)
    assert verdict.action == "stop" and verdict.signal == "repeated_call"


def test_after_the_stop_every_further_signal_still_says_stop():
    monitor = RunawayDetector().start()
    verdicts = drive(monitor, seed_loop(7, same_arguments=True, same_results=True, growth=1.0))
    assert [v.action for v in verdicts if v] == ["nudge", "stop", "stop", "stop", "stop"]


# -- healthy runs are never flagged -----------------------------------------------------


def test_a_healthy_triage_run_is_never_flagged():
    triage = [
        ([ToolCall("analyze_sentiment", {"text": "I've been waiting 3 weeks..."}, "a")], ["negative"]),
        ([ToolCall("get_customer_history", {"id": "CUS-4821"}, "b")], ["error: timed out after 5s; "
                                                                        "fallback get_cached_history used"]),
        ([ToolCall("get_cached_history", {"id": "CUS-4821"}, "c"),
          ToolCall("get_order", {"order": "ORD-77"}, "d")], ["3 orders, 1 late", "ORD-77: shipped 2024-05-02"]),
        ([ToolCall("generate_reply", {"sentiment": "negative", "history": 3, "context": "shipping"}, "e")],
         ["Dear customer, ..."]),
    ]
    monitor = RunawayDetector().start()
    tokens = 900
    for calls, results in triage:
        assert monitor.observe_iteration(calls, results, tokens, tokens * 0.15e-6) is None
        tokens += sum(len(r) for r in results) // 4 + 60


@settings(max_examples=300, deadline=None)
@given(
    head=st.integers(200, 5_000),
    sizes=st.lists(st.lists(st.floats(0, 1), min_size=1, max_size=4), min_size=1, max_size=30),
    windowed=st.booleans(),
    price=st.floats(0, 20e-6),
)
def test_distinct_calls_with_distinct_results_never_trigger(head, sizes, windowed, price):
    """A healthy run: every call new, every result new, and a context that grows by
    appending results no bigger than the prompt (or stays flat under a window)."""
    monitor = RunawayDetector().start()
    tokens = head
    for i, iteration in enumerate(sizes):
        calls = [ToolCall(f"tool{k}", {"i": i}, f"c{i}-{k}") for k in range(len(iteration))]
        results = [f"result {i}/{k}" for k in range(len(iteration))]
        assert monitor.observe_iteration(calls, results, tokens, tokens * price) is None
        added = int(head * sum(iteration) / len(iteration))
        tokens = head + added if windowed else tokens + added


@given(k=st.integers(2, 6), n=st.integers(1, 30))
def test_repeats_below_the_threshold_never_trigger(k, n):
    """Each distinct call made k-1 times, interleaved, with fresh results: never flagged."""
    monitor = RunawayDetector(repeat_calls=k).start()
    for round_ in range(k - 1):
        for i in range(n):
            call = ToolCall("lookup", {"i": i})
            assert monitor.observe_iteration([call], [f"{round_}/{i}"], 1_000, 0.0) is None


# -- each signal on its own -------------------------------------------------------------


def test_repeated_call_counts_across_the_run_not_only_in_a_row():
    monitor = RunawayDetector(**ONLY_REPEATS).start()
    target = ToolCall("search", {"q": "refund policy", "lang": "en"})
    other = [ToolCall("other", {"i": i}) for i in range(3)]
    assert monitor.observe_iteration([target], ["a"], 0, 0.0) is None
    assert monitor.observe_iteration([other[0]], ["b"], 0, 0.0) is None
    # The same call with keys reordered, sent as a JSON string: the same call.
    same = ToolCall("search", '{"lang": "en", "q": "refund policy"}', "x")
    assert monitor.observe_iteration([same, other[1]], ["c", "d"], 0, 0.0) is None
    verdict = monitor.observe_iteration([other[2], target], ["e", "f"], 0, 0.0)
    assert verdict.signal == "repeated_call" and verdict.details["count"] == 3


def test_repeated_call_within_one_response():
    monitor = RunawayDetector(**ONLY_REPEATS).start()
    calls = [ToolCall("ping", {}, f"c{i}") for i in range(3)]
    assert monitor.observe_iteration(calls, ["1", "2", "3"], 0, 0.0).signal == "repeated_call"


def test_canonical_call_ignores_key_order_and_keeps_malformed_json():
    assert canonical_call(ToolCall("f", {"b": 1, "a": [1, 2]})) == canonical_call(ToolCall("f", '{"a":[1,2],"b":1}'))
    assert canonical_call(ToolCall("f", {"a": 1})) != canonical_call(ToolCall("g", {"a": 1}))
    assert canonical_call(ToolCall("f", '{"a": 1')) == '["f","{\\"a\\": 1"]'


@pytest.mark.parametrize("size", [1, 64, 65, 20_000])
def test_repeats_are_told_apart_the_same_for_short_and_long_texts(size):
    """Short texts are remembered as they are, long ones by digest: both repeat and differ alike."""
    repeats = RunawayDetector(**ONLY_REPEATS).start()
    arguments = {"q": "x" * size}
    verdicts = drive(repeats, [([ToolCall("f", arguments, f"c{i}")], [str(i)], 0, 0.0) for i in range(3)])
    assert verdicts[2] is not None and verdicts[2].signal == "repeated_call"
    other = RunawayDetector(**ONLY_REPEATS).start()
    # Texts that differ only in their last character are different calls.
    varied = [([ToolCall("f", {"q": "x" * (size - 1) + str(i)}, f"c{i}")], [str(i)], 0, 0.0) for i in range(5)]
    assert drive(other, varied) == [None] * 5
    stale = RunawayDetector(**ONLY_STALE).start()
    result = "r" * size
    verdicts = drive(stale, [([ToolCall("f", {"i": i}, f"c{i}")], [result], 0, 0.0) for i in range(4)])
    assert verdicts[3] is not None and verdicts[3].signal == "no_new_information"
    fresh = RunawayDetector(**ONLY_STALE).start()
    assert drive(fresh, [([ToolCall("f", {"i": i}, f"c{i}")], ["r" * (size - 1) + str(i)], 0, 0.0)
                         for i in range(5)]) == [None] * 5


def test_a_call_that_contains_itself_fails_alone_and_the_next_call_is_encoded_as_before():
    looped: dict = {"a": 1}
    looped["self"] = looped
    with pytest.raises(RecursionError):
        canonical_call(ToolCall("f", looped))
    # The one encoder is reused: nothing of the failed call is left in it.
    assert canonical_call(ToolCall("f", {"b": {"c": [1]}, "a": looped["a"]})) == '["f",{"a":1,"b":{"c":[1]}}]'


def test_no_new_information_across_iterations():
    monitor = RunawayDetector(**ONLY_STALE).start()
    assert monitor.observe_iteration([ToolCall("a", {"p": 0})], ["same"], 0, 0.0) is None  # new
    assert monitor.observe_iteration([ToolCall("a", {"p": 1})], ["same"], 0, 0.0) is None  # stale 1
    assert monitor.observe_iteration([ToolCall("a", {"p": 2})], ["same"], 0, 0.0) is None  # stale 2
    verdict = monitor.observe_iteration([ToolCall("a", {"p": 3})], ["same"], 0, 0.0)       # stale 3
    assert verdict.signal == "no_new_information" and verdict.action == "nudge"
    assert verdict.details == {"streak": 3}
    assert "no new information" in verdict.nudge


def test_one_new_result_resets_the_stale_streak():
    monitor = RunawayDetector(**ONLY_STALE).start()
    results = ["x", "x", "x", "y", "x", "x", "z", "x"]
    assert all(monitor.observe_iteration([ToolCall("a", {"i": i})], [r], 0, 0.0) is None
               for i, r in enumerate(results))


def test_iterations_without_tool_results_bring_nothing_new():
    monitor = RunawayDetector(**ONLY_STALE).start()
    verdicts = [monitor.observe_iteration([], [], 0, 0.0) for _ in range(3)]
    assert verdicts[:2] == [None, None] and verdicts[2].signal == "no_new_information"


def test_fast_context_growth():
    monitor = RunawayDetector(**ONLY_GROWTH).start()
    verdicts = [monitor.observe_iteration([], [], t, 0.0) for t in (1_000, 1_500, 2_300, 3_500, 5_300)]
    assert verdicts[:3] == [None, None, None]
    assert verdicts[3].signal == "context_growth" and verdicts[3].action == "nudge"
    assert verdicts[3].details["series"] == [1_000, 1_500, 2_300, 3_500]
    assert "1,000 -> 1,500 -> 2,300 -> 3,500" in verdicts[3].message
    assert verdicts[4].action == "stop"


@given(head=st.integers(1, 10_000), added=st.integers(0, 50_000), n=st.integers(1, 40))
def test_linear_growth_never_trips_the_growth_signal(head, added, n):
    """Appending the same amount each iteration (the naive loop of a healthy agent)."""
    monitor = RunawayDetector(**ONLY_GROWTH).start()
    assert all(monitor.observe_iteration([], [], head + i * added, 0.0) is None for i in range(n))


def test_small_contexts_and_tiny_costs_do_not_count_as_growth():
    monitor = RunawayDetector(**ONLY_GROWTH).start()
    assert all(monitor.observe_iteration([], [], t, 0.0) is None for t in (50, 100, 200, 400, 800))
    monitor = RunawayDetector(**ONLY_GROWTH).start()
    assert all(monitor.observe_iteration([], [], 0, c) is None for c in (0.0001, 0.0002, 0.0004, 0.0008))


def test_fast_cost_growth():
    monitor = RunawayDetector(**ONLY_GROWTH).start()
    verdicts = [monitor.observe_iteration([], [], 0, c) for c in (0.01, 0.02, 0.04, 0.08)]
    assert verdicts[3].signal == "context_growth" and verdicts[3].details["measure"] == "cost_usd"
    assert "$0.0100 -> $0.0200 -> $0.0400 -> $0.0800" in verdicts[3].message


def test_a_dip_resets_the_growth_streak():
    monitor = RunawayDetector(**ONLY_GROWTH).start()
    series = (1_000, 1_600, 2_600, 2_000, 3_000, 4_600, 1_000)
    assert all(monitor.observe_iteration([], [], t, 0.0) is None for t in series)


def test_several_signals_at_once_name_the_first_and_list_the_others():
    monitor = RunawayDetector(growth_factor=None).start()
    verdicts = drive(monitor, seed_loop(4, same_arguments=True, same_results=True, growth=1.0))
    assert verdicts[3].signal == "repeated_call" and verdicts[3].details["also"] == ["no_new_information"]


# -- settings ---------------------------------------------------------------------------


def test_disabled_detector_never_flags():
    monitor = RunawayDetector(enabled=False).start()
    assert drive(monitor, seed_loop(20, same_arguments=True, same_results=True, growth=2.0)) == [None] * 20
    assert monitor.iterations == 20


def test_each_run_gets_its_own_monitor():
    detector = RunawayDetector()
    one, two = detector.start(), detector.start()
    drive(one, seed_loop(3, same_arguments=True, same_results=True, growth=1.0))
    assert one.warned_at == 3 and two.warned_at is None
    assert drive(two, seed_loop(2, same_arguments=True, same_results=True, growth=1.0)) == [None, None]


def test_defaults_and_description():
    detector = RunawayDetector()
    assert detector.to_dict() == {
        "repeat_calls": 3, "stale_iterations": 3, "growth_factor": 1.5, "growth_iterations": 3,
        "growth_min_tokens": 1_000, "growth_min_cost_usd": 0.01, "enabled": True,
    }
    assert repr(detector).startswith("RunawayDetector(repeat_calls=3, ")
    assert detector == RunawayDetector() and detector != RunawayDetector(repeat_calls=4)
    with pytest.raises(TypeError):
        RunawayDetector(3)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeat_calls": 1}, "repeat_calls=1"),
        ({"repeat_calls": True}, "repeat_calls=True"),
        ({"repeat_calls": 2.5}, "must be an int >= 2"),
        ({"stale_iterations": 0}, "stale_iterations=0"),
        ({"growth_factor": 1.0}, "growth_factor=1.0"),
        ({"growth_factor": float("nan")}, "must be a number > 1"),
        ({"growth_factor": float("inf")}, "growth_factor=inf"),
        ({"growth_factor": "2"}, "growth_factor='2'"),
        ({"growth_iterations": 0}, "growth_iterations=0"),
        ({"growth_min_tokens": -1}, "growth_min_tokens=-1"),
        ({"growth_min_cost_usd": -0.5}, "growth_min_cost_usd=-0.5"),
        ({"enabled": 1}, "enabled=1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(lw.UserError, match=re.escape(message)):
        RunawayDetector(**kwargs)


def test_a_python_model_sending_keys_that_do_not_sort_does_not_end_the_run_in_error():
    @lw.tool
    def look(x: int) -> str:
        """Look."""
        return "seen"

    script = iter([[ToolCall("look", {"x": 1, None: "extra"})], [ToolCall("look", {"x": 2, 7: "extra"})], []])

    async def model(request):
        calls = next(script)
        return ModelResponse(text=None if calls else "done", tool_calls=calls, usage=Usage(1, 1))

    result = lw.Agent(FunctionModel(model), tools=[look], store=lw.MemoryStore()).run_sync("go")
    assert (result.stop_reason, result.output) == ("done", "done")


def test_the_same_arguments_with_keys_that_do_not_sort_are_a_repeated_call():
    """Such arguments reach the monitor as their JSON text (the loop's edge makes it): repeats still count."""

    @lw.tool
    def look(x: int) -> str:
        """Look."""
        return "seen"

    async def model(request):
        return ModelResponse(tool_calls=[ToolCall("look", {"x": 1, None: "extra"})], usage=Usage(1, 1))

    agent = lw.Agent(FunctionModel(model), tools=[look], store=lw.MemoryStore(),
                     runaway=RunawayDetector(**ONLY_REPEATS))
    result = agent.run_sync("go")
    assert result.stop_reason == "runaway"
