"""`loopwise export RUN_ID --format jsonl|perfetto [--output FILE]`: a run's log for other tools."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .._export import to_jsonl, to_perfetto
from ._common import CLIError, DbOption, open_existing_store, resolve_run_id

__all__ = ["export_command"]

FORMATS = ("jsonl", "perfetto")


def export_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="A run id (or a prefix matching one run).")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            metavar="jsonl|perfetto",
            help="jsonl: the raw events, one JSON object a line; perfetto: Chrome trace JSON for ui.perfetto.dev.",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", dir_okay=False, help="Write here (default: stdout)."),
    ] = None,
    db: DbOption = None,
) -> int:
    """Export one run's events: raw JSON lines, or a trace that ui.perfetto.dev opens."""
    fmt = fmt.strip().lower()
    if fmt == "otlp":
        raise CLIError("otlp export arrives with the OpenTelemetry exporter (loopwise[otel])")
    if fmt not in FORMATS:
        raise CLIError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")

    store = open_existing_store(db)
    try:
        events = store.load(resolve_run_id(store, run_id))
    finally:
        store.close()
    if fmt == "jsonl":
        text = "".join(line + "\n" for line in to_jsonl(events))
    else:
        text = json.dumps(to_perfetto(events), ensure_ascii=False, separators=(",", ":")) + "\n"
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot write {output}: {exc.strerror or exc}", 1) from None
    print(f"wrote {len(events)} events of run {events[0].run_id if events else run_id} as {fmt} to {output}",
          file=sys.stderr)
    return 0
