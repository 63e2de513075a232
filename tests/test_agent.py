"""Developer mistakes raise UserError before a run starts, naming the problem and the fix."""

from __future__ import annotations

import pytest

import loopwise as lw
from loopwise.models import ScriptedModel


def agent(**kw):
    kw.setdefault("store", lw.MemoryStore())
    return lw.Agent(ScriptedModel(["ok"]), **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limits": lw.Limits(max_iterations=2).to_dict()}, "limits must be a loopwise.Limits"),
        ({"store": "path.db"}, "store must be an EventStore"),
        ({"max_tokens": 0}, "max_tokens must be an int >= 1"),
        ({"tools": "lookup"}, "tools must be a list"),
        ({"context": object()}, r"context must be a loopwise.SlidingWindow"),
        ({"runaway": True}, r"runaway must be a loopwise.RunawayDetector"),
        ({"control": object()}, r"control must be a redis:// URL"),
        ({"colour": "red"}, "unknown option"),
        ({"instructions": 3}, "instructions must be a str"),
    ],
)
def test_bad_agent_configuration(kwargs, message):
    with pytest.raises(lw.UserError, match=message):
        agent(**kwargs)


def test_duplicate_tool_names():
    def lookup(x: str) -> str:
        return x

    with pytest.raises(lw.UserError, match="two tools are named 'lookup'"):
        agent(tools=[lookup, lw.tool(lookup)])


def test_plain_functions_become_tools():
    def lookup(x: str) -> str:
        """Look it up."""
        return x

    a = agent(tools=[lookup])
    assert a.tool_specs[0].name == "lookup" and a.tool_specs[0].description == "Look it up."


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_iterations": 0}, "must be an int >= 1"),
        ({"max_iterations": 2.5}, "must be an int >= 1"),
        ({"final_answer_on_limit": "yes"}, "must be True or False"),
        ({"budget_usd": -1}, r"budget_usd=-1\) must be a number of dollars >= 0"),
        ({"budget_tokens": 0}, r"budget_tokens=0\) must be an int >= 1"),
        ({"deadline_s": 0}, r"deadline_s=0\) must be a number of seconds > 0"),
        ({"max_iters": 3}, "unknown option"),
    ],
)
def test_bad_limits(kwargs, message):
    with pytest.raises(lw.UserError, match=message):
        lw.Limits(**kwargs)


def test_limits_defaults():
    assert lw.Limits() == lw.Limits(max_iterations=8, budget_usd=0.50, final_answer_on_limit=True)
    assert repr(lw.Limits()) == (
        "Limits(max_iterations=8, budget_usd=0.5, budget_tokens=None, deadline_s=None, final_answer_on_limit=True)"
    )


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("gpt-4o-mini", "no provider prefix: write 'openai:gpt-4o-mini'"),
        ("anthropic:claude", "unknown model provider 'anthropic'"),
        (42, "must be a Model instance or a string"),
    ],
)
def test_bad_model(model, message):
    with pytest.raises(lw.UserError, match=message):
        lw.Agent(model)


@pytest.mark.parametrize(
    ("task", "kwargs", "message"),
    [
        ("", {}, "task must be a non-empty str"),
        ([], {}, "task must be a non-empty str"),
        (["hi"], {}, r"task\[0\] is a str"),
        (None, {}, "task must be a non-empty str"),
        ("t", {"tags": "prod"}, "write tags=\\['prod'\\]"),
        ("t", {"tags": [""]}, "each tag must be a non-empty str"),
        ("t", {"run_id": ""}, "run_id must be a non-empty str"),
    ],
)
def test_bad_run_arguments(task, kwargs, message):
    with pytest.raises(lw.UserError, match=message):
        agent().run_sync(task, **kwargs)


async def test_run_sync_inside_a_loop_says_to_await():
    with pytest.raises(lw.UserError, match="use `await agent.run"):
        agent().run_sync("t")


def test_bad_message_role():
    with pytest.raises(lw.UserError, match="role 'bot' is not one of"):
        lw.Message("bot", "hi")  # type: ignore[arg-type]


def test_bad_price():
    from loopwise.models import Price

    with pytest.raises(lw.UserError, match="input_per_mtok must be a finite number >= 0"):
        Price(-1, 0)
