"""The benchmarks still run (smoke runs: their numbers are not checked here, see benchmarks/README.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_overhead_prints_every_row():
    out = _run("benchmarks/overhead.py", "--quick")
    for row in ("(a) CPU/run, SQLite log, process", "(a) CPU/run, MemoryStore, event-loop thread",
                "(b) wall ÷ critical path, 200 concurrent", "(b) memory per concurrent run",
                "(b) baseline: same sleeps in bare asyncio", "(c) import loopwise", "(d) tool call"):
        assert row in out, out


def test_context_prints_its_tables():
    out = _run("benchmarks/context.py", "--iterations", "6", "--keep-last", "2")
    for text in ("naive append", "window k=2", "THINK input", "naive / this"):
        assert text in out, out


def test_kill_prints_its_table():
    out = _run("benchmarks/kill.py", "--runs", "20", "--kills", "3", "--no-redis")
    for text in ("local (SQLite)   same process", "local (SQLite)   other process", "p99 ms"):
        assert text in out, out


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (.ci/run installs it)")
def test_instructions_counts_a_run_of_each_tree():
    out = _run("benchmarks/instructions.py", "--runs", "5", "--warmup", "3", "--src", "src", "--src", "src")
    rows = [line for line in out.splitlines() if line.startswith("│ src")]
    assert len(rows) == 2, out
    counts = [int(row.split("│")[2].strip().replace(",", "")) for row in rows]
    # The loop's own work for one run is hundreds of thousands of instructions, the same for the same tree.
    assert all(100_000 < c < 20_000_000 for c in counts), out
    assert abs(counts[0] - counts[1]) < 0.02 * counts[0], out
