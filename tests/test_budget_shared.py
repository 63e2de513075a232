"""A budget shared by processes, on Redis and in the SQLite file: real processes, real agents.

N processes each run M agents at once on one named budget; the spend summed from
every run's event log never exceeds it (and reaches it: the test is not vacuous).
A process SIGKILLed while it holds a reservation gives it back to the pool, by expiry
(Redis) or because its pid is gone (SQLite); a live process in a tool call longer
than the expiry keeps its reservation. Bounds on time are generous: the machine is
shared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import loopwise as lw

from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent

# A child process: `run` runs RUNS agents at once on the shared budget and prints their
# ids; `hang` runs one agent whose paid tool call never returns (printing `holding`).
# Each model call costs up to ~$0.004 and each iteration calls the $0.01 tool twice, in parallel.
CHILD = r"""
import asyncio, json, sys
import loopwise as lw
from loopwise._policies import budget_shared as _budget_shared
from loopwise.models import FunctionModel, ModelResponse, Price, ToolCall, Usage

mode, backend, name, limit, runs, db, ttl = sys.argv[1:8]
_budget_shared.RESERVATION_TTL_S = float(ttl)
shared = lw.Budget(usd=float(limit), name=name, backend=backend)

@lw.tool(cost_usd=0.01)
async def lookup(q: str) -> str:
    '''A paid lookup.'''
    if mode == "hang":
        print(json.dumps({"holding": True}), flush=True)
        await asyncio.Event().wait()
    await asyncio.sleep(0)
    return "result " * 20

async def think(request):
    await asyncio.sleep(0)
    n_in = sum(len(m.content or "") for m in request.messages) // 4 + 1
    out = min(request.max_tokens or 200, 200)
    if request.tools:
        return ModelResponse(text="more", tool_calls=[ToolCall("lookup", {"q": "x"}), ToolCall("lookup", {"q": "y"})],
                             usage=Usage(n_in, out))
    return ModelResponse(text="done", usage=Usage(n_in, out))

agent = lw.Agent(FunctionModel(think, price=Price(3.0, 15.0)), tools=[lookup], store=lw.SQLiteStore(db),
                 limits=lw.Limits(max_iterations=500, budget_usd=None), runaway=lw.RunawayDetector(enabled=False))

async def main():
    results = await asyncio.gather(*(agent.run(f"task {i}", budget=shared) for i in range(int(runs))))
    print(json.dumps({"runs": [r.run_id for r in results], "reasons": [r.stop_reason for r in results]}), flush=True)

asyncio.run(main())
"""


@pytest.fixture(params=["redis", "sqlite"])
def backend(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "shared.db")
        return
    server = RedisServer.start_new(tmp_path / "redis")
    yield server.url
    server.close()


def _child(tmp_path: Path, mode: str, backend: str, limit: float, runs: int, ttl: float) -> tuple[subprocess.Popen, Path]:
    db = tmp_path / f"child-{time.monotonic_ns()}.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("LOOPWISE_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, backend, "batch-42", str(limit), str(runs), str(db),
                             str(ttl)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, db


def _logged_spend(db: Path, run_ids: list[str]) -> float:
    """What the runs spent, summed from their event logs: every model call and tool call."""
    store = lw.SQLiteStore(db)
    try:
        return sum(e.cost_usd for run_id in run_ids for e in store.load(run_id)
                   if e.kind in ("model_call_finished", "tool_call_finished"))
    finally:
        store.close()


def wait_until(condition, timeout: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout} s"
        time.sleep(0.05)


def test_processes_with_concurrent_runs_never_overspend_one_budget(backend, tmp_path):
    limit, n_processes, runs_each = 0.60, 3, 6
    children = [_child(tmp_path, "run", backend, limit, runs_each, 15.0) for _ in range(n_processes)]
    total = 0.0
    reasons: list[str] = []
    for proc, db in children:
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert len(report["runs"]) == runs_each
        reasons += report["reasons"]
        total += _logged_spend(db, report["runs"])
    budget = lw.Budget(usd=limit, name="batch-42", backend=backend)
    s = budget.snapshot()
    assert total <= limit + 1e-9, f"spent ${total:.6f} of ${limit}"
    assert s.spent_usd == pytest.approx(total, abs=1e-9) and s.reserved_usd == 0 and s.overruns == 0
    # Not vacuous: together they ran the budget down to less than one iteration's worth.
    assert total > limit - 0.03 and set(reasons) == {"budget"}


def test_a_killed_process_gives_its_reservations_back_and_a_live_one_keeps_them(backend, tmp_path):
    ttl = 2.0
    proc, _ = _child(tmp_path, "hang", backend, 1.0, 1, ttl)
    budget = lw.Budget(usd=1.0, name="batch-42", backend=backend)
    try:
        holding = threading.Event()
        threading.Thread(target=lambda: proc.stdout and "holding" in proc.stdout.readline() and holding.set(),
                         daemon=True).start()
        assert holding.wait(60), proc.stderr.read() if proc.poll() is not None and proc.stderr else "no line"
        # Its tool calls hold $0.01 each (two in parallel: the second may reserve after the first
        # says it is holding), and outlive the expiry several times over.
        wait_until(lambda: budget.reserved_usd == pytest.approx(0.02), what="both tool calls holding $0.01")
        time.sleep(3 * ttl)
        assert proc.poll() is None and budget.reserved_usd == pytest.approx(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_until(lambda: budget.reserved_usd == 0, what="the killed process's reservations returning")
        # The pool is whole again: what it spent (its model call) and the rest.
        s = budget.snapshot()
        budget.reserve(usd=1.0 - s.spent_usd).release()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
