"""One error tree, true: every exception class loopwise defines is a `LoopwiseError`
(or is one of the few internal ones `_errors` names), and `_errors`'s docstring draws
each where it is, with the bases it has."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import loopwise
from loopwise import LoopwiseError
from loopwise import _errors

# Optional dependencies a module may need; a module that needs a missing one is skipped.
OPTIONAL = {"mcp", "opentelemetry", "redis", "httpx", "openai"}


def _all_modules() -> list[object]:
    modules = []
    for info in pkgutil.walk_packages(loopwise.__path__, "loopwise."):
        try:
            modules.append(importlib.import_module(info.name))
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in OPTIONAL:
                raise
    return modules


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module in _all_modules():
        for value in vars(module).values():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__.split(".")[0] == "loopwise"):
                assert found.setdefault(value.__qualname__, value) is value, f"two classes named {value.__qualname__}"
    return found


def _drawn_tree() -> dict[str, tuple[str | None, str]]:
    """Each class the docstring's tree draws: its drawn parent and its line."""
    block = re.search(r"```\n(.*?)```", _errors.__doc__ or "", re.S)
    assert block, "_errors's docstring has no tree"
    drawn: dict[str, tuple[str | None, str]] = {}
    stack: list[str] = []
    for line in block.group(1).splitlines():
        m = re.match(r"([│├└─ ]*)([A-Z][A-Za-z]+)\b", line)
        if not m:
            continue  # a continuation line
        depth = len(m.group(1)) // 4
        del stack[depth:]
        assert len(stack) == depth, f"the tree skips a level at: {line!r}"
        drawn[m.group(2)] = (stack[-1] if stack else None, line)
        stack.append(m.group(2))
    return drawn


def _internal() -> set[str]:
    text = (_errors.__doc__ or "").split("Internal, not `LoopwiseError`s", 1)
    assert len(text) == 2, "_errors's docstring names no internal exceptions"
    return set(re.findall(r"^- `(\w+)` \(", text[1].split("\n\n", 1)[0], re.M))


def test_every_exception_class_is_found():
    found = _exception_classes()
    # the walk reaches the cli, mcp, otel, isolation and shared-budget modules
    for name in ("CLIError", "MCPTimeoutError", "OTLPExportError", "ProcessTimeoutError", "Unreachable"):
        assert name in found


def test_every_exception_is_a_loopwise_error_or_named_internal():
    internal = _internal()
    for name, cls in _exception_classes().items():
        if name in internal:
            assert not issubclass(cls, LoopwiseError), f"{name} is a LoopwiseError: draw it in the tree"
            source = inspect.getsource(inspect.getmodule(cls))
            assert re.search(rf"# Internal, not a LoopwiseError.*\n(#.*\n)*class {name}\(", source), \
                f"{name} lacks the comment saying it is internal"
        else:
            assert issubclass(cls, LoopwiseError), f"{cls.__module__}.{name} is not a LoopwiseError"
    assert internal <= set(_exception_classes()), "_errors names an internal exception that does not exist"


def test_the_tree_is_true():
    found = _exception_classes()
    drawn = _drawn_tree()
    public = {n for n, c in found.items() if issubclass(c, LoopwiseError)}
    assert set(drawn) == public, f"missing from the tree: {public - set(drawn)}; not a class: {set(drawn) - public}"
    for name, (parent, line) in drawn.items():
        cls = found[name]
        if parent is None:
            assert cls is LoopwiseError
            continue
        assert found[parent] in cls.__bases__, f"{name} is drawn under {parent}; its bases: {cls.__bases__}"
        others = [b.__name__ for b in cls.__bases__ if not issubclass(b, LoopwiseError)]
        for other in others:
            assert f"also a {other}" in line, f"{name} is also a {other}: say so on its line"
        assert line.count("also a ") == len(others), f"{name}'s line names a base it does not have"
        where = re.search(r"\((_[\w.]+|loopwise\.\w+)\)", line)
        module = cls.__module__
        expected = None if module == "loopwise._errors" else module.removeprefix("loopwise.") \
            if module.split(".")[1].startswith("_") else module
        assert (where.group(1) if where else None) == expected, f"{name} is defined in {module}"


@pytest.mark.parametrize("name", ["ProcessTimeoutError", "MCPTimeoutError"])
def test_timeouts_stay_timeout_errors(name):
    assert issubclass(_exception_classes()[name], TimeoutError)


def test_catching_loopwise_error_catches_an_open_breaker():
    breaker = loopwise.CircuitBreaker(failures=1, window_s=60, cooldown_s=60)
    assert breaker.on_failure("t").new == "open"
    with pytest.raises(loopwise.LoopwiseError, match="was not called"):
        breaker.before_call("t")
