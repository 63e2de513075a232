"""Graceful shutdown: SIGTERM / SIGINT stop this process's runs as `killed`, then it exits.

A library must not take over its host's signals (uvicorn, Celery and notebooks have
their own), so this is opt-in: `loopwise.install_signal_handlers()`. The CLI installs
it. On the first signal every run executing in this process gets a kill request
(reason: ``shutdown (SIGTERM)``): each cancels what it has in flight, writes its end
to the log and returns `killed`. If they have not all ended within `grace_s`, the
process exits anyway; a second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

from .._control.plane import KillRequest, local_runs, requester
from .._errors import UserError

__all__ = ["install_signal_handlers", "shutdown_requested"]

_log = logging.getLogger("loopwise")

_shutdown: str | None = None


def shutdown_requested() -> str | None:
    """The signal's name once a shutdown was asked for (``"SIGTERM"``), else None."""
    return _shutdown


def install_signal_handlers(
    *, grace_s: float = 10.0, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
) -> Callable[[], None]:
    """Make SIGTERM and SIGINT stop this process's runs as `killed` (reason: shutdown).

    The runs under way end within about `grace_s` seconds, with their events, partial
    output and totals in the log; after that the process exits with status 128 +
    the signal number. A second signal exits at once. With no run under way, the
    signal does what it did before (SIGINT raises `KeyboardInterrupt`).

    Call it from the main thread. Returns a function that puts the previous handlers back.

    Raises:
        UserError: not called from the main thread, or `grace_s` is not a positive number.
    """
    if threading.current_thread() is not threading.main_thread():
        raise UserError("install_signal_handlers() must be called from the main thread (Python delivers "
                        "signals there)")
    if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not grace_s > 0:
        raise UserError(f"grace_s must be a number of seconds > 0, got {grace_s!r}")
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handler(signum: int, frame: object) -> None:
        global _shutdown
        name = signal.Signals(signum).name
        if _shutdown is not None:
            _log.error("second %s: exiting now", name)
            os._exit(128 + signum)
        runs = local_runs()
        if not runs:
            old = previous.get(signum)
            if callable(old):
                old(signum, frame)  # type: ignore[arg-type]
                return
            if old == signal.SIG_IGN:
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _shutdown = name
        _log.warning("%s: stopping %d run(s) as killed (reason: shutdown); a second %s exits at once",
                     name, len(runs), name)
        request_by = requester()
        now = time.time()
        for run in runs:
            run.deliver(KillRequest(run.run_id, f"shutdown ({name})", request_by, now))
        threading.Thread(target=_exit_after_grace, args=(signum, grace_s), name="loopwise-shutdown",
                         daemon=True).start()

    for signum in signals:
        signal.signal(signum, handler)

    def uninstall() -> None:
        global _shutdown
        for signum, old in previous.items():
            signal.signal(signum, old)
        _shutdown = None

    return uninstall


def _exit_after_grace(signum: int, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not local_runs():
            return
        time.sleep(0.05)
    left = local_runs()
    _log.error("shutdown: %d run(s) did not stop within %g s; exiting", len(left), grace_s)
    os._exit(128 + signum)
