"""What a model call costs: the `Price` of a model, from its own `price=` or `genai-prices`.

```
model.price given                      → that price (an override, always wins)
else model.default_price(...):
  FunctionModel / ScriptedModel /
  SupportDeskSimulator                 → Price(0, 0): test models cost nothing
  OpenAIModel at a known provider's URL→ genai-prices' price of that model there
                                         (api.openai.com, Azure, Groq, OpenRouter...)
  OpenAIModel at any other URL         → None: a local or unknown server, whose
                                         price only its operator knows
  any other Model (unless it overrides
  `default_price`)                     → None
```

`genai-prices` ships its price data inside the package: nothing is fetched. Its data
is loaded on the first lookup (about 0.25 s, once per process), so call `price_for`
before a run starts rather than on the event loop in the middle of one.

Some models price every token higher once a prompt passes a threshold (e.g. above
272K input tokens): `price_for(model, input_tokens=n)` gives the price of a call
whose prompt has `n` tokens. Reserve with the estimated input (an upper bound, so
never a lower tier than the real one) and reconcile with the reported input.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .._errors import UserError
from .._messages import Usage

if TYPE_CHECKING:
    from ..models._base import Model

__all__ = ["Price", "lookup_price", "price_for", "worst_price"]


@dataclass(slots=True, frozen=True)
class Price:
    """Dollars per million tokens. `Price(0, 0)` for a self-hosted server."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok"):
            value = getattr(self, name)
            # (NaN or infinity would make costs NaN or inf, which no budget can weigh)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise UserError(f"Price.{name} must be a finite number >= 0, got {value!r}")

    def cost(self, usage: Usage) -> float:
        """The dollar cost of `usage` at this price (cached input priced as such)."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        cached_rate = (
            self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        )
        return (
            (usage.input_tokens - cached) * self.input_per_mtok
            + cached * cached_rate
            + usage.output_tokens * self.output_per_mtok
        ) / 1_000_000


def price_for(model: Model, *, input_tokens: int = 0, at: datetime | None = None) -> Price | None:
    """The price of one call to `model` whose prompt has `input_tokens` tokens; `None` if unknown.

    Args:
        model: The model; its own `price` (when not `None`) is returned as is.
        input_tokens: The prompt's size, for models whose price rises past a threshold.
        at: When the call is made, for prices that change on a date (default: now).
    """
    price = model.price
    if price is None:
        price = model.default_price(input_tokens=input_tokens, at=at)
        what = "default_price()"
    else:
        what = "price"
    if price is not None and not isinstance(price, Price):  # (a subclass's value: checked, not trusted)
        raise UserError(
            f"{type(model).__name__}.{what} must be a loopwise.models.Price or None, got {type(price).__name__}"
        )
    return price


def lookup_price(
    model: str,
    *,
    base_url: str | None = None,
    provider: str | None = None,
    input_tokens: int = 0,
    at: datetime | None = None,
) -> Price | None:
    """The price `genai-prices` knows for `model` at a provider, or `None`.

    The provider is found from `base_url` (the API's address, e.g.
    ``"https://api.openai.com/v1"``) or named by `provider` (a genai-prices id such as
    ``"openai"``); with neither, from the model name. An address no known provider
    serves (a local server) gives `None`, as does a model the provider is not known to
    price per token.
    """
    if base_url is not None and provider is not None:
        raise UserError("lookup_price takes base_url= or provider=, not both")
    found = _model_prices(model, base_url, provider)
    if found is None:
        return None
    info, _ = found
    prices = info.get_prices(at or datetime.now(UTC))
    input_rate = _rate(getattr(prices, "input_mtok", None), input_tokens)
    output_rate = _rate(getattr(prices, "output_mtok", None), input_tokens)
    if input_rate is None or output_rate is None:
        return None
    cached_rate = _rate(getattr(prices, "cache_read_mtok", None), input_tokens)
    return Price(input_rate, output_rate, cached_rate)


def worst_price(prices: Iterable[Price | None]) -> Price | None:
    """The highest of each rate across `prices` (e.g. a model and its fallbacks), `None` if any is.

    A call that may be answered by any of several models is reserved at this price.
    """
    result: Price | None = None
    for price in prices:
        if price is None:
            return None
        if result is None:
            result = price
            continue
        cached = (
            None
            if result.cached_input_per_mtok is None and price.cached_input_per_mtok is None
            else max(_cached(result), _cached(price))
        )
        result = Price(
            max(result.input_per_mtok, price.input_per_mtok),
            max(result.output_per_mtok, price.output_per_mtok),
            cached,
        )
    return result


def _cached(price: Price) -> float:
    return price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok


@functools.lru_cache(maxsize=256)
def _model_prices(model: str, base_url: str | None, provider: str | None) -> tuple[Any, Any] | None:
    """(genai-prices ModelInfo, Provider) for a model, or `None`; cached (lookups scan the data)."""
    from genai_prices import data_snapshot

    try:
        found_provider, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, base_url)
    except LookupError:
        return None
    return info, found_provider


def _rate(value: Any, input_tokens: int) -> float | None:
    """A genai-prices price (a Decimal, or tiers by prompt size) as dollars per million tokens."""
    if value is None:
        return None
    tiers = getattr(value, "tiers", None)
    if tiers is not None:  # TieredPrices: past a tier's start, its price applies to every token
        chosen = value.base
        for tier in sorted(tiers, key=lambda t: t.start):
            if input_tokens > tier.start:
                chosen = tier.price
        value = chosen
    rate = float(value)
    return rate if math.isfinite(rate) and rate >= 0 else None
