"""The `loopwise` app: `run` (in `_runtime.run.py`), `runs` and `show` (which read the log), `demo`."""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from .._control.kill import control_for
from .._events import STOP_REASONS, event_to_dict
from .._runtime.resume import RESUMABLE
from .._stores.sqlite import SQLiteStore, default_db_path
from .._stores.base import RunSummary
from .._views.render import STOP_STYLES, format_cost, format_duration, render_run
from ._common import CLIError, DbOption, open_existing_store, resolve_run_id, stdout_console, write_json
from ._control import kill_command, resume_command
from ._help import Command, Group
from ._export import export_command
from ._profile import profile_command
from ._prune import parse_duration, prune_command
from ._run import run_command

__all__ = ["app"]


app = typer.Typer(
    name="loopwise",
    help="Run tool-calling agents and read their event logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)
app.command("run", cls=Command)(run_command)
app.command("export", cls=Command)(export_command)
app.command("profile", cls=Command)(profile_command)
app.command("prune", cls=Command)(prune_command)
app.command("kill", cls=Command)(kill_command)
app.command("resume", cls=Command)(resume_command)


@app.callback()
def _root(db: DbOption = None) -> None:
    """Run tool-calling agents and read their event logs.

    --db PATH may come before the command (`loopwise --db x.db runs`) or after it
    (`loopwise runs --db x.db`); given in both places, the one after the command wins.
    """


# -- runs ----------------------------------------------------------------------------


# `--status`: what the table's state column says of a run that is not finished.
_STATES = ("running", "orphaned", "finished")


@app.command("runs", cls=Command)
def runs_command(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, metavar="N", help="How many runs to list.")] = 20,
    status: Annotated[str | None, typer.Option(
        "--status", metavar="STATE", show_default=False,
        help="Only runs in this state: running, orphaned (its process died unfinished) or finished.")] = None,
    stop_reason: Annotated[str | None, typer.Option(
        "--stop-reason", metavar="REASON", show_default=False,
        help=f"Only runs that ended so: {', '.join(STOP_REASONS)}.")] = None,
    tag: Annotated[str | None, typer.Option("--tag", metavar="TAG", show_default=False,
                                            help="Only runs with this tag.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="DURATION", show_default=False,
        help="Only runs started within this long: 90m, 12h, 30d, 2w.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as a JSON list.")] = False,
    db: DbOption = None,
) -> int:
    """The most recently started runs, newest first."""
    if status is not None and status not in _STATES:
        raise CLIError(f"--status {status!r}: choose among {', '.join(_STATES)} (how a run ended: --stop-reason)")
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise CLIError(f"--stop-reason {stop_reason!r}: choose among {', '.join(STOP_REASONS)}")
    started_after = None if since is None else time.time() - parse_duration(since, "--since")
    store = open_existing_store(db)
    try:
        summaries = _matching(store, limit, status, stop_reason=stop_reason, tag=tag, since=started_after)
    finally:
        store.close()
    if as_json:
        write_json([dataclasses.asdict(s) for s in summaries])
        return 0
    console = stdout_console(wide=True)
    if not summaries:
        console.print(f"no runs in {store.path}")
        return 0
    console.print(_runs_table(summaries, console.width))
    return 0


def _runs_table(summaries: list[RunSummary], width: int) -> Table:
    """The runs, one line each. What a run is (id, how it ended or what it is doing, its
    iterations, cost, duration, start) is never cut: a run id is copied from here. Its
    agent and tags come after, folded, where the width leaves room for them; narrower
    than the essentials, each run takes two lines (its id, then the rest)."""
    today = time.strftime("%Y-%m-%d")
    rows = []
    for s in summaries:
        started = time.localtime(s.started_at)
        when = time.strftime("%H:%M:%S" if time.strftime("%Y-%m-%d", started) == today else "%m-%d %H:%M", started)
        # A finished run is named by its stop reason; any other by what it is (running, orphaned).
        end = (Text(s.stop_reason, style=STOP_STYLES.get(s.stop_reason, "")) if s.status == "finished" and s.stop_reason
               else Text(s.status, style={"running": "yellow", "orphaned": "red"}.get(s.status, "dim")))
        rows.append((s.run_id, end, "-" if s.iterations is None else str(s.iterations), format_cost(s.cost_usd),
                     format_duration(s.duration_s), when, s.agent, ", ".join(s.tags)))
    headers = ("run id", "state", "iter", "cost", "duration", "started")
    essential = [max(len(headers[i]), *(len(str(r[i])) for r in rows)) for i in range(len(headers))]
    if sum(essential) + 2 * (len(headers) - 1) > width:
        narrow = Table(box=None, header_style="bold", pad_edge=False, show_header=False)
        narrow.add_column(overflow="fold")  # (a line too long for the width wraps between its words)
        for row in rows:
            narrow.add_row(Text(row[0], style="cyan"))
            narrow.add_row(Text("  ").append(row[1]).append(f"  {row[2]} iter  {row[3]}  {row[4]}  {row[5]}"))
        return narrow
    table = Table(box=None, header_style="bold", pad_edge=False)
    for i, header in enumerate(headers):
        table.add_column(header, no_wrap=True, min_width=essential[i], justify="right" if 2 <= i <= 4 else "left",
                         style="cyan" if i == 0 else None)
    # The agent and the tags only where at least 10 columns are left for each (`--json` has them all).
    extra = sum(essential) + 2 * len(headers) <= width - 24
    if extra:
        table.add_column("agent", overflow="fold", max_width=24)
        table.add_column("tags", overflow="fold", max_width=24, style="magenta")
    for row in rows:
        table.add_row(*row[:6], *(row[6:] if extra else ()))
    return table


def _matching(store: SQLiteStore, limit: int, state: str | None, **filters: object) -> list[RunSummary]:
    """Up to `limit` runs in `state` (as the table shows it: leases tell running from orphaned)
    and matching `filters` (`list_runs`'s), a page of the log at a time."""
    # What the log can filter on first: an orphaned run has no end; a finished one has one
    # (a run being resumed has one too, and is running).
    logged = {"orphaned": "running", "finished": "finished"}.get(state or "")
    found: list[RunSummary] = []
    cursor = None
    while True:
        page = store.list_runs(status=logged, limit=limit if state is None else max(limit, 200), cursor=cursor,
                               **filters)  # type: ignore[arg-type]
        for s in _liveness(store, page):
            if (state is None or s.status == state) and filters["stop_reason"] in (None, s.stop_reason):
                found.append(s)
        if len(found) >= limit or page.next_cursor is None:
            return found[:limit]
        cursor = page.next_cursor


def _liveness(store: SQLiteStore, summaries: list[RunSummary]) -> list[RunSummary]:
    """`running` means a live process holds the run's lease; unfinished without one, `orphaned`.

    A run that was killed or failed and is being resumed is running again.
    """
    maybe = [s.run_id for s in summaries if s.status == "running" or s.stop_reason in RESUMABLE]
    if not maybe:
        return summaries
    leases = control_for(store).leases(maybe)
    now = time.time()
    out = []
    for s in summaries:
        lease = leases.get(s.run_id)
        live = lease is not None and lease.live(now)
        if s.status == "running" and not live:
            s = dataclasses.replace(s, status="orphaned")
        elif s.status != "running" and live:
            s = dataclasses.replace(s, status="running", stop_reason=None)
        out.append(s)
    return out


# -- show ----------------------------------------------------------------------------


@app.command("show", cls=Command)
def show_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="A run id (or a prefix matching one run).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's events as a JSON list.")] = False,
    decisions: Annotated[bool, typer.Option(
        "--decisions", help="The decision log: per iteration, thought, action, expected, actual, match, why.")] = False,
    mismatches: Annotated[bool, typer.Option(
        "--mismatches", help="Only the iterations where reality differed from the model's expectation.")] = False,
    iteration: Annotated[int | None, typer.Option(
        "--iteration", metavar="N",
        help="Exactly what the model saw at iteration N: each model call's messages, whole.")] = None,
    db: DbOption = None,
) -> int:
    """One run, read back from its event log."""
    if iteration is not None and (decisions or mismatches):
        raise CLIError("--iteration shows what the model saw; it does not combine with --decisions or "
                       "--mismatches: give one of them")
    store = open_existing_store(db)
    try:
        events = store.load(resolve_run_id(store, run_id))
    finally:
        store.close()
    if iteration is not None:
        from .._views.render_seen import render_seen, seen_json

        if as_json:
            write_json(seen_json(events, iteration))
        else:
            render_seen(events, iteration, stdout_console())
    elif decisions or mismatches:
        from .._views.decisions import decisions as decision_log
        from .._views.render_decisions import render_decisions

        if as_json:  # --mismatches wins over --decisions: it is the narrower view
            write_json([d.to_dict() for d in decision_log(events) if not mismatches or d.match is False])
        else:
            render_decisions(events, stdout_console(), mismatches_only=mismatches)
    elif as_json:
        write_json([event_to_dict(e) for e in events])
    else:
        render_run(events, stdout_console())
    return 0


# -- demo ----------------------------------------------------------------------------


DEMO_HELP = "\n\n".join((
    "Six scenarios from production agent loops, each run on a simulated model (no network, no keys).",
    "The runs are written to the database, as every command's are (--db, else $LOOPWISE_DB, else "
    ".loopwise/loopwise.db); the demo ends with the commands that read them back.",
    "$LOOPWISE_DEMO_SPEED multiplies every simulated latency: 1 (the default) is real time, about 40 s in "
    "all; 0 runs the demo almost at once: LOOPWISE_DEMO_SPEED=0 loopwise demo",
))


@app.command("demo", cls=Command, help=DEMO_HELP)
def demo_command(db: DbOption = None) -> int:
    """Run `loopwise._demo.scenario` on the CLI's database (see `DEMO_HELP`)."""
    try:
        demo = importlib.import_module("loopwise._demo.scenario")
    except ImportError as exc:
        if getattr(exc, "name", None) == "loopwise._demo.scenario":
            raise CLIError("the demo is not part of this build of loopwise", 1) from None
        raise CLIError(f"the demo could not be loaded: {type(exc).__name__}: {exc}", 1) from None
    store = SQLiteStore(db if db is not None else default_db_path())
    try:
        rv = demo.main(stdout_console(), store=store)
    finally:
        store.close()
    return rv if isinstance(rv, int) else 0
