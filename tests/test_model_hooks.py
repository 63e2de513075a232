"""The optional hooks declared on `Model`: `default_price`, `token_estimator`, `aclose`.

The loop calls them as methods: a model of its own kind prices and counts itself by
overriding them, and gets the documented defaults when it does not.
"""

from __future__ import annotations

from datetime import datetime

import pytest

import loopwise as lw
from loopwise._policies.prices import price_for
from loopwise._policies.tokens import TokenEstimator, for_model
from loopwise.models import FunctionModel, Model, ModelRequest, ModelResponse, OpenAIModel, Price, Usage


class Plain(Model):
    """A provider model of the user's own kind, overriding nothing but `request`."""

    name = "plain"

    async def request(self, request: ModelRequest) -> ModelResponse:
        return ModelResponse(text="done", usage=Usage(input_tokens=1_000, output_tokens=500))


class Listed(Plain):
    """One that knows its provider's price list, with a threshold on the prompt's size."""

    name = "listed"

    def __init__(self) -> None:
        self.asked: list[tuple[int, datetime | None]] = []

    def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price | None:
        self.asked.append((input_tokens, at))
        return Price(1.0, 2.0) if input_tokens <= 100_000 else Price(2.0, 4.0)


def test_the_base_class_declares_the_defaults():
    model = Plain()
    assert model.price is None
    assert model.default_price(input_tokens=10) is None
    estimator = model.token_estimator()
    assert type(estimator) is TokenEstimator and not estimator.exact
    assert model.token_estimator() is not estimator  # a new one each time: the loop keeps it
    assert price_for(model) is None
    assert not for_model(model).exact


def test_a_model_that_declares_its_default_price_is_priced_by_it():
    model = Listed()
    assert price_for(model, input_tokens=500) == Price(1.0, 2.0)
    assert price_for(model, input_tokens=200_000) == Price(2.0, 4.0)
    assert [n for n, _ in model.asked] == [500, 200_000]
    model.price = Price(9.0, 9.0)  # a price given always wins
    assert price_for(model, input_tokens=200_000) == Price(9.0, 9.0)


def test_the_loop_budgets_with_the_default_price():
    # Under a dollar budget a model of unknown price is refused before the run; one that
    # declares its price runs, and its calls are charged at that price.
    with pytest.raises(lw.UserError, match="the price of plain is unknown"):
        lw.Agent(Plain(), limits=lw.Limits(budget_usd=1.0)).run_sync("go")
    result = lw.Agent(Listed(), limits=lw.Limits(budget_usd=1.0)).run_sync("go")
    assert result.output == "done"
    assert result.cost_usd == pytest.approx((1_000 * 1.0 + 500 * 2.0) / 1_000_000)


def test_a_default_price_that_is_not_a_price_is_refused_by_name():
    class Wrong(Plain):
        def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price | None:
            return 0.5  # type: ignore[return-value]

    with pytest.raises(lw.UserError, match=r"Wrong\.default_price\(\) must be a loopwise.models.Price"):
        price_for(Wrong())


def test_the_built_in_models_declare_their_hooks():
    assert FunctionModel(lambda request: "hi").default_price() == Price(0, 0)
    openai = OpenAIModel("gpt-4o-mini", base_url="https://api.openai.com/v1", api_key="test")
    assert openai.token_estimator().exact
    assert openai.default_price() is not None and openai.default_price() == price_for(openai)
    local = OpenAIModel("some-local-model", base_url="http://127.0.0.1:9/v1", api_key="unused")
    assert not local.token_estimator().exact and local.default_price() is None


async def test_every_model_closes_and_works_as_a_context_manager():
    closed: list[str] = []

    class Pooled(Plain):
        async def aclose(self) -> None:
            closed.append(self.name)

    async with Plain() as plain:  # the default holds nothing to close
        assert isinstance(plain, Plain)
    async with Pooled() as pooled:
        assert (await pooled.request(ModelRequest(messages=[]))).text == "done"
    assert closed == ["plain"]
