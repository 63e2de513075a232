"""`loopwise profile`: where the time of one run, or of the last runs, went."""

from __future__ import annotations

from typing import Annotated

import typer

from .._errors import UserError
from .._views.profile import profile, render_profile
from ._common import CLIError, DbOption, open_existing_store, resolve_run_id, stdout_console, write_json

__all__ = ["profile_command"]

DEFAULT_LAST = 20


def profile_command(
    run_id: Annotated[str | None, typer.Argument(metavar="RUN_ID", show_default=False,
                                                 help="One run id (or a prefix matching one run).")] = None,
    last: Annotated[int | None, typer.Option("--last", "-n", min=1, metavar="N", show_default=False,
                                             help=f"Profile the N most recent runs (default {DEFAULT_LAST}).")] = None,
    tag: Annotated[str | None, typer.Option("--tag", metavar="T", help="Only runs tagged T.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
    db: DbOption = None,
) -> int:
    """Where the time goes: per phase, model and tool (p50, p95, max), and the slowest iterations."""
    if run_id is not None and (last is not None or tag is not None):
        raise CLIError("give either RUN_ID or --last/--tag, not both")
    store = open_existing_store(db)
    try:
        if run_id is not None:
            runs = [store.load(resolve_run_id(store, run_id))]
        else:
            n = last if last is not None else DEFAULT_LAST
            page = store.list_runs(limit=n if tag is None else 1_000_000)
            summaries = page if tag is None else [s for s in page if tag in s.tags][:n]
            runs = []
            for summary in summaries:  # (one unreadable run is left out, not the whole profile)
                try:
                    runs.append(store.load(summary.run_id))
                except UserError as exc:
                    typer.echo(f"warning: {exc}; left out", err=True)
    finally:
        store.close()
    prof = profile(runs)
    if as_json:
        write_json(prof.to_dict())
        return 0
    console = stdout_console(wide=True)
    if not runs:
        console.print(f"no runs{f' tagged {tag!r}' if tag is not None else ''} in {store.path}")
        return 0
    render_profile(prof, console)
    return 0
