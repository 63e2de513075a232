"""The command line: `main(argv)` called directly, plus `python -m loopwise` and the script."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
import subprocess
import sys
import sysconfig
import textwrap
import types
import uuid
from pathlib import Path

import pytest
from rich.console import Console

import loopwise as lw
from loopwise._events import event_to_dict
from loopwise._views.render import render_run
from loopwise.cli import main
from loopwise.models import ModelResponse, ScriptedModel, ToolCall, Usage

AGENT_MODULE = '''
import asyncio
import loopwise as lw
from loopwise.models import FunctionModel, ModelResponse, Price, ToolCall, Usage

in_flight = 0
max_in_flight = 0


@lw.tool
async def lookup(order_id: str) -> dict:
    """Look up an order."""
    await asyncio.sleep(0.01)
    return {"order_id": order_id, "status": "shipped"}


async def think(request):
    global in_flight, max_in_flight
    in_flight += 1
    max_in_flight = max(max_in_flight, in_flight)
    try:
        await asyncio.sleep(0.02)
    finally:
        in_flight -= 1
    last = request.messages[-1]
    if last.role == "user":
        if "fail" in last.content:
            raise lw.ModelError("provider down")
        return ModelResponse(text="Let me check [bold]both[/bold].",
                             tool_calls=[ToolCall("lookup", {"order_id": "1"}), ToolCall("lookup", {"order_id": "2"})],
                             usage=Usage(100, 10))
    return ModelResponse(text="Both orders shipped.", usage=Usage(150, 5))


support = lw.Agent(FunctionModel(think, price=Price(1.0, 2.0), name="test:fn"), tools=[lookup], name="support")
private = lw.Agent(FunctionModel(think), tools=[lookup], name="private", store=lw.MemoryStore())
not_an_agent = 42
'''


@pytest.fixture
def agent_module(tmp_path, monkeypatch):
    """A module defining agents, importable by a unique name from the current directory."""
    name = f"cli_agents_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(AGENT_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def db(tmp_path) -> Path:
    """A database holding two finished runs: `alpha-1` (done) and `alpha-2` (max_iterations)."""
    path = tmp_path / "runs.db"
    store = lw.SQLiteStore(path)

    @lw.tool
    def echo(text: str) -> str:
        """Echo."""
        return text

    done = lw.Agent(ScriptedModel([ToolCall("echo", {"text": "hi"}), "all done"]), tools=[echo], store=store, name="first")
    done.run_sync("say hi", run_id="alpha-1", tags=["nightly"])
    looping = lw.Agent(ScriptedModel([ToolCall("echo", {"text": "again"})] * 3, name="loop-model"), tools=[echo],
                       store=store, name="looper", limits=lw.Limits(max_iterations=2, final_answer_on_limit=False))
    looping.run_sync("loop", run_id="alpha-2")
    store.close()
    return path


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    for fragment in fragments:
        assert fragment in error_lines[0], err


# -- run --task ----------------------------------------------------------------------


def test_run_task_prints_the_trace_and_stores_the_run(agent_module, tmp_path, capsys):
    db = tmp_path / "out.db"
    assert main(["run", f"{agent_module}:support", "--task", "Where are my orders?", "--tag", "cli", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "agent support" in out and "model test:fn" in out and "tags cli" in out
    assert "250 in / 15 out tok" in out
    assert "THINK" in out and "ACT" in out and "2 ran concurrently" in out
    assert 'lookup(order_id="1")' in out and "ok" in out
    assert "Let me check [bold]both[/bold]." in out  # model text is shown, not interpreted as markup
    assert "done" in out and "Both orders shipped." in out and "$0.0003" in out
    # --db took effect for this command only
    module = sys.modules[agent_module]
    assert module.support._store is None
    store = lw.SQLiteStore(db)
    try:
        [summary] = store.list_runs()
    finally:
        store.close()
    assert summary.agent == "support" and summary.tags == ("cli",) and summary.stop_reason == "done"


def test_run_task_with_output_writes_one_jsonl_line(agent_module, tmp_path, capsys):
    out_file = tmp_path / "result.jsonl"
    assert main(["run", f"{agent_module}:support", "-t", "hi", "--output", str(out_file), "--db", str(tmp_path / "x.db")]) == 0
    [row] = lines(out_file.read_text())
    assert row["stop_reason"] == "done" and row["output"] == "Both orders shipped."
    assert row["input_tokens"] == 250 and row["output_tokens"] == 15 and row["error"] is None


def test_run_task_that_ends_in_error_exits_1(agent_module, tmp_path, capsys):
    assert main(["run", f"{agent_module}:support", "--task", "please fail", "--db", str(tmp_path / "x.db")]) == 1
    out = capsys.readouterr().out
    assert "ModelError: provider down" in out and "error" in out


def test_run_without_db_uses_the_default_database(agent_module, tmp_path, monkeypatch, capsys):
    default = tmp_path / "env.db"
    monkeypatch.setenv("LOOPWISE_DB", str(default))
    assert main(["run", f"{agent_module}:support", "--task", "hi"]) == 0
    assert default.exists()
    assert main(["runs"]) == 0
    assert "support" in capsys.readouterr().out


def test_db_is_ignored_with_a_warning_when_the_agent_has_its_own_store(agent_module, tmp_path, capsys):
    own = tmp_path / "own.db"
    (tmp_path / "own_agent.py").write_text(textwrap.dedent(f"""\
        import loopwise as lw
        from {agent_module} import lookup, think
        from loopwise.models import FunctionModel
        owned = lw.Agent(FunctionModel(think), tools=[lookup], name="owned", store=lw.SQLiteStore({str(own)!r}))
    """))
    db = tmp_path / "ignored.db"
    try:
        assert main(["run", "own_agent:owned", "--task", "hi", "--db", str(db)]) == 0
        captured = capsys.readouterr()
        assert "warning:" in captured.err and "--db" in captured.err and str(own) in captured.err
        assert "Both orders shipped." in captured.out
        assert not db.exists()
        [summary] = sys.modules["own_agent"].owned.store.list_runs()
        assert summary.stop_reason == "done"
        # The command it prints reads the run back from where it is.
        [command] = [line for line in captured.out.splitlines() if "loopwise show" in line]
        argv = shlex.split(command.split(": ", 1)[1])
        assert argv[:2] == ["loopwise", "show"] and "--db" in argv
        assert main(argv[1:]) == 0
        assert "Both orders shipped." in capsys.readouterr().out
    finally:
        module = sys.modules.pop("own_agent", None)
        if module is not None:
            module.owned.store.close()


@pytest.mark.parametrize("with_db", [True, False])
def test_an_agent_with_an_in_memory_store_writes_to_the_clis_database(agent_module, tmp_path, monkeypatch, capsys,
                                                                      with_db):
    db = tmp_path / ("given.db" if with_db else "env.db")
    monkeypatch.setenv("LOOPWISE_DB", str(tmp_path / "env.db"))
    argv = ["run", f"{agent_module}:private", "--task", "hi"] + (["--db", str(db)] if with_db else [])
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "in memory" in captured.err and str(db) in captured.err
    assert "Both orders shipped." in captured.out
    assert db.exists()
    assert sys.modules[agent_module].private.store.list_runs() == []  # (its own store is left as it was)
    [command] = [line for line in captured.out.splitlines() if "loopwise show" in line]
    assert main(shlex.split(command.split(": ", 1)[1])[1:]) == 0
    assert "Both orders shipped." in capsys.readouterr().out
    assert main(["runs", "--db", str(db)]) == 0
    assert "private" in capsys.readouterr().out


# -- run --input ---------------------------------------------------------------------


def test_batch_runs_every_line_at_most_n_at_a_time(agent_module, tmp_path, capsys):
    input_file = tmp_path / "tasks.jsonl"
    rows = [{"task": f"order question {i}", "run_id": f"batch-{i}", "tags": ["set-a"]} for i in range(7)]
    text = "\n".join(json.dumps(r) for r in rows) + '\n\n"a bare string task"\n"another"\n{"task": "third"}\n'
    input_file.write_text(text)
    db = tmp_path / "batch.db"
    assert main(["run", f"{agent_module}:support", "--input", str(input_file), "--concurrency", "4",
                 "--tag", "nightly", "--db", str(db)]) == 0
    captured = capsys.readouterr()
    results = lines(captured.out)  # stdout is pure JSONL
    assert len(results) == 10
    assert {r["line"] for r in results} == {1, 2, 3, 4, 5, 6, 7, 9, 10, 11}
    for r in results:
        assert set(r) >= {"run_id", "stop_reason", "output", "iterations", "input_tokens", "output_tokens",
                          "cost_usd", "duration_s", "error"}
        assert r["stop_reason"] == "done" and r["output"] == "Both orders shipped." and r["error"] is None
        assert r["iterations"] == 2 and r["input_tokens"] == 250 and r["output_tokens"] == 15
    assert {f"batch-{i}" for i in range(7)} <= {r["run_id"] for r in results}
    # At most 4 runs at once, and really concurrent.
    assert sys.modules[agent_module].max_in_flight == 4
    # The summary goes to stderr when the results go to stdout.
    assert "summary" in captured.err and "done 10" in captured.err and "p95" in captured.err
    assert "10/10" in captured.err  # the progress bar
    store = lw.SQLiteStore(db)
    try:
        summaries = {s.run_id: s for s in store.list_runs(limit=50)}
    finally:
        store.close()
    assert len(summaries) == 10
    assert summaries["batch-0"].tags == ("set-a", "nightly")


def test_batch_with_output_file_and_failures(agent_module, tmp_path, capsys):
    db = tmp_path / "batch.db"
    input_file = tmp_path / "tasks.jsonl"
    input_file.write_text('{"task": "fine", "run_id": "ok-1"}\n{"task": "please fail", "run_id": "bad-1"}\n')
    out_file = tmp_path / "results.jsonl"
    argv = ["run", f"{agent_module}:support", "-i", str(input_file), "-o", str(out_file), "--db", str(db)]
    assert main(argv) == 1  # a run ended in error
    captured = capsys.readouterr()
    by_id = {r["run_id"]: r for r in lines(out_file.read_text())}
    assert by_id["ok-1"]["stop_reason"] == "done" and by_id["ok-1"]["error"] is None
    assert by_id["bad-1"]["stop_reason"] == "error" and by_id["bad-1"]["error"] == "ModelError: provider down"
    assert "summary" in captured.out  # the results went to the file: the summary to stdout
    assert "done 1, error 1" in captured.out or "error 1, done 1" in captured.out

    # Again: the run ids are taken now, so those runs cannot start; the batch still completes.
    assert main(argv) == 1
    rows = lines(out_file.read_text())
    assert all(r["stop_reason"] is None and "already exists" in r["error"] for r in rows)
    assert "2 could not start" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('"fine"\n{"task": "ok"\n', ["line 2", "not valid JSON"]),
        ('"fine"\n\n{"task": 3}\n', ["line 3", "the task is a number"]),
        ('{"prompt": "hi"}\n', ["line 1", "'prompt'"]),
        ('{"run_id": "x"}\n', ["line 1", 'no "task"']),
        ('[1, 2]\n', ["line 1", "an array"]),
        ('"   "\n', ["line 1", "empty"]),
        ('{"task": "a", "tags": "x"}\n', ["line 1", '"tags"']),
        ('{"task": "a", "run_id": 7}\n', ["line 1", '"run_id"']),
        ('{"task": "a", "run_id": "r"}\n{"task": "b", "run_id": "r"}\n', ["line 2", "line 1", "'r'"]),
        ("\n\n", ["holds no tasks"]),
    ],
)
def test_a_bad_input_line_is_an_error_naming_the_line(agent_module, tmp_path, capsys, content, fragments):
    input_file = tmp_path / "bad.jsonl"
    input_file.write_text(content)
    db = tmp_path / "never.db"
    assert main(["run", f"{agent_module}:support", "--input", str(input_file), "--db", str(db)]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, *fragments)
    assert captured.out == ""
    assert not db.exists()  # nothing ran


def test_a_missing_input_file_is_an_error(agent_module, tmp_path, capsys):
    assert main(["run", f"{agent_module}:support", "--input", str(tmp_path / "nope.jsonl")]) == 2
    assert_one_line_error(capsys.readouterr().err, "nope.jsonl")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "--task"),
        (["--task", "a", "--input", "b.jsonl"], "not both"),
        (["--task", "a", "--concurrency", "0"], "--concurrency"),
    ],
)
def test_task_or_input_is_required(agent_module, capsys, args, fragment):
    assert main(["run", f"{agent_module}:support", *args]) == 2
    assert_one_line_error(capsys.readouterr().err, fragment)


@pytest.mark.parametrize(
    ("target", "fragments"),
    [
        ("{module}", ["expected MODULE:AGENT"]),
        ("{module}:", ["expected MODULE:AGENT"]),
        ("no_such_module_xyz:agent", ["no module named 'no_such_module_xyz'"]),
        ("{module}:missing", ["no attribute 'missing'", "support"]),
        ("{module}:not_an_agent", ["not a loopwise.Agent", "int"]),
        ("broken_module:agent", ["importing 'broken_module' failed", "RuntimeError: bad import", "broken_module.py:2"]),
    ],
)
def test_a_bad_module_agent_is_a_one_line_error(agent_module, tmp_path, capsys, target, fragments):
    (tmp_path / "broken_module.py").write_text("x = 1\nraise RuntimeError('bad import')\n")
    try:
        assert main(["run", target.format(module=agent_module), "--task", "hi"]) == 2
    finally:
        sys.modules.pop("broken_module", None)
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, *fragments)
    assert captured.out == ""


def test_run_accepts_a_file_path(agent_module, tmp_path, capsys):
    assert main(["run", f"{tmp_path / agent_module}.py:support", "--task", "hi", "--db", str(tmp_path / "x.db")]) == 0
    assert "Both orders shipped." in capsys.readouterr().out


# -- runs and show -------------------------------------------------------------------


def test_runs_lists_recent_runs(db, capsys):
    assert main(["runs", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    for header in ("run id", "state", "iter", "cost", "duration", "started", "agent", "tags"):
        assert header in out
    first, second = out.splitlines()[1:3]
    assert first.startswith("alpha-2") and "max_iterations" in first and "looper" in first  # newest first
    assert second.startswith("alpha-1") and " done " in second and "nightly" in second

    assert main(["runs", "--db", str(db), "--limit", "1", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["run_id"] == "alpha-2" and row["stop_reason"] == "max_iterations" and row["iterations"] == 2


@pytest.mark.parametrize("columns", [40, 60, 80, 120])
def test_runs_never_cuts_a_run_id_or_how_it_ended(tmp_path, monkeypatch, capsys, columns):
    """A run id is copied from this list: at any width it is whole, and so are the stop
    reason, iterations, cost and duration (two lines a run where one is too narrow)."""
    path = tmp_path / "runs.db"
    store = lw.SQLiteStore(path)
    ids = []
    for i, reply in enumerate(["all done", None]):
        model = ScriptedModel([reply] if reply else [ToolCall("nope", {})] * 3)
        agent = lw.Agent(model, store=store, name="a-rather-long-agent-name",
                         limits=lw.Limits(max_iterations=2, final_answer_on_limit=False))
        ids.append(agent.run_sync("go", tags=["nightly-batch", f"n{i}"]).run_id)
    store.close()
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["runs", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and max(map(len, out.splitlines())) <= columns
    for run_id, stop in zip(ids, ["done", "max_iterations"]):
        assert run_id in out
        block = out[out.index(run_id):].split("\n")
        line = block[0] if stop in block[0] else block[1]  # (its own line, or the one under its id)
        assert stop in line and re.search(r"\d(ms|s)\b", line), line
    if columns >= 120:  # room for the agent and the tags too
        assert "agent" in out and "nightly" in out


def test_runs_filters(tmp_path, capsys):
    import time

    from loopwise._events import RunFinished, RunStarted
    from loopwise._messages import new_message

    path = tmp_path / "filters.db"
    store = lw.SQLiteStore(path)
    now = time.time()
    for run_id, age, tags, end in [("old-done", 90_000, ["nightly"], "done"), ("new-error", 60, ["nightly"], "error"),
                                   ("new-done", 30, [], "done"), ("dead", 20, ["nightly"], None)]:
        events: list = [RunStarted(run_id=run_id, seq=0, ts=now - age, task=[new_message("user", "t")], tags=tags)]
        if end:
            events.append(RunFinished(run_id=run_id, seq=1, ts=now - age + 1, stop_reason=end))
        store.write(events)
    store.close()

    def ids(*args: str) -> list[str]:
        assert main(["runs", "--db", str(path), "--json", *args]) == 0
        return [r["run_id"] for r in json.loads(capsys.readouterr().out)]

    assert ids() == ["dead", "new-done", "new-error", "old-done"]
    assert ids("--status", "orphaned") == ["dead"]  # no end, no live lease: its process is gone
    assert ids("--status", "running") == []
    assert ids("--status", "finished", "--limit", "2") == ["new-done", "new-error"]
    assert ids("--stop-reason", "done") == ["new-done", "old-done"]
    assert ids("--tag", "nightly", "--since", "1h") == ["dead", "new-error"]
    assert main(["runs", "--db", str(path), "--status", "crashed"]) == 2
    assert "--status 'crashed': choose among running, orphaned, finished" in capsys.readouterr().err
    assert main(["runs", "--db", str(path), "--since", "yesterday"]) == 2
    assert "--since 'yesterday' is not a duration" in capsys.readouterr().err


def test_runs_on_an_empty_database(tmp_path, capsys):
    path = tmp_path / "empty-but-ours.db"
    lw.SQLiteStore(path).close()
    assert main(["runs", "--db", str(path)]) == 0
    assert "no runs" in capsys.readouterr().out


def test_show_renders_a_run(db, capsys):
    assert main(["show", "alpha-1", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "run alpha-1" in out and "agent first" in out and "tags nightly" in out
    assert "iteration 1" in out and "iteration 2" in out
    assert 'echo(text="hi")' in out and "ok" in out
    assert "all done" in out and "2 iterations" in out


def test_show_renders_limits(db, capsys):
    assert main(["show", "alpha-2", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "LIMIT" in out and "max_iterations" in out and "not_executed" in out
    assert "no output" in out


def test_show_json_prints_the_events(db, capsys):
    assert main(["show", "alpha-1", "--json", "--db", str(db)]) == 0
    printed = json.loads(capsys.readouterr().out)
    store = lw.SQLiteStore(db)
    try:
        expected = [event_to_dict(e) for e in store.load("alpha-1")]
    finally:
        store.close()
    assert printed == expected
    assert printed[0]["kind"] == "run_started" and printed[-1]["kind"] == "run_finished"


def test_show_accepts_a_unique_prefix(db, capsys):
    assert main(["show", "alpha-", "--db", str(db)]) == 2
    assert_one_line_error(capsys.readouterr().err, "matches several runs", "alpha-1", "alpha-2")
    store = lw.SQLiteStore(db)
    agent = lw.Agent(ScriptedModel(["ok"]), store=store)
    agent.run_sync("x", run_id="beta-unique-run")
    store.close()
    assert main(["show", "beta", "--json", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["run_id"] == "beta-unique-run"


def test_show_an_unknown_run(db, capsys):
    assert main(["show", "nope", "--db", str(db)]) == 2
    assert_one_line_error(capsys.readouterr().err, "no run with id 'nope'")


@pytest.mark.parametrize("command", [["runs"], ["show", "abc"]])
def test_read_commands_never_create_a_database(tmp_path, capsys, command):
    missing = tmp_path / "sub" / "missing.db"
    assert main([*command, "--db", str(missing)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"no loopwise database at {missing}", "--db")
    assert not missing.exists() and not missing.parent.exists()


def test_read_commands_default_to_loopwise_db(tmp_path, monkeypatch, capsys, db):
    monkeypatch.setenv("LOOPWISE_DB", str(tmp_path / "nothing-here.db"))
    assert main(["runs"]) == 2
    assert_one_line_error(capsys.readouterr().err, "nothing-here.db")
    monkeypatch.setenv("LOOPWISE_DB", str(db))
    assert main(["show", "alpha-1", "--json"]) == 0


@pytest.mark.parametrize("kind", ["text", "foreign-sqlite", "foreign-wal", "empty"])
@pytest.mark.parametrize("command", [["runs"], ["show", "abc"]])
def test_a_file_that_is_not_a_loopwise_database(tmp_path, capsys, kind, command):
    path = tmp_path / f"{kind}.db"
    if kind == "text":
        path.write_text("hello, I am a text file\n" * 100)
    elif kind.startswith("foreign"):
        conn = sqlite3.connect(path)
        if kind == "foreign-wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE users (id INTEGER)")
        conn.commit()
        conn.close()
    else:
        path.write_bytes(b"")
    before, files = path.read_bytes(), sorted(tmp_path.iterdir())
    assert main([*command, "--db", str(path)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(path), "not a loopwise database")
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == files  # no -wal, -shm, journal


def test_run_into_a_foreign_database_is_an_error(agent_module, tmp_path, capsys):
    path = tmp_path / "foreign.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    assert main(["run", f"{agent_module}:support", "--task", "hi", "--db", str(path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a loopwise database", "users")


def _spoil(db: Path, run_id: str, data: str) -> None:
    """Add a row `data` after the events of `run_id` (what a newer loopwise wrote, or an edit)."""
    conn = sqlite3.connect(db)
    try:
        seq = conn.execute("SELECT MAX(last_seq) + 1 FROM event_chunks WHERE run_id = ?", (run_id,)).fetchone()[0]
        conn.execute("INSERT INTO event_chunks VALUES (?, ?, ?, 1.0, 1.0, 'x', ?, NULL)", (run_id, seq, seq, data))
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(("data", "why"), [
    ('[{"kind": "from_a_newer_loopwise", "run_id": "alpha-1", "seq": 1, "ts": 1.0}]',
     "an event of unknown kind 'from_a_newer_loopwise'"),
    ('[{"kind": "iteration_started", "run_id": "alpha-1", "seq": 1, "ts": "noon"}]', "iteration_started.ts"),
    ("[{not json", "Invalid JSON"),
])
def test_an_event_this_loopwise_cannot_read_is_a_one_line_error_not_a_traceback(db, capsys, data, why):
    _spoil(db, "alpha-1", data)
    for command in (["show", "alpha-1"], ["export", "alpha-1", "-f", "jsonl"], ["profile", "alpha-1"]):
        assert main([*command, "--db", str(db)]) == 2, command
        assert_one_line_error(capsys.readouterr().err, "run alpha-1", "cannot read", why)
    # The other runs are still listed and profiled; the unreadable one is left out of the profile, saying so.
    assert main(["runs", "--json", "--db", str(db)]) == 0
    assert {r["run_id"] for r in json.loads(capsys.readouterr().out)} == {"alpha-1", "alpha-2"}
    assert main(["profile", "--json", "--db", str(db)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runs"] == 1 and "alpha-1" in captured.err and "left out" in captured.err
    # A run whose first event cannot be read is left out of the list, not the list with it.
    conn = sqlite3.connect(db)
    conn.execute("UPDATE event_chunks SET data = ? WHERE run_id = 'alpha-2' AND seq = 0", (data,))
    conn.commit()
    conn.close()
    assert main(["runs", "--json", "--db", str(db)]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ["alpha-1"]
    assert main(["prune", "--older-than", "0s", "--dry-run", "--db", str(db)]) == 0  # (it reads every run)


# -- the command line itself -----------------------------------------------------------


def test_usage_errors_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert_one_line_error(capsys.readouterr().err, "frobnicate")
    assert main(["runs", "--limit", "0"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--limit")
    assert main(["show"]) == 2
    assert_one_line_error(capsys.readouterr().err, "RUN_ID")
    assert main([]) == 2  # the help, and a usage status


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "runs", "show", "demo", "export", "profile", "kill", "resume"):
        assert f" {command} " in out


def test_demo_calls_the_demo_module(monkeypatch, capsys, tmp_path):
    seen = []
    fake = types.ModuleType("loopwise._demo.scenario")

    def fake_main(console, *, store):
        seen.append((console, store.path))
        console.print("the demo ran")

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "loopwise._demo.scenario", fake)
    assert main(["demo", "--db", str(tmp_path / "demo.db")]) == 0
    assert isinstance(seen[0][0], Console) and seen[0][1] == tmp_path / "demo.db"
    assert "the demo ran" in capsys.readouterr().out


# -- render_run ------------------------------------------------------------------------


def render(events) -> str:
    console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    try:
        render_run(events, console)
        return console.export_text()
    finally:
        console.file.close()


def test_render_run_shows_concurrency_nudges_and_limits():
    store = lw.MemoryStore()

    @lw.tool
    async def slow(n: int) -> str:
        """Sleep a little."""
        import asyncio

        await asyncio.sleep(0.01 * n)
        return f"slept {n}"

    model = ScriptedModel([
        ModelResponse(tool_calls=[ToolCall("slow", {"n": 1}), ToolCall("slow", {"n": 3}),
                                  ToolCall("nope", {}), ToolCall("slow", {"n": "x"})], usage=Usage(10, 2)),
        ModelResponse(text=""),
        ToolCall("slow", {"n": 1}),
        "best effort",
    ])
    agent = lw.Agent(model, tools=[slow], store=store, limits=lw.Limits(max_iterations=3))
    result = agent.run_sync("go", tags=["t1"])
    text = render(store.load(result.run_id))
    assert "4 tool calls" in text and "2 ran concurrently" in text
    assert "▕" in text  # the timeline of the calls that ran
    assert "unknown_tool" in text and "invalid_arguments" in text and "not_executed" in text
    assert "NUDGE" in text and "empty" in text
    assert "LIMIT" in text and "max_iterations" in text
    assert "ANSWER" in text and "best effort" in text
    assert "~" in text  # estimated usage is marked


def test_render_run_on_an_unfinished_log_and_on_nothing():
    store = lw.MemoryStore()
    agent = lw.Agent(ScriptedModel(["done"]), store=store)
    result = agent.run_sync("x")
    events = store.load(result.run_id)
    text = render(events[:3])  # run_started, iteration_started, model_call_started
    assert "no answer recorded" in text and "not finished" in text
    assert "(no events)" in render([])
    assert "no run_started" in render(events[1:])


# -- as a program ------------------------------------------------------------------------


def test_python_dash_m_loopwise(db):
    proc = subprocess.run([sys.executable, "-m", "loopwise", "runs", "--db", str(db)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "alpha-1" in proc.stdout and "alpha-2" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "loopwise", "show", "nope", "--db", str(db)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no run with id 'nope'")
    assert "Traceback" not in proc.stderr


def test_the_console_script(db, agent_module, tmp_path):
    script = Path(sysconfig.get_path("scripts")) / "loopwise"
    assert script.exists(), "the loopwise console script is not installed: run `make test` (pip install -e .)"
    proc = subprocess.run([str(script), "runs", "--db", str(db), "--json"], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {r["run_id"] for r in json.loads(proc.stdout)} == {"alpha-1", "alpha-2"}
    # run, from the current directory, as a user would
    input_file = tmp_path / "in.jsonl"
    input_file.write_text(textwrap.dedent("""\
        "one"
        {"task": "two", "run_id": "script-2"}
    """))
    out_db = tmp_path / "script.db"
    proc = subprocess.run([str(script), "run", f"{agent_module}:support", "-i", str(input_file), "-c", "2",
                           "--db", str(out_db)], check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["line"] for r in lines(proc.stdout)) == [1, 2]
    proc = subprocess.run([str(script), "show", "script-2", "--db", str(out_db)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "Both orders shipped." in proc.stdout


def test_batch_reads_stdin(agent_module, tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO('"one"\n"two"\n'))
    assert main(["run", f"{agent_module}:support", "--input", "-", "--db", str(tmp_path / "x.db")]) == 0
    assert len(lines(capsys.readouterr().out)) == 2


# -- help, options before the command, the environment -----------------------------------

COMMANDS = ("run", "runs", "show", "kill", "resume", "demo", "export", "profile", "prune")


def test_every_command_has_a_help_without_type_placeholders(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    for argv in (["--help"], *([command, "--help"] for command in COMMANDS)):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert "Usage: loopwise" in out, argv
        for placeholder in ("<bool>", "<str>", "<int>", "<float>", "<path>", "[["):
            assert placeholder not in out, (argv, placeholder, out)
        usage = next(line for line in out.splitlines() if "Usage: loopwise" in line)
        assert "{" not in usage, usage
        assert "seed" not in out.lower(), (argv, out)
    # Arguments in the usual notation: required bare, optional in brackets.
    main(["show", "--help"])
    assert "Usage: loopwise show [OPTIONS] RUN_ID" in capsys.readouterr().out
    main(["kill", "--help"])
    assert "Usage: loopwise kill [OPTIONS] [RUN_ID]" in capsys.readouterr().out
    main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "$LOOPWISE_DEMO_SPEED multiplies every simulated latency" in out and "--db" in out


def test_db_is_accepted_before_the_command_too(db, tmp_path, capsys):
    other = tmp_path / "other.db"
    store = lw.SQLiteStore(other)
    lw.Agent(ScriptedModel(["hello"]), store=store, name="other").run_sync("x", run_id="beta-1")
    store.close()
    assert main(["--db", str(db), "runs"]) == 0
    out = capsys.readouterr().out
    assert "alpha-1" in out and "beta-1" not in out
    assert main(["runs", "--db", str(other)]) == 0
    out = capsys.readouterr().out
    assert "beta-1" in out and "alpha-1" not in out
    # Both: the one after the command wins.
    assert main(["--db", str(db), "runs", "--db", str(other)]) == 0
    out = capsys.readouterr().out
    assert "beta-1" in out and "alpha-1" not in out
    assert main(["--db", str(db), "show", "alpha-2"]) == 0
    assert "max_iterations" in capsys.readouterr().out
    assert main(["--db", str(tmp_path / "missing.db"), "runs"]) == 2
    assert_one_line_error(capsys.readouterr().err, "missing.db")


@pytest.mark.parametrize("value", ["bogus", "verbose", "10"])
def test_a_bad_log_level_is_a_one_line_error_naming_the_valid_ones(db, monkeypatch, capsys, value):
    monkeypatch.setenv("LOOPWISE_LOG_LEVEL", value)
    assert main(["runs", "--db", str(db)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"LOOPWISE_LOG_LEVEL={value!r}", "DEBUG, INFO, WARNING, ERROR")


@pytest.mark.parametrize("value", ["info", " WARNING ", "warn", ""])
def test_a_good_log_level_is_accepted(db, monkeypatch, capsys, value):
    monkeypatch.setenv("LOOPWISE_LOG_LEVEL", value)
    assert main(["runs", "--db", str(db)]) == 0
    assert "alpha-1" in capsys.readouterr().out


# -- show at any width ---------------------------------------------------------------------


@pytest.fixture
def recovery_db(tmp_path) -> Path:
    """A run with concurrent calls, long arguments, a long result and a timed-out lookup
    answered by its fallback: `recovery-1`."""
    import anyio

    path = tmp_path / "recovery.db"
    store = lw.SQLiteStore(path)

    @lw.tool
    async def cached_history(customer_id: str) -> dict:
        """Yesterday's history."""
        return {"customer_id": customer_id, "tier": "gold", "as_of": "yesterday"}

    @lw.tool(timeout=0.05, fallback=cached_history)
    async def customer_history(customer_id: str) -> dict:
        """The live history: it hangs."""
        await anyio.sleep(3600)
        return {}

    @lw.tool
    async def draft_reply(sentiment: str, history: str, context: str) -> str:
        """A long reply."""
        return "Zebra reply: " + "we are very sorry about the wait on your order. " * 6

    model = ScriptedModel([
        ModelResponse(tool_calls=[
            ToolCall("draft_reply", {"sentiment": "negative " * 8, "history": "gold tier " * 8, "context": "shipping"}),
            ToolCall("customer_history", {"customer_id": "CUS-4821-" + "x" * 40}),
        ]),
        "done",
    ])
    lw.Agent(model, tools=[customer_history, draft_reply], store=store, name="recovery").run_sync(
        "help", run_id="recovery-1")
    store.close()
    return path


def tool_rows_visible(text: str, events, width: int) -> None:
    """Each tool call's outcome, latency and the start of its result are on screen."""
    from loopwise._views.render import format_duration

    lines_ = text.splitlines()
    assert all(len(line) <= width for line in lines_), [line for line in lines_ if len(line) > width]
    finished = [e for e in events if e.kind == "tool_call_finished"]
    assert finished
    for event in finished:
        content = " ".join((event.content or "").split())
        start = content[:12]
        row = [line for line in lines_ if start in line and f" {event.outcome} " in line]
        assert len(row) == 1, (start, event.outcome, text)
        assert f" {format_duration(event.latency_s)} " in row[0], (row[0], text)


@pytest.mark.parametrize("width", [60, 80, 120, 160])
def test_show_keeps_each_tool_rows_outcome_latency_and_result_at_any_width(recovery_db, monkeypatch, capsys, width):
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(["show", "recovery-1", "--db", str(recovery_db)]) == 0
    text = capsys.readouterr().out
    store = lw.SQLiteStore(recovery_db)
    try:
        events = store.load("recovery-1")
    finally:
        store.close()
    tool_rows_visible(text, events, width)
    assert "fallback" in text and "↳ answered from cached_history" in text
    assert "Zebra reply" in text
    if width >= 160:  # wide enough: one line per call
        assert any("draft_reply(" in line and "Zebra reply" in line for line in text.splitlines()), text


def test_show_labels_a_failed_model_attempt_by_what_the_log_says(tmp_path, monkeypatch, capsys):
    from loopwise.models import FunctionModel, ModelPolicy

    calls = {"n": 0}

    async def flaky(request):
        calls["n"] += 1
        if calls["n"] == 1:
            raise lw.ModelHTTPError("rate limited", status_code=429)
        if calls["n"] == 2:
            raise lw.ModelHTTPError("bad request: no such parameter", status_code=400)
        return ModelResponse(text="fine")

    backup = FunctionModel(lambda request: ModelResponse(text="from the backup"), name="backup")
    path = tmp_path / "attempts.db"
    store = lw.SQLiteStore(path)
    agent = lw.Agent(FunctionModel(flaky, name="primary"), fallback_models=[backup], store=store,
                     model_policy=ModelPolicy(retries=2, backoff_initial_s=0.001))
    result = agent.run_sync("x", run_id="attempts-1")
    store.close()
    assert result.output == "from the backup"
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["show", "attempts-1", "--db", str(path)]) == 0
    lines_ = [line for line in capsys.readouterr().out.splitlines() if "primary attempt" in line]
    assert len(lines_) == 2, lines_
    retried, failed = lines_
    assert retried.startswith("RETRY") and "429" in retried and "retrying in" in retried
    assert failed.startswith("FAILED") and "RETRY" not in failed
    assert "400" in failed and "(not retried: HTTP 400 is not retryable; falling back to backup)" in failed


def test_no_message_a_user_sees_speaks_of_the_seed_post():
    """The project's story ("the seed post") stays in docstrings and comments: a string the
    code shows (an error, a warning, the demo's text) says what happened in the user's terms."""
    import ast

    story = re.compile(r"\bseed post|\bthe seed'?s?\b|\bseed's\b", re.IGNORECASE)
    found = []
    for path in sorted(Path(lw.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and story.search(node.value)):
                found.append(f"{path.name}:{node.lineno}: {node.value[:80]!r}")
    assert found == [], found
