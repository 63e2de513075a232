"""Tools: Python functions the model can call, with schemas and argument validation.

```python
import loopwise as lw

@lw.tool
async def get_order(order_id: str) -> dict:
    \"\"\"Look up an order.

    Args:
        order_id: The order's id, like "ORD-1042".
    \"\"\"
```

The JSON schema the model sees comes from the signature (pydantic); the docstring's
first paragraph is the description and its ``Args:`` section describes parameters.
Arguments that are not valid JSON, or that fail validation, become tool-error
observations the model can correct; they never crash the run.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, overload

from ._errors import UserError
from ._messages import ToolSpec

__all__ = ["RunContext", "Tool", "ToolArgumentsError", "tool"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(kw_only=True, slots=True, frozen=True)
class RunContext:
    """What a tool receives when it declares a parameter of this type.

    `call_id` is stable across resume: use it as an idempotency key. The
    parameter is not part of the tool's schema.
    """

    run_id: str
    call_id: str
    iteration: int
    tags: tuple[str, ...] = ()
    deps: Any = None


class ToolArgumentsError(Exception):
    """The model's arguments for a tool could not be used; the message is for the model."""


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The description (text before any section) and per-parameter descriptions."""
    if not doc:
        return "", {}
    doc = inspect.cleandoc(doc)
    lines = doc.splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        header = re.match(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?|Notes?):\s*$", stripped)
        if header and not line.startswith((" ", "\t")):
            section = header.group(1)
            current = None
            continue
        if section is None:
            description.append(line)
        elif section in ("Args", "Arguments", "Parameters"):
            m = re.match(r"^\s+(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
            if m:
                current = m.group(1).lstrip("*")
                params[current] = m.group(3).strip()
            elif current and stripped:
                params[current] = (params[current] + " " + stripped).strip()
    return "\n".join(description).strip(), params


def _format_validation_error(exc: Any) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


@dataclass(kw_only=True, slots=True, eq=False)
class Tool:
    """A function the model can call. Make one with `@loopwise.tool`."""

    fn: Callable[..., Any]
    name: str
    description: str
    spec: ToolSpec
    is_async: bool
    context_param: str | None
    _validator: Any = field(repr=False)
    _param_names: tuple[str, ...] = field(repr=False, default=())

    def validate(self, arguments: dict[str, Any] | str | None) -> dict[str, Any]:
        """The validated keyword arguments, or `ToolArgumentsError` explaining what is wrong."""
        from pydantic import ValidationError

        if isinstance(arguments, str):
            raw = arguments.strip() or "{}"
            try:
                arguments = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise ToolArgumentsError(
                    f"arguments are not valid JSON ({exc}); send a JSON object matching the tool's schema"
                ) from None
        elif arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ToolArgumentsError(
                f"arguments must be a JSON object, got {type(arguments).__name__}"
            )
        try:
            model = self._validator.model_validate(arguments)
        except ValidationError as exc:
            raise ToolArgumentsError(f"invalid arguments: {_format_validation_error(exc)}") from None
        return {name: getattr(model, name) for name in self._param_names}

    async def call(self, kwargs: dict[str, Any], ctx: RunContext) -> Any:
        """Run the tool with validated arguments."""
        if self.context_param is not None:
            kwargs = {**kwargs, self.context_param: ctx}
        if self.is_async:
            return await self.fn(**kwargs)
        import anyio.to_thread

        return await anyio.to_thread.run_sync(lambda: self.fn(**kwargs), abandon_on_cancel=True)


def _make_tool(fn: Callable[..., Any], *, name: str | None, description: str | None) -> Tool:
    from pydantic import ConfigDict, Field, create_model

    if isinstance(fn, Tool):
        return fn
    if not callable(fn):
        raise UserError(f"@tool needs a function, got {type(fn).__name__}")
    tool_name = name or getattr(fn, "__name__", None) or type(fn).__name__
    if not _NAME_RE.match(tool_name):
        raise UserError(
            f"tool name {tool_name!r} is not valid: use 1-64 letters, digits, '_' or '-' "
            "(pass name=... to @tool)"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolvable forward references
        raise UserError(f"tool {tool_name!r}: cannot resolve its type hints ({exc})") from exc
    doc_description, param_docs = _parse_docstring(inspect.getdoc(fn))
    signature = inspect.signature(fn)
    fields: dict[str, Any] = {}
    context_param = None
    for pname, param in signature.parameters.items():
        annotation = hints.get(pname, Any)
        if annotation is RunContext:
            context_param = pname
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise UserError(
                f"tool {tool_name!r}: *args/**kwargs parameters cannot be described to a model; "
                "declare each argument explicitly"
            )
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise UserError(f"tool {tool_name!r}: positional-only parameter {pname!r} is not supported")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, Field(default, description=param_docs.get(pname)))
    try:
        validator = create_model(
            f"{tool_name}_arguments", __config__=ConfigDict(extra="ignore"), **fields
        )
        parameters = validator.model_json_schema()
    except Exception as exc:
        raise UserError(f"tool {tool_name!r}: its parameters cannot be turned into a JSON schema ({exc})") from exc
    parameters.pop("title", None)
    for prop in parameters.get("properties", {}).values():
        if isinstance(prop, dict):
            prop.pop("title", None)
    tool_description = description if description is not None else doc_description
    is_async = inspect.iscoroutinefunction(fn)
    return Tool(
        fn=fn,
        name=tool_name,
        description=tool_description,
        spec=ToolSpec(name=tool_name, description=tool_description, parameters=parameters),
        is_async=is_async,
        context_param=context_param,
        _validator=validator,
        _param_names=tuple(fields),
    )


_NOT_YET = {
    "timeout": "per-tool timeouts",
    "total_timeout": "per-tool timeouts",
    "retries": "retries",
    "retry_on": "retries",
    "fallback": "fallbacks",
    "idempotent": "resume",
    "cost_usd": "tool costs in budgets",
    "max_result_chars": "result truncation",
    "isolation": "process isolation",
    "alternatives": "alternatives",
}


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@overload
def tool(*, name: str | None = None, description: str | None = None, **options: Any) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None, description: str | None = None, **options: Any) -> Any:
    """Make a function (sync or async) a tool. Works bare (`@tool`) or with options.

    Args:
        name: The name the model sees (default: the function's name).
        description: What the model is told the tool does (default: the docstring).
    """
    if options:
        known = [k for k in options if k in _NOT_YET]
        unknown = [k for k in options if k not in _NOT_YET]
        if unknown:
            raise UserError(f"@tool got unknown option(s) {', '.join(sorted(unknown))}; options: name, description")
        raise UserError(
            f"@tool option(s) {', '.join(sorted(known))} are not implemented in this version of "
            "loopwise; remove them rather than rely on a policy that would not be applied"
        )
    if fn is not None:
        return _make_tool(fn, name=name, description=description)
    return lambda f: _make_tool(f, name=name, description=description)
