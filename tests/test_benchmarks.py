"""The benchmarks still run (smoke runs: their numbers are not checked here, see benchmarks/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
