"""`loopwise profile` on a screen: the tables of a `Profile`, readable at any width.

Nothing is cut: every number and name is printed whole. A table is printed as a table
where its columns fit the width; narrower, each row becomes a line naming the thing (a
phase, model, tool or run id) followed by a folded line of "header value" pairs. The tool
table is split in two (latency, then failures) before it falls back to lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .render import format_duration as fd

if TYPE_CHECKING:
    from .profile import LatencyStats, Profile

__all__ = ["render"]

#: Columns between two cells of a table.
GAP = 2
LATENCY = ("count", "p50", "p95", "max", "total")
FAILURES = ("timeouts", "retries", "fallbacks", "errors")


def _fits(headers: Sequence[str], rows: Sequence[Sequence[Text]], width: int) -> bool:
    widths = [max(len(h), *(r[i].cell_len for r in rows)) for i, h in enumerate(headers)]
    return sum(widths) + GAP * (len(widths) - 1) <= width


def _print_table(console: Console, title: str, headers: Sequence[str], rows: Sequence[Sequence[Text]],
                 *, first_style: str = "cyan", last_left: bool = False) -> None:
    """A table whose first column names its rows; as lines where it does not fit.
    Numbers are right-justified; the name, and the last column with `last_left`, left."""
    console.print()
    if not rows:
        return
    if _fits(headers, rows, console.width):
        table = Table(title=title, title_justify="left", title_style="bold", box=None, header_style="bold",
                      pad_edge=False, padding=(0, GAP // 2))
        for i, header in enumerate(headers):
            table.add_column(header, no_wrap=True, justify="left" if i == 0 or (last_left and i == len(headers) - 1) else "right",
                             style=first_style if i == 0 else None)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    console.print(Text(title, style="bold"))
    for row in rows:
        console.print(Text(row[0].plain, style=first_style), overflow="fold")
        # "header value" pairs, packed into lines; a pair is never split from its value.
        line = Text("  ")
        for header, cell in zip(headers[1:], row[1:], strict=True):
            pair = Text(f"{header} ", style="dim").append_text(cell)
            if line.plain.strip() and line.cell_len + GAP + pair.cell_len > console.width:
                console.print(line, overflow="fold")
                line = Text("  ")
            line.append("  " if line.plain.strip() else "").append_text(pair)
        console.print(line, overflow="fold")


def _latency(s: LatencyStats) -> list[Text]:
    return [Text(str(s.count)), Text(fd(s.p50_s)), Text(fd(s.p95_s)), Text(fd(s.max_s)), Text(fd(s.total_s))]


def render(prof: Profile, console: Console) -> None:
    """The profile on one screen: phases, models, tools, slowest iterations, the latency trap."""
    n = len(prof.run_ids)
    console.print(Text.assemble(("latency profile", "bold"),
                                (f"  {n} run{'s' if n != 1 else ''}, {fd(prof.total_s)} in all, "
                                 f"{len(prof.iterations)} iterations", "dim")))
    if not n:
        return

    phases = []
    for label, s in (("THINK", prof.think), ("ACT", prof.act), ("overhead", prof.overhead)):
        share = f"{100 * s.total_s / prof.total_s:.0f}%" if prof.total_s > 0 else "-"
        phases.append([Text(label), *_latency(s), Text(share)])
    _print_table(console, "where the time goes", ("phase", *LATENCY, "share"), phases, first_style="")
    console.print(Text("THINK: per model call. ACT: per iteration, first tool start to last tool end. "
                       "Overhead: per run, the rest.", style="dim"))

    if prof.models:
        _print_table(console, "models", ("model", *LATENCY),
                     [[Text(name), *_latency(s)] for name, s in prof.models.items()])

    if prof.tools:
        latency = {name: [Text(name), *_latency(t.latency)] for name, t in prof.tools.items()}
        failures = {name: [Text(name), *(Text(str(v), style="yellow" if v else "dim")
                                         for v in (t.timeouts, t.retries, t.fallbacks, t.errors))]
                    for name, t in prof.tools.items()}
        both = [[*latency[name], *failures[name][1:]] for name in prof.tools]
        if _fits(("tool", *LATENCY, *FAILURES), both, console.width):
            _print_table(console, "tools", ("tool", *LATENCY, *FAILURES), both)
        else:
            _print_table(console, "tools", ("tool", *LATENCY), list(latency.values()))
            _print_table(console, "tool failures", ("tool", *FAILURES), list(failures.values()))

    slowest = prof.slowest
    if slowest:
        rows = [[Text(it.run_id), Text(str(it.iteration)), Text(fd(it.duration_s)), Text(fd(it.think_s)),
                 Text(fd(it.act_s)), Text(fd(it.critical_path_s)),
                 Text(f"{it.slowest_tool} {fd(it.slowest_tool_s)}" if it.slowest_tool else "-")]
                for it in slowest]
        _print_table(console, "slowest iterations",
                     ("run id", "iter", "duration", "THINK", "ACT", "critical", "slowest tool"), rows,
                     last_left=True)
        console.print(Text("critical: the critical path, the iteration's THINK plus its slowest tool call.",
                           style="dim"))

    if prof.sequential:
        console.print()
        console.print(Text("one tool per iteration", style="bold yellow"))
        for streak in prof.sequential[:5]:
            console.print(Text.assemble(
                (streak.run_id, "cyan"), (f" iterations {streak.first_iteration}-{streak.last_iteration} ", ""),
                (f"({', '.join(streak.tools)}): ", "dim"), (streak.message, "")), overflow="fold")
        if len(prof.sequential) > 5:
            console.print(Text(f"... and {len(prof.sequential) - 5} more", style="dim"))
