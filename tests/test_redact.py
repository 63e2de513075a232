"""Redaction: secrets and chosen patterns never reach the log, the stream or the views."""

from __future__ import annotations

import json
import re

import pytest

import loopwise as lw
from loopwise._runtime.agent import new_run_id
from loopwise.events import dumps, dumps_lines
from loopwise._policies.redact import Redactor
from loopwise.cli import main
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ScriptedModel, ToolCall, Usage

# Fake credentials in each provider's format (not real keys).
OPENAI = "sk-proj-" + "Zq8x2LmN4vB7cD1eF5gH9jK3pQ6rS0tU"
ANTHROPIC = "sk-ant-" + "api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
AWS = "AKIA" + "Q3EXAMPLE7KEY2Z4"
GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
GOOGLE = "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
SLACK = "xoxb-" + "2048-4096-AbCdEfGhIjKlMnOp"
STRIPE = "sk_live_" + "EXAMPLE0000000000000000a"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXN0LTQ4MjEifQ.c2lnbmF0dXJlLXBhcnQtaGVyZQ"
BEARER = "tok_9f8e7d6c5b4a39281706f5e4"
PASSWORD = "Tr0ub4dor & 3horse"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq8\nx9Yv0Q==\n-----END RSA PRIVATE KEY-----"
# A tool's secret argument: nothing about it looks like a key, only the tool says it is one.
SECRET_ARG = "correct-horse-battery-staple"

ALL_SECRETS = [OPENAI, ANTHROPIC, AWS, GITHUB, GOOGLE, SLACK, STRIPE, JWT, BEARER, PASSWORD, "MIIEowIBAAKCAQEA7bq8",
               SECRET_ARG]


def _db_bytes(path) -> bytes:
    """Every byte SQLite wrote: the database and its write-ahead log."""
    data = b""
    for suffix in ("", "-wal"):
        p = path.parent / (path.name + suffix)
        if p.exists():
            data += p.read_bytes()
    return data


def _leaky_agent(store: lw.EventStore, seen: list[ModelRequest], received: list[str], **kwargs) -> lw.Agent:
    """An agent whose task, model text, tool arguments, results and errors all carry secrets."""

    @lw.tool(secret=("api_key",))
    def call_crm(customer: dict, api_key: str) -> str:
        """Look a customer up in the CRM."""
        received.append(api_key)
        return f"customer {customer['id']}: plan gold, token={BEARER}, aws {AWS}"

    @lw.tool
    def deploy(target: str) -> str:
        """Deploy."""
        raise RuntimeError(f"deploy to {target} failed: bad credentials {GITHUB} / {GOOGLE}")

    def model(request: ModelRequest) -> ModelResponse:
        seen.append(request)
        tool_messages = [m for m in request.messages if m.role == "tool"]
        if not tool_messages:
            return ModelResponse(
                text=f"I will call the CRM with Authorization: Bearer {BEARER}",
                tool_calls=[
                    ToolCall("call_crm", {"customer": {"id": "CUS-4821", "auth": {"headers": [f"X-Slack: {SLACK}"]}},
                                          "api_key": SECRET_ARG}),
                    ToolCall("deploy", json.dumps({"target": f"prod password='{PASSWORD}'"})),
                ],
                usage=Usage(10, 5),
            )
        return ModelResponse(text=f"Done. I used {SECRET_ARG} and {STRIPE}; here is a JWT {JWT}", usage=Usage(10, 5))

    return lw.Agent(FunctionModel(model), tools=[call_crm, deploy], store=store,
                    instructions=f"You are a support agent. Our key is {ANTHROPIC}.", **kwargs)


def _task() -> str:
    return f"My OpenAI key {OPENAI} leaked, and this:\n{PEM}"


def test_secrets_never_reach_the_sqlite_file_and_the_model_still_sees_them(tmp_path):
    path = tmp_path / "log.db"
    store = lw.SQLiteStore(path)
    seen: list[ModelRequest] = []
    received: list[str] = []
    agent = _leaky_agent(store, seen, received)
    result = agent.run_sync(_task(), run_id="leaky")
    store.close()
    assert result.stop_reason == "done"
    data = _db_bytes(path)
    assert b"leaky" in data and b"CUS-4821" in data  # the run is there...
    for secret in ALL_SECRETS:
        assert secret.encode() not in data, secret  # ...its secrets are not
    for name in ("openai_key", "anthropic_key", "aws_key", "github_token", "google_key", "slack_token",
                 "stripe_key", "jwt", "private_key", "password", "secret"):
        assert f"[redacted:{name}]".encode() in data, name
    # The model read the real content: the task, the instructions, the tool result.
    first, second = seen
    assert OPENAI in first.messages[1].content and ANTHROPIC in first.messages[0].content
    assert any(m.role == "tool" and BEARER in (m.content or "") for m in second.messages)
    # The tool got the real secret argument.
    assert received == [SECRET_ARG]


def test_secrets_never_reach_the_stream(store):
    import anyio

    agent = _leaky_agent(store, [], [])
    events = []

    async def main_() -> None:
        async for event in agent.stream(_task()):
            events.append(event)

    anyio.run(main_)
    raw = dumps_lines(events).encode()
    for secret in ALL_SECRETS:
        assert secret.encode() not in raw, secret
    # The stream and the log hold the same events.
    assert [dumps(e) for e in store.load(events[0].run_id)] == [dumps(e) for e in events]


def test_secrets_never_reach_show_json(tmp_path, capsys):
    path = tmp_path / "log.db"
    store = lw.SQLiteStore(path)
    _leaky_agent(store, [], []).run_sync(_task(), run_id="shown")
    store.close()
    assert main(["show", "shown", "--json", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[redacted:openai_key]" in out
    for secret in ALL_SECRETS:
        assert secret not in out, secret
    assert main(["show", "shown", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    for secret in ALL_SECRETS:
        assert secret not in out, secret


def test_secret_arguments_are_replaced_at_any_depth_and_in_raw_json(store):
    received: list[str] = []

    @lw.tool(secret=("token", "pin"))
    def pay(account: str, token: str, pin: int) -> str:
        """Pay."""
        received.append(token)
        return f"paid from {account}"

    calls = [
        ToolCall("pay", {"account": "ACC-1", "token": SECRET_ARG, "pin": 493817}),
        ToolCall("pay", json.dumps({"account": "ACC-2", "token": SECRET_ARG + "-2", "pin": 493817})),
        ToolCall("pay", '{"account": "ACC-3", "token": "' + SECRET_ARG + '-3", '),  # malformed JSON
    ]
    agent = lw.Agent(ScriptedModel([ModelResponse(tool_calls=calls), f"paid; your token was {SECRET_ARG}"]),
                     tools=[pay], store=store)
    result = agent.run_sync("pay twice", run_id="pay")
    events = store.load("pay")
    assert sorted(received) == [SECRET_ARG, SECRET_ARG + "-2"]  # the tool got the real values
    started = [e for e in events if e.kind == "tool_call_started"]
    assert started[0].arguments == {"account": "ACC-1", "token": "[redacted:secret]", "pin": "[redacted:secret]"}
    assert json.loads(started[1].arguments) == {"account": "ACC-2", "token": "[redacted:secret]",
                                                "pin": "[redacted:secret]"}
    assert "ACC-3" not in started[2].arguments and SECRET_ARG not in started[2].arguments
    # The model's response, which carried the same calls, is redacted the same way.
    response = next(e for e in events if e.kind == "model_call_finished")
    assert response.tool_calls[0].arguments["token"] == "[redacted:secret]"
    # A value the run learnt is secret stays secret later in the run: the final answer.
    assert result.output == "paid; your token was [redacted:secret]"
    raw = dumps_lines(events).encode()
    assert SECRET_ARG.encode() not in raw and b"493817" not in raw


def test_the_result_is_read_from_the_log_so_it_is_redacted_too(store):
    agent = lw.Agent(ScriptedModel([f"use {OPENAI}"]), store=store)
    result = agent.run_sync("hi", run_id="r")
    assert result.output == "use [redacted:openai_key]"
    assert lw.RunResult.from_events(store.load("r")) == result


def test_events_the_run_holds_are_not_changed():
    redactor = Redactor().for_tools([])
    from loopwise._events import ToolCallFinished

    event = ToolCallFinished(run_id="r", seq=3, ts=1.0, iteration=1, call_id="c", name="t", outcome="ok",
                             content=f"key {OPENAI}")
    out = redactor(event)
    assert out is not event and event.content == f"key {OPENAI}"
    assert out.content == "key [redacted:openai_key]" and out.seq == 3
    clean = ToolCallFinished(run_id="r", seq=4, ts=1.0, iteration=1, call_id="c", name="t", outcome="ok",
                             content="nothing to hide")
    assert redactor(clean) is clean  # nothing to redact: no copy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key={OPENAI}", "key=[redacted:openai_key]"),
        (f"Authorization: Bearer {BEARER}", "Authorization: Bearer [redacted:authorization]"),
        ("authorization: Basic dXNlcjpwYXNz", "authorization: Basic [redacted:authorization]"),
        (f"curl -H 'Authorization: {BEARER}'", "curl -H 'Authorization: [redacted:authorization]'"),
        (f"send bearer {BEARER} now", "send bearer [redacted:bearer] now"),
        ('{"api_key": "abcd1234efgh", "max_tokens": 1024}', '{"api_key": "[redacted:credential]", "max_tokens": 1024}'),
        ("client_secret=s3cr3t-value&grant=x", "client_secret=[redacted:credential]&grant=x"),
        ("PASSWORD: hunter2", "PASSWORD: [redacted:password]"),
        ('{"password": "two words & more", "user": "bob"}', '{"password": "[redacted:password]", "user": "bob"}'),
        ("secret_key='a b c' rest", "secret_key='[redacted:credential]' rest"),
        ("postgres://app:hunter2@db.internal:5432/x", "postgres://app:[redacted:url_password]@db.internal:5432/x"),
        (f"id {AWS}.", "id [redacted:aws_key]."),
        ("hook https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXX",
         "hook https://[redacted:slack_webhook]"),
        (PEM + "\ntrailing", "[redacted:private_key]\ntrailing"),
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg (cut)", "[redacted:private_key]"),
    ],
)
def test_secret_patterns(text, expected):
    assert Redactor().redact(text) == expected


ORDINARY = [
    "I've been waiting 3 weeks for my order, and nobody answers my emails.",
    "The bearer of this letter is my colleague; authorization: pending review.",
    "Your order ORD-2024-000123 shipped on 2024-01-15T10:30:00Z via UPS 1Z999AA10123456784.",
    "The token count was high; the secret to success is patience; the key point is price.",
    '{"input_tokens": 120, "output_tokens": 30, "max_tokens": 1024, "tokens": 5, "keys": ["a"]}',
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855, md5 d41d8cd98f00b204e9800998ecf8427e",
    "uuid 123e4567-e89b-12d3-a456-426614174000, git 4be64a4, version 1.2.3, ip 10.0.0.1",
    "Total: $1,234.56 for 3 items; call back at 14:30 on 15.01.2024.",
    "See https://example.com/docs?page=2&sort=asc and skip-list, task-runner, ask-me-anything.",
    "Asia and Akia are names; ghost_writer, xoxo, sk-8 are not keys.",
    "Nudge: your last response was empty (no text and no tool calls). Call a tool or give your final answer.",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_no_false_positives_on_ordinary_text(text):
    assert Redactor().redact(text) is text
    assert Redactor(patterns=["email", "card", "phone"]).redact(text) == text


def test_no_false_positives_on_run_ids():
    redactor = Redactor(patterns=["email", "card", "phone"])
    for _ in range(200):
        run_id = new_run_id()
        assert redactor.redact(f"run {run_id}") == f"run {run_id}"


def test_user_patterns_presets_and_names(store):
    redactor = Redactor(patterns=["email", "card", "phone", r"ACCT-\d+", re.compile(r"(?i)vip-[a-z]+")])
    text = ("Mail jane.doe+tag@example.co.uk or call +1 (415) 555-2671 / 020 7946 0958; card 4111 1111 1111 1111, "
            "not 4111 1111 1111 1112; account ACCT-99812, customer VIP-Gold.")
    assert redactor.redact(text) == (
        "Mail [redacted:email] or call [redacted:phone] / [redacted:phone]; card [redacted:card], "
        "not 4111 1111 1111 1112; account [redacted], customer [redacted]."
    )
    named = Redactor(patterns={"account": r"ACCT-\d+"})
    assert named.redact("ACCT-1 and ACCT-22") == "[redacted:account] and [redacted:account]"
    assert named.describe() == {"secrets": True, "patterns": ["account"], "hook": None}
    # The run's log says which redaction was active, by name: never the patterns' matches.
    agent = lw.Agent(ScriptedModel(["ok"]), store=store, redact=Redactor(patterns=["email", r"ACCT-\d+"]))
    agent.run_sync("write to jane@example.com about ACCT-7", run_id="p")
    started = store.load("p")[0]
    assert started.agent["redact"] == {"secrets": True, "patterns": ["email", "regex"], "hook": None}
    assert started.task[0].content == "write to [redacted:email] about [redacted]"


@pytest.mark.parametrize(
    ("number", "is_card"),
    [
        ("4111111111111111", True),  # Visa test number
        ("5500-0000-0000-0004", True),  # Mastercard, dashes
        ("3782 822463 10005", True),  # Amex, 15 digits
        ("4111111111111112", False),  # one digit off: fails Luhn
        ("0000000000000000", False),  # all one digit
        ("123456789012", False),  # 12 digits: too short
    ],
)
def test_card_numbers_are_luhn_checked(number, is_card):
    out = Redactor(patterns=["card"]).redact(f"card {number} on file")
    assert (out == "card [redacted:card] on file") is is_card


def test_secrets_off_is_explicit_and_recorded(store):
    agent = lw.Agent(ScriptedModel([f"key {OPENAI}"]), store=store, redact=Redactor(secrets=False))
    agent.run_sync("hi", run_id="off")
    events = store.load("off")
    assert events[-1].output == f"key {OPENAI}"
    assert events[0].agent["redact"]["secrets"] is False
    default = lw.Agent(ScriptedModel(["x"]), store=store)
    assert default.describe()["redact"] == {"secrets": True, "patterns": [], "hook": None}
    assert lw.Agent(ScriptedModel(["x"]), store=store, redact=None).describe()["redact"]["secrets"] is True


def test_a_hook_runs_on_every_string_and_fails_closed(store, caplog):
    def upper_names(text: str) -> str:
        return text.replace("Jane", "[redacted:name]")

    agent = lw.Agent(ScriptedModel(["Hello Jane"]), store=store, redact=Redactor(hook=upper_names))
    agent.run_sync("I am Jane", run_id="h")
    events = store.load("h")
    assert events[0].task[0].content == "I am [redacted:name]" and events[-1].output == "Hello [redacted:name]"

    def broken(text: str) -> str:
        raise ValueError("oops")

    assert Redactor(hook=broken).redact("anything") == "[redacted:hook_error]"
    assert "raised ValueError" in caplog.text
    assert Redactor(hook=lambda t: None).redact("anything") == "[redacted:hook_error]"  # type: ignore[arg-type, return-value]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patterns": ["emails"]}, "no preset is named 'emails'"),
        ({"patterns": "email"}, "takes a list"),
        ({"patterns": ["(unclosed"]}, "not a valid regular expression"),
        ({"patterns": [r"\d*"]}, "matches the empty string"),
        ({"patterns": [42]}, "each pattern is a preset name"),
        ({"patterns": {"Bad Name": "x"}}, "lowercase identifier"),
        ({"secrets": "yes"}, "must be True or False"),
        ({"hook": "not callable"}, "must be a function"),
    ],
)
def test_bad_configuration_is_a_user_error(kwargs, message):
    with pytest.raises(lw.UserError, match=re.escape(message)):
        Redactor(**kwargs)


def test_redact_must_be_a_redactor():
    with pytest.raises(lw.UserError, match=r"redact must be a loopwise.Redactor.*Redactor\(secrets=False\)"):
        lw.Agent(ScriptedModel(["x"]), store=lw.MemoryStore(), redact=False)
    with pytest.raises(lw.UserError, match="redact must be a loopwise.Redactor"):
        lw.Agent(ScriptedModel(["x"]), store=lw.MemoryStore(), redact=["email"])
