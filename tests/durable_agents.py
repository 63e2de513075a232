"""Agents that tests/test_kill.py and tests/test_resume.py run in real child processes.

`loopwise run tests.durable_agents:NAME --db DB` runs one; `$LW_TEST_DIR` is a folder
where the tools leave what they did (one line per completed side effect) and marker
files that tell the test where the run is, so it can kill the process at that point.

The model is deterministic: it reads the tool results it has seen so far, so a run
resumed from its log asks for exactly what an uninterrupted run asks for next.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import loopwise as lw
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ToolCall, Usage

STEPS = 4
PRICE = Price(input_per_mtok=1.0, output_per_mtok=2.0)


def _dir() -> Path:
    return Path(os.environ["LW_TEST_DIR"])


def _mark(name: str) -> None:
    (_dir() / name).touch()


def _pause_at(name: str) -> bool:
    """True (after leaving the marker `name`) when the test asked to pause here."""
    if os.environ.get("LW_PAUSE_AT") == name and not (_dir() / f"{name}.passed").exists():
        (_dir() / f"{name}.passed").touch()
        _mark(name)
        return True
    return False


def _done_so_far(request: ModelRequest) -> int:
    return sum(1 for m in request.messages if m.role == "tool")


def _usage(request: ModelRequest) -> Usage:
    # Deterministic usage: what an uninterrupted run is billed, call for call.
    return Usage(input_tokens=100 + 10 * len(request.messages), output_tokens=20)


async def _steps_model(request: ModelRequest) -> ModelResponse:
    n = _done_so_far(request)
    if _pause_at(f"think-{n + 1}"):
        await asyncio.sleep(60)
    if not request.tools:
        return ModelResponse(text=f"best effort after {n} steps", usage=_usage(request))
    if n < STEPS:
        return ModelResponse(tool_calls=[ToolCall(os.environ.get("LW_TOOL", "step"), {"n": n + 1})],
                             usage=_usage(request))
    results = [m.content for m in request.messages if m.role == "tool"]
    return ModelResponse(text="done: " + " | ".join(results), usage=_usage(request))


@lw.tool(timeout=120, idempotent=True)
async def step(n: int) -> str:
    """An idempotent step: its effect is written when it completes."""
    if _pause_at(f"step-{n}"):
        await asyncio.sleep(60)
    with open(_dir() / "effects.txt", "a") as f:
        f.write(f"step {n}\n")
    return f"step {n} ok"


@lw.tool(timeout=120)
async def charge(n: int) -> str:
    """Not idempotent: it records that it began, then pauses, then records the charge."""
    with open(_dir() / "effects.txt", "a") as f:
        f.write(f"charge {n} began\n")
    if _pause_at(f"step-{n}"):
        await asyncio.sleep(60)
    with open(_dir() / "effects.txt", "a") as f:
        f.write(f"charge {n}\n")
    return f"charged {n}"


@lw.tool(timeout=120)
async def nap(seconds: float = 30) -> str:
    """Sleeps (a tool that hangs, as far as a run is concerned)."""
    _mark("napping")
    await asyncio.sleep(seconds)
    return "rested"


@lw.tool(timeout=120)
def nap_in_thread(seconds: float = 30) -> str:
    """A sync tool blocking its worker thread."""
    _mark("napping")
    time.sleep(seconds)
    return "rested"


@lw.tool(timeout=120)
async def block_loop(seconds: float = 30) -> str:
    """Blocks the event loop itself (the bug a watchdog reports): a kill cannot be handled."""
    _mark("napping")
    time.sleep(seconds)
    return "rested"


def _nap_model(tool: str):
    def fn(request: ModelRequest) -> ModelResponse:
        if not request.tools:
            return ModelResponse(text="stopped early")
        return ModelResponse(tool_calls=[ToolCall(tool, {"seconds": 30})])

    return FunctionModel(fn, name=f"nap-model-{tool}")


_limits = lw.Limits(max_iterations=8, budget_usd=1.0)

stepper = lw.Agent(FunctionModel(_steps_model, price=PRICE, name="steps"), tools=[step, charge],
                   limits=_limits, name="stepper")
sleeper = lw.Agent(_nap_model("nap"), tools=[nap], limits=lw.Limits(budget_usd=None), name="sleeper")
thread_sleeper = lw.Agent(_nap_model("nap_in_thread"), tools=[nap_in_thread], limits=lw.Limits(budget_usd=None),
                          name="thread-sleeper")
loop_blocker = lw.Agent(_nap_model("block_loop"), tools=[block_loop], limits=lw.Limits(budget_usd=None),
                        name="loop-blocker")
