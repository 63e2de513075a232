"""Tools that fail well: timeouts, retries, fallbacks, breakers, truncation, redaction.

Timing is asserted from event timestamps or with generous bounds, never tightly. Tests of
loopwise's own timeouts and backoff run under a `FakeClock` (`clock=FakeClock()`): the
waits take no real time, and what the attempts report is exact fake time.
"""

from __future__ import annotations

import asyncio
import json
import time

import anyio
import pytest

import loopwise as lw
from loopwise.models import ScriptedModel, ToolCall
from loopwise.testing import FakeClock

from .test_loop import assert_valid_log


def run(tools, calls, *, store=None, **agent_kw):
    """One run whose model asks for `calls` in one response, then answers."""
    store = store or lw.MemoryStore()
    agent = lw.Agent(ScriptedModel([calls, "done"]), tools=tools, store=store, **agent_kw)
    result = agent.run_sync("go")
    events = store.load(result.run_id)
    assert_valid_log(events)
    return result, events


def finished(events, name=None):
    return [e for e in events if e.kind == "tool_call_finished" and (name is None or e.name == name)]


def of_kind(events, kind):
    return [e for e in events if e.kind == kind]


async def _hang(**_):
    await anyio.sleep_forever()


def test_timeout_then_fallback_tool_says_why():
    @lw.tool
    async def get_cached_history(customer_id: str) -> dict:
        """Cheaper, staler history."""
        return {"customer_id": customer_id, "orders": 3, "as_of": "yesterday"}

    @lw.tool(timeout=0.2, fallback=get_cached_history)
    async def get_customer_history(customer_id: str) -> dict:
        """Live history."""
        await anyio.sleep(30)
        return {}

    clock = FakeClock()
    result, events = run([get_customer_history, get_cached_history],
                         [ToolCall("get_customer_history", {"customer_id": "CUS-4821"})], clock=clock)
    (done,) = finished(events)
    assert done.outcome == "fallback" and done.fallback == "get_cached_history" and done.attempts == 1
    assert done.content.startswith(
        "get_customer_history timed out after 0.2 s; answered from get_cached_history: "
    )
    assert '"as_of":"yesterday"' in done.content
    assert done.latency_s < 5
    (attempt,) = of_kind(events, "tool_attempt_failed")
    assert attempt.error.type == "TimeoutError" and attempt.retry_in_s is None
    assert attempt.latency_s == pytest.approx(0.2) and clock.monotonic() == pytest.approx(0.2)
    (fb,) = of_kind(events, "tool_fallback")
    assert fb.ok and fb.fallback == "get_cached_history"


def test_flaky_tool_succeeds_on_the_third_attempt():
    calls = []

    @lw.tool(retries=2, backoff=lw.Backoff(initial_s=10, max_s=20))
    async def flaky() -> str:
        """Fails twice."""
        calls.append(clock.monotonic())
        if len(calls) < 3:
            raise lw.ToolRetry(f"not yet ({len(calls)})")
        return "finally"

    clock = FakeClock()
    _, events = run([flaky], [ToolCall("flaky", {})], clock=clock)
    (done,) = finished(events)
    assert (done.outcome, done.content, done.attempts) == ("ok", "finally", 3)
    attempts = of_kind(events, "tool_attempt_failed")
    assert [a.attempt for a in attempts] == [1, 2]
    assert 0 <= attempts[0].retry_in_s <= 10 and 0 <= attempts[1].retry_in_s <= 20
    # Each attempt started after the wait before it (fake seconds: no real 30 s wait).
    assert calls == pytest.approx([0, attempts[0].retry_in_s, attempts[0].retry_in_s + attempts[1].retry_in_s])
    assert attempts[0].error.message == "not yet (1)"


def test_retry_on_narrows_what_is_retried():
    calls = []

    @lw.tool(retries=3, retry_on=ConnectionError, backoff=lw.Backoff(initial_s=0))
    def strict(x: int) -> str:
        """Raises ValueError: not worth retrying."""
        calls.append(x)
        raise ValueError("bad input")

    _, events = run([strict], [ToolCall("strict", {"x": 1})])
    assert len(calls) == 1
    (done,) = finished(events)
    assert done.outcome == "error" and done.attempts == 1
    body = json.loads(done.content)["error"]
    assert body["type"] == "ValueError" and body["attempts"] == 1
    assert body["message"] == "strict raised ValueError: bad input"


def test_a_fallback_chain_is_tried_in_order():
    def broken_cache(customer_id: str) -> str:
        raise KeyError(customer_id)

    @lw.tool(timeout=0.1, fallback=[broken_cache, lw.Template("no history for {customer_id} right now")])
    async def history(customer_id: str) -> str:
        """Live history."""
        await anyio.sleep(10)
        return ""

    _, events = run([history], [ToolCall("history", {"customer_id": "CUS-1"})], clock=FakeClock())
    (done,) = finished(events)
    assert done.outcome == "fallback" and done.fallback == "a template"
    assert done.content == (
        "history timed out after 0.1 s; fallback broken_cache raised KeyError: 'CUS-1'; "
        "answered from a template: no history for CUS-1 right now"
    )
    tried = of_kind(events, "tool_fallback")
    assert [(t.fallback, t.ok) for t in tried] == [("broken_cache", False), ("a template", True)]


def test_plain_value_fallback():
    @lw.tool(timeout=0.1, fallback="neutral")
    async def analyze_sentiment(text: str) -> str:
        """Sentiment."""
        await anyio.sleep(10)
        return "negative"

    _, events = run([analyze_sentiment], [ToolCall("analyze_sentiment", {"text": "hi"})], clock=FakeClock())
    assert finished(events)[0].content.endswith("answered from a default value: neutral")


def test_failure_without_fallback_is_a_structured_error_with_alternatives():
    @lw.tool(alternatives=["get_cached_history"], secret=["api_key"])
    async def get_customer_history(customer_id: str, api_key: str) -> str:
        """Live history."""
        raise PermissionError(f"key {api_key} rejected for {customer_id}")

    _, events = run([get_customer_history],
                    [ToolCall("get_customer_history", {"customer_id": "C1", "api_key": "sk-very-secret"})])
    (done,) = finished(events)
    body = json.loads(done.content)["error"]
    assert body == {
        "tool": "get_customer_history",
        "type": "PermissionError",
        "message": "get_customer_history raised PermissionError: key [redacted] rejected for C1",
        "attempts": 1,
        "alternatives": ["get_cached_history"],
    }
    assert "sk-very-secret" not in done.content
    assert "sk-very-secret" not in of_kind(events, "tool_attempt_failed")[0].error.message


def test_total_timeout_bounds_attempts_backoff_and_fallbacks():
    async def slow_fallback(q: str) -> str:
        await anyio.sleep(30)
        return "late"

    @lw.tool(timeout=0.2, retries=5, total_timeout=0.6, backoff=lw.Backoff(initial_s=0.05), fallback=slow_fallback)
    async def search(q: str) -> str:
        """Hangs."""
        await anyio.sleep(30)
        return ""

    clock = FakeClock()
    _, events = run([search], [ToolCall("search", {"q": "x"})], clock=clock)
    assert clock.monotonic() == pytest.approx(0.6)  # the point: the whole call took its 0.6 s, not 30 s
    (done,) = finished(events)
    assert done.outcome == "error"
    assert "total_timeout of 0.6 s" in json.loads(done.content)["error"]["message"]


def _late_hang_tool(**policy):
    """A tool whose every attempt hangs, and ends 60 ms after its timeout (a blocking cleanup):
    what a busy event loop's late timers do to a run."""
    attempts: list[float] = []

    @lw.tool(timeout=0.2, retries=1, backoff=lw.Backoff(initial_s=0.05, jitter=False), **policy)
    async def lookup(q: str) -> str:
        """Hangs."""
        attempts.append(time.monotonic())
        try:
            await anyio.sleep(30)
        finally:
            time.sleep(0.06)  # noqa: ASYNC251 - the point: this attempt ends late
        return ""

    return lookup, attempts


def test_late_timers_do_not_shorten_the_last_attempt_under_a_derived_total_timeout():
    lookup, attempts = _late_hang_tool()
    _, events = run([lookup], [ToolCall("lookup", {"q": "x"})])
    failed = of_kind(events, "tool_attempt_failed")
    assert [f.error.message for f in failed] == ["lookup timed out after 0.2 s"] * 2
    assert len(attempts) == 2
    # The second attempt had its whole timeout (ended late too), not what the derived total left.
    assert failed[1].latency_s >= 0.2
    (done,) = finished(events)
    assert json.loads(done.content)["error"]["message"] == "lookup timed out after 0.2 s"


def test_late_attempts_do_not_shorten_a_fallback_under_a_derived_total_timeout():
    @lw.tool(timeout=0.2)
    async def stale_copy(q: str) -> str:
        """Hangs too."""
        await anyio.sleep(30)
        return ""

    @lw.tool(timeout=0.2, fallback=stale_copy)
    async def lookup(q: str) -> str:
        """Hangs, and its attempt ends 60 ms after its timeout."""
        try:
            await anyio.sleep(30)
        finally:
            time.sleep(0.06)  # noqa: ASYNC251 - the point: this attempt ends late
        return ""

    _, events = run([lookup, stale_copy], [ToolCall("lookup", {"q": "x"})])
    (fallback,) = of_kind(events, "tool_fallback")
    # The fallback had its own 0.2 s (and timed out), not the 0.14 s the late attempt left of the 0.4 s.
    assert not fallback.ok and fallback.reason.endswith("failed too (TimeoutError)"), fallback.reason


def test_a_total_timeout_given_still_cuts_the_last_attempt_short():
    lookup, attempts = _late_hang_tool(total_timeout=0.45)
    _, events = run([lookup], [ToolCall("lookup", {"q": "x"})])
    failed = of_kind(events, "tool_attempt_failed")
    assert len(attempts) == 2 and failed[0].error.message == "lookup timed out after 0.2 s"
    assert failed[1].error.message == "lookup ran out of its total_timeout of 0.45 s after 2 attempts"
    assert failed[1].latency_s < 0.2 + 0.06 + 0.5  # cut: what the 0.45 s left, and the late cleanup


def test_derived_total_timeout():
    @lw.tool
    async def cached(q: str) -> str:
        return q

    @lw.tool(timeout=2, retries=1, backoff=lw.Backoff(initial_s=0.5), fallback=[cached, "x"])
    async def live(q: str) -> str:
        return q

    # two attempts of 2 s, one wait of at most 0.5 s, and the fallback tool's own 30 s
    assert live.policy.total_timeout == pytest.approx(2 * 2 + 0.5 + 30)
    def unbounded() -> int:
        return 1

    assert lw.tool(timeout=None)(unbounded).policy.total_timeout is None


def test_breaker_opens_and_the_tool_stops_being_called():
    calls = []
    breaker = lw.CircuitBreaker(failures=3, window_s=60, cooldown_s=60)

    @lw.tool(breaker=breaker, fallback="unavailable")
    async def missing_tool() -> str:
        """Always fails: its backend is gone (a business error would not count: test_breaker.py)."""
        calls.append(1)
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    store = lw.MemoryStore()
    agent = lw.Agent(ScriptedModel([[ToolCall("missing_tool", {})]] * 8 + ["gave up"]), tools=[missing_tool],
                     store=store, limits=lw.Limits(max_iterations=9))
    result = agent.run_sync("keep trying")
    assert len(calls) == 3  # then the breaker is open: 5 more calls never reach the tool
    events = store.load(result.run_id)
    changes = of_kind(events, "breaker_changed")
    assert [(c.old, c.new) for c in changes] == [("closed", "open")]
    skipped = finished(events)[3:]
    assert all(e.attempts == 0 and e.outcome == "fallback" for e in skipped)
    assert "missing_tool was not called: its circuit breaker has been open since" in skipped[0].content


def test_breaker_half_open_probe_closes_it():
    now = [0.0]
    breaker = lw.CircuitBreaker(failures=2, window_s=10, cooldown_s=5, clock=lambda: now[0])
    assert breaker.on_failure("t") is None
    assert breaker.on_failure("t").new == "open"
    with pytest.raises(lw.CircuitOpenError):
        breaker.before_call("t")
    now[0] = 6.0
    assert breaker.before_call("t").new == "half_open"
    with pytest.raises(lw.CircuitOpenError, match="probe call is in flight"):
        breaker.before_call("t")
    assert breaker.on_success("t").new == "closed"
    # failures outside the window do not add up
    breaker.on_failure("t")
    now[0] = 20.0
    assert breaker.on_failure("t") is None and breaker.state == "closed"


def test_breaker_probe_failure_reopens():
    now = [0.0]
    breaker = lw.CircuitBreaker(failures=1, window_s=10, cooldown_s=5, clock=lambda: now[0])
    breaker.on_failure("t")
    now[0] = 5.5
    breaker.before_call("t")
    change = breaker.on_failure("t")
    assert (change.old, change.new) == ("half_open", "open")


def test_big_results_are_truncated_with_a_note():
    @lw.tool(max_result_chars=1000)
    async def dump() -> str:
        """Ten megabytes, in the seed's words a cost spiral in one step."""
        return "x" * 10_000_000

    _, events = run([dump], [ToolCall("dump", {})])
    content = finished(events)[0].content
    assert len(content) < 1200
    assert "the result had 10,000,000 characters; the first 1,000 are shown" in content


def test_default_truncation_is_20000():
    @lw.tool
    async def big() -> str:
        return "y" * 50_000

    assert big.policy.max_result_chars == 20_000


def test_tool_cost_is_counted_per_attempt():
    @lw.tool(cost_usd=0.01, retries=1, backoff=lw.Backoff(initial_s=0))
    async def paid(x: int) -> str:
        """A paid API that fails once."""
        if x == 1:
            raise lw.ToolRetry("rate limited")
        return "ok"

    result, events = run([paid], [ToolCall("paid", {"x": 1}), ToolCall("paid", {"x": 2})])
    assert [e.cost_usd for e in sorted(finished(events), key=lambda e: e.call_id)] == [0.02, 0.01]
    assert result.cost_usd == pytest.approx(0.03)


def test_two_slow_tools_overlap_in_the_log():
    @lw.tool
    async def slow_a() -> str:
        await anyio.sleep(0.3)
        return "a"

    @lw.tool
    async def slow_b() -> str:
        await anyio.sleep(0.3)
        return "b"

    clock = FakeClock()
    _, events = run([slow_a, slow_b], [ToolCall("slow_a", {}), ToolCall("slow_b", {})], clock=clock)
    assert clock.monotonic() == pytest.approx(0.3)  # together: 0.3 s, not 0.6 s
    start = {e.name: e.ts for e in events if e.kind == "tool_call_started"}
    end = {e.name: e.ts for e in events if e.kind == "tool_call_finished"}
    assert start["slow_a"] < end["slow_b"] and start["slow_b"] < end["slow_a"]


def test_max_parallel_tools_bounds_concurrency():
    running = []
    peak = []

    @lw.tool
    async def work(i: int) -> int:
        running.append(i)
        peak.append(len(running))
        await asyncio.sleep(0.05)
        running.remove(i)
        return i

    clock = FakeClock()
    _, events = run([work], [ToolCall("work", {"i": i}) for i in range(7)], max_parallel_tools=2, clock=clock)
    assert max(peak) == 2
    assert clock.monotonic() == pytest.approx(0.2)  # four rounds of 0.05 s: two at a time
    assert sorted(int(e.content) for e in finished(events)) == list(range(7))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout=0 must be a number of seconds > 0"),
        ({"retries": -1}, "retries=-1 must be an int >= 0"),
        ({"retry_on": "ValueError"}, "must be exception types"),
        ({"fallback": []}, "fallback=\\[\\] is empty"),
        ({"fallback": object()}, "neither a JSON-able value"),
        ({"cost_usd": -1}, "cost_usd=-1 must be a finite number >= 0"),
        ({"max_result_chars": 5}, "must be an int >= 100"),
        ({"isolation": "vm"}, "isolation='vm' must be"),
        ({"breaker": 3}, "breaker= must be True, False or"),
        ({"tiemout": 3}, "unknown option"),
    ],
)
def test_bad_policy_options(options, message):
    with pytest.raises(lw.UserError, match=message):
        def f(x: int) -> int:
            return x

        lw.tool(**options)(f)


def test_template_fills_from_arguments():
    t = lw.Template("no history for {customer_id} ({missing})")
    assert t.render({"customer_id": "C1"}) == "no history for C1 ({missing})"
    with pytest.raises(lw.UserError, match="not a valid format string"):
        lw.Template("{unclosed")


def test_a_hung_sync_tool_is_abandoned_and_the_run_moves_on():
    import threading

    release = threading.Event()

    @lw.tool(timeout=0.3, fallback="no answer")
    def blocking_lookup(q: str) -> str:
        """A sync tool stuck in a C call / socket read."""
        release.wait(60)
        return "late"

    started = time.monotonic()
    try:
        _, events = run([blocking_lookup], [ToolCall("blocking_lookup", {"q": "x"})])
    finally:
        release.set()
    assert time.monotonic() - started < 10
    (done,) = finished(events)
    assert done.outcome == "fallback" and done.latency_s < 5
    (abandoned,) = of_kind(events, "thread_abandoned")
    assert abandoned.name == "blocking_lookup" and abandoned.thread


def test_a_process_that_hangs_is_killed_and_the_process_exits_promptly(tmp_path):
    """A 60 s sync tool under timeout=0.5 in a real process: the run ends, then the process exits."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "agent_script.py"
    script.write_text(textwrap.dedent("""
        import time
        import loopwise as lw
        from loopwise.models import ScriptedModel, ToolCall

        @lw.tool(timeout=0.5)
        def slow() -> str:
            time.sleep(60)
            return "late"

        agent = lw.Agent(ScriptedModel([ToolCall("slow", {}), "done"]), tools=[slow], store=lw.MemoryStore())
        result = agent.run_sync("go")
        print(result.stop_reason, result.iterations)
    """))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["done", "2"]
    assert time.monotonic() - started < 30  # not 60: the abandoned daemon thread does not hold the exit


def test_process_isolation_kills_a_hung_tool():
    from .isolation_helpers import sleep_then_return

    slow = lw.tool(timeout=0.5, isolation="process", name="slow")(sleep_then_return)
    started = time.monotonic()
    _, events = run([slow], [ToolCall("slow", {"seconds": 60, "value": "late"})])
    assert time.monotonic() - started < 20
    (done,) = finished(events)
    assert done.outcome == "error" and "timed out after 0.5 s" in done.content


def test_an_async_tool_that_ignores_cancellation_for_a_while_delays_only_itself():
    @lw.tool(timeout=0.2)
    async def stubborn() -> str:
        """Shields its cleanup from cancellation for 0.5 s."""
        try:
            await anyio.sleep(30)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.5)
        return "never"

    @lw.tool
    async def quick() -> str:
        return "ok"

    _, events = run([stubborn, quick], [ToolCall("stubborn", {}), ToolCall("quick", {})])
    by_name = {e.name: e for e in finished(events)}
    assert by_name["quick"].outcome == "ok"
    assert by_name["stubborn"].outcome == "error"
    assert 0.6 <= by_name["stubborn"].latency_s < 10  # its timeout, plus the cleanup it shielded


@pytest.mark.parametrize("bad", ["async", "ctx"])
def test_process_isolation_misuse_is_a_user_error(bad):
    if bad == "async":
        async def f() -> None: ...
        match = "isolation='process' is for sync functions"
    else:
        def f(ctx: lw.RunContext) -> None: ...
        match = "cannot take a RunContext"
    with pytest.raises(lw.UserError, match=match):
        lw.tool(isolation="process")(f)
