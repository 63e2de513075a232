"""`call_with_policy`: a timeout per attempt, retries honouring Retry-After, fallback models.

Most tests use `FunctionModel` stand-ins and a `sleep` that records the waits instead
of sleeping, or a `FakeClock` driving the event loop (the `fake_clock` fixture: timeouts and waits
take no real time, and latencies are exact fake time); the last ones talk to a real HTTP
server (`tests/openai_server.py`) through `OpenAIModel` and the openai SDK, with real
waits and generous bounds.
"""

from __future__ import annotations

import email.utils
import time

import anyio
import pytest

from loopwise._errors import (
    ModelBehaviorError,
    ModelConnectionError,
    ModelError,
    ModelHTTPError,
    ModelTimeoutError,
    UserError,
)
from loopwise.models import FunctionModel, Message, ModelRequest, ModelResponse, OpenAIModel
from loopwise.models._resilience import AttemptRecord, ModelPolicy, call_with_policy, parse_retry_after

from .openai_server import OpenAIServer

REQUEST = ModelRequest([Message("user", "hi")])


class Recorder:
    """Collects attempt records and the waits asked for (without waiting)."""

    def __init__(self) -> None:
        self.records: list[AttemptRecord] = []
        self.waits: list[float] = []

    def __call__(self, record: AttemptRecord) -> None:
        self.records.append(record)

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def flaky(*outcomes: BaseException | str, name: str = "flaky") -> FunctionModel:
    """A model that raises or answers each outcome in turn (the last one repeats)."""
    calls = []

    def fn(request: ModelRequest) -> ModelResponse:
        outcome = outcomes[min(len(calls), len(outcomes) - 1)]
        calls.append(outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        return ModelResponse(text=outcome)

    model = FunctionModel(fn, name=name)
    model.calls = calls  # type: ignore[attr-defined]
    return model


def http(status: int, **kw) -> ModelHTTPError:
    return ModelHTTPError(f"HTTP {status} from the stand-in", status_code=status, **kw)


async def call(models, policy: ModelPolicy | None = None, rec: Recorder | None = None, **kw):
    rec = rec or Recorder()
    return await call_with_policy(models, REQUEST, policy or ModelPolicy(), on_attempt=rec, sleep=rec.sleep, **kw)


# -- the happy path and the retry decision ----------------------------------------------


async def test_first_answer_is_returned_with_its_model():
    rec = Recorder()
    model = flaky("hello")
    response, used = await call([model], rec=rec)
    assert response.text == "hello" and used is model
    [record] = rec.records
    assert record.ok and record.error is None and record.attempt == 1 and record.model == "flaky"
    assert record.retry_in_s is None and not record.will_fallback and record.reason == "answered"
    assert record.latency_s >= 0
    assert rec.waits == []


async def test_retries_with_exponential_backoff_then_answers():
    rec = Recorder()
    model = flaky(http(503), http(503), "third time")
    response, _ = await call([model], ModelPolicy(retries=2), rec, rng=lambda: 1.0)
    assert response.text == "third time"
    assert rec.waits == [0.5, 1.0]  # initial 0.5 s, factor 2 (rng=1: the top of the jitter range)
    assert [(r.attempt, r.ok, r.retry_in_s) for r in rec.records] == [(1, False, 0.5), (2, False, 1.0), (3, True, None)]
    assert rec.records[0].error.type == "ModelHTTPError"
    assert rec.records[0].reason == "HTTP 503: retrying in 0.5s (backoff, retry 1 of 2)"


def test_backoff_is_full_jitter_capped_at_the_max():
    policy = ModelPolicy(backoff_initial_s=0.5, backoff_factor=2, backoff_max_s=20)
    assert [policy.backoff(n, rng=lambda: 1.0) for n in (1, 2, 3, 6, 7, 50, 5000)] == [0.5, 1, 2, 16, 20, 20, 20]
    assert policy.backoff(3, rng=lambda: 0.25) == 0.5
    assert policy.backoff(3, rng=lambda: 0.0) == 0.0
    assert 0 <= policy.backoff(3) <= 2  # the default rng


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 599])
async def test_retryable_statuses_are_retried(status):
    rec = Recorder()
    await call([flaky(http(status), "ok")], rec=rec)
    assert [r.ok for r in rec.records] == [False, True]
    assert len(rec.waits) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_are_not_retried(status):
    rec = Recorder()
    model = flaky(http(status), "never reached")
    with pytest.raises(ModelHTTPError) as info:
        await call([model], rec=rec)
    assert info.value.status_code == status
    assert str(info.value) == f"HTTP {status} from the stand-in"  # one attempt: the message as is
    assert len(model.calls) == 1 and rec.waits == []
    [record] = rec.records
    assert record.reason == f"HTTP {status} is not retried; no fallback left"
    assert record.retry_in_s is None and not record.will_fallback


@pytest.mark.parametrize("error", [ModelTimeoutError("slow"), ModelConnectionError("refused")], ids=type)
async def test_timeouts_and_connection_errors_are_retried(error):
    rec = Recorder()
    response, _ = await call([flaky(error, "ok")], rec=rec)
    assert response.text == "ok" and len(rec.waits) == 1


async def test_behavior_errors_are_not_retried_but_fall_back():
    rec = Recorder()
    primary = flaky(ModelBehaviorError("nonsense"), name="primary")
    backup = flaky("from the backup", name="backup")
    response, used = await call([primary, backup], rec=rec)
    assert response.text == "from the backup" and used is backup
    assert len(primary.calls) == 1 and rec.waits == []
    assert [(r.model, r.attempt, r.ok, r.will_fallback) for r in rec.records] == [
        ("primary", 1, False, True), ("backup", 1, True, False)]
    assert rec.records[0].reason == "ModelBehaviorError is not retried; falling back to backup"


async def test_a_plain_model_error_is_not_retried():
    model = flaky(ModelError("something odd"), "ok")
    with pytest.raises(ModelError, match="something odd"):
        await call([model])
    assert len(model.calls) == 1


async def test_the_server_can_say_whether_to_retry():
    rec = Recorder()
    model = flaky(http(503, headers={"x-should-retry": "false"}), "ok")
    with pytest.raises(ModelHTTPError):
        await call([model], rec=rec)
    assert len(model.calls) == 1
    await call([flaky(http(400, headers={"x-should-retry": "true"}), "ok")], rec=rec)
    assert rec.records[-1].ok


async def test_retries_zero_makes_one_attempt_per_model():
    primary, backup = flaky(http(503), name="a"), flaky(http(503), name="b")
    with pytest.raises(ModelHTTPError):
        await call([primary, backup], ModelPolicy(retries=0))
    assert len(primary.calls) == len(backup.calls) == 1


# -- Retry-After ------------------------------------------------------------------------


async def test_retry_after_is_honoured_instead_of_backoff():
    rec = Recorder()
    await call([flaky(http(429, retry_after=3.0), "ok")], rec=rec, rng=lambda: 1.0)
    assert rec.waits == [3.0]
    assert rec.records[0].retry_in_s == 3.0
    assert rec.records[0].reason == "HTTP 429: retrying in 3s (Retry-After, retry 1 of 2)"


async def test_retry_after_is_read_from_headers_when_the_adapter_did_not_parse_it():
    rec = Recorder()
    await call([flaky(http(503, headers={"Retry-After": "2"}), "ok")], rec=rec)
    assert rec.waits == [2.0]


async def test_retry_after_above_the_cap_is_not_waited_for():
    rec = Recorder()
    primary = flaky(http(429, retry_after=3600.0), "never reached", name="primary")
    backup = flaky("backup answers", name="backup")
    _, used = await call([primary, backup], ModelPolicy(max_retry_after=60), rec)
    assert used is backup and rec.waits == [] and len(primary.calls) == 1
    first = rec.records[0]
    assert first.will_fallback and first.retry_in_s is None
    assert first.reason == ("HTTP 429: Retry-After of 3600s exceeds max_retry_after=60s, not waiting; "
                            "falling back to backup")
    # With no fallback, the call fails at once.
    rec = Recorder()
    with pytest.raises(ModelHTTPError):
        await call([flaky(http(429, retry_after=120.0), "x")], rec=rec)
    assert rec.waits == [] and len(rec.records) == 1
    assert "exceeds max_retry_after=60s, not waiting; no fallback left" in rec.records[0].reason


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "1"}) == 1.0
    assert parse_retry_after({"Retry-After": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # ms is more precise
    assert parse_retry_after({"retry-after-ms": "junk", "retry-after": "9"}) == 9.0
    assert parse_retry_after({"retry-after": "-3"}) == 0.0
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after({"retry-after": date}, now=now) <= 31
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 30, usegmt=True)}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


# -- timeouts ---------------------------------------------------------------------------


async def test_a_hanging_model_is_cut_by_the_timeout_and_retried(fake_clock):
    calls = []

    async def hang_then_answer(request):
        calls.append(fake_clock.monotonic())
        if len(calls) == 1:
            await anyio.sleep_forever()
        return "second attempt"

    rec = Recorder()
    response, _ = await call([FunctionModel(hang_then_answer, name="hangs")], ModelPolicy(timeout=0.1), rec)
    assert response.text == "second attempt"
    assert calls == pytest.approx([0, 0.1])  # the second attempt right after the first one's 0.1 s
    first = rec.records[0]
    assert first.error.type == "ModelTimeoutError"
    assert first.error.message == "hangs did not answer within timeout=0.1s (ModelPolicy.timeout)"
    assert first.latency_s == pytest.approx(0.1)


async def test_a_model_that_always_hangs_fails_with_a_timeout_error(fake_clock):
    async def hang(request):
        await anyio.sleep_forever()

    rec = Recorder()
    with pytest.raises(ModelTimeoutError, match=r"timeout=0.05s") as info:
        await call([FunctionModel(hang, name="hangs")], ModelPolicy(timeout=0.05, retries=1), rec)
    assert [r.error.type for r in rec.records] == ["ModelTimeoutError"] * 2
    assert fake_clock.monotonic() == pytest.approx(0.1)
    assert str(info.value).startswith("all 2 model call attempts failed (hangs #1 ModelTimeoutError, "
                                      "#2 ModelTimeoutError); last error: hangs did not answer")


async def test_timeout_none_sets_no_limit(fake_clock):
    async def slowish(request):
        await anyio.sleep(3600)
        return "ok"

    rec = Recorder()
    response, _ = await call([FunctionModel(slowish)], ModelPolicy(timeout=None), rec, report_ok=True)
    assert response.text == "ok"
    assert rec.records[0].latency_s == pytest.approx(3600)


async def test_a_timeout_error_the_model_raises_itself_is_not_ours():
    def broken(request):
        raise TimeoutError("the model's own")

    rec = Recorder()
    with pytest.raises(TimeoutError, match="the model's own"):
        await call([FunctionModel(broken), flaky("unused")], rec=rec)
    [record] = rec.records
    assert record.reason == "TimeoutError is not a ModelError: not retried, no fallback"


# -- fallback and the final error -------------------------------------------------------


async def test_exhausted_retries_go_to_the_fallback():
    rec = Recorder()
    primary = flaky(http(503), name="primary")
    backup = flaky("backup answers", name="backup")
    response, used = await call([primary, backup], ModelPolicy(retries=2), rec)
    assert used is backup and response.text == "backup answers"
    assert len(primary.calls) == 3
    assert [(r.model, r.attempt, r.ok, r.retry_in_s is not None, r.will_fallback) for r in rec.records] == [
        ("primary", 1, False, True, False),
        ("primary", 2, False, True, False),
        ("primary", 3, False, False, True),
        ("backup", 1, True, False, False),
    ]
    assert rec.records[2].reason == "HTTP 503: retries exhausted (3 attempts); falling back to backup"


async def test_when_everything_fails_the_last_error_is_raised_with_a_summary():
    rec = Recorder()
    a = flaky(http(503), name="a")
    b = flaky(http(401), name="b")
    c = flaky(ModelConnectionError("c is down"), name="c")
    with pytest.raises(ModelConnectionError) as info:
        await call([a, b, c], ModelPolicy(retries=1), rec)
    assert str(info.value) == ("all 5 model call attempts failed (a #1 HTTP 503, #2 HTTP 503; b #1 HTTP 401; "
                               "c #1 ModelConnectionError, #2 ModelConnectionError); last error: c is down")
    assert len(rec.records) == 5 and rec.records[-1].reason.endswith("retries exhausted (2 attempts); no fallback left")


async def test_the_last_error_keeps_its_type_and_attributes():
    with pytest.raises(ModelHTTPError) as info:
        await call([flaky(http(429, retry_after=0.0, body={"x": 1}))], ModelPolicy(retries=1))
    assert info.value.status_code == 429 and info.value.body == {"x": 1} and info.value.retry_after == 0.0
    assert str(info.value).startswith("all 2 model call attempts failed (flaky #1 HTTP 429, #2 HTTP 429)")


async def test_a_non_model_error_propagates_without_retry_or_fallback():
    backup = flaky("unused")
    model = flaky(ValueError("a bug"), "unused")
    with pytest.raises(ValueError, match="a bug"):
        await call([model, backup])
    assert len(model.calls) == 1 and backup.calls == []


async def test_check_failures_fail_the_attempt_and_fall_back():
    def check(response: ModelResponse) -> None:
        if response.text == "bad":
            raise ModelBehaviorError("not usable")

    primary, backup = flaky("bad", name="primary"), flaky("good", name="backup")
    response, used = await call([primary, backup], check=check)
    assert used is backup and response.text == "good" and len(primary.calls) == 1


async def test_a_response_that_is_not_a_model_response_is_a_behavior_error():
    class Odd(FunctionModel):
        async def request(self, request):
            return {"text": "a dict"}

    rec = Recorder()
    with pytest.raises(ModelBehaviorError, match="odd returned dict, not a ModelResponse"):
        await call([Odd(lambda r: "x", name="odd")], rec=rec)
    assert len(rec.records) == 1


async def test_no_models_is_a_user_error():
    with pytest.raises(UserError):
        await call([])


async def test_on_attempt_is_optional():
    response, _ = await call_with_policy([flaky(http(500), "ok")], REQUEST, ModelPolicy(backoff_initial_s=0))
    assert response.text == "ok"


# -- cancellation -----------------------------------------------------------------------


async def test_cancellation_during_the_backoff_wait_propagates_at_once(fake_clock):
    rec = Recorder()
    model = flaky(http(503), "never reached")
    with anyio.move_on_after(0.2) as scope:
        # A 30 s backoff, slept on the loop's (fake) clock: no injected sleep.
        await call_with_policy([model, flaky("backup unused")], REQUEST,
                               ModelPolicy(backoff_initial_s=30, backoff_max_s=30), on_attempt=rec, rng=lambda: 1.0)
    assert scope.cancelled_caught
    assert fake_clock.monotonic() < 30  # cancelled at 0.2 s (plus the stand-in's thread's real time), not 30 s
    assert len(model.calls) == 1 and [r.retry_in_s for r in rec.records] == [30.0]


async def test_cancellation_mid_call_propagates_and_is_not_retried():
    calls = []

    async def hang(request):
        calls.append(1)
        await anyio.sleep_forever()

    rec = Recorder()
    with anyio.move_on_after(0.1) as scope:
        await call([FunctionModel(hang), flaky("backup unused")], ModelPolicy(timeout=10), rec)
    assert scope.cancelled_caught
    assert calls == [1] and rec.records == [] and rec.waits == []


async def test_cancellation_is_not_caught_even_by_the_models_own_timeout():
    # The outer deadline fires first, inside the policy's own timeout scope.
    async def hang(request):
        await anyio.sleep_forever()

    with anyio.move_on_after(0.05) as scope:
        await call([FunctionModel(hang)], ModelPolicy(timeout=0.06))
    assert scope.cancelled_caught


# -- the policy's own checks ------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{"timeout": 0}, {"timeout": -1}, {"timeout": "5"}, {"retries": -1}, {"retries": 1.5}, {"retries": True},
     {"backoff_initial_s": -1}, {"backoff_max_s": False}, {"backoff_factor": 0.5}, {"max_retry_after": float("nan")},
     {"retry_on_status": ("429",)}, {"retry_on_status": "5xx"}],
)
def test_bad_policies_are_user_errors(kw):
    with pytest.raises(UserError, match="ModelPolicy"):
        ModelPolicy(**kw)


def test_policy_describe_and_statuses():
    policy = ModelPolicy(retry_on_status=(429, range(500, 504)))
    assert policy.retries_status(429) and policy.retries_status(503) and not policy.retries_status(504)
    assert policy.describe()["retry_on_status"] == [429, "500-503"]
    assert ModelPolicy().describe() == {
        "timeout": 60.0, "retries": 2, "backoff_initial_s": 0.5, "backoff_factor": 2.0, "backoff_max_s": 20.0,
        "max_retry_after": 60.0, "retry_on_status": [408, 409, 429, "500-599"],
    }
    assert ModelPolicy(retry_on_status=429).retry_on_status == (429,)


# -- against a real HTTP server ---------------------------------------------------------


@pytest.fixture
def server():
    with OpenAIServer() as s:
        yield s


def openai_model(server: OpenAIServer, **kw) -> OpenAIModel:
    return OpenAIModel("gpt-4o-mini", base_url=server.base_url, api_key="test", max_retries=0, **kw)


class Timed(Recorder):
    """Records when each attempt was reported, and really sleeps."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def __call__(self, record: AttemptRecord) -> None:
        self.at.append(time.monotonic())
        super().__call__(record)

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        await anyio.sleep(seconds)


async def test_the_openai_adapter_carries_retry_after_and_headers(server):
    server.reply_error(429, headers={"Retry-After": "7"})
    server.reply_error(503, headers={"retry-after-ms": "1500"})
    server.reply_error(503, headers={"Retry-After": email.utils.formatdate(time.time() + 40, usegmt=True)})
    server.reply_error(500)
    async with openai_model(server) as model:
        errors = []
        for _ in range(4):
            with pytest.raises(ModelHTTPError) as info:
                await model.request(REQUEST)
            errors.append(info.value)
    assert errors[0].retry_after == 7.0 and errors[0].headers["retry-after"] == "7"
    assert errors[1].retry_after == 1.5
    assert 35 <= errors[2].retry_after <= 41
    assert errors[3].retry_after is None and errors[3].headers["content-type"] == "application/json"


async def test_a_429_with_retry_after_is_retried_after_that_wait(server):
    server.reply_error(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "1"})
    server.reply(text="now it works")
    rec = Timed()
    async with openai_model(server) as model:
        response, used = await call_with_policy([model], REQUEST, ModelPolicy(), on_attempt=rec, sleep=rec.sleep)
    assert response.text == "now it works" and used is model
    assert len(server.requests) == 2
    assert rec.waits == [1.0]
    first, second = rec.records
    assert first.error.type == "ModelHTTPError" and "HTTP 429: slow down" in first.error.message
    assert first.retry_in_s == 1.0 and "Retry-After" in first.reason
    assert second.ok and second.attempt == 2
    assert 0.9 <= rec.at[1] - rec.at[0] < 10  # the wait, then the second request


async def test_503s_exhaust_the_retries_then_the_fallback_server_answers(server):
    for _ in range(3):
        server.reply_error(503, {"error": {"message": "overloaded"}})
    rec = Recorder()
    with OpenAIServer() as other:
        other.reply(text="the fallback answers")
        async with openai_model(server) as primary, \
                OpenAIModel("gpt-4o", base_url=other.base_url, api_key="test", max_retries=0) as backup:
            response, used = await call_with_policy([primary, backup], REQUEST, ModelPolicy(retries=2),
                                                    on_attempt=rec, sleep=rec.sleep)
        assert len(other.requests) == 1
    assert used is backup and response.text == "the fallback answers"
    assert len(server.requests) == 3 and len(rec.waits) == 2
    assert [(r.model, r.attempt, r.ok, r.will_fallback) for r in rec.records] == [
        ("openai:gpt-4o-mini", 1, False, False),
        ("openai:gpt-4o-mini", 2, False, False),
        ("openai:gpt-4o-mini", 3, False, True),
        ("openai:gpt-4o", 1, True, False),
    ]
    assert rec.records[2].reason == "HTTP 503: retries exhausted (3 attempts); falling back to openai:gpt-4o"


async def test_a_401_is_not_retried(server):
    server.reply_error(401, {"error": {"message": "Incorrect API key provided"}})
    rec = Recorder()
    async with openai_model(server) as model:
        with pytest.raises(ModelHTTPError) as info:
            await call_with_policy([model], REQUEST, ModelPolicy(), on_attempt=rec, sleep=rec.sleep)
    assert info.value.status_code == 401
    assert len(server.requests) == 1 and rec.waits == [] and len(rec.records) == 1


async def test_a_server_slower_than_the_timeout_is_cut_then_retried(server):
    server.reply(text="too late", delay=3.0)
    server.reply(text="in time")
    rec = Recorder()
    started = time.monotonic()
    async with openai_model(server) as model:
        response, _ = await call_with_policy([model], REQUEST, ModelPolicy(timeout=0.3), on_attempt=rec,
                                             sleep=rec.sleep)
    assert response.text == "in time"
    assert time.monotonic() - started < 2.5  # did not wait for the slow answer
    first, second = rec.records
    assert first.error.type == "ModelTimeoutError"
    assert first.error.message == "openai:gpt-4o-mini did not answer within timeout=0.3s (ModelPolicy.timeout)"
    assert 0.25 <= first.latency_s < 2.5
    assert second.ok and len(server.requests) == 2
