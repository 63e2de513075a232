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

from .._errors import LoopwiseError, UserError
from .._messages import ToolSpec
from .._stores.storable import DEPTH_MESSAGE, TOO_DEEP, plain, too_deep
from .breaker import CircuitBreaker
from .policy import DEFAULT_MAX_RESULT_CHARS, DEFAULT_TIMEOUT_S, Backoff, Isolation, ToolLike, ToolPolicy

__all__ = ["RunContext", "Tool", "ToolArgumentsError", "parse_arguments", "tool"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(kw_only=True, slots=True, frozen=True)
class RunContext:
    """What a tool receives when it declares a parameter of this type.

    `call_id` is stable across resume: use it as an idempotency key. The
    parameter is not part of the tool's schema. A tool caller (`ToolCaller.call_tool`)
    gets one for every call.
    """

    run_id: str
    call_id: str
    iteration: int
    tags: tuple[str, ...] = ()
    deps: Any = None
    # The run's side of the call, for the default tool caller: where the policy's reports
    # go (`_execute.CallEvents`) and the meter its attempts' cost is added to as they start
    # (`_execute.Spend`). None outside a run.
    _events: Any = field(default=None, repr=False, compare=False)
    _spend: Any = field(default=None, repr=False, compare=False)


class ToolArgumentsError(LoopwiseError):
    """The model's arguments for a tool could not be used; the message is for the model."""


def parse_arguments(arguments: dict[str, Any] | str | None) -> dict[str, Any]:
    """A tool call's arguments as a dict: parsed from the provider's raw JSON if need be.

    Raises `ToolArgumentsError`, worded for the model, when they are not a JSON object.
    """
    if isinstance(arguments, str):
        if arguments == TOO_DEEP:  # what the loop kept of a Python model's arguments nested too deep
            raise ToolArgumentsError(DEPTH_MESSAGE)
        try:
            arguments = json.loads(arguments.strip() or "{}")
        except RecursionError:
            raise ToolArgumentsError(DEPTH_MESSAGE) from None
        except ValueError as exc:
            raise ToolArgumentsError(
                f"arguments are not valid JSON ({exc}); send a JSON object matching the tool's schema"
            ) from None
    elif arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolArgumentsError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    if not plain(arguments) and too_deep(arguments):
        raise ToolArgumentsError(DEPTH_MESSAGE)
    return arguments


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
    policy: ToolPolicy = field(default_factory=ToolPolicy)
    _validator: Any = field(repr=False, default=None)

    def validate(self, arguments: dict[str, Any] | str | None) -> dict[str, Any]:
        """The validated keyword arguments, or `ToolArgumentsError` explaining what is wrong."""
        arguments = parse_arguments(arguments)
        try:
            # `model_validate` without its Python wrapper: every tool call passes here.
            model = self._validator.__pydantic_validator__.validate_python(arguments)
        except Exception as exc:
            from pydantic import ValidationError

            if not isinstance(exc, ValidationError):
                raise
            raise ToolArgumentsError(f"invalid arguments: {_format_validation_error(exc)}") from None
        # The validated fields, in the signature's order: the dict of a model instance
        # that nothing else holds, so it needs no copy.
        fields: dict[str, Any] = model.__dict__
        return fields

    async def call(self, kwargs: dict[str, Any], ctx: RunContext | None, events: Any = None, *,
                   timeout: float | None = None) -> Any:
        """One attempt with validated arguments (the policy around it is `_tools.execute`'s).

        Async tools run on the event loop and are cancelled on timeout. Sync tools run
        in a daemon worker thread and are abandoned on timeout (`events.thread_abandoned`
        is told). Their caller's cancel scope is their timeout. `isolation="process"`
        tools run in a child process, killed once `timeout` has passed since the function
        started in it (`_tools.isolation.ProcessTimeoutError`): the process's start-up is
        bounded apart.
        """
        if self.context_param is not None:
            kwargs = {**kwargs, self.context_param: ctx}
        if self.is_async:
            return await self.fn(**kwargs)
        if self.policy.isolation == "process":
            from .isolation import run_in_subprocess

            return await run_in_subprocess(self.fn, kwargs, timeout=timeout, label=self.name)
        from .threads import default_pool

        fn = self.fn
        on_abandon = None
        if events is not None:
            name = self.name

            def on_abandon(info: Any) -> None:
                events.thread_abandoned(name, getattr(info, "thread_name", str(info)))

        return await default_pool().run(lambda: fn(**kwargs), label=self.name, on_abandon=on_abandon)


ToolLike.register(Tool)


def _make_tool(fn: Callable[..., Any], *, name: str | None, description: str | None,
               options: dict[str, Any]) -> Tool:
    from pydantic import ConfigDict, Field, create_model

    if isinstance(fn, Tool):
        if name is None and description is None and not options:
            return fn
        raise UserError(f"{fn.name!r} is already a tool; give the options to its @tool decorator")
    if not callable(fn):
        raise UserError(f"@tool needs a function, got {type(fn).__name__}")
    tool_name = name or getattr(fn, "__name__", None) or type(fn).__name__
    if not _NAME_RE.match(tool_name):
        raise UserError(
            f"tool name {tool_name!r} is not valid: use 1-64 letters, digits, '_' or '-' "
            "(pass name=... to @tool)"
        )
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise UserError(
            f"tool {tool_name!r} is a generator function (it yields): a tool's result is one value; "
            "return it (collect what it yields into a list or a string first)"
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
    policy = ToolPolicy.build(tool_name, **options)
    if policy.isolation == "process":
        if is_async:
            raise UserError(f"tool {tool_name!r}: isolation='process' is for sync functions; make it a plain def")
        if context_param is not None:
            raise UserError(f"tool {tool_name!r}: isolation='process' tools cannot take a RunContext "
                            "(it does not cross into the child process); pass what it needs as arguments")
    elif policy.isolation == "thread" and is_async:
        raise UserError(f"tool {tool_name!r}: isolation='thread' is for sync functions; async tools run on the event loop")
    return Tool(
        fn=fn,
        name=tool_name,
        description=tool_description,
        spec=ToolSpec(name=tool_name, description=tool_description, parameters=parameters),
        is_async=is_async,
        context_param=context_param,
        policy=policy,
        _validator=validator,
    )


_OPTIONS = frozenset(
    ("timeout", "total_timeout", "retries", "retry_on", "backoff", "fallback", "idempotent", "cost_usd",
     "max_result_chars", "isolation", "alternatives", "secret", "breaker", "check")
)

#: Exception types for `retry_on=`: one, or several.
RetryOn = type[Exception] | tuple[type[Exception], ...] | list[type[Exception]]
#: Tool names or argument names: one, or several.
Names = str | tuple[str, ...] | list[str]
#: What `check=` is: check(expected, actual) -> bool | None.
Check = Callable[[Any, Any], bool | None]


class _Default:
    """The default of an option not given: `@tool` passes on only the options given."""

    def __repr__(self) -> str:
        return "<default>"


_DEFAULT: Any = _Default()


# The two overloads spell the options out with their real defaults (what a type checker
# and an editor show); the implementation takes them with `_DEFAULT`, to tell which were given.
# tests/test_tools.py checks that the three agree with each other and with `ToolPolicy.build`.
@overload
def tool(
    fn: Callable[..., Any], /, *, name: str | None = None, description: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S, total_timeout: float | None = None, retries: int = 0,
    retry_on: RetryOn | None = None, backoff: Backoff | None = None, fallback: object = None,
    idempotent: bool = False, cost_usd: float = 0.0, max_result_chars: int | None = DEFAULT_MAX_RESULT_CHARS,
    isolation: Isolation | None = None, alternatives: Names = (), secret: Names = (),
    breaker: CircuitBreaker | bool | None = True, check: Check | None = None,
) -> Tool: ...
@overload
def tool(
    *, name: str | None = None, description: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S, total_timeout: float | None = None, retries: int = 0,
    retry_on: RetryOn | None = None, backoff: Backoff | None = None, fallback: object = None,
    idempotent: bool = False, cost_usd: float = 0.0, max_result_chars: int | None = DEFAULT_MAX_RESULT_CHARS,
    isolation: Isolation | None = None, alternatives: Names = (), secret: Names = (),
    breaker: CircuitBreaker | bool | None = True, check: Check | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(
    fn: Callable[..., Any] | None = None, /, *, name: str | None = None, description: str | None = None,
    timeout: float | None = _DEFAULT, total_timeout: float | None = _DEFAULT, retries: int = _DEFAULT,
    retry_on: RetryOn | None = _DEFAULT, backoff: Backoff | None = _DEFAULT, fallback: object = _DEFAULT,
    idempotent: bool = _DEFAULT, cost_usd: float = _DEFAULT, max_result_chars: int | None = _DEFAULT,
    isolation: Isolation | None = _DEFAULT, alternatives: Names = _DEFAULT, secret: Names = _DEFAULT,
    breaker: CircuitBreaker | bool | None = _DEFAULT, check: Check | None = _DEFAULT,
    **unknown: Any,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a function (sync or async) a tool. Works bare (`@tool`) or with options.

    Args:
        name: The name the model sees (default: the function's name).
        description: What the model is told the tool does (default: the docstring).
        timeout: Seconds one attempt may take (default 30; None: no limit).
        total_timeout: Seconds all attempts, backoff and the fallback chain may take
            together (default: derived from the others).
        retries: Extra attempts after a failure (`retries=1`: up to two attempts).
        retry_on: Exception types worth retrying (default: any; a timeout always is).
        backoff: A `loopwise.Backoff` for the waits between attempts.
        fallback: What answers after the last failure: a plain value, a
            `loopwise.Template`, a tool or callable taking the same arguments, or a
            list of these tried in order.
        idempotent: Whether running the call twice is safe (resume re-runs it then).
        cost_usd: Dollars one call costs (counted in the run's cost).
        max_result_chars: The most characters of one result the model reads (default 20,000).
        isolation: ``"process"`` runs a sync tool in a child process that is killed
            on timeout, for code that must truly stop.
        alternatives: Names of tools the model may use instead when this one fails.
        secret: Argument names whose values are redacted from error messages.
        breaker: A `loopwise.CircuitBreaker`, True (the default breaker) or False.
        check: ``check(expected, actual) -> bool | None``: with `Agent(expectations=True)`,
            decides whether the value the tool returned matched the model's expectation
            (None: cannot tell). Default: the comparison documented in docs/decisions.md.
    """
    if unknown:  # (a type checker reports these; a plain call gets this line)
        raise UserError(f"@tool got unknown option(s) {', '.join(sorted(unknown))}; options: name, description, "
                        f"{', '.join(sorted(_OPTIONS))}")
    given = locals()  # (no other local yet: only the parameters)
    options = {key: given[key] for key in _OPTIONS if given[key] is not _DEFAULT}
    if fn is not None:
        return _make_tool(fn, name=name, description=description, options=options)
    return lambda f: _make_tool(f, name=name, description=description, options=options)
