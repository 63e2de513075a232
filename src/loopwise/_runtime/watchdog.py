"""A loop-stall watchdog: it notices when something blocks the event loop.

An async tool that calls `time.sleep`, or any code that never reaches an
`await`, blocks the event loop: no timeout can fire, no other tool runs, and
loopwise cannot interrupt it. What it can do is say so. A daemon thread pings
the loop every `interval` seconds (`loop.call_soon_threadsafe`); when a ping
goes unanswered for `threshold` seconds it logs one WARNING on the `loopwise`
logger, naming the code the loop is stuck in, and when the loop answers again
it calls `on_stall(seconds)`.

```python
watchdog = start_watchdog(asyncio.get_running_loop(), threshold=1.0)
...
watchdog.stop()
```
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable

__all__ = ["Watchdog", "start_watchdog"]

_log = logging.getLogger("loopwise")

_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watchdog] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
# The watchdog `start_watchdog` returned last: every run asks for its loop's watchdog,
# and nearly always of the same loop as the run before.
_last: Watchdog | None = None


class Watchdog:
    """Watches one event loop from a daemon thread. Make one with `start_watchdog`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        threshold: float,
        interval: float,
        on_stall: Callable[[float], None] | None,
    ) -> None:
        self.loop = loop
        self.threshold = threshold
        self.interval = interval
        self.on_stall = on_stall
        #: Stalls seen so far.
        self.stalls = 0
        self._stopped = threading.Event()
        self._pending = threading.Event()  # the ping in flight
        self._loop_thread: int | None = None
        self._thread = threading.Thread(
            target=self._watch, name="loopwise-watchdog", daemon=True
        )

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() else "running"
        return f"<Watchdog {state} threshold={self.threshold}s stalls={self.stalls}>"

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def stop(self) -> None:
        """Stop watching. Safe to call twice, and from any thread."""
        self._stopped.set()
        self._pending.set()  # wake the thread if it waits for an answer
        self._unregister()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, 2 * self.interval))

    def _unregister(self) -> None:
        global _last
        with _registry_lock:
            if _watchdogs.get(self.loop) is self:
                del _watchdogs[self.loop]
            if _last is self:
                _last = None  # hold no reference to a loop that may be gone

    def _pong(self, answered: threading.Event) -> None:
        self._loop_thread = threading.get_ident()
        answered.set()

    def _watch(self) -> None:
        try:
            while not self._stopped.is_set():
                answered = self._pending = threading.Event()
                if self._stopped.is_set():
                    return
                sent = time.monotonic()
                try:
                    self.loop.call_soon_threadsafe(self._pong, answered)
                except RuntimeError:  # the loop is closed
                    return
                if not answered.wait(self.threshold):
                    if self.loop.is_running():
                        self._stalled(sent, answered)
                    else:  # a loop between run_until_complete calls is idle, not stuck
                        while not answered.wait(self.interval) and not self._stopped.is_set():
                            pass
                if self._stopped.wait(max(0.0, self.interval - (time.monotonic() - sent))):
                    return
        finally:
            self._unregister()

    def _stalled(self, sent: float, answered: threading.Event) -> None:
        self.stalls += 1
        blocked = time.monotonic() - sent
        _log.warning(
            "event loop blocked for %.1f s%s: an async tool or callback is blocking it "
            "(time.sleep in an async def?); loopwise cannot interrupt code that never "
            "yields — make it yield, run it as a sync tool, or use isolation='process'",
            blocked,
            self._where(),
        )
        answered.wait()  # the loop answers, or stop() wakes us
        if self._stopped.is_set():
            return
        duration = time.monotonic() - sent
        if self.on_stall is not None:
            try:
                self.on_stall(duration)
            except Exception:  # noqa: BLE001 - a callback bug must not stop the watchdog
                _log.exception("loop-stall watchdog: on_stall callback failed")

    def _where(self) -> str:
        """Where the loop's thread is stuck: its innermost Python frame."""
        if self._loop_thread is None:
            return ""
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return ""
        summary = traceback.extract_stack(frame, limit=1)[-1]
        return f" in {summary.name} ({summary.filename}:{summary.lineno})"


def start_watchdog(
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    threshold: float = 1.0,
    interval: float = 0.1,
    on_stall: Callable[[float], None] | None = None,
) -> Watchdog:
    """Start watching `loop` (default: the running loop), or return its running watchdog.

    Args:
        loop: The event loop to watch.
        threshold: Seconds without an answer that count as a stall.
        interval: Seconds between pings.
        on_stall: Called from the watchdog's thread with the stall's duration in
            seconds once the loop answers again.

    A loop has at most one watchdog: a second call returns the first one, with
    its settings. The watchdog stops by itself when the loop is closed.
    """
    global _last
    if loop is None:
        loop = asyncio.get_running_loop()
    if threshold <= 0 or interval <= 0:
        raise ValueError(f"threshold and interval must be positive, got {threshold} and {interval}")
    last = _last
    if last is not None and last.loop is loop and not last._stopped.is_set():
        # The fast path: no lock, no registry lookup. Its thread is alive: a watchdog whose
        # thread ends is no longer `_last` (`_watch` unregisters it on its way out).
        return last
    with _registry_lock:
        existing = _watchdogs.get(loop)
        if existing is not None and existing.running:
            _last = existing
            return existing
        watchdog = Watchdog(loop, threshold=threshold, interval=interval, on_stall=on_stall)
        try:
            if asyncio.get_running_loop() is loop:
                watchdog._loop_thread = threading.get_ident()
        except RuntimeError:
            pass  # started from another thread: the first answer tells which thread runs it
        _watchdogs[loop] = watchdog
        watchdog._thread.start()
        _last = watchdog
    return watchdog
