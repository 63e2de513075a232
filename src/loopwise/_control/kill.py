"""Choosing the control plane of a store's runs, and `kill`.

Where kills go (`control_for`): an explicit plane or ``redis://`` URL; else
`$LOOPWISE_REDIS_URL`; else the plane the store declares (`EventStore.control_plane`):

- `LocalControl` (``_control.local``, an `SQLiteStore`'s): tables beside the event log
  in the SQLite database; reaches every process on this machine that uses the file.
- `MemoryControl` (``_control.plane``, a `MemoryStore`'s): this process only, declared so.
- `RedisControl` (``_control.redis``): `$LOOPWISE_REDIS_URL`; any machine.

A store that declares none (a third-party store that has not said where kills go) has
no plane: `control_for` raises `UserError` rather than hand it a process-local one that
would silently miss the runs of other processes. Its runs are still attached to a
process-local plane while they run (`plane_for_runs`), so a kill from their own
process reaches them.

Kills never touch the event log: the run writes its own end (`kill_received`, then
`run_finished` with stop reason `killed`), so the log keeps one writer per run.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import TYPE_CHECKING

from .plane import (
    LEASE_GRACE_S,
    ControlPlane,
    KillRequest,
    MemoryControl,
    _local_lock,
    _local_runs,
    _log,
    _owner,
    requester,
    shared_plane,
)
from .._errors import UserError
from .._stores.storable import clean_text

if TYPE_CHECKING:
    from .._stores.base import EventStore

__all__ = ["control_for", "kill", "plane_for_runs", "run_status"]


def control_for(store: EventStore, control: ControlPlane | str | None = None) -> ControlPlane:
    """The control plane for runs logged in `store`.

    `control` wins (a `ControlPlane`, or a ``redis://`` URL); then `$LOOPWISE_REDIS_URL`;
    then the plane the store declares (`EventStore.control_plane`). One instance per
    target and process.

    Raises:
        UserError: the store declares no control plane and none is given.
    """
    plane = _chosen(store, control)
    if plane is None:
        raise UserError(
            f"{store.describe()} declares no control plane, so a kill cannot reach its runs in other "
            "processes; pass control='redis://...' (or set $LOOPWISE_REDIS_URL), or have the store's "
            "control_plane() return one"
        )
    return plane


_in_process: weakref.WeakKeyDictionary[EventStore, ControlPlane] = weakref.WeakKeyDictionary()


def plane_for_runs(store: EventStore, control: ControlPlane | str | None = None) -> ControlPlane:
    """The plane an agent attaches its runs to: `control_for`'s, or for a store that declares
    none, a process-local one (kills from this process reach them; `kill` from another
    process, or of a tag, raises `UserError` for such a store instead of missing them)."""
    plane = _chosen(store, control)
    if plane is not None:
        return plane
    try:
        plane = _in_process.get(store)
        if plane is None:
            plane = _in_process[store] = MemoryControl()
    except TypeError:  # (a store that cannot be weakly referenced: a plane per agent)
        plane = MemoryControl()
    return plane


def _chosen(store: EventStore, control: ControlPlane | str | None) -> ControlPlane | None:
    if isinstance(control, ControlPlane):
        return control
    if control is not None and not isinstance(control, str):
        raise UserError(f"control must be a redis:// URL or a control plane, got {type(control).__name__}")
    url = control or os.environ.get("LOOPWISE_REDIS_URL") or None
    if url:
        return shared_plane(("redis", url), lambda: _redis_control(url))
    plane = store.control_plane()
    if plane is not None and not isinstance(plane, ControlPlane):
        raise UserError(f"{type(store).__name__}.control_plane() returned a {type(plane).__name__}; it must "
                        "return a loopwise control plane or None")
    return plane


def _redis_control(url: str) -> ControlPlane:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise UserError(f"the control plane URL must start with redis://, rediss:// or unix://, got {url!r}")
    try:
        from .redis import RedisControl
    except ImportError as exc:
        if getattr(exc, "name", "") == "redis":
            raise UserError("the Redis control plane needs the redis package: pip install 'loopwise[redis]'") from None
        raise
    return RedisControl(url)


# -- kill ----------------------------------------------------------------------------


def kill(
    run_id: str | None = None,
    *,
    tag: str | None = None,
    all: bool = False,  # noqa: A002 - the contract's name
    reason: str | None = None,
    store: EventStore | None = None,
    control: ControlPlane | str | None = None,
) -> int:
    """Stop a run (by id), the runs with a tag, or all runs, from any process.

    Returns how many runs were signalled, once the request is durably stored. The
    runs stop within milliseconds, cancelling their in-flight model call and tool
    calls, and end with stop reason ``killed`` and this reason in their log.

    A finished run is a no-op (0, and a log line says so); so is a run whose process
    died (resume it instead). An unknown run id raises `UserError`. A tag or `all`
    reaches the runs running at that moment, in every process; the count leaves out
    runs of other processes younger than a few tens of milliseconds (no lease yet),
    which the local control plane stops all the same.

    Args:
        run_id: The run to stop.
        tag: Stop every running run with this tag.
        all: Stop every running run.
        reason: Why (recorded in each run's log with who asked).
        store: The event store the runs write to (default: the default SQLite store).
        control: The control plane (default: `$LOOPWISE_REDIS_URL`, else the store's).
    """
    chosen = sum((run_id is not None, tag is not None, bool(all)))
    if chosen != 1:
        raise UserError("kill needs exactly one of: a run id, tag=..., or all=True")
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise UserError(f"run_id must be a non-empty str, got {run_id!r}")
    if tag is not None and (not isinstance(tag, str) or not tag):
        raise UserError(f"tag must be a non-empty str, got {tag!r}")
    if reason is not None and not isinstance(reason, str):
        raise UserError(f"reason must be a str, got {type(reason).__name__}")
    if reason is not None and (fixed := clean_text(reason)) is not None:
        reason = fixed  # text UTF-8 cannot encode: U+FFFD, as in the runs' logs (`_stores.storable`)
    if tag is not None and (fixed := clean_text(tag)) is not None:
        tag = fixed  # (as the runs' tags were stored)
    if store is None:
        from .._stores.sqlite import default_store

        store = default_store()
    plane = _chosen(store, control)
    by = requester()
    now = time.time()
    text = reason.strip() if reason and reason.strip() else "no reason given"
    if plane is None:
        # No plane to store the kill in: only a run executing in this process can hear it.
        with _local_lock:
            local_run = _local_runs.get(run_id) if run_id is not None else None
        if local_run is None:
            control_for(store, control)  # (raises: why, and what to do)
        local_run.deliver(KillRequest(local_run.run_id, text, by, now))  # type: ignore[union-attr]
        return 1
    if run_id is not None:
        targets = [run_id] if _running(run_id, store, plane) else []
    else:
        with _local_lock:
            local = {r.run_id for r in _local_runs.values() if tag is None or tag in r.tags}
        now_live = time.time()
        me = _owner()
        remote = {lease.run_id for lease in plane.leases().values()
                  if lease.live(now_live) and lease.owner != me and (tag is None or tag in lease.tags)}
        targets = sorted(local | remote)
    if run_id is None:
        # The runs of other processes too young to hold a lease yet: their watchers match this.
        plane.record_broadcast(tag, KillRequest("", text, by, now))
    requests = [KillRequest(t, text, by, now) for t in targets]
    plane.record_kills(requests)
    # Runs in this process hear of it at once; others through their watcher.
    with _local_lock:
        here = [(_local_runs.get(r.run_id), r) for r in requests]
    for run, request in here:
        if run is not None:
            run.deliver(request)
    return len(requests)


def run_status(run_id: str, store: EventStore, plane: ControlPlane) -> str:
    """``running``, ``orphaned`` (its process ended without finishing it), or ``finished:REASON``.

    Raises:
        UserError: no such run.
    """
    with _local_lock:
        if run_id in _local_runs:
            return "running"
    lease = plane.leases([run_id]).get(run_id)
    if lease is not None and lease.live() and lease.owner != _owner():
        return "running"  # (a lease of ours for a run not running here is being released)
    if not store.has_run(run_id):
        if lease is not None:
            return "orphaned"  # a lease without a log: its process died before the first commit
        raise UserError(f"no run with id {run_id!r} in {store.describe()}; `loopwise runs` lists the runs there")
    events = store.load(run_id)
    last = events[-1] if events else None
    if last is not None and last.kind == "run_finished":
        return f"finished:{last.stop_reason}"
    if lease is None and last is not None and time.time() - last.ts < LEASE_GRACE_S:
        return "running"  # its process writes leases at its next poll: a kill still reaches it
    return "orphaned"


def _running(run_id: str, store: EventStore, plane: ControlPlane) -> bool:
    """Whether `run_id` is running now (so a kill can reach it); False with a log line if it is not."""
    status = run_status(run_id, store, plane)
    if status.startswith("finished:"):
        _log.info("run %s already finished (%s); nothing to kill", run_id, status.partition(":")[2])
    elif status == "orphaned":
        _log.warning("run %s is not running: its process ended without finishing it (orphaned); resume it "
                     "with `loopwise resume %s --agent MODULE:AGENT`", run_id, run_id)
    return status == "running"
