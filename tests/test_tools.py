from __future__ import annotations

import pytest

import loopwise as lw
from loopwise._tools.tool import ToolArgumentsError


@lw.tool
async def lookup(customer_id: str, limit: int = 3) -> dict:
    """Look up a customer's recent orders.

    Args:
        customer_id: The customer's id, like "CUS-4821".
        limit: How many orders to return.
    """
    return {"id": customer_id, "limit": limit}


def test_schema_from_signature_and_docstring():
    spec = lookup.spec
    assert spec.name == "lookup"
    assert spec.description == "Look up a customer's recent orders."
    assert spec.parameters == {
        "type": "object",
        "properties": {
            "customer_id": {"type": "string", "description": 'The customer\'s id, like "CUS-4821".'},
            "limit": {"type": "integer", "description": "How many orders to return.", "default": 3},
        },
        "required": ["customer_id"],
    }


def test_bare_and_with_options():
    @lw.tool(name="renamed", description="Does it.")
    def f(x: int) -> int:
        return x

    assert f.name == "renamed" and f.description == "Does it."
    assert not f.is_async


def test_run_context_is_not_in_the_schema():
    @lw.tool
    async def needs_ctx(ctx: lw.RunContext, q: str) -> str:
        return ctx.call_id

    assert list(needs_ctx.spec.parameters["properties"]) == ["q"]
    assert needs_ctx.context_param == "ctx"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ('{"customer_id": ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ("42", "must be a JSON object, got int"),
        ({"limit": 2}, "customer_id: Field required"),
        ({"customer_id": "C", "limit": "many"}, "limit: Input should be a valid integer"),
        ("null", "must be a JSON object, got NoneType"),
    ],
)
def test_bad_arguments_explain_themselves(arguments, message):
    with pytest.raises(ToolArgumentsError, match=message):
        lookup.validate(arguments)


def test_arguments_from_string_dict_empty_and_extra():
    assert lookup.validate('{"customer_id": "C1"}') == {"customer_id": "C1", "limit": 3}
    assert lookup.validate({"customer_id": "C1", "limit": "5", "extra": 1}) == {"customer_id": "C1", "limit": 5}

    @lw.tool
    def no_args() -> str:
        return "ok"

    assert no_args.validate("") == {}
    assert no_args.validate(None) == {}


@pytest.mark.parametrize("name", ["has space", "", "x" * 65, "dot.ted"])
def test_invalid_names_are_user_errors(name):
    with pytest.raises(lw.UserError, match="not valid"):
        lw.tool(name=name)(lambda: None)


def test_var_args_rejected():
    with pytest.raises(lw.UserError, match=r"\*args/\*\*kwargs"):

        @lw.tool
        def f(*args: int) -> None: ...


def test_generator_functions_are_refused_with_the_fix():
    """Refused up front: a sync generator's items were collected while its result was encoded (on the event
    loop, outside the tool's timeout), and an async one gave the model "<async_generator object ...>"."""

    def numbers():
        yield 1

    async def stream():
        yield "part"

    for fn in (numbers, stream):
        with pytest.raises(lw.UserError, match=f"tool '{fn.__name__}' is a generator function.*return it"):
            lw.tool(fn)


def test_unknown_options_are_refused_loudly():
    with pytest.raises(lw.UserError, match="unknown option.*tiemout"):
        lw.tool(tiemout=3)


def test_options_on_an_existing_tool_are_refused_not_ignored():
    with pytest.raises(lw.UserError, match="'lookup' is already a tool"):
        lw.tool(timeout=3)(lookup)
    assert lw.tool(lookup) is lookup


def test_not_a_function():
    with pytest.raises(lw.UserError, match="needs a function"):
        lw.tool(42)  # type: ignore[call-overload]
