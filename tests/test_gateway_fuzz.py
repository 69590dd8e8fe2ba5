"""Fuzzing the HTTP gateway: schemathesis generates requests from the gateway's own OpenAPI
document (``/openapi.json``), valid ones and ones that break it, and sends them to a real gateway
in front of the real pipeline (scheduler, worker pool, accountant; the mock provider answering at
once). Raw requests (malformed JSON, invalid UTF-8, odd content types and methods) are fuzzed
beside them, since a schema only generates well-formed JSON; and the inputs known to be hard are
sent every run (``PINNED``).

Whatever comes in, the answer is never a 5xx the pipeline did not mean (``not_a_server_error``)
and never missing, and every 4xx and 5xx body is OpenAI's error object, ``{"error": {"message",
"type", "param", "code"}}``. A 5xx whose code is the pipeline's or the provider's own answer
(``LEGITIMATE_5XX``) is not a failure; one that is Switchyard's own exception is.

Each run generates the same requests (hypothesis ``derandomize``; a change to a generator's code
changes what it draws): every failure is recorded, not raised, so one run reports each distinct
failure once, with a request that reproduces it.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup

from broker.core.config import Config, load_config
from schemas import ErrorCode
from tests.conftest import MockProvider, write_config

# schemathesis's own strategies draw from ``random`` (hypothesis deprecates it; not this test's).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"
)

SECRET = "sk-fuzz-test-key"
SCOPED = "sk-fuzz-scoped-key"
MODELS = ("gpt-4o-mini", "gpt-4o")

LEGITIMATE_5XX = frozenset(
    {
        # The pipeline's own answers: the job was late, or nothing could serve it now.
        ErrorCode.DEADLINE_EXCEEDED.value,  # 504: a deadline already past (or passed waiting)
        ErrorCode.NO_PROVIDER_AVAILABLE.value,  # 503: every provider of the model refused it
        ErrorCode.UNAVAILABLE.value,  # 503: RabbitMQ, Redis or Postgres away
        # The provider's answers, passed on (502/503/504).
        ErrorCode.SERVER_ERROR.value,
        ErrorCode.TIMEOUT.value,
        ErrorCode.PROVIDER_UNAVAILABLE.value,
        ErrorCode.AUTHENTICATION.value,
        ErrorCode.PROVIDER_PROTOCOL_ERROR.value,
    }
)
"""Error codes whose 5xx is an answer, not a bug; ``internal_error`` (500) never is. The mock
provider here never fails on its own (no latency, no faults configured), so in practice only
``deadline_exceeded`` for a deadline already past is seen."""
OWN_EXCEPTION = re.compile(r"unexpected \w+ while handling the call")
"""A ``provider_protocol_error`` saying so is Switchyard's own exception in the worker (its
catch-all, ``workers.adapters._errors.translate``), not anything the provider answered."""

CALL_TIMEOUT_S = 10.0
"""A request unanswered this long is a failure of its own (every job here takes milliseconds);
after one, the run sends nothing more (the pipeline is stuck: each further request would only
wait out the timeout)."""

BASE_SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same requests on every run: CI sees what a local run saw
    database=None,
    phases=[Phase.explicit, Phase.generate],  # failures are recorded, never shrunk
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
CHAT_EXAMPLES = 100
"""Examples of ``POST /v1/chat/completions`` per generation mode."""
EXAMPLES = 25
"""Examples per generation mode of each other operation that takes input."""
FEW_EXAMPLES = 5
"""Examples of an operation without input (nothing to vary but the headers)."""
RAW_EXAMPLES = 200


def _key(key_id: str, secret: str, **fields: Any) -> dict[str, Any]:
    return {"id": key_id, "key_sha256": hashlib.sha256(secret.encode()).hexdigest(), **fields}


@pytest.fixture
def fuzz_config(tmp_path: Path, mock: MockProvider) -> Config:
    mock.configure(latency_ms=0, jitter_ms=0)
    providers = [
        {
            "id": "mock",
            "concurrency": 16,
            "models": {
                "gpt-4o-mini": {"input": 0.15, "output": 0.60},
                "gpt-4o": {"input": 2.5, "output": 10},
            },
        }
    ]
    keys = [_key("fuzz", SECRET), _key("scoped", SCOPED, scopes=["gpt-4o"])]
    return load_config(write_config(tmp_path / "fuzz.yaml", mock, providers, keys=keys))


@pytest.fixture
async def fuzz_gateway(fuzz_config: Config, gateway_in_front: Any) -> AsyncIterator[str]:
    """The pipeline and a gateway in front of it; yields the gateway's base URL."""
    async with gateway_in_front(fuzz_config) as url:
        yield url


# ---------------------------------------------------------------------------------------------
# What a request carries besides what the schema generates.

AUTHORIZATION = st.sampled_from(
    [
        *[f"Bearer {SECRET}"] * 6,  # mostly past authentication, to reach the pipeline
        f"Bearer {SCOPED}",  # a key scoped to gpt-4o only
        None,
        "Bearer sk-not-a-key",
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ]
)
DEADLINES = [
    "2020-01-01T00:00:00Z",  # past
    "2999-01-01T00:00:00Z",  # far ahead
    "9999-12-31T23:59:59+00:00",  # the last there is
    "0001-01-01T00:00:00+14:00",  # the first there is
    "2030-01-01T00:00:00",  # naive
    "tomorrow",
]
_HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=24
)
ROUTING_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "x-switchyard-deadline": st.one_of(st.sampled_from(DEADLINES), _HEADER_TEXT),
        "x-switchyard-priority": st.one_of(st.integers(-3, 12).map(str), _HEADER_TEXT),
        "x-switchyard-task-type": _HEADER_TEXT,
        "x-switchyard-on-quota": st.one_of(st.sampled_from(["wait", "reject"]), _HEADER_TEXT),
        "x-switchyard-metadata": st.one_of(
            st.sampled_from(['{"team": "a"}', "[1, 2]", '"text"', "null", "{", "1e999"]),
            _HEADER_TEXT,
        ),
        "x-switchyard-idempotency-key": _HEADER_TEXT,
    },
)
"""Switchyard's routing fields as headers (the OpenAPI document does not name them)."""


def _headers(authorization: str | None, routing: dict[str, str]) -> dict[str, str]:
    headers = dict(routing)
    if authorization is not None:
        headers["authorization"] = authorization
    return headers


# ---------------------------------------------------------------------------------------------
# The checks, and the failures they record.


def error_shape_problem(status: int, content: bytes) -> str | None:
    """Why an error body is not OpenAI's error object, or None when it is."""
    try:
        body = json.loads(content)
    except ValueError:
        return f"the {status} body is not JSON"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f'the {status} body is not {{"error": {{...}}}}'
    error = body["error"]
    missing = [k for k in ("message", "type", "param", "code") if k not in error]
    if missing:
        return f"the {status} error object has no {', '.join(missing)}"
    if not (isinstance(error["message"], str) and error["message"]):
        return f"the {status} error's message is not a non-empty string"
    if not isinstance(error["type"], str) or not isinstance(error["code"], str):
        return f"the {status} error's type or code is not a string"
    if error["param"] is not None and not isinstance(error["param"], str):
        return f"the {status} error's param is neither a string nor null"
    return None


def error_field(content: bytes, name: str) -> str:
    try:
        value = json.loads(content)["error"][name]
    except (ValueError, KeyError, TypeError):
        return ""
    return value if isinstance(value, str) else ""


def excused(content: bytes) -> bool:
    """Whether a 5xx is the pipeline's or the provider's answer (``LEGITIMATE_5XX``)."""
    code, message = error_field(content, "code"), error_field(content, "message")
    return code in LEGITIMATE_5XX and not OWN_EXCEPTION.search(message)


@dataclass
class Finding:
    problem: str
    reproduce: str
    status: int | None
    response: str


@dataclass
class Findings:
    """Every distinct failure (by where and what), with the first request that showed it, and
    a tally of the answers the run got (by where, status and error code)."""

    failures: dict[tuple[str, str], Finding] = field(default_factory=dict)
    statuses: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    stalled: bool = False
    skipped: int = 0
    recent: deque[Callable[[], str]] = field(default_factory=lambda: deque(maxlen=4))

    def fail(
        self, where: str, problem: str, reproduce: str, status: int | None, body: bytes
    ) -> None:
        self.failures.setdefault(
            (where, problem),
            Finding(problem, reproduce, status, body[:2000].decode(errors="replace")),
        )

    def sending(self, reproduce: Callable[[], str]) -> None:
        """Remember the request about to go: a request that stops the pipeline (one whose job
        the scheduler cannot pass on) may have been answered, and the next one is not."""
        self.recent.append(reproduce)

    def no_answer(self, where: str, exc: Exception, reproduce: str) -> None:
        self.stalled = True
        before = [r() for r in list(self.recent)[:-1]]
        if before:
            reproduce += "".join(f"\n    sent before it: {r}" for r in before)
        self.fail(
            where, f"no answer in {CALL_TIMEOUT_S:g} s ({type(exc).__name__})", reproduce, None, b""
        )

    def judge(
        self,
        where: str,
        status: int,
        content: bytes,
        reproduce: Callable[[], str],
        server_error_check: Callable[[], None],
    ) -> None:
        """Record the response's problems: a 5xx that is not ``excused`` (as
        ``server_error_check`` raises), an error body that is not OpenAI's error object."""
        code = error_field(content, "code")
        self.statuses[(where, status, code)] += 1
        if not (status >= 500 and excused(content)):
            try:
                server_error_check()
            except (AssertionError, FailureGroup):
                # One failure per distinct error: its message without the values it quotes.
                message = re.sub(r"'[^']*'", "'…'", error_field(content, "message"))
                problem = f"server error {status} {code}: {message}".strip()
                self.fail(where, problem, reproduce(), status, content)
        if status >= 400:
            problem = error_shape_problem(status, content)
            if problem is not None:
                self.fail(where, problem, reproduce(), status, content)

    def report(self) -> str:
        lines = [f"{len(self.failures)} distinct failure(s):"]
        for (where, _), f in self.failures.items():
            lines += [
                f"- {where}: {f.problem}",
                f"    reproduce: {f.reproduce}",
                f"    answer: {f.status} {f.response}",
            ]
        if self.skipped:
            lines.append(f"({self.skipped} requests not sent: the pipeline had stopped answering)")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line per operation, status and error code: how many answers were so."""
        return "\n".join(
            f"  {where} {status} {code}: {n}".rstrip()
            for (where, status, code), n in sorted(self.statuses.items())
        )

    def count(self, where: str, status: int) -> int:
        return sum(n for (w, s, _), n in self.statuses.items() if (w, s) == (where, status))


def server_error(status: int) -> None:
    """``not_a_server_error`` for a response with no schemathesis case (the raw requests)."""
    if status >= 500:
        raise AssertionError(f"server error {status}")


# ---------------------------------------------------------------------------------------------
# Schemathesis: every operation of the document, valid and invalid input.


def steer(body: dict[str, Any], model: str | None, shape: str) -> None:
    """Steer a valid body toward the provider: random values mostly stop at the door (an
    unknown model, an idempotency key, a deadline long past) or at the provider (messages and
    parameters it refuses). ``tame`` drops the first two, ``sane`` also sends sane messages,
    ``minimal`` keeps only what a plain (or streamed) request has."""
    if model is not None:
        body["model"] = model
    if shape != "as generated":
        body.pop("idempotency_key", None)
        body.pop("deadline", None)
    if shape in ("sane", "minimal"):
        body["messages"] = [{"role": "user", "content": "What is a priority queue?"}]
    if shape == "minimal":
        for name in set(body) - {"model", "messages", "stream", "stream_options"}:
            del body[name]


def fuzz_schema(base_url: str, findings: Findings) -> int:
    """Run the generated cases of every operation; returns how many requests went out."""
    # The config given, not one discovered from the working directory; reproductions unredacted.
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config, timeout=10)
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        has_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
        examples = CHAT_EXAMPLES if label == "POST /v1/chat/completions" else EXAMPLES
        modes = [GenerationMode.POSITIVE]
        if has_input:
            modes.append(GenerationMode.NEGATIVE)
        else:
            examples = FEW_EXAMPLES
        for mode in modes:
            where = f"{label} [{mode.value}]"
            sent += fuzz_operation(base_url, operation, mode, examples, findings, where)
    return sent


def fuzz_operation(
    base_url: str,
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    examples: int,
    findings: Findings,
    where: str,
) -> int:
    sent = 0

    @settings(BASE_SETTINGS, max_examples=examples)
    @given(
        case=operation.as_strategy(generation_mode=mode),
        authorization=AUTHORIZATION,
        routing=ROUTING_HEADERS,
        model=st.sampled_from([*MODELS, "auto", None]),
        shape=st.sampled_from(["as generated", "tame", "sane", "minimal"]),
    )
    def run(
        case: schemathesis.Case,
        authorization: str | None,
        routing: dict[str, str],
        model: str | None,
        shape: str,
    ) -> None:
        nonlocal sent
        if findings.stalled:
            findings.skipped += 1
            return
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            steer(case.body, model, shape)
            if shape != "as generated":
                routing.pop("x-switchyard-idempotency-key", None)
        headers = _headers(authorization, routing)
        sent += 1

        def reproduce() -> str:
            return case.as_curl_command(headers=headers, base_url=base_url)

        findings.sending(reproduce)
        # A connection per request (no session): one request's failure stays its own.
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=CALL_TIMEOUT_S)
        except requests.RequestException as exc:
            findings.no_answer(where, exc, reproduce())
            return
        findings.judge(
            where,
            response.status_code,
            response.content,
            reproduce,
            lambda: case.validate_response(response, checks=[not_a_server_error]),
        )

    try:
        run()
    except Unsatisfiable:
        # No input breaks the operation's schema (a path parameter any string fits): nothing
        # negative to send.
        if mode is not GenerationMode.NEGATIVE or sent:
            raise
    return sent


async def test_schemathesis_finds_no_5xx_and_only_openai_errors(fuzz_gateway: str) -> None:
    findings = Findings()
    started = time.monotonic()
    # Synchronous clients in a thread: the gateway serves in this test's event loop.
    sent = await asyncio.to_thread(fuzz_schema, fuzz_gateway, findings)
    print(f"\n{sent} requests in {time.monotonic() - started:.1f} s\n{findings.summary()}")
    assert not findings.failures, findings.report()
    assert sent > 200
    # The fuzz reached the pipeline, not only the door.
    assert findings.count("POST /v1/chat/completions [positive]", 200) > 0


# ---------------------------------------------------------------------------------------------
# Raw requests: what a schema never generates.

VALID_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
INVALID_BYTES = [b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00"]


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    valid = json.dumps(VALID_BODY).encode()
    kind = draw(
        st.sampled_from(
            [
                "bytes",
                "truncated",
                "invalid-utf8",
                "in-string",
                "json-value",
                "deep",
                "big-int",
                "edited",
            ]
        )
    )
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "invalid-utf8":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.sampled_from(INVALID_BYTES)) + valid[at:]
    if kind == "in-string":  # invalid UTF-8 (or an escape) inside a JSON string
        inner = draw(st.sampled_from([*INVALID_BYTES, b"\\ud800", b"\\u0000", b"\\x", b"\\"]))
        return valid.replace(b'"hi"', b'"h' + inner + b'i"')
    if kind == "json-value":  # well-formed JSON that is not a request
        value = draw(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3)
                ),
                max_leaves=8,
            )
        )
        return json.dumps(value).encode()
    if kind == "deep":  # nesting past any parser's recursion limit, in a field or the body
        depth = draw(st.sampled_from([100, 300, 1_000, 100_000]))
        nested = b"[" * depth + b"]" * depth
        return draw(
            st.sampled_from(
                [
                    nested,
                    valid[:-1] + b', "metadata": {"a": ' + nested + b"}}",
                    valid[:-1] + b', "tools": [' + b'{"a": ' * depth + b"1" + b"}" * depth + b"]}",
                ]
            )
        )
    if kind == "big-int":  # an integer JSON allows and 64 bits do not hold, somewhere
        big = draw(st.sampled_from([2**63, 2**64, 10**30, -(2**63) - 1]))
        body = copy.deepcopy(VALID_BODY)
        where = draw(
            st.sampled_from(["seed", "max_tokens", "tools", "metadata", "message", "part"])
        )
        if where == "tools":
            body["tools"] = [{"type": "function", "function": {"name": "f", "x": big}}]
        elif where == "metadata":
            body["metadata"] = {"n": big}
        elif where == "message":
            body["messages"][0]["x"] = big
        elif where == "part":
            body["messages"][0]["content"] = [{"type": "text", "text": "hi", "x": big}]
        else:
            body[where] = big
        return json.dumps(body).encode()
    # edited: a valid body with one field replaced, added or removed
    body: dict[str, Any] = json.loads(valid)
    name = draw(
        st.sampled_from(
            ["model", "messages", "stream", "max_tokens", "deadline", "priority", "colour", "n"]
        )
    )
    if draw(st.booleans()) and name in body:
        del body[name]
    elif name == "deadline":
        body[name] = draw(st.sampled_from(DEADLINES))
    else:
        body[name] = draw(
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.text(max_size=8),
                st.sampled_from([float("nan"), float("inf"), 10**40, [], {}, [None], {"": None}]),
            )
        )
    return json.dumps(body).encode()


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json; charset=latin-1",
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "multipart/form-data",
        "application/vnd.api+json",
    ]
)
CHAT = ("POST", "/v1/chat/completions")
TARGETS = st.one_of(
    st.just(CHAT),
    st.tuples(
        st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        st.sampled_from(
            [
                "/v1/chat/completions",
                "/v1/chat/completions/",
                "/v1/models",
                "/v1/models/gpt-4o",
                "/v1/completions",
                "/healthz",
                "/",
            ]
        ),
    ),
)
"""Half the requests a chat completion; the rest other methods and paths."""


def _ansi_c(body: bytes) -> str:
    """``body`` in bash's ``$'...'`` quoting, byte for byte."""
    out = []
    for byte in body:
        char = chr(byte)
        if char in "\\'":
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


def curl(method: str, url: str, headers: dict[str, str], body: bytes) -> str:
    parts = [f"curl -X {method} '{url}'"]
    parts += [f"-H '{k}: {v}'" for k, v in headers.items()]
    if len(body) > 400:
        parts.append(f"--data-binary {_ansi_c(body[:400])}... ({len(body)} bytes)")
    elif body:
        parts.append(f"--data-binary {_ansi_c(body)}")
    return " ".join(parts)


def fuzz_raw(base_url: str, findings: Findings) -> int:
    sent = 0
    # No keep-alive: one request's failure stays its own.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base_url, timeout=CALL_TIMEOUT_S, limits=limits) as http:

        @settings(BASE_SETTINGS, max_examples=RAW_EXAMPLES)
        @given(
            target=TARGETS,
            content_type=CONTENT_TYPES,
            body=raw_bodies(),
            authorization=AUTHORIZATION,
        )
        def run(
            target: tuple[str, str],
            content_type: str | None,
            body: bytes,
            authorization: str | None,
        ) -> None:
            nonlocal sent
            if findings.stalled:
                findings.skipped += 1
                return
            method, path = target
            headers = _headers(authorization, {})
            if content_type is not None:
                headers["content-type"] = content_type
            where = f"{method} {path} [raw]"
            sent += 1
            reproduce = partial(curl, method, base_url + path, headers, body)
            findings.sending(reproduce)
            try:
                response = http.request(method, path, content=body, headers=headers)
            except httpx.HTTPError as exc:
                findings.no_answer(where, exc, reproduce())
                return
            status = response.status_code
            findings.judge(
                where, status, response.content, reproduce, partial(server_error, status)
            )

        run()
    return sent


async def test_raw_bodies_get_4xx_in_openai_shape(fuzz_gateway: str) -> None:
    findings = Findings()
    started = time.monotonic()
    sent = await asyncio.to_thread(fuzz_raw, fuzz_gateway, findings)
    print(f"\n{sent} requests in {time.monotonic() - started:.1f} s\n{findings.summary()}")
    assert not findings.failures, findings.report()
    assert sent > 100


# ---------------------------------------------------------------------------------------------
# Inputs known to be hard, each sent every run whatever the generators draw.

_DEEP = "[" * 300 + "]" * 300
PINNED: list[tuple[str, dict[str, str], bytes]] = [
    ("malformed JSON", {}, b'{"model": "gpt-4o-mini", "messages": ['),
    ("empty body", {}, b""),
    ("wrong type", {}, b'{"model": "gpt-4o-mini", "messages": "hello"}'),
    ("unknown field", {}, json.dumps({**VALID_BODY, "colour": "blue"}).encode()),
    ("invalid UTF-8", {}, json.dumps(VALID_BODY).encode().replace(b'"hi"', b'"h\xffi"')),
    ("lone surrogate in a message", {}, json.dumps(VALID_BODY).encode().replace(b"hi", b"\\ud800")),
    (
        "lone surrogate in tools",
        {},
        json.dumps({**VALID_BODY, "tools": [{"type": "function", "x": "\ud800"}]}).encode(),
    ),
    ("int over 64 bits in tools", {}, json.dumps({**VALID_BODY, "tools": [{"n": 2**64}]}).encode()),
    ("int over 64 bits in seed", {}, json.dumps({**VALID_BODY, "seed": 2**64}).encode()),
    (
        "int over 64 bits in a message",
        {},
        json.dumps(
            {**VALID_BODY, "messages": [{"role": "user", "content": "hi", "n": 2**64}]}
        ).encode(),
    ),
    (
        "nesting 300 deep in metadata",
        {},
        f'{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "hi"}}], '
        f'"metadata": {{"a": {_DEEP}}}}}'.encode(),
    ),
    # Last: when it stops the pipeline, nothing after it is answered.
    (
        "deadline more than 3650 days ahead",
        {"x-switchyard-deadline": "9999-12-31T23:59:59Z"},
        json.dumps(VALID_BODY).encode(),
    ),
]
"""Each class of input the fuzz has found answered with a 5xx (or not at all), and the bad
inputs the issue names; a change of the generators cannot drop them."""


async def test_pinned_hard_inputs_get_4xx_in_openai_shape(fuzz_gateway: str) -> None:
    findings = Findings()
    url = f"{fuzz_gateway}/v1/chat/completions"
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=CALL_TIMEOUT_S, limits=limits) as http:
        for what, extra, body in PINNED:
            if findings.stalled:
                findings.skipped += 1
                continue
            headers = {
                "authorization": f"Bearer {SECRET}",
                "content-type": "application/json",
                **extra,
            }
            reproduce = partial(curl, "POST", url, headers, body)
            findings.sending(reproduce)
            try:
                response = await http.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                findings.no_answer(what, exc, reproduce())
                continue
            status = response.status_code
            findings.judge(what, status, response.content, reproduce, partial(server_error, status))
    assert not findings.failures, findings.report()
