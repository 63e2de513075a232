"""The benchmarks still run (smoke runs: their numbers are not checked here, see benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 110) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_overhead_prints_every_row():
    out = _run("benchmarks/overhead.py", "--quick")
    for row in ("(a) CPU/run, SQLite log, process", "(a) CPU/run, MemoryStore, event-loop thread",
                "(b) wall ÷ critical path, 200 concurrent", "(b) memory per concurrent run",
                "(b) baseline: same sleeps in bare asyncio", "(c) import loopwise", "(d) tool call"):
        assert row in out, out


def test_overhead_prints_the_scaling_table():
    out = _run("benchmarks/overhead.py", "--only", "e", "--scale", "5,20", "--scale-runs", "20", "--model-ms", "5",
               "--tool-ms", "2")
    for row in ("(e) CPU/run at 5 concurrent", "(e) CPU/run at 20 concurrent", "(e) wall ÷ critical path at 20",
                "(e) gc at 20"):
        assert row in out, out


def test_context_prints_its_tables():
    out = _run("benchmarks/context.py", "--iterations", "6", "--keep-last", "2")
    for text in ("naive append", "window k=2", "THINK input", "naive / this"):
        assert text in out, out


def test_kill_prints_its_table():
    out = _run("benchmarks/kill.py", "--runs", "20", "--kills", "3", "--no-redis")
    for text in ("local (SQLite)   same process", "local (SQLite)   other process", "p99 ms"):
        assert text in out, out


def _instructions_module():
    spec = importlib.util.spec_from_file_location("instructions_bench", ROOT / "benchmarks" / "instructions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("workload", "store", "runs"), [("_WORKLOAD", "memory", 3), ("_WORKLOAD", "sqlite", 61),
                                                        ("_WAITING", "memory", 1)])
def test_the_workload_instructions_counts_runs_on_this_tree(tmp_path, workload, store, runs):
    """What instructions.py runs under valgrind (it patches loopwise's timers), run here without it.

    The count itself takes minutes under valgrind on a busy machine: `pytest -m benchmark`.
    """
    bench = _instructions_module()
    script = tmp_path / "workload.py"
    script.write_text(getattr(bench, workload).format(bench=str(ROOT / "benchmarks"), copy_every=bench.COPY_EVERY))
    done = subprocess.run([sys.executable, str(script), store, "1", str(runs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=100, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stdout + done.stderr


# Not in the default run (pyproject's addopts deselect `benchmark`): four interpreters under
# valgrind took 1m45 of CPU, 4m45 at a load of 5 on 2 cores. `pytest -m benchmark` runs it.
@pytest.mark.benchmark
@pytest.mark.timeout(1800)
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (make bench installs it)")
def test_instructions_counts_a_run_of_each_tree():
    out = _run("benchmarks/instructions.py", "--runs", "5", "--warmup", "3", "--src", "src", "--src", "src",
               timeout=1700)
    rows = [line for line in out.splitlines() if line.startswith("│ src")]
    assert len(rows) == 2, out
    counts = [int(row.split("│")[3].strip().replace(",", "")) for row in rows]
    # The loop's own work for one run is hundreds of thousands of instructions, the same for the same tree.
    assert all(100_000 < c < 20_000_000 for c in counts), out
    assert abs(counts[0] - counts[1]) < 0.02 * counts[0], out
