"""`WrapperModel`: a model that delegates to another, to act around its calls.

Subclass it and override `request` to count, record, gate or route a model's calls;
everything else the loop asks of a model is the wrapped model's unless overridden:
its `name`, its `price` (given or `default_price`), its `token_estimator`, `aclose`.
So a wrapper is priced, counted and budgeted exactly as the model it wraps.

```python
class Counting(WrapperModel):
    calls = 0

    async def request(self, request):
        self.calls += 1
        return await super().request(request)
```

The model policy (`ModelPolicy`: timeout, retries, fallback models) applies to the
wrapper as to any model: each attempt is one `request` of the wrapper.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._errors import UserError
from ._base import Model, ModelRequest, ModelResponse, Price

if TYPE_CHECKING:
    from .._policies.tokens import TokenEstimator

__all__ = ["WrapperModel"]


class WrapperModel(Model):
    """A model that delegates every call and hook to `wrapped`; subclass it to act around them.

    Args:
        wrapped: The model it delegates to.
    """

    def __init__(self, wrapped: Model) -> None:
        if not isinstance(wrapped, Model):
            raise UserError(f"{type(self).__name__}(wrapped) must be a loopwise.models.Model, "
                            f"got {type(wrapped).__name__}")
        self.wrapped = wrapped

    async def request(self, request: ModelRequest) -> ModelResponse:
        return await self.wrapped.request(request)

    # `name` and `price` are the wrapped model's; setting one on the wrapper overrides it.
    @property
    def name(self) -> str:
        return self.__dict__.get("_name") or self.wrapped.name

    @name.setter
    def name(self, value: str) -> None:
        self.__dict__["_name"] = value

    @property
    def price(self) -> Price | None:
        own = self.__dict__.get("_price")
        return self.wrapped.price if own is None else own

    @price.setter
    def price(self, value: Price | None) -> None:
        self.__dict__["_price"] = value

    def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price | None:
        return self.wrapped.default_price(input_tokens=input_tokens, at=at)

    def token_estimator(self) -> TokenEstimator:
        return self.wrapped.token_estimator()

    async def aclose(self) -> None:
        await self.wrapped.aclose()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class": type(self).__name__, "wraps": self.wrapped.describe()}
