"""The log records what each model call was shown, and `messages_seen` rebuilds it exactly.

Each run's model records every request it receives; the requests rebuilt from the
run's SQLite log (a real file, read back by a fresh store) must equal them, call for
call: whole transcripts, sliding windows with summaries and drops, nudges, best-effort
answers after limits, parallel tool calls, a kill and a resume, redaction.
"""

from __future__ import annotations

import dataclasses
import json
import re

import anyio
import pytest

import loopwise as lw
from loopwise._policies.context import ContextPolicy, ContextState
from loopwise import events as ev
from loopwise._views.seen import seen_calls
from loopwise.events import ModelCallStarted, messages_seen
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ToolCall


class Recorder:
    """A model that answers from a script of rules and records every request it gets."""

    def __init__(self, answer):
        self.requests: list[list[lw.Message]] = []
        self.purposes: list[str] = []
        self.answer = answer
        self.thinks = 0

    async def __call__(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(list(request.messages))
        summary = bool(request.messages) and request.messages[0].content.startswith("You keep the running summary")
        if summary:
            return ModelResponse(text=f"summary #{len(self.requests)}: " + request.messages[-1].content[-40:])
        self.thinks += 1
        return self.answer(request, self.thinks)


@lw.tool
def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}: " + "x" * (len(key) * 7)


@lw.tool
async def slow(n: int) -> str:
    """Wait a little, then answer."""
    await anyio.sleep(0.001 * n)
    return json.dumps({"n": n, "squared": n * n})


def _tools_then_answer(calls_per_iteration: int = 2, answer_at: int = 6):
    """Parallel tool calls for a few iterations, an empty response and a cut one (nudges), then an answer."""

    def answer(request: ModelRequest, n: int) -> ModelResponse:
        if not request.tools:
            return ModelResponse(text="best effort from what I have")
        think = n
        if think == 3:
            return ModelResponse(text="")  # nudged: empty
        if think == 4:
            return ModelResponse(text="a long answer cut", finish_reason="length")  # nudged: cut
        if think >= answer_at:
            return ModelResponse(text=f"final after {n} calls")
        return ModelResponse(text=f"step {n}", tool_calls=[
            ToolCall("lookup" if i % 2 == 0 else "slow", {"key": f"k{n}-{i}"} if i % 2 == 0 else {"n": i + n})
            for i in range(calls_per_iteration)])

    return answer


def _check(db, run_id: str, recorder: Recorder, expected=lambda messages: messages) -> list:
    store = lw.SQLiteStore(db)
    try:
        events = store.load(run_id)
    finally:
        store.close()
    calls = seen_calls(events)
    assert len(calls) == len(recorder.requests) > 0
    for call, request in zip(calls, recorder.requests):
        assert call.messages == expected(request), f"model call {call.number} ({call.event.purpose})"
        assert messages_seen(events, call.number) == call.messages == messages_seen(events, call.event)
        assert call.event.n_messages == len(request)
    return events


CONTEXTS = {
    "full": lambda: None,
    "window-summary": lambda: lw.SlidingWindow(keep_last=1),
    "window-drop": lambda: lw.SlidingWindow(keep_last=2, summarize=False),
    "window-tokens": lambda: lw.SlidingWindow(keep_last=3, max_context_tokens=120),
}


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("instructions", [None, "Be brief."])
@pytest.mark.parametrize("limits", ["done", "max_iterations", "no-best-effort"])
async def test_every_request_is_rebuilt_exactly_from_the_log(tmp_path, context, instructions, limits):
    recorder = Recorder(_tools_then_answer(calls_per_iteration=3))
    max_iterations = {"done": 8, "max_iterations": 5, "no-best-effort": 2}[limits]
    db = tmp_path / "lw.db"
    agent = lw.Agent(FunctionModel(recorder), tools=[lookup, slow], instructions=instructions,
                     context=CONTEXTS[context](), store=lw.SQLiteStore(db), runaway=None,
                     limits=lw.Limits(max_iterations=max_iterations, final_answer_on_limit=limits != "no-best-effort"))
    try:
        result = await agent.run([lw.Message("user", "start"), lw.Message("assistant", "ok"),
                                  lw.Message("user", "now go")], run_id="r1")
    finally:
        agent.store.close()
    assert result.stop_reason == ("done" if limits == "done" else "max_iterations")
    events = _check(db, "r1", recorder)
    kinds = {e.kind for e in events}
    assert "nudge" in kinds or limits == "no-best-effort"
    if context.startswith("window") and limits == "done":
        assert "context_folded" in kinds
    if limits == "max_iterations":
        assert [c.event.purpose for c in seen_calls(events)][-1] == "final_answer"
    # Linear: each call refers to what the transcript gained since the previous one (two
    # integers), never copies it: the messages are in the events before it.
    transcript_calls = [c.event for c in seen_calls(events) if c.event.input_at is not None]
    assert sum(e.input_n for e in transcript_calls) == transcript_calls[-1].input_at + transcript_calls[-1].input_n
    assert all(e.input_added is None for e in transcript_calls)
    assert all(e.input_at is None for e in (c.event for c in seen_calls(events)) if e.purpose == "summary")


async def test_a_failed_summary_call_drops_with_a_note_and_is_rebuilt(tmp_path):
    recorder = Recorder(_tools_then_answer(calls_per_iteration=1))
    summaries = Recorder(lambda r, n: ModelResponse(text="unused"))

    async def failing(request):
        await summaries(request)
        raise RuntimeError("summary model down")

    db = tmp_path / "lw.db"
    agent = lw.Agent(FunctionModel(recorder), tools=[lookup, slow], store=lw.SQLiteStore(db),
                     context=lw.SlidingWindow(keep_last=1, summary_model=FunctionModel(failing)),
                     model_policy=lw.models.ModelPolicy(retries=0))
    try:
        await agent.run("go", run_id="r2")
    finally:
        agent.store.close()
    store = lw.SQLiteStore(db)
    events = store.load("r2")
    store.close()
    calls = seen_calls(events)
    think = [c for c in calls if c.event.purpose != "summary"]
    assert [c.messages for c in think] == recorder.requests
    assert [c.messages for c in calls if c.event.purpose == "summary"] == summaries.requests
    notes = [m.content for m in think[-1].messages if m.role == "system"]
    assert any("dropped from the context" in n for n in notes)


async def test_a_killed_and_resumed_run_is_rebuilt_across_its_segments(tmp_path):
    gate = anyio.Event()

    @lw.tool(idempotent=True)
    async def work(n: int) -> str:
        if n == 3 and not gate.is_set():
            gate.set()
            await anyio.sleep(60)  # killed here
        return f"result {n}"

    def answer(request: ModelRequest, n: int) -> ModelResponse:
        if n >= 5 or not request.tools:
            return ModelResponse(text="all done")
        return ModelResponse(text=f"thinking {n}", tool_calls=[ToolCall("work", {"n": n})])

    for context in (None, lw.SlidingWindow(keep_last=1)):
        recorder = Recorder(answer)
        db = tmp_path / f"lw-{context is None}.db"
        gate = anyio.Event()
        agent = lw.Agent(FunctionModel(recorder), tools=[work], store=lw.SQLiteStore(db), context=context)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: agent.run("go", run_id="r3"))
                await gate.wait()
                lw.kill("r3", reason="test", store=agent.store)
            result = await agent.resume("r3")
        finally:
            agent.store.close()
        assert result.stop_reason == "done"
        events = _check(db, "r3", recorder)
        assert any(e.kind == "run_resumed" for e in events)


class LastTwo(ContextPolicy):
    """A policy of one's own: it shows the task and the last two messages, its own way."""

    def plan(self, transcript, state):
        from loopwise._policies.context import ContextPlan

        return ContextPlan()

    def messages(self, transcript, state: ContextState):
        return [*transcript[: state.head], *transcript[max(state.head, len(transcript) - 2):]]


async def test_a_policy_of_ones_own_is_recorded_whole(tmp_path):
    recorder = Recorder(_tools_then_answer(calls_per_iteration=1, answer_at=5))
    db = tmp_path / "lw.db"
    agent = lw.Agent(FunctionModel(recorder), tools=[lookup, slow], store=lw.SQLiteStore(db), context=LastTwo())
    try:
        await agent.run("go", run_id="r4")
    finally:
        agent.store.close()
    events = _check(db, "r4", recorder)
    assert all(e.input_at is None for e in events if isinstance(e, ModelCallStarted))


async def test_the_rebuilt_requests_are_redacted_as_the_log_is(tmp_path):
    email = re.compile(r"[\w.]+@example\.com")

    @lw.tool
    def contact(name: str) -> str:
        """Find a contact."""
        return f"{name} can be reached at {name.lower()}@example.com"

    def answer(request: ModelRequest, n: int) -> ModelResponse:
        if n >= 4:
            return ModelResponse(text="write to ann@example.com")
        return ModelResponse(tool_calls=[ToolCall("contact", {"name": f"Bob{n}", "cc": "eve@example.com"})])

    recorder = Recorder(answer)
    db = tmp_path / "lw.db"
    agent = lw.Agent(FunctionModel(recorder), tools=[contact], store=lw.SQLiteStore(db),
                     instructions="Reply to joe@example.com", context=lw.SlidingWindow(keep_last=1),
                     redact=lw.Redactor(patterns=["email"]))
    try:
        await agent.run("find bob, from sue@example.com", run_id="r5")
    finally:
        agent.store.close()

    def scrub(value):
        if isinstance(value, str):
            return email.sub("[redacted:email]", value)
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        return value

    def redacted(messages):
        return [lw.Message(m.role, scrub(m.content),
                           tuple(ToolCall(c.name, scrub(c.arguments), c.id) for c in m.tool_calls), m.tool_call_id)
                for m in messages]

    events = _check(db, "r5", recorder, redacted)
    assert not any("@example.com" in json.dumps(str(c.messages)) for c in seen_calls(events))
    assert any("[redacted:email]" in (m.content or "") for c in seen_calls(events) for m in c.messages)


async def test_an_older_log_loads_and_says_it_has_no_inputs(tmp_path):
    store = lw.MemoryStore()
    await lw.Agent(FunctionModel(lambda r: "hi"), store=store).run("go", run_id="old")
    events = []
    for e in store.load("old"):
        data = json.loads(ev.dumps(e))
        data.pop("input_at", None)
        data.pop("input_n", None)
        data.pop("input_added", None)
        events.append(ev.loads(json.dumps(data), schema="1.0"))
    [call] = seen_calls(events)
    assert call.messages is None and call.event.input_added is None
    with pytest.raises(lw.UserError, match="recorded before loopwise logged what each model call was shown"):
        messages_seen(events, 1)
    with pytest.raises(lw.UserError, match=r"model call 2 is not in these events: they hold 1 model call$"):
        messages_seen(events, 2)


# -- loopwise show RUN_ID --iteration N -------------------------------------------------------


@pytest.fixture
def seen_db(tmp_path):
    """A run of 4 iterations under a sliding window: summaries, a long tool result, a parallel call."""
    recorder = Recorder(_tools_then_answer(calls_per_iteration=2, answer_at=5))
    db = tmp_path / "seen.db"
    agent = lw.Agent(FunctionModel(recorder, name="test:recorder"), tools=[lookup, slow], store=lw.SQLiteStore(db),
                     instructions="Be brief.", context=lw.SlidingWindow(keep_last=1), runaway=None)
    try:
        agent.run_sync("find the keys " + "and more " * 12, run_id="seen-run")
    finally:
        agent.store.close()
    return db, recorder


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def test_show_iteration_prints_exactly_what_the_model_saw_at_80_columns(seen_db, monkeypatch, capsys):
    from loopwise.cli import main

    db, recorder = seen_db
    monkeypatch.setenv("COLUMNS", "80")
    store = lw.SQLiteStore(db)
    events = store.load("seen-run")
    store.close()
    calls = seen_calls(events)
    last = max(e.iteration for e in events if e.kind == "iteration_started")
    for iteration in range(1, last + 1):
        assert main(["show", "seen-run", "--iteration", str(iteration), "--db", str(db)]) == 0
        out = capsys.readouterr().out
        lines_ = out.splitlines()
        assert all(len(line) <= 80 for line in lines_), [line for line in lines_ if len(line) > 80]
        assert lines_[0].startswith("run seen-run") and f"iteration {iteration} of {last}" in lines_[0]
        here = [c for c in calls if c.event.iteration == iteration]
        assert here
        flat = " ".join(out.split())
        for call in here:
            assert f"model call {call.number} of {len(calls)}   {call.event.purpose}   test:recorder" in out
            for m in call.messages:  # every message whole: role, text, tool calls with their arguments
                assert " ".join((m.content or "").split()) in flat
                for c in m.tool_calls:
                    assert f"{c.name}({json.dumps(c.arguments)})" in out
        rules = [line for line in lines_ if re.fullmatch(r"(system|user|assistant|tool)( · answers \S+)? ─+", line)]
        assert [r.split()[0] for r in rules] == [m.role for c in here for m in c.messages]
    # The JSON form is the same messages.
    assert main(["show", "seen-run", "--iteration", "3", "--json", "--db", str(db)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["model_call"] for p in printed] == [c.number for c in calls if c.event.iteration == 3]
    assert [len(p["messages"]) for p in printed] == [len(recorder.requests[c.number - 1]) for c in calls
                                                       if c.event.iteration == 3]
    assert {p["purpose"] for p in printed} == {"summary", "think"}


@pytest.mark.parametrize("n", ["0", "-1", "9", "99"])
def test_show_iteration_out_of_range_is_a_one_line_error_naming_the_range(seen_db, capsys, n):
    from loopwise.cli import main

    db, _ = seen_db
    assert main(["show", "seen-run", "--iteration", n, "--db", str(db)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line == f"error: run seen-run has iterations 1 to 5; --iteration {n} is not one of them"


def test_show_iteration_of_a_run_recorded_before_inputs_were_logged(tmp_path, capsys):
    from loopwise.cli import main

    new = lw.MemoryStore()
    lw.Agent(FunctionModel(lambda r: "hi"), store=new).run_sync("go", run_id="old-run")
    db = tmp_path / "old.db"
    store = lw.SQLiteStore(db)
    store.write([dataclasses.replace(e, input_at=None, input_n=None, input_added=None) if isinstance(e, ModelCallStarted) else e
                 for e in new.load("old-run")])
    store.close()
    assert main(["show", "old-run", "--iteration", "1", "--db", str(db)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "run old-run was recorded before loopwise logged what each model call was shown" in line
    assert main(["show", "old-run", "--db", str(db)]) == 0  # its trace still shows
    assert "hi" in capsys.readouterr().out


async def test_a_log_the_fold_disagrees_with_is_refused_not_shown_wrong():
    """A log written by other rules (here: a tool result missing) gives a clear error."""
    store = lw.MemoryStore()
    recorder = Recorder(_tools_then_answer(calls_per_iteration=2))
    await lw.Agent(FunctionModel(recorder), tools=[lookup], store=store, runaway=None).run("go", run_id="r")
    events = store.load("r")
    assert len(seen_calls(events)) >= 2
    dropped = next(i for i, e in enumerate(events) if e.kind == "tool_call_finished")
    tampered = events[:dropped] + events[dropped + 1:]
    with pytest.raises(lw.UserError, match=r"folding the log gives \d+: the log was written by other rules"):
        seen_calls(tampered)
