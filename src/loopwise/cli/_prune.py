"""`loopwise prune`: retention. Delete whole runs older than a duration, by status and tag.

Support logs hold customer data, and every run's prompts and tool results are in the
database; `prune` is how they leave it. It deletes runs whole (every event, and their
rows in the control tables), never a run without an end unless asked
(``--status unfinished``), and never a run being executed.
"""

from __future__ import annotations

import re
import time
from typing import Annotated

import typer

from .._stores.base import PRUNE_STATUSES
from ._common import CLIError, DbOption, open_existing_store, stdout_console

__all__ = ["parse_duration", "prune_command"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")
# Dry runs list this many run ids, then say how many more.
_SHOW_IDS = 20


def parse_duration(text: str, option: str = "--older-than") -> float:
    """Seconds in ``90m``, ``12h``, ``30d``, ``2w`` (or ``45s``). Raises `CLIError`."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise CLIError(f"{option} {text!r} is not a duration; write a number and a unit, "
                       "such as 90m, 12h, 30d or 2w (units: s, m, h, d, w)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def prune_command(
    older_than: Annotated[str, typer.Option(
        "--older-than", metavar="DURATION", show_default=False,
        help="Prune runs whose last event is older than this: 90m, 12h, 30d, 2w.")],
    status: Annotated[list[str] | None, typer.Option(
        "--status", metavar="STATUS", show_default=False,
        help=f"Only runs that ended so (repeatable): {', '.join(PRUNE_STATUSES)}. Default: every finished "
             "run; 'unfinished' (crashed runs) only when named.")] = None,
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", metavar="TAG", show_default=False, help="Only runs with this tag (repeatable: any of them).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be pruned; delete nothing.")] = False,
    vacuum: Annotated[bool, typer.Option(
        "--vacuum", help="Then give the freed space back to the file system (rewrites the file).")] = False,
    db: DbOption = None,
) -> int:
    """Delete old runs (every event of each) from the database; runs being executed are never touched."""
    seconds = parse_duration(older_than)
    statuses = list(status) if status else None
    if statuses is not None:
        unknown = [s for s in statuses if s not in PRUNE_STATUSES]
        if unknown:
            raise CLIError(f"--status {unknown[0]!r} is not a status; choose among {', '.join(PRUNE_STATUSES)}")
    store = open_existing_store(db)
    try:
        result = store.prune(before=time.time() - seconds, statuses=statuses, tags=list(tag or ()),
                             dry_run=dry_run, vacuum=vacuum and not dry_run)
    finally:
        store.close()
    console = stdout_console(wide=True)
    what = f"{_plural(result.runs, 'run')} ({_plural(result.events, 'event')})"
    if dry_run:
        console.print(f"would prune {what} from {store.path} (dry run: nothing deleted)")
        for run_id in result.run_ids[:_SHOW_IDS]:
            console.print(f"  {run_id}")
        if result.runs > _SHOW_IDS:
            console.print(f"  ... and {result.runs - _SHOW_IDS} more")
    else:
        console.print(f"pruned {what} from {store.path}" + (", then vacuumed" if vacuum else ""))
    if result.unfinished_kept:
        console.print(f"left {_plural(result.unfinished_kept, 'unfinished run')} alone (no end in the log: "
                      "crashed or interrupted); --status unfinished prunes them")
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"
