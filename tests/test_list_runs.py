"""`store.list_runs` filters (status, stop reason, tag, start time) and pages with a cursor.

The same checks on both stores: an `SQLiteStore` on a real file (its filters are SQL)
and a `MemoryStore`. Paging is checked while runs are being written, by a thread
here and, for SQLite, by another process.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

import loopwise as lw
from loopwise._events import RunFinished, RunStarted
from loopwise._messages import new_message

ROOT = Path(__file__).resolve().parent.parent


def _run(store: lw.EventStore, run_id: str, ts: float, *, tags: tuple[str, ...] = (), end: str | None = "done") -> None:
    """A run of one or two events written straight to `store` (`end` None: no end yet)."""
    events: list = [RunStarted(run_id=run_id, seq=0, ts=ts, task=[new_message("user", "t")], tags=list(tags),
                               agent={"name": "a"})]
    if end is not None:
        events.append(RunFinished(run_id=run_id, seq=1, ts=ts + 1, stop_reason=end))  # type: ignore[arg-type]
    store.write(events)


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    s = lw.SQLiteStore(tmp_path / "lw.db") if request.param == "sqlite" else lw.MemoryStore()
    yield s
    s.close()


def _ids(page: list) -> list[str]:
    return [s.run_id for s in page]


def _all_pages(store: lw.EventStore, limit: int, between=None, **filters) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = store.list_runs(limit=limit, cursor=cursor, **filters)
        assert len(page) <= limit
        ids += _ids(page)
        if page.next_cursor is None:
            return ids
        assert len(page) == limit  # (a short page is the last one)
        cursor = page.next_cursor
        if between is not None:
            between()


def test_filters(store):
    _run(store, "a-done", 1000.0, tags=("nightly", "eu"))
    _run(store, "b-error", 2000.0, tags=("nightly",), end="error")
    _run(store, "c-killed", 3000.0, tags=("eu",), end="killed")
    _run(store, "d-open", 4000.0, tags=("nightly",), end=None)
    _run(store, "e-done", 5000.0)
    assert _ids(store.list_runs()) == ["e-done", "d-open", "c-killed", "b-error", "a-done"]
    assert _ids(store.list_runs(status="running")) == ["d-open"]
    assert _ids(store.list_runs(status="finished")) == ["e-done", "c-killed", "b-error", "a-done"]
    assert _ids(store.list_runs(stop_reason="done")) == ["e-done", "a-done"]
    assert _ids(store.list_runs(stop_reason="error")) == ["b-error"]
    assert _ids(store.list_runs(tag="nightly")) == ["d-open", "b-error", "a-done"]
    assert _ids(store.list_runs(tag="eu", stop_reason="killed")) == ["c-killed"]
    assert _ids(store.list_runs(tag="nowhere")) == []
    assert _ids(store.list_runs(since=3000.0)) == ["e-done", "d-open", "c-killed"]
    assert _ids(store.list_runs(since=3000.0, tag="nightly", status="running")) == ["d-open"]
    assert _ids(store.list_runs(status="running", stop_reason="done")) == []
    summary = store.list_runs(stop_reason="killed")[0]
    assert summary.status == "finished" and summary.tags == ("eu",) and summary.started_at == 3000.0


def test_pages_visit_every_run_once_ties_included(store):
    # 53 runs, ten of them started at the very same time (a page boundary falls among them).
    for i in range(43):
        _run(store, f"run-{i:03d}", 1000.0 + i, tags=("odd",) if i % 2 else ())
    for i in range(10):
        _run(store, f"tie-{i}", 1020.0)
    expected = _ids(store.list_runs(limit=1000))
    assert len(expected) == 53
    for limit in (1, 4, 7, 53, 60):
        assert _all_pages(store, limit) == expected
    odd = _all_pages(store, 3, tag="odd")
    assert odd == [i for i in expected if i.startswith("run-") and int(i[4:]) % 2] and len(odd) == 21
    page = store.list_runs(limit=53)
    assert page.next_cursor is None
    assert store.list_runs(limit=52).next_cursor is not None


def test_paging_while_runs_are_written(store):
    for i in range(60):
        _run(store, f"old-{i:03d}", 1000.0 + i)
    before = set(_ids(store.list_runs(limit=1000)))
    n = [0]

    def write_more() -> None:
        # Runs that start meanwhile (newer), and one each time at the oldest start there is.
        def go() -> None:
            for _ in range(5):
                n[0] += 1
                _run(store, f"new-{n[0]:03d}", 5000.0 + n[0])
            _run(store, f"late-{n[0]:03d}", 999.0, end=None)

        t = threading.Thread(target=go)
        t.start()
        t.join()

    seen = _all_pages(store, 7, between=write_more)
    assert len(seen) == len(set(seen)), "a run appeared on two pages"
    assert before <= set(seen), f"runs missed: {sorted(before - set(seen))[:5]}"
    assert not any(i.startswith("new-") for i in seen)  # (newer than the first page: never shift a page)


_WRITER = """
import sys, loopwise as lw
from loopwise._events import RunStarted
from loopwise._messages import new_message
store = lw.SQLiteStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    store.write([RunStarted(run_id=f"other-{i:04d}", seq=0, ts=9000.0 + i, task=[new_message("user", "t")])])
store.close()
print("written")
"""


def test_paging_while_another_process_writes(tmp_path):
    db = tmp_path / "lw.db"
    store = lw.SQLiteStore(db)
    try:
        for i in range(200):
            _run(store, f"old-{i:03d}", 1000.0 + i)
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db), "400"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT / "src"),
                                                                        "PATH": "/usr/bin:/bin"})
        seen = _all_pages(store, 9, status="finished")
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0 and out.strip() == "written", err
        assert seen == [f"old-{i:03d}" for i in reversed(range(200))]
        assert len(store.list_runs(limit=10_000, status="running")) == 400  # (what the other wrote)
    finally:
        store.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"status": "orphaned"}, "status='orphaned'): choose among running, finished"),
    ({"stop_reason": "timeout"}, "stop_reason='timeout'): choose among done, "),
    ({"tag": ""}, "tag=...) must be a non-empty str"),
    ({"since": "yesterday"}, "since=...) must be a time in seconds"),
    ({"since": float("nan")}, "since=...) must be a time in seconds"),
    ({"limit": 0}, "limit=...) must be an int >= 1"),
    ({"limit": True}, "limit=...) must be an int >= 1"),
    ({"cursor": "not-a-cursor"}, "is not a cursor list_runs returned"),
    ({"cursor": "W1siYSJdXQ"}, "is not a cursor list_runs returned"),
    ({"cursor": 12}, "is not a cursor list_runs returned"),
])
def test_bad_arguments_are_one_line_errors(store, kwargs, message):
    with pytest.raises(lw.UserError) as err:
        store.list_runs(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
