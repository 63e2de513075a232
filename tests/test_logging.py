"""Runtime decisions reach the standard `logging` module as structured, redacted records."""

from __future__ import annotations

import logging

import pytest

import loopwise as lw
import loopwise._views.logging as lw_logging
from loopwise.models import FunctionModel, ModelPolicy, ModelRequest, ModelResponse, ScriptedModel, ToolCall

KEY = "sk-proj-" + "Zq8x2LmN4vB7cD1eF5gH9jK3pQ6rS0tU"


def _records(caplog, event: str | None = None) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "loopwise" and hasattr(r, "event")
            and (event is None or r.event == event)]


def test_fallbacks_retries_and_limits_are_logged_with_run_id_and_iteration(store, caplog):
    caplog.set_level(logging.INFO, logger="loopwise")

    @lw.tool(retries=1, fallback="history unavailable", backoff=lw.Backoff(initial_s=0.001, max_s=0.001))
    def get_customer_history(customer_id: str) -> str:
        """The live history."""
        raise ConnectionError(f"CRM down (key {KEY})")

    model = ScriptedModel([ToolCall("get_customer_history", {"customer_id": "CUS-4821"})] * 3)
    agent = lw.Agent(model, tools=[get_customer_history], store=store,
                     limits=lw.Limits(max_iterations=3, final_answer_on_limit=False))
    result = agent.run_sync("history please", run_id="logged")
    assert result.stop_reason == "max_iterations"
    events = store.load("logged")

    retries = _records(caplog, "tool_attempt_failed")
    assert len(retries) == sum(e.kind == "tool_attempt_failed" for e in events) >= 2
    first = retries[0]
    assert first.levelno == logging.WARNING and first.run_id == "logged" and first.iteration == 1
    assert first.tool == "get_customer_history" and first.attempt == 1 and first.retry_in_s is not None
    # The record carries what the log keeps: redacted.
    assert first.error == "ConnectionError: CRM down (key [redacted:openai_key])"
    assert KEY not in caplog.text

    fallbacks = _records(caplog, "tool_fallback")
    assert len(fallbacks) == sum(e.kind == "tool_fallback" for e in events) == 2
    assert [r.iteration for r in fallbacks] == [1, 2]
    assert all(r.ok and r.levelno == logging.WARNING and r.tool == "get_customer_history" for r in fallbacks)

    [limit] = _records(caplog, "limit_hit")
    assert limit.levelno == logging.INFO and limit.iteration == 3 and limit.limit == "max_iterations"
    assert "iteration limit of 3" in limit.detail and "run logged iteration 3: limit max_iterations hit" in limit.getMessage()

    [finished] = _records(caplog, "run_finished")
    assert finished.levelno == logging.WARNING and finished.stop_reason == "max_iterations"
    assert finished.iteration is None and finished.iterations == 3 and finished.run_id == "logged"


def test_a_done_run_logs_info_and_an_error_run_logs_error(store, caplog):
    caplog.set_level(logging.INFO, logger="loopwise")
    lw.Agent(ScriptedModel(["fine"]), store=store).run_sync("hi", run_id="ok")
    [done] = _records(caplog, "run_finished")
    assert done.levelno == logging.INFO and done.stop_reason == "done" and done.run_id == "ok"

    def broken(request: ModelRequest) -> ModelResponse:
        raise lw.ModelConnectionError(f"unreachable, Authorization: Bearer {KEY}")

    agent = lw.Agent(FunctionModel(broken), store=store,
                     model_policy=ModelPolicy(retries=1, backoff_initial_s=0.001, backoff_max_s=0.001))
    result = agent.run_sync("hi", run_id="err")
    assert result.stop_reason == "error"
    attempts = [r for r in _records(caplog, "model_attempt_failed") if r.run_id == "err"]
    assert [r.attempt for r in attempts] == [1, 2] and all(r.levelno == logging.WARNING for r in attempts)
    assert attempts[0].iteration == 1 and attempts[0].model == "function:broken"
    [failed] = [r for r in _records(caplog, "run_finished") if r.run_id == "err"]
    assert failed.levelno == logging.ERROR and failed.stop_reason == "error"
    assert "[redacted:openai_key]" in failed.error and KEY not in caplog.text


def test_nudges_are_logged(store, caplog):
    caplog.set_level(logging.INFO, logger="loopwise")
    lw.Agent(ScriptedModel(["", "answer"]), store=store).run_sync("hi", run_id="n")
    [nudge] = _records(caplog, "nudge")
    assert nudge.levelno == logging.INFO and nudge.iteration == 1
    assert nudge.reason == "the model returned an empty response" and "empty" in nudge.content


def test_only_decisions_are_logged_and_each_once(store, caplog):
    caplog.set_level(logging.DEBUG, logger="loopwise")

    @lw.tool
    def lookup(order: str) -> str:
        """Look up."""
        return "shipped"

    lw.Agent(ScriptedModel([ToolCall("lookup", {"order": "1"}), "done"]), tools=[lookup],
             store=store).run_sync("hi", run_id="quiet")
    # A run with no decision in it: one record, its end.
    assert [r.event for r in _records(caplog)] == ["run_finished"]


def test_nothing_is_built_when_the_logger_is_disabled(store, caplog, monkeypatch):
    caplog.set_level(logging.CRITICAL, logger="loopwise")

    def must_not_run(event):  # pragma: no cover - the assertion is that it is not called
        raise AssertionError("a record was built for a disabled level")

    monkeypatch.setitem(lw_logging._DESCRIBE, "nudge", must_not_run)
    monkeypatch.setitem(lw_logging._DESCRIBE, "run_finished", must_not_run)
    result = lw.Agent(ScriptedModel(["", "answer"]), store=store).run_sync("hi")
    assert result.stop_reason == "done" and _records(caplog) == []


@pytest.mark.parametrize("kind", sorted(lw_logging.LOGGED_KINDS))
def test_every_logged_kind_is_an_event_kind(kind):
    from typing import get_args

    from loopwise._events import Event

    kinds = {cls.__dataclass_fields__["kind"].default for cls in get_args(Event)}
    assert kind in kinds
