"""The hot-path tricks (`loopwise._hotpath`) against their plain versions.

Every trick has a plain reference version (`LOOPWISE_PLAIN`). The same runs, kills and
deadlines included, must write the same event logs under both; and the core test files
must pass under the plain versions as they do under the fast ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopwise import _hotpath
from loopwise._errors import UserError

ROOT = Path(__file__).resolve().parent.parent

#: The core test files, re-run under the plain versions (in a child pytest).
CORE_TESTS = ("tests/test_loop.py", "tests/test_kill.py", "tests/test_events_api.py", "tests/test_scopes.py",
              "tests/test_tools.py")


def _env(plain: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    env.pop("LOOPWISE_PLAIN", None)
    if plain is not None:
        env["LOOPWISE_PLAIN"] = plain
    return env


@pytest.mark.parametrize(("value", "plain"), [
    (None, set()), ("", set()), ("0", set()), ("1", set(_hotpath.TRICKS)), ("all", set(_hotpath.TRICKS)),
    ("scopes", {"scopes"}), (" sweeper , tool_tasks ", {"sweeper", "tool_tasks"}),
])
def test_loopwise_plain_names_the_tricks_replaced(value, plain):
    assert _hotpath.plain_from(value) == plain


def test_an_unknown_trick_is_a_clear_error():
    with pytest.raises(UserError, match=r"LOOPWISE_PLAIN='scopes,fastest' names no trick fastest: use 1 .*"
                                        r"comma-separated list of constructors, message, scopes"):
        _hotpath.plain_from("scopes,fastest")


def test_the_plain_versions_are_what_a_child_process_gets():
    probe = "from loopwise import _hotpath as h; print(sorted(h.PLAIN), h.cancel_scope.__name__, h.wait_within.__name__)"
    out = subprocess.run([sys.executable, "-c", probe], env=_env("scopes,arm_on_wait"), capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["['arm_on_wait',", "'scopes']", "_plain_cancel_scope", "_plain_wait_within"]
    bad = subprocess.run([sys.executable, "-c", "import loopwise"], env=_env("bogus"), capture_output=True, text=True)
    assert bad.returncode != 0 and "LOOPWISE_PLAIN='bogus' names no trick bogus" in bad.stderr


def _logs(tmp_path: Path, plain: str | None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "hotpath_runs.py"),
                             str(tmp_path / f"{plain or 'fast'}.db")], env=_env(plain), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fast_and_plain_versions_write_the_same_logs(tmp_path):
    """The same runs (tool calls at once and one at a time, timeouts near and far, a deadline, kills) in two
    processes, one with every trick, one with every plain version: the same events, less what timing decides."""
    children = {"fast": _logs(tmp_path, None), "plain": _logs(tmp_path, "1")}
    lines = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=100)
        assert child.returncode == 0, err
        lines[name] = [json.loads(line) for line in out.splitlines()]
    assert lines["fast"][-1] == {"plain": []} and lines["plain"][-1] == {"plain": sorted(_hotpath.TRICKS)}
    fast, plain = lines["fast"][:-1], lines["plain"][:-1]
    ends = {run["scenario"]: run["events"][-1]["stop_reason"] for run in fast}
    assert ends == {"parallel": "done", "one_at_a_time": "done", "no_waits": "done", "tool_timeouts": "done",
                    "model_timeout": "error", "deadline": "deadline", "killed": "killed", "killed_stubborn": "killed"}
    outcomes = [e["outcome"] for run in fast if run["scenario"] == "tool_timeouts" for e in run["events"]
                if e["kind"] == "tool_call_finished"]
    assert sorted(outcomes) == ["error", "error", "ok"]  # both timeouts, the near one and the swept one
    for fast_run, plain_run in zip(fast, plain, strict=True):
        assert fast_run == plain_run, fast_run["scenario"]


@pytest.mark.timeout(900)
def test_the_core_tests_pass_under_the_plain_versions():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *CORE_TESTS],
                          env=_env("1"), cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
