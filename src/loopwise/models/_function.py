"""Test models that ship with the library: `FunctionModel` and `ScriptedModel`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from .._errors import ModelBehaviorError, UserError
from .._messages import ToolCall
from .._runtime.scopes import current_run
from ._base import Model, ModelRequest, ModelResponse, Price

__all__ = ["FunctionModel", "ScriptedModel"]

ModelFunction = Callable[[ModelRequest], "ModelResponse | str | Awaitable[ModelResponse | str]"]


def _coerce(value: Any, source: str | FunctionModel) -> ModelResponse:
    if type(value) is ModelResponse:
        return value
    if isinstance(value, ModelResponse):
        return value
    if isinstance(value, str):
        return ModelResponse(text=value)
    if isinstance(source, FunctionModel):  # named only when it is wrong: no string per call
        source = f"FunctionModel function {source.name!r}"
    raise ModelBehaviorError(
        f"{source} returned {type(value).__name__}; expected a ModelResponse "
        "(or a str for a final answer)"
    )


class FunctionModel(Model):
    """A model whose answers come from a Python function (sync or async).

    ```python
    from loopwise.models import FunctionModel, ModelResponse

    model = FunctionModel(lambda request: ModelResponse(text="hello"))
    ```

    The function receives the `ModelRequest` and returns a `ModelResponse` (a plain
    `str` is taken as a final answer). It costs $0 unless given a `price`. A sync
    function runs in a worker thread, as a sync tool does, so `ModelPolicy.timeout`
    bounds it even when it blocks (its thread is abandoned); an async one runs on the
    event loop (and, like an async tool, cannot be stopped if it never yields).
    """

    def __init__(self, fn: ModelFunction, *, price: Price | None = None, name: str | None = None) -> None:
        if not callable(fn):
            raise UserError(f"FunctionModel needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.price = price
        self.name = name or f"function:{getattr(fn, '__name__', 'fn')}"
        self._is_async = inspect.iscoroutinefunction(fn)

    def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price:
        """$0 unless given a `price`: a test double."""
        return Price(0, 0)

    async def request(self, request: ModelRequest) -> ModelResponse:
        if self._is_async:
            value = await self.fn(request)  # type: ignore[misc]
        else:
            # In a worker thread, as a sync tool: a function that blocks is then abandoned
            # when `ModelPolicy.timeout` expires (or the run is killed), not waited for.
            from .._tools.threads import default_pool

            fn = self.fn
            value = await default_pool().run(lambda: fn(request), label=self.name)
            if inspect.isawaitable(value):
                value = await value
        return _coerce(value, self)


class ScriptedModel(Model):
    """A fixed sequence of responses, replayed from the start for each run.

    Each item is a `ModelResponse`, a `str` (a final answer) or a `ToolCall` /
    list of `ToolCall`s (a response asking for those tools). Running out of
    responses ends the run as `error` with a message saying so.

    The position is the run's count of model calls made, resumed runs included: a
    call cut off by a crash or a kill counts as made (it is charged), so the call a
    resume makes again gets the next response. A test double that must answer the
    repeated call the same way decides from the request instead (`FunctionModel`).
    """

    def __init__(self, responses: Sequence[ModelResponse | str | ToolCall | Sequence[ToolCall]], *, price: Price | None = None, name: str = "scripted") -> None:
        self.responses = [self._normalize(i, r) for i, r in enumerate(responses)]
        self.price = price
        self.name = name
        self._calls_outside_runs = 0

    def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price:
        """$0 unless given a `price`: a test double."""
        return Price(0, 0)

    @staticmethod
    def _normalize(index: int, item: Any) -> ModelResponse:
        if isinstance(item, ModelResponse):
            return item
        if isinstance(item, str):
            return ModelResponse(text=item)
        if isinstance(item, ToolCall):
            return ModelResponse(tool_calls=[item])
        if isinstance(item, (list, tuple)) and all(isinstance(c, ToolCall) for c in item):
            return ModelResponse(tool_calls=list(item))
        raise UserError(
            f"ScriptedModel response #{index} is {type(item).__name__}; "
            "expected a ModelResponse, a str, a ToolCall or a list of ToolCalls"
        )

    async def request(self, request: ModelRequest) -> ModelResponse:
        run = current_run.get()
        if run is None:
            index = self._calls_outside_runs
            self._calls_outside_runs += 1
        else:
            index = run.model_calls - 1
        if index >= len(self.responses):
            raise ModelBehaviorError(
                f"ScriptedModel ran out of responses: call #{index + 1} was made but the "
                f"script has {len(self.responses)}; add responses to the script"
            )
        response = self.responses[index]
        # A fresh copy, so a run cannot alter the script for the next one.
        return ModelResponse(
            text=response.text,
            tool_calls=list(response.tool_calls),
            usage=None if response.usage is None else type(response.usage)(
                response.usage.input_tokens,
                response.usage.output_tokens,
                response.usage.cached_input_tokens,
                response.usage.reasoning_tokens,
            ),
            finish_reason=response.finish_reason,
        )
