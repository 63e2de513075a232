"""What every command shares: errors, the --db option, consoles, opening the database."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .._errors import UserError
from .._runtime.signals import install_signal_handlers, shutdown_requested
from .._stores.sqlite import SQLiteStore, default_db_path
from .._stores.base import EventStore

__all__ = ["CLIError", "DbOption", "db_args", "open_existing_store", "shutdown_handlers", "stderr_console",
           "stdout_console", "write_json"]


# Internal, not a LoopwiseError: `loopwise.cli.main` prints it and returns its exit status;
# it never reaches a caller (see `_errors`).
class CLIError(Exception):
    """A one-line error for the user; `code` is the exit status (2: bad command line)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _db_before_or_after(ctx: typer.Context, value: Path | None) -> Path | None:
    """`--db` after the command, else `--db` before it (`loopwise --db x.db runs`), else None.

    After the command wins: it is the more specific of the two, as a later option
    overrides an earlier one (an alias `lw='loopwise --db prod.db'` still takes
    `lw runs --db test.db`).
    """
    if value is not None:
        return value
    root = ctx.find_root()
    return None if root is ctx else root.params.get("db")


DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        metavar="PATH",
        help="The loopwise database (default: $LOOPWISE_DB or .loopwise/loopwise.db). "
             "Also accepted before the command; if both, the one after the command wins.",
        show_default=False,
        dir_okay=False,
        callback=_db_before_or_after,
    ),
]


def db_args(store: EventStore) -> str | None:
    """What a `loopwise` command needs to read `store`: "" (it is the database every command
    uses by default), " --db PATH", or None (no command can: it is not a database file)."""
    if not isinstance(store, SQLiteStore):
        return None
    path = Path(store.path)
    try:
        if path.resolve() == default_db_path().resolve():
            return ""
    except OSError:
        pass
    return f" --db {shlex.quote(str(path))}"


def stdout_console(*, wide: bool = False) -> Console:
    """The console for stdout; `wide`: a pipe or a file (not a terminal) gets long lines whole."""
    console = Console(highlight=False)
    if wide and not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=240)
    return console


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def write_json(value: Any) -> None:
    """JSON on stdout, as is (rich would wrap long lines)."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def open_existing_store(db: Path | None) -> SQLiteStore:
    """The database a read command reads: it must exist (read commands never create one)."""
    path = db if db is not None else default_db_path()
    if not path.exists():
        raise CLIError(f"no loopwise database at {path}; run an agent first or pass --db")
    if path.is_file():
        _check_ours(path)
    return SQLiteStore(path)


def _check_ours(path: Path) -> None:
    """Refuse an empty file: a read command never makes a database. (Any other file that is
    not a loopwise database is refused by `SQLiteStore` itself, read-only, before it writes.)"""
    if path.stat().st_size == 0:
        raise CLIError(f"{path} is an empty file, not a loopwise database; pass --db PATH of a loopwise database")


def resolve_run_id(store: EventStore, run_id: str) -> str:
    """`run_id`, or the one stored run whose id starts with it."""
    if not run_id:
        raise CLIError("RUN_ID is empty; `loopwise runs` lists the stored runs")
    if store.has_run(run_id):
        return run_id
    if isinstance(store, SQLiteStore):
        rows = store._read(
            "SELECT run_id FROM event_chunks WHERE seq = 0 AND substr(run_id, 1, ?) = ? LIMIT 6",
            (len(run_id), run_id),
        )
        matches = [r[0] for r in rows]
    else:
        matches = [s.run_id for s in store.list_runs(limit=10_000) if s.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise CLIError(f"the run id prefix {run_id!r} matches several runs ({shown}); give more of the id")
    raise store._unknown(run_id)


@contextmanager
def shutdown_handlers() -> Iterator[None]:
    """SIGTERM / SIGINT stop the command's runs as killed, then it exits 128 + the signal."""
    try:
        uninstall = install_signal_handlers()
    except UserError:  # not the main thread (an embedding app): leave its signals alone
        yield
        return
    try:
        yield
    finally:
        name = shutdown_requested()
        uninstall()
    if name is not None:
        print(f"stopped by {name}: the runs under way were written to the log as killed", file=sys.stderr)
        raise typer.Exit(143 if name == "SIGTERM" else 130)

