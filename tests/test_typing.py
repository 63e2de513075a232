"""loopwise is typed for real: mypy passes over `src` and tests/typing_check.py (the
configuration is pyproject.toml's `[tool.mypy]`: strict on the public modules), and
`@tool`'s spelled-out options agree with what it accepts at run time."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import loopwise as lw
from loopwise._tools.policy import ToolPolicy
from loopwise._tools.tool import _DEFAULT, _OPTIONS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mypy_passes_over_src_and_the_typing_check():
    # With an empty cache (.mypy_cache) about 26 s of CPU: 70 s at a load of 10 on 2 cores.
    # With a warm one (`make test` runs mypy first) 1 to 3 s.
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "typing_check.py" not in done.stdout
    assert done.stdout.startswith("Success: no issues found in ")


def _keywords(fn: typing.Callable[..., object]) -> dict[str, inspect.Parameter]:
    return {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_tool_spells_out_every_option_with_the_policy_defaults():
    overloads = typing.get_overloads(lw.tool)
    assert len(overloads) == 2
    build = _keywords(ToolPolicy.build)
    assert set(build) == _OPTIONS
    for overload in overloads:
        options = _keywords(overload)
        assert list(options)[:2] == ["name", "description"]
        del options["name"], options["description"]
        assert list(options) == list(build)  # every option, in the policy's order
        for name, param in options.items():
            assert param.default == build[name].default, name  # (the default a type checker shows is true)
            assert param.annotation != "Any", name
    implementation = _keywords(lw.tool)
    assert list(implementation) == ["name", "description", *build]
    assert all(implementation[name].default is _DEFAULT for name in build)
    assert [p.kind for p in inspect.signature(lw.tool).parameters.values()][-1] is inspect.Parameter.VAR_KEYWORD
