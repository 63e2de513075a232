"""`loopwise kill` and `loopwise resume`: stop a run from anywhere; continue one from its log."""

from __future__ import annotations

import os
from typing import Annotated

import anyio
import typer

from .._control.kill import control_for, kill, run_status
from .._views.render import render_run
from .._stores.sqlite import default_db_path
from .._stores.base import EventStore, MemoryStore
from ._common import (
    CLIError,
    DbOption,
    open_existing_store,
    resolve_run_id,
    shutdown_handlers,
    stdout_console,
)
from ._run import _agent_store, load_agent

__all__ = ["kill_command", "resume_command"]

RedisOption = Annotated[
    str | None,
    typer.Option("--redis", metavar="URL", show_default=False,
                 help="The Redis control plane (default: $LOOPWISE_REDIS_URL; without it, the database's own)."),
]


def kill_command(
    run_id: Annotated[str | None, typer.Argument(metavar="RUN_ID", help="The run to stop (or a prefix of its id).")] = None,
    tag: Annotated[str | None, typer.Option("--tag", metavar="TAG", help="Stop every running run with this tag.")] = None,
    all_runs: Annotated[bool, typer.Option("--all", help="Stop every running run.")] = False,
    reason: Annotated[str | None, typer.Option("--reason", metavar="TEXT", help="Why (kept in each run's log).")] = None,
    db: DbOption = None,
    redis: RedisOption = None,
) -> int:
    """Stop runs from any process: they cancel what is in flight and end as `killed`."""
    if sum((run_id is not None, tag is not None, all_runs)) != 1:
        raise CLIError("give exactly one of: RUN_ID, --tag TAG, --all")
    plane_url = redis or os.environ.get("LOOPWISE_REDIS_URL") or None
    path = db if db is not None else default_db_path()
    # On Redis, a run on another machine has its log there and its lease here: no local database needed.
    store: EventStore = open_existing_store(db) if plane_url is None or path.exists() else MemoryStore()
    console = stdout_console()
    try:
        plane = control_for(store, redis)
        elsewhere = (run_id is not None and plane_url is not None and not store.has_run(run_id)
                     and (lease := plane.leases([run_id]).get(run_id)) is not None and lease.live())
        if run_id is not None and not elsewhere:
            run_id = resolve_run_id(store, run_id)
            status = run_status(run_id, store, plane)
            if status.startswith("finished:"):
                console.print(f"run {run_id} already finished ({status.partition(':')[2]}); nothing to kill",
                              markup=False)
                return 0
            if status == "orphaned":
                console.print(f"run {run_id} is not running: its process ended without finishing it; "
                              f"continue it with `loopwise resume {run_id} --agent MODULE:AGENT`", markup=False)
                return 0
        n = kill(run_id, tag=tag, all=all_runs, reason=reason, store=store, control=redis)
    finally:
        store.close()
    what = run_id if run_id is not None else (f"tag {tag!r}" if tag is not None else "all")
    if n == 0:
        console.print(f"no running runs ({what}); nothing to kill", markup=False)
    else:
        console.print(f"kill sent to {n} run{'s' if n != 1 else ''} ({what}): they stop now and end as killed",
                      markup=False)
    return 0


def resume_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run to continue (or a prefix of its id).")],
    agent_target: Annotated[str, typer.Option("--agent", "-a", metavar="MODULE:AGENT",
                                              help="The agent that continues it, e.g. myapp.agents:support.")],
    db: DbOption = None,
) -> int:
    """Continue a crashed, killed or interrupted run from its log, as a new segment of it."""
    agent = load_agent(agent_target)
    with _agent_store(agent, db):
        store = agent.store
        run_id = resolve_run_id(store, run_id)

        async def go():  # noqa: ANN202
            return await agent.resume(run_id)

        with shutdown_handlers():
            result = anyio.run(go)
        render_run(store.load(run_id), stdout_console())
    return 1 if result.stop_reason == "error" else 0
