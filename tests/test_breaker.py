"""Circuit breakers count infrastructure failures, not a tool's business errors.

Real failures where they can be had: a connection to a closed port on 127.0.0.1, a
timeout of a tool that hangs. The clock is injected where a cooldown must pass.
"""

from __future__ import annotations

import errno
import socket
import urllib.error

import anyio
import pytest

import loopwise as lw
from loopwise._tools.infra_errors import is_infrastructure
from loopwise.models import ScriptedModel, ToolCall

from .test_loop import assert_valid_log


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


def _one_call(tool: lw.Tool, store: lw.MemoryStore, call: ToolCall, run_id: str):
    """One run (an agent of its own, as each ticket of a batch) whose model makes `call`."""
    agent = lw.Agent(ScriptedModel([[call], "done"]), tools=[tool], store=store)
    result = agent.run_sync("go", run_id=run_id)
    events = store.load(result.run_id)
    assert_valid_log(events)
    return events


def _kinds(events, kind):
    return [e for e in events if e.kind == kind]


def test_a_business_error_never_opens_the_breaker():
    """The 30-ticket batch: refunds over the limit rightly fail, and the tool stays callable."""
    calls = []

    @lw.tool(breaker=lw.CircuitBreaker(failures=3, window_s=60, cooldown_s=60))
    def refund(order_id: str, amount: float) -> str:
        """Refund an order, up to $100."""
        calls.append(order_id)
        if amount > 100:
            raise ValueError(f"refund of ${amount:.2f} is over the $100 limit; escalate to a human")
        return f"refunded ${amount:.2f} on {order_id}"

    store = lw.MemoryStore()
    outcomes = []
    for i in range(30):
        amount = 250.0 if i % 3 else 40.0  # two of three over the limit
        events = _one_call(refund, store, ToolCall("refund", {"order_id": f"T{i}", "amount": amount}), f"ticket-{i}")
        assert not _kinds(events, "breaker_changed")
        outcomes.append(_kinds(events, "tool_call_finished")[0])
    assert len(calls) == 30  # every ticket reached the tool
    assert all(e.attempts == 1 for e in outcomes)
    assert sum(e.outcome == "error" for e in outcomes) == 20
    assert all("CircuitOpenError" not in e.content for e in outcomes)
    assert refund.policy.breaker.state == "closed"


def test_connection_errors_open_it_and_the_message_says_which_tool_since_when_why_and_when_again():
    port = _closed_port()
    calls = []

    @lw.tool(breaker=lw.CircuitBreaker(failures=3, window_s=60, cooldown_s=60))
    def live_status(service: str) -> str:
        """The live status of a service, from its status endpoint."""
        calls.append(service)
        socket.create_connection(("127.0.0.1", port), timeout=30).close()
        return "up"

    store = lw.MemoryStore()
    for i in range(3):
        events = _one_call(live_status, store, ToolCall("live_status", {"service": "db"}), f"r{i}")
        assert "ConnectionRefusedError" in _kinds(events, "tool_call_finished")[0].content
    changes = _kinds(events, "breaker_changed")
    assert [(c.old, c.new) for c in changes] == [("closed", "open")]
    assert "the last: ConnectionRefusedError" in changes[0].reason
    events = _one_call(live_status, store, ToolCall("live_status", {"service": "db"}), "r3")
    assert len(calls) == 3  # the fourth never reached the tool
    done = _kinds(events, "tool_call_finished")[0]
    assert done.attempts == 0 and done.error.type == "CircuitOpenError"
    assert done.content.count("live_status") == 2  # the JSON's "tool" field, and the message once
    message = done.error.message
    assert message.startswith("live_status was not called: its circuit breaker has been open since ")
    assert "after 3 failures within 60 s (the last: ConnectionRefusedError)" in message
    assert "it will be tried again in " in message
    assert message.count("live_status") == 1


def test_a_timeout_counts():
    @lw.tool(timeout=0.05, breaker=lw.CircuitBreaker(failures=2, window_s=600, cooldown_s=600))
    async def hangs() -> str:
        """Never answers."""
        await anyio.sleep_forever()

    store = lw.MemoryStore()
    _one_call(hangs, store, ToolCall("hangs", {}), "t0")
    events = _one_call(hangs, store, ToolCall("hangs", {}), "t1")
    (change,) = _kinds(events, "breaker_changed")
    assert change.new == "open" and "the last: a timeout" in change.reason


@pytest.mark.parametrize("how", ["ToolRetry", "retry_on", "failure_on type", "failure_on predicate"])
def test_what_the_tool_marks_transient_and_failure_on_count(how):
    class QuotaExceeded(Exception):
        pass

    options = {
        "ToolRetry": {},
        "retry_on": {"retry_on": QuotaExceeded},
        "failure_on type": {"breaker": lw.CircuitBreaker(failures=2, failure_on=QuotaExceeded)},
        "failure_on predicate": {"breaker": lw.CircuitBreaker(
            failures=2, failure_on=lambda exc: "quota" in str(exc))},
    }[how]
    options.setdefault("breaker", lw.CircuitBreaker(failures=2))
    calls = []

    @lw.tool(**options)
    def search(q: str) -> str:
        """Search."""
        calls.append(q)
        if how == "ToolRetry":
            raise lw.ToolRetry("the index is rebuilding; try again")
        raise QuotaExceeded("daily quota used up")

    store = lw.MemoryStore()
    for i in range(3):
        _one_call(search, store, ToolCall("search", {"q": "x"}), f"s{i}")
    assert len(calls) == 2  # the third call found the breaker open
    assert search.policy.breaker.state == "open"


def test_failure_on_exception_counts_everything_and_bad_values_are_refused():
    breaker = lw.CircuitBreaker(failures=1, failure_on=Exception)
    assert breaker.on_failure("t", ValueError("no")).new == "open"
    for bad in ("ValueError", 3, [ValueError, "x"], ()):
        with pytest.raises(lw.UserError, match="failure_on=.* must be an exception type, a tuple of them, or a function"):
            lw.CircuitBreaker(failure_on=bad)


def test_a_probe_that_reaches_the_tool_closes_the_breaker_even_if_it_says_no():
    now = [0.0]
    breaker = lw.CircuitBreaker(failures=1, window_s=10, cooldown_s=5, clock=lambda: now[0])
    assert breaker.on_failure("t", ConnectionResetError()).new == "open"
    now[0] = 6.0
    assert breaker.before_call("t").new == "half_open"
    change = breaker.on_failure("t", ValueError("amount over the limit"))
    assert (change.old, change.new) == ("half_open", "closed")
    assert "raised ValueError, which the breaker does not count" in change.reason
    # and a counted failure of the probe opens it again, saying what it was
    breaker.on_failure("t", TimeoutError())
    now[0] = 12.0
    breaker.before_call("t")
    assert "probe call failed (TimeoutError)" in breaker.on_failure("t", TimeoutError()).reason


def _raised_from(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("the status service failed") from exc
    except RuntimeError as outer:
        return outer


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://127.0.0.1/", code, "status", {}, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("exc", "counted"), [
    (TimeoutError(), True),
    (ConnectionRefusedError(), True),
    (BrokenPipeError(), True),
    (OSError(errno.EHOSTUNREACH, "No route to host"), True),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), True),
    (socket.gaierror(-2, "Name or service not known"), True),
    (urllib.error.URLError(ConnectionRefusedError()), True),
    (urllib.error.URLError("unknown url type: ftpx"), False),
    (_http_error(503), True),
    (_http_error(429), True),
    (_http_error(404), False),
    (_raised_from(ConnectionResetError()), True),
    (ExceptionGroup("tasks", [ValueError(), ConnectionResetError()]), True),
    (ExceptionGroup("tasks", [ValueError()]), False),
    (FileNotFoundError(errno.ENOENT, "No such file"), False),
    (PermissionError(errno.EACCES, "denied"), False),
    (ValueError("over the limit"), False),
    (KeyError("customer"), False),
    (_raised_from(ValueError()), False),
])
def test_what_counts_as_infrastructure(exc, counted):
    assert is_infrastructure(exc) is counted


def test_http_clients_errors_count_by_kind_and_status():
    requests = pytest.importorskip("requests")
    assert is_infrastructure(requests.ConnectionError("refused"))
    assert is_infrastructure(requests.Timeout("slow"))
    response = requests.Response()
    response.status_code = 502
    assert is_infrastructure(requests.HTTPError("bad gateway", response=response))
    response.status_code = 400
    assert not is_infrastructure(requests.HTTPError("bad request", response=response))


def test_openai_errors_count_by_kind_and_status():
    openai = pytest.importorskip("openai")
    import sys

    httpx = sys.modules.get("httpx") or sys.modules.get("httpx2")
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    assert is_infrastructure(openai.APIConnectionError(request=request))
    assert is_infrastructure(openai.InternalServerError("down", response=httpx.Response(503, request=request),
                                                        body=None))
    assert not is_infrastructure(openai.BadRequestError("no", response=httpx.Response(400, request=request),
                                                        body=None))
