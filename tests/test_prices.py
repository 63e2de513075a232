"""Model prices: a model's own `price=`, $0 for test models, genai-prices for provider models."""

from __future__ import annotations

from decimal import Decimal

import genai_prices
import pytest
from genai_prices import data_snapshot
from genai_prices.types import TieredPrices

from loopwise._errors import UserError
from loopwise._policies.prices import lookup_price, price_for, worst_price
from loopwise.models import (
    FunctionModel,
    Model,
    ModelRequest,
    ModelResponse,
    OpenAIModel,
    Price,
    ScriptedModel,
    Usage,
)
from loopwise._demo.simulator import SupportDeskSimulator

OPENAI_URL = "https://api.openai.com/v1"


def package_price(model: str, **usage: int) -> Decimal:
    """What genai-prices itself says the usage costs at OpenAI."""
    return genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id="openai").total_price


def per_mtok(value: Decimal) -> float:
    return float(value)


@pytest.mark.parametrize("name", ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini-2024-07-18"])
def test_openai_models_are_priced_as_genai_prices_says(name):
    price = price_for(OpenAIModel(name, base_url=OPENAI_URL, api_key="test"))
    assert price is not None
    assert price.input_per_mtok == per_mtok(package_price(name, input_tokens=1_000_000))
    assert price.output_per_mtok == per_mtok(package_price(name, output_tokens=1_000_000))
    cached = package_price(name, input_tokens=1_000_000, cache_read_tokens=1_000_000)
    assert price.cached_input_per_mtok == per_mtok(cached)
    assert 0 < price.cached_input_per_mtok < price.input_per_mtok < price.output_per_mtok


def test_reconciliation_prices_cached_input_as_the_package_does():
    price = lookup_price("gpt-4o-mini", base_url=OPENAI_URL)
    usage = Usage(input_tokens=12_345, output_tokens=678, cached_input_tokens=10_000)
    expected = package_price("gpt-4o-mini", input_tokens=12_345, output_tokens=678, cache_read_tokens=10_000)
    assert price.cost(usage) == pytest.approx(float(expected), rel=1e-12)


def test_the_models_own_price_wins():
    mine = Price(1, 2)
    assert price_for(OpenAIModel("gpt-4o-mini", base_url=OPENAI_URL, api_key="test", price=mine)) is mine
    assert price_for(FunctionModel(lambda request: "hi", price=mine)) is mine


def test_test_models_cost_nothing_unless_given_a_price():
    assert price_for(FunctionModel(lambda request: "hi")) == Price(0, 0)
    assert price_for(ScriptedModel(["hi"])) == Price(0, 0)
    assert price_for(SupportDeskSimulator()) == Price(0, 0)
    assert price_for(ScriptedModel(["hi"], price=Price(3, 4))) == Price(3, 4)


def test_an_unknown_model_has_no_price():
    assert price_for(OpenAIModel("no-such-model-xyz", base_url=OPENAI_URL, api_key="test")) is None
    assert lookup_price("no-such-model-xyz", provider="openai") is None
    assert lookup_price("gpt-4o-mini", provider="no-such-provider") is None


@pytest.mark.parametrize("url", ["http://localhost:11434/v1", "http://127.0.0.1:8000/v1/", "http://0.0.0.0:1234/v1"])
def test_a_local_server_has_no_price_even_for_a_known_name(url):
    assert price_for(OpenAIModel("gpt-4o-mini", base_url=url, api_key="unused")) is None
    assert price_for(OpenAIModel("gpt-4o-mini", base_url=url, api_key="unused", price=Price(0, 0))) == Price(0, 0)


def test_a_known_hosted_provider_behind_the_openai_protocol_is_priced():
    azure = price_for(OpenAIModel("gpt-4o-mini", base_url="https://acme.openai.azure.com/openai/", api_key="t"))
    assert azure is not None and azure.input_per_mtok > 0


def test_a_model_of_its_own_kind_has_no_price():
    class Mine(Model):
        async def request(self, request: ModelRequest) -> ModelResponse:
            return ModelResponse(text="hi")

    assert price_for(Mine()) is None

    class Wrong(Mine):
        price = 0.5  # type: ignore[assignment]

    with pytest.raises(UserError, match="must be a loopwise.models.Price"):
        price_for(Wrong())


def _tiered_openai_model() -> tuple[str, int] | None:
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id != "openai":
            continue
        for model in provider.models:
            tiered = getattr(model.prices, "input_mtok", None)
            if isinstance(tiered, TieredPrices) and tiered.tiers:
                return model.id, tiered.tiers[0].start
    return None


def test_a_price_that_rises_with_the_prompt_is_the_tier_of_that_prompt():
    found = _tiered_openai_model()
    if found is None:
        pytest.skip("genai-prices has no tiered OpenAI model in this version")
    name, start = found
    for prompt in (1_000, start + 1_000):
        price = lookup_price(name, provider="openai", input_tokens=prompt)
        usage = Usage(input_tokens=prompt, output_tokens=1_000)
        expected = package_price(name, input_tokens=prompt, output_tokens=1_000)
        assert price.cost(usage) == pytest.approx(float(expected), rel=1e-12)
    assert lookup_price(name, provider="openai", input_tokens=start + 1).input_per_mtok > lookup_price(
        name, provider="openai", input_tokens=start).input_per_mtok


def test_worst_price_takes_the_highest_of_each_rate():
    assert worst_price([Price(1, 10), Price(2, 5, 0.5)]) == Price(2, 10, 1)
    assert worst_price([Price(1, 10, 0.1), Price(2, 5, 0.5)]) == Price(2, 10, 0.5)
    assert worst_price([Price(1, 10)]) == Price(1, 10)
    assert worst_price([Price(1, 10), None]) is None
    assert worst_price([]) is None


def test_lookup_takes_a_url_or_a_provider():
    with pytest.raises(UserError, match="not both"):
        lookup_price("gpt-4o", base_url=OPENAI_URL, provider="openai")
