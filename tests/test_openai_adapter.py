"""OpenAIAdapter against a stand-in provider (``httpx.MockTransport``) serving documented bodies."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from broker.core import errors
from broker.core.config import ProviderConfig
from schemas import ChatMessage, CompletionParams
from tests.adapter_cases import AdapterCase, folded, only_tool_call
from tests.conftest import free_port
from tests.provider_stub import Provider
from workers.adapters.base import ProviderRequest
from workers.adapters.openai import OpenAIAdapter, parse_retry_after
from workers.http import make_http_client, post

KEY = "sk-test-abc123supersecret"
URL = "https://api.example.test/v1/chat/completions"
CONFIG = {
    "models": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}},
    "headers": {"OpenAI-Organization": "org-test"},
}
api = AdapterCase("openai", OpenAIAdapter, KEY, "gpt-4o-mini", "chat_completion.json", CONFIG)
provider = api.provider_fixture()


def request_from(body: dict[str, Any]) -> ProviderRequest:
    """A ProviderRequest built from a documented request body."""
    body = dict(body)
    model = body.pop("model")
    messages = [ChatMessage.model_validate(m) for m in body.pop("messages")]
    return ProviderRequest(
        model=model, messages=messages, params=CompletionParams.model_validate(body)
    )


def assert_no_none(value: Any, path: str = "body") -> None:
    assert value is not None, f"{path} is null"
    if isinstance(value, dict):
        for key, item in value.items():
            assert_no_none(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_no_none(item, f"{path}.{index}")


# --- the request ---------------------------------------------------------------------------


async def test_sends_the_documented_request(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("chat_completion.json"))
    documented = api.fixture("chat_request.json")

    await api.call(provider, stub, request_from(documented))

    [sent] = stub.requests
    assert sent.method == "POST"
    assert str(sent.url) == URL
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["openai-organization"] == "org-test"
    assert sent.headers["content-type"] == "application/json"
    assert orjson.loads(sent.content) == documented


async def test_sends_params_without_none_fields_or_stream(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("chat_completion_tool_calls.json"))
    documented = api.fixture("tools_request.json")
    request = request_from({**documented, "max_tokens": 50, "temperature": None, "seed": 7})

    await api.call(provider, stub, request)

    body = orjson.loads(stub.requests[0].content)
    assert body == {**documented, "max_tokens": 50, "seed": 7}
    assert "stream" not in body
    assert_no_none(body)


async def test_message_fields_that_are_none_are_left_out(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("chat_completion.json"))
    tool_turn = api.fixture("chat_completion_tool_calls.json")["choices"][0]["message"]
    request = ProviderRequest(
        model="gpt-4o-mini",
        messages=[
            ChatMessage(role="user", content="What is the weather like in Boston today?"),
            ChatMessage.model_validate(tool_turn),
            ChatMessage(role="tool", tool_call_id="call_abc123", content='{"temp": 22}'),
        ],
        params=CompletionParams(),
    )

    await api.call(provider, stub, request)

    body = orjson.loads(stub.requests[0].content)
    assert_no_none(body)
    assert body["messages"][1] == {"role": "assistant", "tool_calls": tool_turn["tool_calls"]}
    assert body["messages"][2] == {
        "role": "tool",
        "content": '{"temp": 22}',
        "tool_call_id": "call_abc123",
    }


async def test_pass_through_params_cannot_replace_model_or_messages(
    provider: ProviderConfig,
) -> None:
    stub = Provider(body=api.fixture("chat_completion.json"))
    request = api.simple_request(model="other-model", messages=[], logprobs=True)

    await api.call(provider, stub, request)

    body = orjson.loads(stub.requests[0].content)
    assert body["model"] == "gpt-4o-mini"
    assert len(body["messages"]) == 1
    assert body["logprobs"] is True


async def test_base_url_with_trailing_slash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(api.key_env, KEY)
    stub = Provider(body=api.fixture("chat_completion.json"))

    await api.call(api.make_provider(base_url="https://api.example.test/v1/"), stub)

    assert str(stub.requests[0].url) == URL


async def test_no_authorization_header_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(api.key_env, raising=False)
    stub = Provider(body=api.fixture("chat_completion.json"))

    await api.call(api.make_provider(), stub)
    await api.call(api.make_provider(id="mock", type="mock", api_key_env=None, headers={}), stub)

    assert all("authorization" not in sent.headers for sent in stub.requests)


async def test_complete_never_sends_stream(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("chat_completion.json"))

    await api.call(
        provider, stub, api.simple_request(stream=True, stream_options={"include_usage": True})
    )

    body = orjson.loads(stub.requests[0].content)
    assert "stream" not in body
    assert "stream_options" not in body


@pytest.mark.parametrize(
    ("kind", "params", "reserved", "spec_cap", "expected"),
    [
        # A job without a cap under a budget: the scheduler's reserved cap, under OpenAI's name
        # for it (max_tokens is deprecated there and refused by o-series models).
        ("openai", {}, 40, None, {"max_completion_tokens": 40}),
        ("openai", {}, 40, 2048, {"max_completion_tokens": 40}),
        ("openai", {}, None, 2048, {"max_completion_tokens": 2048}),  # the model's own cap
        ("openai", {}, None, None, {}),  # no cap anywhere: none sent, as before
        # OpenAI-compatible servers read max_tokens.
        ("openai_compatible", {}, 40, None, {"max_tokens": 40}),
        ("mock", {}, 40, None, {"max_tokens": 40}),
        # The job's own cap, under either name, is sent as it came and nothing is added.
        ("openai", {"max_tokens": 10}, 40, 2048, {"max_tokens": 10}),
        ("openai", {"max_completion_tokens": 12}, 40, None, {"max_completion_tokens": 12}),
        ("mock", {"max_completion_tokens": 12}, 40, None, {"max_completion_tokens": 12}),
    ],
)
async def test_sends_the_output_cap_reserved_for_a_job_without_its_own(
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    params: dict[str, Any],
    reserved: int | None,
    spec_cap: int | None,
    expected: dict[str, int],
) -> None:
    monkeypatch.setenv(api.key_env, KEY)
    spec: dict[str, Any] = {"input": "0.15", "output": "0.60"}
    if spec_cap is not None:
        spec["max_tokens"] = spec_cap
    provider = api.make_provider(type=kind, models={"gpt-4o-mini": spec})
    stub = Provider(body=api.fixture("chat_completion.json"))
    request = api.simple_request(**params)
    request = ProviderRequest(request.model, request.messages, request.params, reserved)

    await api.call(provider, stub, request)

    body = orjson.loads(stub.requests[0].content)
    caps = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if k in body}
    assert caps == expected


# --- the response --------------------------------------------------------------------------


async def test_parses_the_documented_response(provider: ProviderConfig) -> None:
    completion = await api.call(provider, Provider(body=api.fixture("chat_completion.json")))

    assert completion.id == "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"
    assert completion.model == "gpt-4.1-2025-04-14"
    assert completion.choices[0].message.content == "Hello! How can I assist you today?"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (19, 10)
    assert completion.usage.total_tokens == 29
    # Fields the canonical model does not name are kept.
    assert completion.model_extra == {"service_tier": "default"}
    assert completion.usage.model_extra is not None
    assert completion.usage.model_extra["prompt_tokens_details"]["cached_tokens"] == 0


async def test_parses_the_documented_tool_call_response(provider: ProviderConfig) -> None:
    completion = await api.call(
        provider, Provider(body=api.fixture("chat_completion_tool_calls.json"))
    )

    tool_call = only_tool_call(completion)
    assert tool_call.id == "call_abc123"
    assert tool_call.function.name == "get_current_weather"
    assert orjson.loads(tool_call.function.arguments) == {"location": "Boston, MA"}
    assert completion.usage is not None
    assert completion.usage.total_tokens == 99


async def test_content_filtered_choice(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("chat_completion_content_filter.json"))

    error = await api.fails(provider, stub, errors.ContentFiltered)

    assert "content_filter" in error.message


async def test_content_filter_with_partial_content_is_returned(provider: ProviderConfig) -> None:
    body = api.fixture("chat_completion_content_filter.json")
    body["choices"][0]["message"]["content"] = "Partial answer"

    completion = await api.call(provider, Provider(body=body))

    assert completion.choices[0].message.content == "Partial answer"


async def test_body_not_json(provider: ProviderConfig) -> None:
    error = await api.fails(
        provider, Provider(content=b"<html>bad gateway</html>"), errors.ProviderProtocolError
    )

    assert "'openai-test'" in error.message
    assert "not JSON" in error.message


async def test_body_json_but_not_an_object(provider: ProviderConfig) -> None:
    error = await api.fails(provider, Provider(body=[1, 2]), errors.ProviderProtocolError)

    assert "not an object" in error.message


async def test_missing_choices_names_the_field(provider: ProviderConfig) -> None:
    body = api.fixture("chat_completion.json")
    del body["choices"]

    error = await api.fails(provider, Provider(body=body), errors.ProviderProtocolError)

    assert error.message == "provider 'openai-test': response field choices: Field required"


async def test_missing_nested_field_names_its_path(provider: ProviderConfig) -> None:
    body = api.fixture("chat_completion.json")
    del body["choices"][0]["message"]

    error = await api.fails(provider, Provider(body=body), errors.ProviderProtocolError)

    assert "provider 'openai-test': response field choices.0.message: Field required" in (
        error.message
    )
    # The response's own text stays out of the message.
    assert "How can I assist" not in error.message


async def test_empty_choices(provider: ProviderConfig) -> None:
    body = {**api.fixture("chat_completion.json"), "choices": []}

    error = await api.fails(provider, Provider(body=body), errors.ProviderProtocolError)

    assert "no choices" in error.message


async def test_missing_usage(provider: ProviderConfig) -> None:
    body = api.fixture("chat_completion.json")
    del body["usage"]

    error = await api.fails(provider, Provider(body=body), errors.ProviderProtocolError)

    assert "no usage" in error.message


# --- error statuses ------------------------------------------------------------------------


test_status_maps_to_error = api.status_test(
    [
        (
            400,
            api.fixture("error_400_context_length.json"),
            errors.ProviderInvalidRequest,
            ["HTTP 400, code context_length_exceeded", "maximum context length is 128000"],
        ),
        (
            404,
            api.fixture("error_404_model_not_found.json"),
            errors.ProviderInvalidRequest,
            ["HTTP 404, code model_not_found", "does not exist"],
        ),
        (
            409,
            {"error": {"message": "Conflict", "code": None}},
            errors.ProviderInvalidRequest,
            ["409"],
        ),
        (413, {"error": "Request too large"}, errors.ProviderInvalidRequest, ["Request too large"]),
        (
            422,
            {"message": "Unprocessable"},
            errors.ProviderInvalidRequest,
            ["422", "Unprocessable"],
        ),
        (
            400,
            api.fixture("error_400_content_policy.json"),
            errors.ContentFiltered,
            ["code content_policy_violation", "safety system"],
        ),
        (
            400,
            {
                "error": {
                    "message": "filtered",
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                }
            },
            errors.ContentFiltered,
            ["code content_filter"],
        ),
        (408, {"error": {"message": "Request timeout"}}, errors.ProviderTimeout, ["HTTP 408"]),
        (
            500,
            api.fixture("error_500_server.json"),
            errors.ProviderServerError,
            ["HTTP 500", "The server had an error"],
        ),
        (503, None, errors.ProviderServerError, ["HTTP 503"]),
        (
            418,
            {"error": {"message": "teapot"}},
            errors.ProviderServerError,
            ["unexpected", "HTTP 418"],
        ),
    ]
)


async def test_error_body_not_json_is_tolerated(provider: ProviderConfig) -> None:
    stub = Provider(502, content=b"<html><body>502 Bad Gateway</body></html>")

    error = await api.fails(provider, stub, errors.ProviderServerError)

    assert error.message == "provider 'openai-test' failed (HTTP 502)"


@pytest.mark.parametrize(
    ("status", "fixture_name"),
    [(401, "error_401_invalid_api_key.json"), (403, "error_403_unsupported_region.json")],
)
async def test_auth_error_never_repeats_the_provider_text(
    provider: ProviderConfig, status: int, fixture_name: str
) -> None:
    body = api.fixture(fixture_name)

    error = await api.fails(provider, Provider(status, body), errors.ProviderAuthentication)

    assert error.message.startswith(
        f"provider 'openai-test' refused our credentials (HTTP {status}"
    )
    assert body["error"]["message"] not in error.message
    assert "sk-test" not in error.message


async def test_auth_error_with_the_whole_key_echoed(provider: ProviderConfig) -> None:
    body = {"error": {"message": f"Bad key {KEY}", "type": "auth", "param": None, "code": KEY}}

    error = await api.fails(provider, Provider(401, body), errors.ProviderAuthentication)

    assert error.message == "provider 'openai-test' refused our credentials (HTTP 401)"


async def test_key_in_a_provider_message_is_redacted(provider: ProviderConfig) -> None:
    body = {"error": {"message": f"invalid header value Bearer {KEY}", "code": "bad_header"}}

    error = await api.fails(provider, Provider(400, body), errors.ProviderInvalidRequest)

    assert "Bearer [redacted]" in error.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "20"}, 20.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after": "nan"}, None),
    ],
)
async def test_rate_limited_carries_retry_after(
    provider: ProviderConfig, headers: dict[str, str], expected: float | None
) -> None:
    stub = Provider(429, api.fixture("error_429_rate_limit.json"), headers=headers)

    error = await api.fails(provider, stub, errors.RateLimited)

    assert error.retry_after == expected
    assert "code rate_limit_exceeded" in error.message
    assert "Please try again in 20s" in error.message
    assert error.to_job_error().retry_after == expected


async def test_an_account_out_of_quota_is_a_429_that_is_not_retried(
    provider: ProviderConfig,
) -> None:
    """OpenAI answers 429 ``insufficient_quota`` when the account's credit or spend limit is
    used up; retrying cannot help, so it is not retryable, unlike a rate limit."""
    stub = Provider(429, api.fixture("error_429_insufficient_quota.json"))

    error = await api.call_error(provider, stub)

    assert isinstance(error, errors.QuotaExhausted) and not error.retryable
    assert error.to_job_error().code.value == "rate_limited"
    assert "code insufficient_quota" in error.message and "quota is used up" in error.message
    rate_limited = await api.call_error(
        provider, Provider(429, api.fixture("error_429_rate_limit.json"))
    )
    assert type(rate_limited) is errors.RateLimited and rate_limited.retryable


async def test_rate_limited_with_an_http_date(provider: ProviderConfig) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    stub = Provider(
        429,
        api.fixture("error_429_rate_limit.json"),
        headers={"retry-after": format_datetime(when, usegmt=True)},
    )

    error = await api.fails(provider, stub, errors.RateLimited)

    assert error.retry_after == pytest.approx(30, abs=2)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past: retry now
        ("Wed, 21 Oct 2015 07:28:00 -0000", 30.0),
        ("Wed, 99 Oct 2015", None),
    ],
)
def test_parse_retry_after_http_dates(value: str, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC)

    assert parse_retry_after(httpx.Headers({"Retry-After": value}), now=now) == expected


# --- transport failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [httpx.ReadTimeout("read timed out"), httpx.ConnectTimeout("connect timed out")],
)
async def test_timeout(provider: ProviderConfig, exc: Exception) -> None:
    error = await api.fails(provider, Provider(raises=exc), errors.ProviderTimeout)

    assert type(exc).__name__ in error.message


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("connection refused"), httpx.RemoteProtocolError("peer closed")],
)
async def test_connection_failure(provider: ProviderConfig, exc: Exception) -> None:
    error = await api.fails(provider, Provider(raises=exc), errors.ProviderServerError)

    assert error.message == (f"provider 'openai-test': connection failed: {type(exc).__name__}")


async def test_no_other_exception_escapes(provider: ProviderConfig) -> None:
    error = await api.fails(
        provider, Provider(raises=RuntimeError(f"boom {KEY}")), errors.ProviderProtocolError
    )

    assert "RuntimeError" in error.message
    assert "boom" not in error.message


# --- the HTTP client seam ------------------------------------------------------------------


async def test_make_http_client() -> None:
    provider = api.make_provider(concurrency=32, timeout_s=5.0)

    async with make_http_client(provider) as http:
        assert http.timeout == httpx.Timeout(5.0, connect=5.0)
        assert http.base_url == httpx.URL("")

    async with make_http_client(api.make_provider(timeout_s=120.0)) as http:
        assert http.timeout == httpx.Timeout(120.0, connect=10.0)


async def test_post_over_aiohttp_reads_plain_and_encoded_bodies_whole() -> None:
    """``post`` on the aiohttp transport hands back an httpx response read whole: a plain body
    as it came, a gzip one decoded by httpx (it asked for gzip), each with its status and
    headers, over a real HTTP server on loopback."""
    answer = orjson.dumps({"id": "chatcmpl-1", "text": "é" * 300})
    seen: list[str] = []

    async def plain(request: web.Request) -> web.Response:
        seen.append(request.headers.get("accept-encoding", ""))
        return web.Response(body=answer, content_type="application/json", status=201)

    async def encoded(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(answer),
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )

    app = web.Application()
    app.router.add_post("/plain", plain)
    app.router.add_post("/gzip", encoded)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with make_http_client(api.make_provider(), "aiohttp") as http:
            headers = httpx.Headers({"content-type": "application/json"})
            first = await post(http, f"http://127.0.0.1:{port}/plain", b"{}", headers)
            second = await post(http, f"http://127.0.0.1:{port}/gzip", b"{}", headers)
    finally:
        await runner.cleanup()

    assert (first.status_code, first.content, first.json()["text"]) == (201, answer, "é" * 300)
    assert first.headers["content-type"] == "application/json" and first.is_closed
    assert "gzip" in seen[0]
    assert (second.status_code, second.content) == (200, answer)
    assert second.headers["content-encoding"] == "gzip"


MALFORMED_ANSWERS = [
    pytest.param(b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\n{}", id="bad-status-line"),
    pytest.param(b"HTTP/1.1 200 OK\r\nNoColonHere\r\nContent-Length: 2\r\n\r\n{}", id="bad-header"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        id="bad-chunk-size",
    ),
]


@pytest.mark.parametrize("answer", MALFORMED_ANSWERS)
@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_a_malformed_answer_is_a_retried_server_error_on_either_transport(
    answer: bytes, transport: Any
) -> None:
    """A server that breaks HTTP is a provider failing, retried like a dropped connection, on
    either transport."""

    async def answer_badly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_badly, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = api.make_provider(base_url=f"http://127.0.0.1:{port}/v1")
    try:
        async with make_http_client(provider, transport) as http:
            headers = httpx.Headers({"content-type": "application/json"})
            with pytest.raises(httpx.RemoteProtocolError):
                await post(http, f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", headers)
            with pytest.raises(errors.ProviderServerError) as failed:
                await OpenAIAdapter(provider, http).complete(api.simple_request())
    finally:
        server.close()
    assert failed.value.retryable


# --- streaming -------------------------------------------------------------------------------


async def test_stream_sends_stream_and_include_usage(provider: ProviderConfig) -> None:
    stub = api.streaming(api.sse("stream_chunks.txt"))
    request = api.simple_request(max_tokens=20, stream_options={"include_obfuscation": False})

    await api.collect(provider, stub, request)

    [sent] = stub.requests
    assert str(sent.url) == URL
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = orjson.loads(sent.content)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert body["max_tokens"] == 20


async def test_stream_yields_the_documented_chunks(provider: ProviderConfig) -> None:
    chunks = await api.collect(provider, api.streaming(api.sse("stream_chunks.txt")))

    assert len(chunks) == 5
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:3]] == [
        "Hello",
        "! How can I assist you today?",
    ]
    assert chunks[3].choices[0].finish_reason == "stop"
    assert chunks[4].choices == []
    assert chunks[4].usage is not None
    assert chunks[4].usage.total_tokens == 29
    result = folded(provider, chunks)
    assert result.id == "chatcmpl-123"
    assert result.choices[0].message.content == "Hello! How can I assist you today?"
    assert result.choices[0].finish_reason == "stop"


async def test_streamed_tool_call_folds_into_the_non_streamed_result(
    provider: ProviderConfig,
) -> None:
    chunks = await api.collect(provider, api.streaming(api.sse("stream_tool_calls.txt")))
    completion = await api.call(
        provider, Provider(body=api.fixture("chat_completion_tool_calls.json"))
    )

    result = folded(provider, chunks)

    assert result.choices[0].message.content is None
    assert result.choices[0].message.tool_calls == completion.choices[0].message.tool_calls
    assert result.choices[0].finish_reason == completion.choices[0].finish_reason == "tool_calls"
    assert result.usage is not None and completion.usage is not None
    assert result.usage.total_tokens == completion.usage.total_tokens == 99


async def test_stream_that_ends_early(provider: ProviderConfig) -> None:
    cut = b"\n\n".join(api.sse("stream_chunks.txt").split(b"\n\n")[:2]) + b"\n\n"

    chunks = await api.ends_early(provider, cut)

    assert [c.choices[0].delta.content for c in chunks] == ["", "Hello"]


async def test_stream_without_done_but_finished_is_complete(provider: ProviderConfig) -> None:
    body = api.sse("stream_chunks.txt").replace(b"data: [DONE]\n\n", b"")

    chunks = await api.collect(provider, api.streaming(body))

    assert folded(provider, chunks).choices[0].finish_reason == "stop"


async def test_events_after_done_are_not_read(provider: ProviderConfig) -> None:
    body = api.sse("stream_chunks.txt") + b"data: not json\n\n"

    chunks = await api.collect(provider, api.streaming(body))

    assert len(chunks) == 5


def without_usage_chunk(name: str) -> bytes:
    events = api.sse(name).split(b"\n\n")
    return b"\n\n".join(e for e in events if b'"choices":[]' not in e)


async def test_stream_without_usage_from_openai(provider: ProviderConfig) -> None:
    stub = api.streaming(without_usage_chunk("stream_chunks.txt"))

    error, chunks = await api.stream_fails(provider, stub, errors.ProviderProtocolError)

    assert error.message == "provider 'openai-test': stream has no usage"
    assert len(chunks) == 4


async def test_stream_without_usage_from_an_openai_compatible_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(api.key_env, KEY)
    provider = api.make_provider(id="vllm", type="openai_compatible")
    stub = api.streaming(without_usage_chunk("stream_chunks.txt"))

    chunks = await api.collect(provider, stub)

    result = folded(provider, chunks)
    assert result.usage is None
    assert result.choices[0].message.content == "Hello! How can I assist you today?"


async def test_missing_usage_tolerated_from_an_openai_compatible_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(api.key_env, KEY)
    body = api.fixture("chat_completion.json")
    del body["usage"]

    completion = await api.call(api.make_provider(type="openai_compatible"), Provider(body=body))

    assert completion.usage is None
    assert completion.choices[0].message.content == "Hello! How can I assist you today?"


async def test_missing_usage_from_the_mock_provider_type(monkeypatch: pytest.MonkeyPatch) -> None:
    body = api.fixture("chat_completion.json")
    del body["usage"]
    provider = api.make_provider(id="mock", type="mock", api_key_env=None, headers={})

    await api.fails(provider, Provider(body=body), errors.ProviderProtocolError)


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (429, api.fixture("error_429_rate_limit.json"), {"retry-after": "20"}, errors.RateLimited),
        (401, api.fixture("error_401_invalid_api_key.json"), {}, errors.ProviderAuthentication),
        (400, api.fixture("error_400_context_length.json"), {}, errors.ProviderInvalidRequest),
        (500, api.fixture("error_500_server.json"), {}, errors.ProviderServerError),
    ],
)
async def test_stream_error_status_maps_like_complete(
    provider: ProviderConfig,
    status: int,
    body: Any,
    headers: dict[str, str],
    expected: type[errors.ProviderError],
) -> None:
    stub = Provider(status, body, headers=headers)

    error, chunks = await api.collect_error(provider, stub)
    same = await api.call_error(provider, stub)

    assert chunks == []
    assert type(error) is type(same) is expected
    assert error.message == same.message
    if isinstance(error, errors.RateLimited):
        assert error.retry_after == 20.0


async def test_stream_chunk_of_the_wrong_shape_names_the_field(provider: ProviderConfig) -> None:
    bad = b'data: {"object":"chat.completion.chunk","created":1,"model":"m","choices":[]}\n\n'

    error, _ = await api.stream_fails(provider, api.streaming(bad), errors.ProviderProtocolError)

    assert error.message == "provider 'openai-test': stream chunk field id: Field required"


async def test_stream_data_not_json(provider: ProviderConfig) -> None:
    error, _ = await api.stream_fails(
        provider, api.streaming(b"data: {oops\n\n"), errors.ProviderProtocolError
    )

    assert "stream event data is not JSON" in error.message


async def test_stream_error_event(provider: ProviderConfig) -> None:
    event = b'data: {"error": {"message": "The server had an error", "type": "server_error"}}'
    body = b"\n\n".join([*api.sse("stream_chunks.txt").split(b"\n\n")[:2], event]) + b"\n\n"

    error, chunks = await api.stream_fails(
        provider, api.streaming(body), errors.ProviderServerError
    )

    assert error.message == "provider 'openai-test' failed (error event): The server had an error"
    assert len(chunks) == 2


@pytest.mark.parametrize(
    ("error", "expected", "said"),
    [
        (
            {"message": "m", "code": "content_filter"},
            errors.ContentFiltered,
            "filtered the request (error event, code content_filter): m",
        ),
        (
            {"message": "m", "code": "content_policy_violation"},
            errors.ContentFiltered,
            "filtered the request (error event, code content_policy_violation): m",
        ),
        (
            {"message": "m", "type": "requests", "code": "rate_limit_exceeded"},
            errors.RateLimited,
            "rate limited the call (error event, code rate_limit_exceeded): m",
        ),
        (
            {"message": "m", "code": "rate_limit_error"},
            errors.RateLimited,
            "rate limited the call (error event, code rate_limit_error): m",
        ),
        (
            # An error event's type does not make it a quota error: only its code is read.
            {"message": "m", "type": "insufficient_quota", "code": "rate_limit_exceeded"},
            errors.RateLimited,
            "rate limited the call (error event, code rate_limit_exceeded): m",
        ),
        (
            {"message": "m", "type": "insufficient_quota", "code": "insufficient_quota"},
            errors.ProviderServerError,
            "failed (error event, code insufficient_quota): m",
        ),
        (
            {"message": "m", "code": "context_length_exceeded"},
            errors.ProviderServerError,
            "failed (error event, code context_length_exceeded): m",
        ),
        ("a bare string", errors.ProviderServerError, "failed (error event): a bare string"),
        (
            {"code": "rate_limit_exceeded"},
            errors.RateLimited,
            "rate limited the call (error event, code rate_limit_exceeded)",
        ),
    ],
)
async def test_stream_error_event_codes(
    provider: ProviderConfig, error: object, expected: type[errors.ProviderError], said: str
) -> None:
    """An error event inside a 200 stream has no status: its code chooses the error, by the
    same ladder as a status, and it never carries a retry_after (there are no headers)."""
    event = b"data: " + orjson.dumps({"error": error})
    body = b"\n\n".join([*api.sse("stream_chunks.txt").split(b"\n\n")[:1], event]) + b"\n\n"
    headers = {"content-type": api.event_stream, "retry-after": "9"}

    raised, chunks = await api.collect_error(provider, Provider(content=body, headers=headers))

    assert type(raised) is expected
    assert raised.retryable is (expected is not errors.ContentFiltered)
    assert raised.message == f"provider 'openai-test' {said}"
    if isinstance(raised, errors.RateLimited):
        assert raised.retry_after is None
    assert len(chunks) == 1


async def test_stream_content_filtered_without_content(provider: ProviderConfig) -> None:
    body = api.sse("stream_chunks.txt")
    body = body.replace(b'"Hello"', b'""').replace(b'"! How can I assist you today?"', b'""')
    body = body.replace(b'"finish_reason":"stop"', b'"finish_reason":"content_filter"')

    await api.stream_fails(provider, api.streaming(body), errors.ContentFiltered)


async def test_stream_answered_with_a_json_body(provider: ProviderConfig) -> None:
    json_headers = {"content-type": "application/json"}
    stub = Provider(body=api.fixture("chat_completion.json"), headers=json_headers)

    error, _ = await api.stream_fails(provider, stub, errors.ProviderProtocolError)

    assert "not an event stream" in error.message


async def test_stream_cut_by_the_connection(provider: ProviderConfig) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield api.sse("stream_chunks.txt").split(b"\n\n")[0] + b"\n\n"
        raise httpx.RemoteProtocolError("peer closed connection")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": api.event_stream})

    error, chunks = await api.stream_fails(provider, handler, errors.ProviderServerError)

    assert error.message == "provider 'openai-test': connection failed: RemoteProtocolError"
    assert len(chunks) == 1


async def test_stream_read_timeout(provider: ProviderConfig) -> None:
    await api.stream_fails(
        provider, Provider(raises=httpx.ReadTimeout("slow")), errors.ProviderTimeout
    )


async def test_cancellation_propagates(provider: ProviderConfig) -> None:
    stub = Provider(raises=asyncio.CancelledError())

    with pytest.raises(asyncio.CancelledError):
        await api.call(provider, stub)
    with pytest.raises(asyncio.CancelledError):
        await api.collect(provider, stub)


async def test_closing_a_stream_early_closes_the_response(provider: ProviderConfig) -> None:
    closed: list[bool] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for event in api.sse("stream_chunks.txt").split(b"\n\n"):
                yield event + b"\n\n"

        async def aclose(self) -> None:
            closed.append(True)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(), headers={"content-type": api.event_stream})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        stream = OpenAIAdapter(provider, http).stream(api.simple_request())
        first = await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]

    assert first.choices[0].delta.role == "assistant"
    assert closed == [True]
