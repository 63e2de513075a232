"""Redaction at every depth of escaping: JSON in a JSON string in a JSON string, in every field of every event.

A model that calls tools with raw JSON arguments (as OpenAI-style models do) puts
``{"password": "X"}`` inside a string, with its quotes escaped; a tool result may carry
a JSON document inside one of its strings. Each secret the `Redactor` knows is generated
here in each form it is written in, wrapped in up to four levels of escaping, and put in
every field an event has: none of it may reach the log, the SQLite files, the stream or
the ``loopwise`` logger, in any escaping, and no tail of it may follow its marker.
"""

from __future__ import annotations

import html
import json
import logging
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loopwise as lw
from loopwise.events import dumps, dumps_lines
from loopwise._policies.redact import Redactor
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ToolCall, Usage

ALNUM = string.ascii_letters + string.digits
DEFAULT = Redactor()
OPT_IN = Redactor(patterns=["email", "card", "phone"])


@dataclass(frozen=True)
class Secret:
    """A secret as some text writes it, and what must not survive redaction."""

    kind: str
    text: str  # how it is written: a sentence, a pair, a header
    needles: tuple[str, ...]  # none may appear after redaction, in any escaping
    pair: tuple[str, str] | None = None  # a key and its value: also put in a dict as such
    redactor: Redactor = DEFAULT


# -- the secrets, in each form ----------------------------------------------------


def _distinct(word: str) -> bool:
    return any(c.isdigit() for c in word) and any(c.isalpha() for c in word)


def _chars(alphabet: str, size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=size, max_size=size)


# A word no template text holds: letters and digits both.
WORD = st.text(alphabet=ALNUM, min_size=7, max_size=12).filter(_distinct)
# Between the words of a password: anything, where the value is quoted by an encoder...
QUOTED_SEPARATORS = [" ", "  ", "'", '"', "\\", "\\\\", ", ", "; ", "&", ":", "=", "{", "}", "[", "]", "é", "\t",
                     "\n", "\\n", '\\"', "#", "%", "/", "@", "`", "<", ">", "-", " -", " x: ", " y=", "&z="]
# ...what a hand-written quote may hold (not its own quote, a backslash or a newline)...
HAND_QUOTED_SEPARATORS = [" ", "  ", ", ", "; ", "&", ":", "=", "{", "}", "[", "]", "é", "#", "%", "/", "@", "-",
                          "<", ">", "(", ")"]
# ...and what an unquoted value may hold: spaces, but no quote, no comma or semicolon and a
# space, nothing that starts another pair or flag (those end the value: see _redact_pairs).
BARE_SEPARATORS = [" ", ".", "_", "+", "/", "!", "#", "%", "*", "?", "^", "~", "(", ")", "[", "]", "{", "}", "<", ">",
                   "|", "$", "-", ",", ";", "é"]


def _value(separators: list[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda words, seps: words[0] + "".join(s + w for s, w in zip(seps, words[1:], strict=False)),
                     st.lists(WORD, min_size=1, max_size=4),
                     st.lists(st.sampled_from(separators), min_size=3, max_size=3))


PASSWORD_KEYS = ["password", "PASSWORD", "Password", "passwd", "passphrase", "pwd", "db_password", "DB_PASSWORD",
                 "userPassword", "smtp-password", "new_passphrase", "pass", "db_pass", "passcode"]
CREDENTIAL_KEYS = ["api_key", "api-key", "apikey", "X-Api-Key", "client_secret", "secret", "SECRET_KEY",
                   "secret_access_key", "aws_secret_access_key", "access_token", "refresh_token", "id_token",
                   "auth_token", "session_token", "token", "private_key", "access_key"]

# How a pair is written: (form, the values it can hold, a function key, value -> text).
PAIR_FORMS: list[tuple[str, list[str], Callable[[str, str], str]]] = [
    ("json", QUOTED_SEPARATORS, lambda k, v: json.dumps({"user": "bob", k: v, "n": 3})),
    ("json_compact", QUOTED_SEPARATORS, lambda k, v: json.dumps({k: v, "n": [1]}, separators=(",", ":"))),
    ("json_inline", QUOTED_SEPARATORS, lambda k, v: f"note {json.dumps(k)}: {json.dumps(v)}, \"user\": \"bob\""),
    ("json_utf8", QUOTED_SEPARATORS, lambda k, v: json.dumps({k: v}, ensure_ascii=False)),
    ("repr", QUOTED_SEPARATORS, lambda k, v: repr({k: v, "user": "bob"})),
    ("arrow", QUOTED_SEPARATORS, lambda k, v: f"{{{json.dumps(k)} => {json.dumps(v)}}}"),
    ("double_quoted", HAND_QUOTED_SEPARATORS, lambda k, v: f'set {k} = "{v}" then'),
    ("single_quoted", HAND_QUOTED_SEPARATORS, lambda k, v: f"{k}: '{v}' and more"),
    ("backticks", HAND_QUOTED_SEPARATORS, lambda k, v: f"the {k}: `{v}` (ok)"),
    ("html", QUOTED_SEPARATORS, lambda k, v: f"<pre>{html.escape(json.dumps({k: v}))}</pre>"),
    ("colon", BARE_SEPARATORS, lambda k, v: f"{k}: {v}\nuser: bob"),
    ("colon_at_end", BARE_SEPARATORS, lambda k, v: f"log in with {k}: {v}"),
    ("yaml", BARE_SEPARATORS, lambda k, v: f"config:\n  {k}: {v}\n  user: bob\n"),
    ("header", BARE_SEPARATORS, lambda k, v: f"POST /login HTTP/1.1\r\nHost: x\r\n{k}: {v}\r\n\r\nbody"),
    ("equals", BARE_SEPARATORS, lambda k, v: f"{k}={v} user=bob"),
    ("query", BARE_SEPARATORS, lambda k, v: f"https://x.test/login?user=bob&{k}={v}&next=/home"),
    ("flag", BARE_SEPARATORS, lambda k, v: f"mysql --{k}={v} --host db"),
    ("equals_at_end", BARE_SEPARATORS, lambda k, v: f"export {k}={v}"),
]


@st.composite
def pairs(draw: st.DrawFn, keys: list[str], kind: str) -> Secret:
    key = draw(st.sampled_from(keys))
    form, separators, write = draw(st.sampled_from(PAIR_FORMS))
    value = draw(_value(separators))
    words = tuple(w for w in _words(value))
    return Secret(f"{kind}/{form}", write(key, value), (value, *words), pair=(key, value))


def _words(value: str) -> list[str]:
    out, word = [], ""
    for c in value:
        if c in ALNUM:
            word += c
            continue
        if len(word) >= 7 and _distinct(word):
            out.append(word)
        word = ""
    if len(word) >= 7 and _distinct(word):
        out.append(word)
    return out


def _key(kind: str, prefix: str, body: st.SearchStrategy[str]) -> st.SearchStrategy[Secret]:
    end = st.sampled_from([" ", ".", ",", "\n", ")", '"', "'", ""])
    prose = st.sampled_from(["my key is", "use", "(", "key:\n", "KEY=", "\t", "see"])
    return st.builds(lambda p, b, e: Secret(kind, f"{p} {prefix}{b}{e} thanks", (prefix + b, b[-10:])), prose, body, end)


def _b64url(n: int) -> st.SearchStrategy[str]:
    return _chars(ALNUM + "_-", n).filter(_distinct)


PROVIDER_KEYS = st.one_of(
    _key("openai_key", "sk-proj-", _chars(ALNUM, 32).filter(_distinct)),
    _key("openai_key", "sk-", _chars(ALNUM + "_-", 40).filter(_distinct)),
    _key("anthropic_key", "sk-ant-api03-", _chars(ALNUM + "_-", 40).filter(_distinct)),
    st.sampled_from(["sk_live_", "rk_test_", "pk_live_"]).flatmap(
        lambda p: _key("stripe_key", p, _chars(ALNUM, 24).filter(_distinct))),
    _key("google_key", "AIza", _chars(ALNUM + "_-", 35).filter(_distinct)),
    st.sampled_from(["AKIA", "ASIA"]).flatmap(
        lambda p: _key("aws_key", p, _chars(string.ascii_uppercase + string.digits, 16).filter(_distinct))),
    _key("github_token", "ghp_", _chars(ALNUM, 36).filter(_distinct)),
    _key("github_token", "github_pat_", _chars(ALNUM + "_", 50).filter(_distinct)),
    _key("slack_token", "xoxb-2048-", _chars(ALNUM, 24).filter(_distinct)),
    _key("slack_webhook", "https://hooks.slack.com/services/T0A1B2C3/", _chars(ALNUM, 24).filter(_distinct)),
    st.builds(lambda h, p, s: Secret("jwt", f"token eyJ{h}.eyJ{p}.{s} ok", (f"eyJ{h}.eyJ{p}", s)),
              _b64url(12), _b64url(20), _b64url(24)),
)

TOKEN = _chars(ALNUM + "-._~+/", 28).filter(_distinct)
AUTH_FORMS: list[Callable[[str], tuple[str, tuple[str, str] | None]]] = [
    lambda t: (f"Authorization: Bearer {t}\r\nHost: x", ("Authorization", f"Bearer {t}")),
    lambda t: (json.dumps({"headers": {"Authorization": f"Basic {t}"}}), ("Authorization", f"Basic {t}")),
    lambda t: (repr({"authorization": f"Token {t}"}), ("authorization", f"Token {t}")),
    lambda t: (f"curl -H 'Authorization: {t}' https://x.test", ("Authorization", t)),
    lambda t: (f"send it with bearer {t} now", None),
    lambda t: (f"Proxy-Authorization={t}&x=1", ("Proxy-Authorization", t)),
]
AUTHORIZATION = st.builds(lambda form, t: Secret("authorization", *form(t)[:1], (t, t[-10:]), pair=form(t)[1]),
                          st.sampled_from(AUTH_FORMS), TOKEN)


@st.composite
def private_keys(draw: st.DrawFn) -> Secret:
    lines = draw(st.lists(_chars(ALNUM + "+/", 64).filter(_distinct), min_size=1, max_size=3))
    kind = draw(st.sampled_from(["RSA ", "EC ", "OPENSSH ", ""]))
    pem = f"-----BEGIN {kind}PRIVATE KEY-----\n" + "\n".join(lines) + f"\n-----END {kind}PRIVATE KEY-----"
    return Secret("private_key", f"key file:\n{pem}\nend", tuple(lines))


@st.composite
def url_passwords(draw: st.DrawFn) -> Secret:
    password = draw(st.text(alphabet=ALNUM + "-._~!$*+", min_size=10, max_size=20).filter(_distinct))
    scheme = draw(st.sampled_from(["postgres", "redis", "https", "mongodb+srv"]))
    return Secret("url_password", f"connect to {scheme}://app:{password}@db.internal:5432/x", (password,))


def _luhn_complete(digits: str) -> str:
    total = 0
    for i, c in enumerate(reversed(digits + "0")):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return digits + str((10 - total % 10) % 10)


@st.composite
def opt_in(draw: st.DrawFn) -> Secret:
    which = draw(st.sampled_from(["email", "card", "phone"]))
    if which == "email":
        local = draw(st.text(alphabet=ALNUM + "._+", min_size=7, max_size=14).filter(_distinct))
        local = local.strip("._+") or "jane7x"
        domain = draw(st.text(alphabet=string.ascii_lowercase + string.digits, min_size=5, max_size=10))
        email = f"{local}@{domain}.example.com"
        return Secret("email", f"write to {email} today", (email,), pair=("email", email), redactor=OPT_IN)
    if which == "card":
        body = draw(st.text(alphabet=string.digits, min_size=15, max_size=15).filter(lambda d: len(set(d)) > 3))
        number = _luhn_complete(body)
        sep = draw(st.sampled_from(["", " ", "-"]))
        written = sep.join(number[i:i + 4] for i in range(0, 16, 4))
        return Secret("card", f"card {written} on file", (written, number[4:12]), pair=("card", written),
                      redactor=OPT_IN)
    digits = draw(st.text(alphabet=string.digits, min_size=10, max_size=10).filter(lambda d: len(set(d)) > 3))
    phone = f"+1 ({digits[:3]}) {digits[3:6]}-{digits[6:]}"
    return Secret("phone", f"call {phone} now", (phone, f"{digits[3:6]}-{digits[6:]}"), pair=("phone", phone),
                  redactor=OPT_IN)


SECRETS = st.one_of(
    PROVIDER_KEYS, AUTHORIZATION, private_keys(), url_passwords(), opt_in(),
    pairs(PASSWORD_KEYS, "password"), pairs(CREDENTIAL_KEYS, "credential"),
)

# -- escaping -----------------------------------------------------------------------

# One level of escaping: the text inside a string of another document.
WRAPS: dict[str, Callable[[str], str]] = {
    "json": lambda s: json.dumps({"text": f"see {s} ok"}),
    "json_list": lambda s: json.dumps(["a", s]),
    "json_indent": lambda s: json.dumps({"n": 1, "text": s}, indent=2),
    "json_utf8": lambda s: json.dumps({"t": s}, ensure_ascii=False),
    "arguments": lambda s: json.dumps({"query": s, "limit": 5}),
    "repr": lambda s: repr({"text": s}),
}


def wrap(text: str, levels: list[str]) -> str:
    for level in levels:
        text = WRAPS[level](text)
    return text


def escapings(needle: str, depth: int) -> set[str]:
    """`needle` as it is written at each depth of JSON or repr escaping up to `depth`."""
    out = current = {needle}
    for _ in range(depth):
        current = ({json.dumps(c)[1:-1] for c in current} | {json.dumps(c, ensure_ascii=False)[1:-1] for c in current}
                   | {repr(c)[1:-1] for c in current})
        out = out | current
    return out


def assert_gone(secret: Secret, data: str | bytes, depth: int, where: str) -> None:
    for needle in secret.needles:
        for form in escapings(needle, depth):
            at = data.find(form.encode()) if isinstance(data, bytes) else data.find(form)
            assert at < 0, f"{secret.kind}: {form!r} is in {where}: {data[max(0, at - 200):at + 100]!r}"


# -- the Redactor, on text ------------------------------------------------------------


def test_the_issue_examples():
    # A JSON object inside a JSON string: its quotes are escaped once.
    assert (Redactor().redact('{"text": "see {\\"password\\": \\"X\\"}"}')
            == '{"text": "see {\\"password\\": \\"[redacted:password]\\"}"}')
    # The value left after the marker: an escaped quote stopped the value at its backslash...
    assert (Redactor().redact('{"note": "passphrase: \\"correct horse battery\\" ok"}')
            == '{"note": "passphrase: \\"[redacted:password]\\" ok"}')
    # ...and an unquoted passphrase stopped at its first space.
    assert (Redactor().redact("passphrase: correct horse battery staple\nuser: bob")
            == "passphrase: [redacted:password]\nuser: bob")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # two and three levels deep
        ('{"a": "{\\"b\\": \\"{\\\\\\"pwd\\\\\\": \\\\\\"s3 cr3t\\\\\\"}\\"}"}',
         '{"a": "{\\"b\\": \\"{\\\\\\"pwd\\\\\\": \\\\\\"[redacted:password]\\\\\\"}\\"}"}'),
        # a value holding an escaped quote and a backslash, one level deep
        ('{"a": "{\\"password\\": \\"x\\\\\\"y\\\\\\\\z\\"}"}', '{"a": "{\\"password\\": \\"[redacted:password]\\"}"}'),
        # one that ends in a backslash: ambiguous, it runs on (more is replaced, never less)
        ('{"a": "{\\"password\\": \\"x\\\\\\\\\\"}"}', '{"a": "{\\"password\\": \\"[redacted:password]"}'),
        # JSON in a repr: the quote's backslash is escaped, the quote is not
        (repr({"t": json.dumps({"password": 'a"b c', "n": 1})}), repr({"t": '{"password": "[redacted:password]", "n": 1}'})),
        # an object or a number under a secret key: replaced whole, JSON kept valid
        ('{"api_key": {"v": "k9x", "w": [1, "}"]}, "n": 1}', '{"api_key": "[redacted:credential]", "n": 1}'),
        ('{"a": "{\\"password\\": 123456, \\"n\\": 1}"}', '{"a": "{\\"password\\": \\"[redacted:password]\\", \\"n\\": 1}"}'),
        # plain values under a credential's name are not credentials
        ('{"token": null, "max_tokens": 5, "password": true}', '{"token": null, "max_tokens": 5, "password": true}'),
        # an escaped header, a key after an escaped newline
        ('{"raw": "GET /\\nAuthorization: Basic dXNlcjpwYXNz\\nHost: x"}',
         '{"raw": "GET /\\nAuthorization: Basic [redacted:authorization]\\nHost: x"}'),
        ('{"k": "line\\nsk-proj-Zq8x2LmN4vB7cD1eF5gH9jK3pQ6rS0tU"}', '{"k": "line\\n[redacted:openai_key]"}'),
        # the next pair ends an unquoted value; a space does not
        ("user=bob password=two words ip=10.0.0.1", "user=bob password=[redacted:password] ip=10.0.0.1"),
        ("password: abc, user: bob", "password: [redacted:password], user: bob"),
        ("mysql --password=abc -h db", "mysql --password=[redacted:password] -h db"),
        ('{"user": "bob", "pass": "x1 y2", "bypass": "cache", "compass": "north"}',
         '{"user": "bob", "pass": "[redacted:password]", "bypass": "cache", "compass": "north"}'),
        ("&quot;password&quot;: &quot;a b&quot;", "&quot;password&quot;: &quot;[redacted:password]&quot;"),
        # a character that lower-cases to two ("İ"): the case-insensitive pattern reads the text
        ('İstanbul {"PASSWORD": "two words"}', 'İstanbul {"PASSWORD": "[redacted:password]"}'),
    ],
)
def test_pairs_at_depth(text, expected):
    assert Redactor().redact(text) == expected


def test_dicts_are_redacted_by_key():
    from loopwise._events import ToolCallStarted

    args = {"password": "hunter2", "nested": {"api_key": "abc123xyz", "max_tokens": 5, "token": 7},
            "headers": [{"Authorization": "Basic dXNlcjpwYXNz", "status": "pending"}], "use_password": True,
            "sk-proj-Zq8x2LmN4vB7cD1eF5gH9jK3pQ6rS0tU": 1, "plain": "nothing"}
    event = ToolCallStarted(run_id="r", seq=1, ts=1.0, iteration=1, call_id="c", name="t", arguments=args)
    out = Redactor().for_tools([])(event)
    assert out.arguments == {
        "password": "[redacted:password]", "nested": {"api_key": "[redacted:credential]", "max_tokens": 5, "token": 7},
        "headers": [{"Authorization": "Basic [redacted:authorization]", "status": "pending"}], "use_password": True,
        "[redacted:openai_key]": 1, "plain": "nothing"}
    assert event.arguments["password"] == "hunter2"  # the run's own dict is not changed
    assert Redactor(secrets=False).for_tools([])(event) is event


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secret=SECRETS, levels=st.lists(st.sampled_from(sorted(WRAPS)), max_size=4))
def test_every_secret_at_every_depth_is_redacted(secret, levels):
    text = wrap(secret.text, levels)
    out = secret.redactor.redact(text)
    assert "[redacted" in out
    assert_gone(secret, out, len(levels) + 1, f"{out!r}")
    assert secret.redactor.redact(out) == out  # a redacted text has nothing left to redact
    try:
        json.loads(text)
    except ValueError:
        return
    json.loads(out)  # JSON stays JSON


# -- every field of every event, through real agents ----------------------------------

FIELDS = ["task", "instructions", "tags", "model_text", "args_dict", "args_raw", "args_malformed", "result",
          "tool_error", "model_error"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())
        self.texts.extend(str(v) for v in vars(record).values())


def _agent(field: str, text: str, secret: Secret, store: lw.EventStore) -> lw.Agent:
    @lw.tool
    def lookup(query: str = "", options: dict | None = None) -> str:
        """Look something up."""
        if field == "tool_error":
            raise RuntimeError(f"lookup failed: {text}")
        return text if field == "result" else "found"

    if field == "args_dict":
        arguments: Any = {"query": text}
        if secret.pair is not None:
            arguments = {"query": "q", "options": {"outer": {secret.pair[0]: secret.pair[1]}}}
    elif field == "args_raw":
        arguments = json.dumps({"query": text})
    elif field == "args_malformed":
        arguments = '{"query": ' + json.dumps(text)[:-1]
    else:
        arguments = {"query": "q"}

    def model(request: ModelRequest) -> ModelResponse:
        if field == "model_error":
            raise RuntimeError(f"provider said: {text}")
        if not any(m.role == "assistant" for m in request.messages):
            return ModelResponse(tool_calls=[ToolCall("lookup", arguments)], usage=Usage(10, 5))
        return ModelResponse(text=text if field == "model_text" else "done", usage=Usage(10, 5))

    return lw.Agent(FunctionModel(model), tools=[lookup], store=store, redact=secret.redactor,
                    instructions=text if field == "instructions" else "You help.")


async def _run(field: str, text: str, secret: Secret, store: lw.EventStore, run_id: str) -> list[lw.Event]:
    agent = _agent(field, text, secret, store)
    task = text if field == "task" else "help me"
    tags = [text] if field == "tags" else ["t"]
    return [event async for event in agent.stream(task, run_id=run_id, tags=tags)]


def _dumped(events: list[lw.Event]) -> bytes:
    return dumps_lines(events).encode()


@pytest.fixture
def records():
    handler = _Records()
    logger = logging.getLogger("loopwise")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(secret=SECRETS, levels=st.lists(st.sampled_from(sorted(WRAPS)), max_size=3), field=st.sampled_from(FIELDS))
def test_every_secret_in_every_field_is_redacted(secret, levels, field, records):
    text = wrap(secret.text, levels)
    store = lw.MemoryStore()
    records.texts.clear()
    streamed = anyio.run(_run, field, text, secret, store, "r1")
    logged = store.load("r1")
    assert [dumps(e) for e in streamed] == [dumps(e) for e in logged]
    data = _dumped(logged)
    assert b"[redacted" in data, field  # the secret was there, and was replaced
    depth = len(levels) + 3  # the field's own string, the event's JSON, a raw-arguments string
    assert_gone(secret, data, depth, f"the log ({field})")
    assert_gone(secret, "\n".join(records.texts), depth, f"the logger's records ({field})")


# -- end to end: the bytes of every file a SQLiteStore writes -------------------------


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALNUM) for _ in range(n - 2)) + rng.choice(string.digits) + rng.choice("abcxyz")


def _cases(rng: random.Random) -> list[Secret]:
    """A secret of every kind the Redactor knows, in each form it is written in, with random cores."""
    upper = "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(15)) + "7"
    written: list[Callable[[str], Secret]] = [
        lambda t: Secret("openai_key", f"key sk-proj-{t[:32]} and", (t[:32], t[22:32])),
        lambda t: Secret("openai_key", f"(sk-{t})", (t, t[-10:])),
        lambda t: Secret("anthropic_key", f"sk-ant-api03-{t}", (t, t[-10:])),
        lambda t: Secret("stripe_key", f"rk_live_{t[:24]}.", (t[:24],)),
        lambda t: Secret("google_key", f"AIza{t[:35]}", (t[:35], t[25:35])),
        lambda t: Secret("aws_key", f"id AKIA{upper}.", (upper, upper[-10:])),
        lambda t: Secret("github_token", f"ghp_{t[:36]}", (t[:36], t[26:36])),
        lambda t: Secret("github_token", f"github_pat_{t}_{t[::-1]}", (t, t[::-1])),
        lambda t: Secret("slack_token", f"xoxb-2048-{t}", (t, t[-10:])),
        lambda t: Secret("slack_webhook", f"https://hooks.slack.com/services/T0/B0/{t}", (t, t[-10:])),
        lambda t: Secret("jwt", f"eyJ{t[:12]}.eyJ{t[12:]}.{t[::-1]}", (t[::-1], t[-10:])),
        lambda t: Secret("private_key",
                         f"-----BEGIN RSA PRIVATE KEY-----\n{t}{t}\n{t[::-1]}\n-----END RSA PRIVATE KEY-----",
                         (t + t, t[::-1])),
        lambda t: Secret("url_password", f"redis://app:{t[:14]}@cache:6379/0", (t[:14],)),
        lambda t: Secret("email", f"mail jane.{t[:8]}@example.com", (f"jane.{t[:8]}@example.com",), redactor=OPT_IN),
        lambda t: Secret("card", "card 4111-1111-1111-1111 on file", ("4111-1111-1111-1111",), redactor=OPT_IN),
        lambda t: Secret("phone", "call +1 (415) 555-2671 now", ("(415) 555-2671",), redactor=OPT_IN),
    ]
    keys = [write(_token(rng, 40)) for write in written]
    tokens = [_token(rng, 30) for _ in AUTH_FORMS]
    auth = [Secret("authorization", form(tok)[0], (tok, tok[-10:]), pair=form(tok)[1])
            for form, tok in zip(AUTH_FORMS, tokens, strict=True)]
    names = PASSWORD_KEYS + CREDENTIAL_KEYS
    pair_secrets = []
    for i, (form, separators, write) in enumerate(PAIR_FORMS):
        words = [_token(rng, 9) for _ in range(3)]
        value = words[0] + rng.choice(separators) + words[1] + rng.choice(separators) + words[2]
        key = names[(i * 5) % len(names)]
        pair_secrets.append(Secret(f"pair/{form}", write(key, value), (value, *words), pair=(key, value)))
    return keys + auth + pair_secrets


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_no_secret_reaches_any_file_the_store_writes_the_stream_or_the_logger(tmp_path, records):
    rng = random.Random(14)
    cases = [(secret, field, [sorted(WRAPS)[(i + j) % len(WRAPS)] for j in range(i % 4)])
             for i, (secret, field) in enumerate((s, f) for s in _cases(rng) for f in FIELDS)]
    path = tmp_path / "log.db"
    store = lw.SQLiteStore(path)
    streamed: dict[str, list[lw.Event]] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i, (secret, field, levels) in enumerate(cases):
                async def one(i: int = i, secret: Secret = secret, field: str = field, levels: list[str] = levels):
                    streamed[f"run-{i}"] = await _run(field, wrap(secret.text, levels), secret, store, f"run-{i}")

                tg.start_soon(one)

    anyio.run(main)
    while_open = _files(tmp_path)  # the process still holds its journal
    assert any("-lwj-" in name for name in while_open), sorted(while_open)
    assert "log.db-wal" in while_open
    logged = {run_id: store.load(run_id) for run_id in streamed}
    store.close()
    after_close = _files(tmp_path)
    everything = b"".join(while_open.values()) + b"".join(after_close.values())
    assert b"run-0" in after_close["log.db"] or b"run-0" in after_close.get("log.db-wal", b"")
    records_text = "\n".join(records.texts)
    for i, (secret, field, levels) in enumerate(cases):
        run_id = f"run-{i}"
        events = streamed[run_id]
        assert events[-1].kind == "run_finished"
        assert [dumps(e) for e in events] == [dumps(e) for e in logged[run_id]]
        depth = len(levels) + 3
        where = f"{secret.kind} in {field} at depth {len(levels)}"
        assert_gone(secret, everything, depth, f"a file of the store ({where})")
        assert_gone(secret, _dumped(events), depth, f"the stream ({where})")
        assert_gone(secret, records_text, depth, f"the logger's records ({where})")
