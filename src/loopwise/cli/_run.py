"""`loopwise run MODULE:AGENT`: one task, or a JSONL file of tasks run concurrently."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import anyio

from .._runtime.signals import shutdown_requested
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .._runtime.agent import Agent
from .._errors import UserError
from .._views.render import format_cost, format_duration, render_run
from .._views.result import RunResult
from .._stores.sqlite import SQLiteStore, _default_stores, default_db_path
from .._stores.base import MemoryStore
from ._common import CLIError, DbOption, db_args, shutdown_handlers, stderr_console, stdout_console

__all__ = ["load_agent", "read_input", "run_command"]

DEFAULT_CONCURRENCY = 8
_INPUT_KEYS = ("task", "run_id", "tags")
_JSON_TYPES = {dict: "an object", list: "an array", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null", str: "a string"}


# -- MODULE:AGENT ----------------------------------------------------------------------


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}:{exc.lineno})"
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _import(module_name: str) -> Any:
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise CLIError(f"cannot import {module_name!r}: no such file")
        name = path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CLIError(f"cannot import {module_name!r}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's module failed: say where, in one line
            del sys.modules[name]
            raise CLIError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}") from None
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CLIError(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                f"(looked in the current directory {cwd} and the installed packages)"
            ) from None
        raise CLIError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed: say where, in one line
        raise CLIError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}") from None


def load_agent(target: str) -> Agent:
    """The `Agent` that `MODULE:AGENT` names (the module is imported from the current directory)."""
    module_name, sep, attribute = target.rpartition(":")
    if not sep or not module_name or not attribute:
        raise CLIError(f"expected MODULE:AGENT, such as `myapp.agents:support`, got {target!r}")
    if not all(part.isidentifier() for part in attribute.split(".")):
        raise CLIError(f"{attribute!r} in {target!r} is not a Python name; expected MODULE:AGENT")
    module = _import(module_name)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            agents = sorted(k for k, v in vars(module).items() if isinstance(v, Agent))
            hint = f"; its agents: {', '.join(agents)}" if agents else "; it defines no loopwise.Agent"
            raise CLIError(f"module {module_name!r} has no attribute {attribute!r}{hint}") from None
    if not isinstance(obj, Agent):
        raise CLIError(f"{target} is not a loopwise.Agent: it is the {type(obj).__name__} {repr(obj)[:60]}")
    return obj


@contextmanager
def _agent_store(agent: Agent, db: Path | None) -> Iterator[None]:
    """The store the command's runs go to, for the command's duration.

    An agent built with the default store writes to `--db` when given. An agent whose
    store is in memory (`MemoryStore`) writes to the CLI's database instead (`--db`, else
    the default), saying so: memory ends with this command, and the CLI's runs are for
    `loopwise runs`, `show` and `resume` to read afterwards. An agent built with a store
    of its own (a database file of its choosing) keeps it; `--db` is then ignored, with
    a warning.
    """
    original = agent._store
    in_memory = isinstance(original, MemoryStore)
    if not in_memory and original is not None and not any(original is s for s in _default_stores.values()):
        if db is not None:
            print(f"warning: agent {agent.name!r} was built with its own store ({original.describe()}); "
                  f"--db {db} is ignored", file=sys.stderr)
        yield
        return
    if db is None and not in_memory:
        yield
        return
    path = db if db is not None else default_db_path()
    if in_memory:
        print(f"note: agent {agent.name!r} keeps its runs in memory, which ends with this command; "
              f"they are written to {path} instead, for `loopwise show` to read", file=sys.stderr)
    store = SQLiteStore(path)
    agent._store = store
    try:
        yield
    finally:
        agent._store = original
        store.close()


# -- the input file ------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    line: int
    task: str
    run_id: str | None
    tags: list[str]


def read_input(path: Path, extra_tags: list[str]) -> list[_Item]:
    """The tasks of a JSONL file: `{"task": ..., "run_id": ..., "tags": [...]}` or `"task"` per line."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CLIError(f"cannot read --input {path}: {why}") from None
    items: list[_Item] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno}); each line is "
                           '{"task": "...", "run_id": "...", "tags": [...]} or a JSON string') from None
        run_id = None
        tags: list[str] = []
        if isinstance(value, dict):
            unknown = [k for k in value if k not in _INPUT_KEYS]
            if unknown:
                raise CLIError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                               f"a line may have {', '.join(_INPUT_KEYS)}")
            if "task" not in value:
                raise CLIError(f'{where}: no "task"; each line is {{"task": "..."}} or a JSON string')
            task = value["task"]
            run_id = value.get("run_id")
            tags = value.get("tags") or []
            if run_id is not None and (not isinstance(run_id, str) or not run_id):
                raise CLIError(f'{where}: "run_id" must be a non-empty string, got {json.dumps(run_id)}')
            if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
                raise CLIError(f'{where}: "tags" must be a list of non-empty strings, got {json.dumps(tags)}')
        else:
            task = value
        if not isinstance(task, str):
            raise CLIError(f"{where}: the task is {_JSON_TYPES.get(type(task), 'a value')}; "
                           'it must be a string ({"task": "..."} or "...")')
        if not task.strip():
            raise CLIError(f"{where}: the task is empty")
        if run_id is not None:
            if run_id in seen:
                raise CLIError(f"{where}: the run_id {run_id!r} is already used on line {seen[run_id]}")
            seen[run_id] = number
        items.append(_Item(number, task, run_id, [*tags, *(t for t in extra_tags if t not in tags)]))
    if not items:
        raise CLIError(f"--input {path} holds no tasks")
    return items


# -- results -------------------------------------------------------------------------


def _row(line: int | None, result: RunResult) -> dict[str, Any]:
    error = None
    if result.stop_reason == "error":
        error = f"{result.error.type}: {result.error.message}" if result.error else (result.reason or "error")
    return {
        "line": line,
        "run_id": result.run_id,
        "stop_reason": result.stop_reason,
        "output": result.output,
        "iterations": result.iterations,
        "input_tokens": result.usage.input_tokens,
        "output_tokens": result.usage.output_tokens,
        "cost_usd": round(result.cost_usd, 10),
        "duration_s": round(result.duration_s, 4),
        "error": error,
    }


def _failed_row(item: _Item, run_id: str | None, error: str, *, stop_reason: str | None = None) -> dict[str, Any]:
    return {"line": item.line, "run_id": run_id, "stop_reason": stop_reason, "output": None, "iterations": 0,
            "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "duration_s": 0.0, "error": error}


def _percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _summary(rows: list[dict[str, Any]], wall_s: float, planned: int) -> Table:
    table = Table(title="summary", title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    started = [r for r in rows if r["stop_reason"] is not None]
    not_started = len(rows) - len(started)
    runs = f"{len(rows)}" if len(rows) == planned else f"{len(rows)} of {planned}"
    table.add_row("runs", runs + (f" ({not_started} could not start)" if not_started else ""))
    reasons = Counter(r["stop_reason"] for r in started)
    table.add_row("stop reasons", ", ".join(f"{k} {v}" for k, v in reasons.most_common()) or "-")
    table.add_row("errors", str(sum(1 for r in rows if r["error"])))
    table.add_row("cost", format_cost(sum(r["cost_usd"] for r in rows)))
    tokens_in = sum(r["input_tokens"] for r in rows)
    tokens_out = sum(r["output_tokens"] for r in rows)
    table.add_row("tokens", f"{tokens_in + tokens_out:,} ({tokens_in:,} in / {tokens_out:,} out)")
    durations = [r["duration_s"] for r in started if r["error"] != "interrupted"]
    table.add_row("duration", f"p50 {format_duration(_percentile(durations, 50))}   "
                              f"p95 {format_duration(_percentile(durations, 95))}")
    table.add_row("wall time", format_duration(wall_s))
    return table


def _write_row(out: IO[str] | None, row: dict[str, Any]) -> None:
    stream = out if out is not None else sys.stdout
    stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    stream.flush()


# -- the command ---------------------------------------------------------------------


def run_command(
    target: Annotated[str, typer.Argument(metavar="MODULE:AGENT", help="Where the agent is, e.g. myapp.agents:support.")],
    task: Annotated[str | None, typer.Option("--task", "-t", metavar="TEXT", help="Run the agent once on this task.")] = None,
    input_file: Annotated[Path | None, typer.Option(
        "--input", "-i", metavar="FILE.jsonl", dir_okay=False,
        help='One run per line: {"task": "...", "run_id": "...", "tags": [...]} or a JSON string ("-": stdin).',
    )] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", "-c", min=1, metavar="N", help="With --input: how many runs at once.")] = DEFAULT_CONCURRENCY,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE.jsonl", dir_okay=False, help="Write the results as JSONL to this file (default with --input: stdout).",
    )] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", metavar="TAG", help="Tag every run (repeatable).")] = None,
    db: DbOption = None,
) -> int:
    """Run an agent on one task (--task), or on each line of a JSONL file (--input).

    Exits 1 if a run ended with stop reason `error` (or could not start).
    """
    if (task is None) == (input_file is None):
        raise CLIError("give either --task TEXT or --input FILE.jsonl" + (" (not both)" if task is not None else ""))
    tags = list(tag or [])
    items = read_input(input_file, tags) if input_file is not None else None
    agent = load_agent(target)
    try:
        with _agent_store(agent, db), _open_output(output) as out:
            if items is None:
                assert task is not None
                return _run_one(agent, task, tags, out)
            return _run_batch(agent, items, concurrency, out)
    except KeyboardInterrupt:
        raise CLIError("interrupted: the runs under way were written to the log as killed", 130) from None


@contextmanager
def _open_output(output: Path | None) -> Iterator[IO[str] | None]:
    if output is None:
        yield None
        return
    try:
        f = open(output, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise CLIError(f"cannot write --output {output}: {exc.strerror or exc}") from None
    with f:
        yield f


def _run_one(agent: Agent, task: str, tags: list[str], out: IO[str] | None) -> int:
    async def one() -> RunResult:
        return await agent.run(task, tags=tags)

    with shutdown_handlers():
        result = anyio.run(one)
    console = stdout_console()
    store = agent.store
    try:
        events = store.load(result.run_id)
    except UserError as exc:
        print(f"warning: cannot read run {result.run_id} back from {store.describe()}: {exc}", file=sys.stderr)
    else:
        render_run(events, console)
        db = db_args(store)
        if db is None:  # a store of the agent's own that no command reads
            console.print(f"stored in {store.describe()} (not a database file the loopwise commands read)",
                          style="dim", markup=False)
        else:
            console.print(f"stored in {store.describe()}: loopwise show {result.run_id}{db}", style="dim",
                          markup=False, soft_wrap=True)
    if out is not None:
        _write_row(out, _row(None, result))
    return 1 if result.stop_reason == "error" else 0


def _run_batch(agent: Agent, items: list[_Item], concurrency: int, out: IO[str] | None) -> int:
    rows: list[dict[str, Any]] = []
    err = stderr_console()
    interactive = err.is_terminal and sys.stdout.isatty() and out is None
    progress = Progress(
        TextColumn("[bold]runs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        redirect_stdout=interactive,  # results printed above the bar when both are this terminal
        redirect_stderr=False,
    )
    bar = progress.add_task("runs", total=len(items), status="")

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        _write_row(out, row)
        errors = sum(1 for r in rows if r["error"])
        cost = sum(r["cost_usd"] for r in rows)
        progress.update(bar, advance=1, status=f"{format_cost(cost)}" + (f"  {errors} error{'s' if errors != 1 else ''}" if errors else ""))

    async def one(item: _Item) -> dict[str, Any]:
        run_id = item.run_id or uuid.uuid4().hex  # known here, so an interrupted run still gets its line
        try:
            result = await agent.run(item.task, run_id=run_id, tags=item.tags)
        except anyio.get_cancelled_exc_class():
            record(_failed_row(item, run_id, "interrupted", stop_reason="killed"))
            raise
        except UserError as exc:
            return _failed_row(item, item.run_id, str(exc))
        except Exception as exc:  # noqa: BLE001 - an unexpected failure of one run does not end the batch
            return _failed_row(item, run_id, f"{type(exc).__name__}: {exc}")
        return _row(item.line, result)

    async def batch() -> None:
        queue = iter(items)

        async def worker() -> None:
            for item in queue:  # the workers share one iterator: each item runs once
                if shutdown_requested() is not None:
                    return  # SIGTERM / SIGINT: no new runs; those under way end as killed
                record(await one(item))

        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, len(items))):
                tg.start_soon(worker)

    t0 = time.perf_counter()
    interrupted = False
    stopped: typer.Exit | None = None
    try:
        with progress, shutdown_handlers():
            anyio.run(batch)
    except KeyboardInterrupt:  # the runs under way ended as `killed`; sum up what there is
        interrupted = True
    except typer.Exit as exc:  # SIGTERM / SIGINT: the same, with the signal's exit status
        stopped = exc
    wall = time.perf_counter() - t0
    summary_console: Console = stdout_console() if out is not None else err
    summary_console.print(_summary(rows, wall, len(items)))
    if interrupted:
        raise KeyboardInterrupt
    if stopped is not None:
        raise stopped
    return 1 if any(r["error"] for r in rows) else 0
