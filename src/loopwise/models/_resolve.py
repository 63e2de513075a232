"""Turn `Agent(model=...)` values into `Model` instances."""

from __future__ import annotations

from .._errors import UserError
from ._base import Model

__all__ = ["resolve_model"]

_PROVIDERS = ("openai",)


def resolve_model(model: Model | str, *, max_retries: int | None = None) -> Model:
    """A `Model` as is; a string ``"provider:model-name"`` as that provider's model.

    ``"openai:gpt-4o-mini"`` becomes ``OpenAIModel("gpt-4o-mini")`` (which reads
    ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` as the `openai` SDK does).
    `max_retries` sets the SDK-level retries of a model made from a string (the
    `Agent` passes 0: its `ModelPolicy` owns retries).
    """
    if isinstance(model, Model):
        return model
    if not isinstance(model, str):
        raise UserError(
            f"Agent(model=...) must be a Model instance or a string like 'openai:gpt-4o-mini', "
            f"got {type(model).__name__}"
        )
    provider, sep, name = model.partition(":")
    if not sep or not name:
        raise UserError(
            f"model {model!r} has no provider prefix: write 'openai:{model}', or pass a Model "
            "instance (e.g. loopwise.models.OpenAIModel(...))"
        )
    if provider == "openai":
        from ._openai import OpenAIModel

        return OpenAIModel(name) if max_retries is None else OpenAIModel(name, max_retries=max_retries)
    raise UserError(
        f"unknown model provider {provider!r} in {model!r}; known providers: "
        f"{', '.join(_PROVIDERS)}. For another server that speaks the OpenAI protocol use "
        "OpenAIModel(name, base_url=...)"
    )
