"""Runs that tests/test_hotpath.py makes under the fast and the plain hot-path versions.

`python tests/hotpath_runs.py DB` runs each scenario once with a `SQLiteStore` at DB
and prints its event log as JSON, one scenario a line, with what timing decides
(timestamps, durations, run ids, who killed) left out: two processes, one with
`LOOPWISE_PLAIN=1`, must print the same lines. The scenarios take every path the
tricks touch: tool calls at once and one at a time, calls that wait and calls that do
not, a tool and a model timed out (a near deadline and one the sweeper arms), the
run's deadline, a kill, and a tool that swallows a cancellation.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any

import loopwise as lw
from loopwise._events import event_to_dict
from loopwise._hotpath import PLAIN
from loopwise.models import FunctionModel, ModelPolicy, ModelRequest, ModelResponse, ToolCall, Usage

#: Fields that say when or by whom, not what: they differ from one process to the next
#: (`retry_in_s`: the backoff's jitter; `latency_s`: how long a call took).
TIMING = frozenset({"ts", "duration_s", "requested_ts", "stored_ts", "by", "retry_in_s", "latency_s"})
#: Fields whose words quote the numbers above (a pid, a backoff): their numbers are masked.
QUOTING = frozenset({"reason", "detail"})


def _comparable(event: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in event.items() if k not in TIMING}
    for key in QUOTING & out.keys():
        if isinstance(out[key], str):
            out[key] = re.sub(r"\d+(\.\d+)?", "N", out[key])
    return out


def _scripted(*turns: list[ToolCall] | str, pause: float = 0.0) -> FunctionModel:
    """A model that answers turn n (its assistant messages so far) with `turns[n]`."""

    async def answer(request: ModelRequest) -> ModelResponse:
        if pause:
            await asyncio.sleep(pause)
        turn = turns[min(sum(m.role == "assistant" for m in request.messages), len(turns) - 1)]
        if isinstance(turn, str):
            return ModelResponse(text=turn, usage=Usage(100, 20))
        return ModelResponse(tool_calls=turn, usage=Usage(100, 20))

    return FunctionModel(answer)


def _tools(started: asyncio.Event) -> list[lw.Tool]:
    @lw.tool
    async def lookup(key: str) -> str:
        """Look a key up (waits a little)."""
        await asyncio.sleep(0.005)
        return f"value of {key}"

    @lw.tool
    def instant(key: str) -> str:
        """Answer at once (a sync tool, in a thread)."""
        return key.upper()

    @lw.tool
    async def quick(key: str) -> str:
        """Answer without waiting."""
        return key[::-1]

    @lw.tool(timeout=0.1)
    async def hangs(key: str) -> str:
        """Never answers in time (a near timeout)."""
        started.set()
        await asyncio.sleep(30)
        return "late"

    @lw.tool(timeout=1.3)
    async def hangs_far(key: str) -> str:
        """Never answers in time (a timeout past the sweeper's horizon)."""
        await asyncio.sleep(30)
        return "late"

    @lw.tool(timeout=None)
    async def sleeps(key: str) -> str:
        """Waits until cancelled."""
        started.set()
        await asyncio.sleep(30)
        return "late"

    @lw.tool(timeout=None)
    async def stubborn(key: str) -> str:
        """Swallows the first cancellation, then waits again."""
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)
        return "stubborn"

    return [lookup, instant, quick, hangs, hangs_far, sleeps, stubborn]


def _calls(*names: str) -> list[ToolCall]:
    return [ToolCall(name, {"key": f"k{i}"}, id=f"call-{i}") for i, name in enumerate(names)]


async def _scenario(name: str, store: lw.EventStore) -> list[dict[str, Any]]:
    started = asyncio.Event()
    tools = _tools(started)
    options: dict[str, Any] = {}
    limits = lw.Limits(budget_usd=None)
    kill = False
    if name == "parallel":
        model = _scripted(_calls("lookup", "instant", "quick"), _calls("lookup"), "done", pause=0.002)
    elif name == "one_at_a_time":
        model = _scripted(_calls("lookup", "quick", "lookup"), "done")
        options["max_parallel_tools"] = 1
    elif name == "no_waits":
        model = _scripted(_calls("quick", "quick"), _calls("quick"), "done")
    elif name == "tool_timeouts":
        model = _scripted(_calls("hangs", "hangs_far", "quick"), "done")
    elif name == "model_timeout":
        model = _scripted("never", pause=30)
        options["model_policy"] = ModelPolicy(timeout=0.1, retries=1)
    elif name == "deadline":
        model = _scripted(_calls("lookup", "sleeps", "quick"), "done")
        limits = lw.Limits(budget_usd=None, deadline_s=1.0)
    elif name == "killed":
        model = _scripted(_calls("quick", "sleeps", "quick"), "done")
        kill = True
    elif name == "killed_stubborn":
        model = _scripted(_calls("stubborn", "lookup"), "done")
        kill = True
    else:
        raise SystemExit(f"no scenario {name!r}")
    agent = lw.Agent(model, instructions="Be brief.", tools=tools, store=store, limits=limits, **options)
    run_id = f"hotpath-{name}"
    task = asyncio.ensure_future(agent.run(f"scenario {name}", run_id=run_id))
    if kill:
        await started.wait()
        await asyncio.sleep(0.02)  # (the other calls, which do not wait, are over by now)
        await asyncio.to_thread(lw.kill, run_id, reason="test", store=store)
    await task
    return [_comparable(event_to_dict(e)) for e in store.load(run_id)]


SCENARIOS = ("parallel", "one_at_a_time", "no_waits", "tool_timeouts", "model_timeout", "deadline", "killed",
             "killed_stubborn")


async def main(db: str) -> None:
    store = lw.SQLiteStore(db)
    try:
        for name in SCENARIOS:
            print(json.dumps({"scenario": name, "events": await _scenario(name, store)}, sort_keys=True))
    finally:
        store.close()
    print(json.dumps({"plain": sorted(PLAIN)}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
