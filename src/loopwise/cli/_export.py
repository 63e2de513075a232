"""`loopwise export RUN_ID --format jsonl|perfetto|otlp`: a run's log for other tools.

jsonl and perfetto write a file (or stdout); otlp sends the run's spans to an
OpenTelemetry collector over OTLP/HTTP (extra `loopwise[otel]`), to `--endpoint` or
where the standard `OTEL_EXPORTER_OTLP_*` variables say.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .._views.export import to_jsonl, to_perfetto
from ._common import CLIError, DbOption, open_existing_store, resolve_run_id

__all__ = ["export_command"]

FORMATS = ("jsonl", "perfetto", "otlp")


def _headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--header {value!r} is not KEY=VALUE (e.g. --header 'Authorization=Basic ...')")
        headers[key.strip()] = val.strip()
    return headers


def export_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="A run id (or a prefix matching one run).")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            metavar="jsonl|perfetto|otlp",
            help="jsonl: the raw events, one JSON object a line; perfetto: Chrome trace JSON for ui.perfetto.dev; "
            "otlp: OpenTelemetry GenAI spans sent to a collector (Jaeger, Phoenix, Langfuse).",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", dir_okay=False, help="Write here (default: stdout)."),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            metavar="URL",
            help="otlp: the collector's OTLP/HTTP URL, e.g. http://localhost:4318 (/v1/traces is appended). "
            "Default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else $OTEL_EXPORTER_OTLP_ENDPOINT.",
            show_default=False,
        ),
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option("--header", metavar="KEY=VALUE", help="otlp: a request header (repeatable); "
                     "added to $OTEL_EXPORTER_OTLP_HEADERS.", show_default=False),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", metavar="SECONDS", min=0.001, help="otlp: how long to keep trying (default 10).",
                     show_default=False),
    ] = None,
    include_content: Annotated[
        bool,
        typer.Option("--include-content", help="otlp: also send the task, model output, tool arguments and results "
                     "(off by default: they may hold personal data)."),
    ] = False,
    db: DbOption = None,
) -> int:
    """Export one run: raw JSON lines, a trace that ui.perfetto.dev opens, or OpenTelemetry spans to a collector."""
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise CLIError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    otlp_only = [name for name, given in (("--endpoint", endpoint is not None), ("--header", bool(header)),
                                         ("--timeout", timeout is not None), ("--include-content", include_content))
                 if given]
    if fmt != "otlp" and otlp_only:
        verb = "applies" if len(otlp_only) == 1 else "apply"
        raise CLIError(f"{', '.join(otlp_only)} only {verb} to --format otlp (this is --format {fmt})")
    if fmt == "otlp" and output is not None:
        raise CLIError("--output does not apply to --format otlp: the spans go to the collector (--endpoint)")
    headers = _headers(header or [])
    if fmt == "otlp":  # a missing extra or a bad or missing endpoint fails before the database is read
        from .._views.otel import require_sdk, resolve_endpoint

        require_sdk()
        url = resolve_endpoint(endpoint)

    store = open_existing_store(db)
    try:
        events = store.load(resolve_run_id(store, run_id))
    finally:
        store.close()
    if fmt == "otlp":
        return _send(events, url, headers, timeout, include_content)
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


def _send(events: list, url: str, headers: dict[str, str], timeout: float | None, include_content: bool) -> int:
    from .._views.otel import OTLPExportError, post_otlp

    try:
        n = post_otlp(url, events, headers=headers, timeout_s=timeout, include_content=include_content)
    except OTLPExportError as exc:
        raise CLIError(str(exc), 1) from None
    print(f"sent {n} spans of run {events[0].run_id} to {url}")
    return 0
