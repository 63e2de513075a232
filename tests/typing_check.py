"""What a user's type checker sees of loopwise: mypy checks this file (strict), it never runs.

`make test` and tests/test_typing.py run mypy over it with `src`. Each `assert_type` is a
claim about a public signature; each `# type: ignore[code]` is a mistake mypy must report
(with `warn_unused_ignores`, an ignore that has nothing to ignore is itself an error, so a
signature that stopped catching the mistake fails the check).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, assert_type

import loopwise as lw
from loopwise.models import Model, ModelRequest, ModelResponse, Price

# -- @tool: bare, with options, called on a function --------------------------------------


@lw.tool
def bare(order_id: str) -> str:
    return order_id


assert_type(bare, lw.Tool)


@lw.tool(
    name="lookup", description="Look up an order.", timeout=5, total_timeout=None, retries=2,
    retry_on=(TimeoutError, ConnectionError), backoff=lw.Backoff(initial_s=0.1), fallback=lw.Template("no {order_id}"),
    idempotent=True, cost_usd=0.01, max_result_chars=1_000, isolation="thread", alternatives=["bare"],
    secret="token", breaker=lw.CircuitBreaker(), check=lambda expected, actual: expected == actual,
)
def configured(order_id: str, token: str) -> str:
    return order_id


assert_type(configured, lw.Tool)

decorator = lw.tool(timeout=None, retry_on=ValueError, fallback=[bare, "n/a"], breaker=False)
assert_type(decorator, Callable[[Callable[..., Any]], lw.Tool])
assert_type(lw.tool(bare.fn, idempotent=True), lw.Tool)


async def async_tool(query: str) -> list[str]:
    return [query]


assert_type(lw.tool(async_tool), lw.Tool)

# Mistakes a type checker catches before the code runs (at run time each is a UserError).
lw.tool(tiemout=3)  # type: ignore[call-overload]
lw.tool(timeout="30s")  # type: ignore[call-overload]
lw.tool(isolation="container")  # type: ignore[call-overload]
lw.tool(retries=1.5)  # type: ignore[call-overload]
lw.tool(secret=["token", 1])  # type: ignore[list-item]
lw.tool(bare.fn, retry_on="ValueError")  # type: ignore[call-overload]


# -- Model: the request method and the optional hooks, declared on the base class ---------


class EchoModel(Model):
    name = "echo"

    async def request(self, request: ModelRequest) -> ModelResponse:
        return ModelResponse(text=request.messages[-1].content)


class PricedModel(EchoModel):
    def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price | None:
        return Price(input_per_mtok=1.0, output_per_mtok=2.0) if input_tokens < 200_000 else None


async def use_models() -> None:
    model = EchoModel()
    assert_type(model.price, Price | None)
    assert_type(model.default_price(input_tokens=10), Price | None)
    estimator = model.token_estimator()
    assert_type(estimator.exact, bool)
    async with PricedModel() as priced:
        assert_type(priced, PricedModel)
    await model.aclose()
    model.default_price(10)  # type: ignore[call-arg]
