"""The `loopwise` command line: `main(argv)` returns the exit status.

```
loopwise run MODULE:AGENT (--task TEXT | --input FILE.jsonl)   run an agent
loopwise runs                                                   recent runs
loopwise show RUN_ID [--json] [--iteration N]                    one run's trace (N: what the model saw)
loopwise kill RUN_ID | --tag T | --all [--reason TEXT]          stop runs from any process
loopwise resume RUN_ID --agent MODULE:AGENT                     continue a run from its log
loopwise demo                                                   the scenarios
```

Exit status: 0 on success; 1 when a run ended in `error` (or could not start);
2 for a bad command line (unknown option, bad MODULE:AGENT, a missing database or
run id, a bad input line); 130 when interrupted.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from .._errors import UserError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException, UsageError  # type: ignore[assignment]
from ._app import app
from ._common import CLIError

__all__ = ["main", "run_main"]


def _error(message: str) -> None:
    # One line on stderr, never wrapped or styled: scripts and tests read it.
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level() -> int:
    """``$LOOPWISE_LOG_LEVEL`` as a `logging` level (unset or empty: ERROR); else a `CLIError`."""
    raw = os.environ.get("LOOPWISE_LOG_LEVEL", "")
    name = raw.strip().upper() or "ERROR"
    if name not in LOG_LEVELS and name not in ("WARN", "FATAL"):  # (logging's own aliases)
        raise CLIError(f"LOOPWISE_LOG_LEVEL={raw!r} is not a log level; use one of {', '.join(LOG_LEVELS)} "
                       "(or unset it: ERROR)")
    return int(logging.getLevelName(name))


def _route_logging(level: int) -> None:
    """The CLI prints runs itself: the `loopwise` logger's records go to stderr only from
    ERROR up (``$LOOPWISE_LOG_LEVEL``, e.g. ``INFO``, shows more), unless the host set up logging."""
    logger = logging.getLogger("loopwise")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("loopwise %(levelname)s %(message)s"))
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(min(handler.level, logger.getEffectiveLevel()))
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: `sys.argv[1:]`); return the exit status."""
    return _main(argv, route_logging=False)


def _main(argv: list[str] | None, *, route_logging: bool) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    command = typer.main.get_command(app)
    try:
        level = _log_level()  # a bad $LOOPWISE_LOG_LEVEL is an error, whatever the command
        if route_logging:
            _route_logging(level)
        rv = command.main(args=args, prog_name="loopwise", standalone_mode=False)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `loopwise` alone: the help was printed
            if exc.format_message().strip():
                print(exc.format_message(), file=sys.stderr)
            return 2
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _error(exc.format_message() + hint)
        return 2
    except ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        _error("aborted")
        return 130
    except CLIError as exc:
        _error(exc.message)
        return exc.code
    except UserError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    return rv if isinstance(rv, int) else 0


def run_main() -> None:
    """The `loopwise` console script (and `python -m loopwise`)."""
    sys.exit(_main(None, route_logging=True))
