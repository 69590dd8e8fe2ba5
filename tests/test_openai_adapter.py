"""OpenAIAdapter against a stand-in provider (``httpx.MockTransport``) serving documented bodies."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from broker.config import ProviderConfig
from broker.errors import (
    ContentFiltered,
    ProviderAuthentication,
    ProviderError,
    ProviderInvalidRequest,
    ProviderProtocolError,
    ProviderServerError,
    ProviderTimeout,
    RateLimited,
)
from schemas import ChatCompletion, ChatMessage, CompletionParams
from workers.adapters.base import ProviderRequest
from workers.adapters.openai import OpenAIAdapter, parse_retry_after
from workers.http import make_http_client

FIXTURES = Path(__file__).parent / "fixtures" / "openai"
KEY_ENV = "SWITCHYARD_TEST_OPENAI_KEY"
KEY = "sk-test-abc123supersecret"
PROMPT_MARKER = "PROMPT-TEXT-MARKER"
URL = "https://api.example.test/v1/chat/completions"

Handler = Callable[[httpx.Request], httpx.Response]


def fixture(name: str) -> Any:
    return orjson.loads((FIXTURES / name).read_bytes())


def make_provider(**overrides: Any) -> ProviderConfig:
    fields: dict[str, Any] = {
        "id": "openai-test",
        "type": "openai",
        "base_url": "https://api.example.test/v1",
        "api_key_env": KEY_ENV,
        "models": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}},
        "headers": {"OpenAI-Organization": "org-test"},
    }
    fields.update(overrides)
    return ProviderConfig(**fields)


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> ProviderConfig:
    monkeypatch.setenv(KEY_ENV, KEY)
    return make_provider()


def request_from(body: dict[str, Any]) -> ProviderRequest:
    """A ProviderRequest built from a documented request body."""
    body = dict(body)
    model = body.pop("model")
    messages = [ChatMessage.model_validate(m) for m in body.pop("messages")]
    return ProviderRequest(
        model=model, messages=messages, params=CompletionParams.model_validate(body)
    )


def simple_request(**params: Any) -> ProviderRequest:
    return ProviderRequest(
        model="gpt-4o-mini",
        messages=[ChatMessage(role="user", content=f"Say hi. {PROMPT_MARKER}")],
        params=CompletionParams(**params),
    )


class Provider:
    """A stand-in provider: answers every call with one response and records the requests."""

    def __init__(
        self,
        status: int = 200,
        body: Any = None,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        raises: Exception | None = None,
    ) -> None:
        self.status = status
        self.content = content if content is not None else orjson.dumps(body)
        self.headers = headers or {}
        self.raises = raises
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.raises is not None:
            raise self.raises
        return httpx.Response(self.status, content=self.content, headers=self.headers)


async def call(
    provider: ProviderConfig, handler: Handler, request: ProviderRequest | None = None
) -> ChatCompletion:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        return await OpenAIAdapter(provider, http).complete(request or simple_request())


async def call_error(
    provider: ProviderConfig, handler: Handler, request: ProviderRequest | None = None
) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await call(provider, handler, request)
    error = caught.value
    assert error.provider == provider.id
    assert KEY not in error.message
    assert PROMPT_MARKER not in error.message
    return error


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
    stub = Provider(body=fixture("chat_completion.json"))
    documented = fixture("chat_request.json")

    await call(provider, stub, request_from(documented))

    [sent] = stub.requests
    assert sent.method == "POST"
    assert str(sent.url) == URL
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["openai-organization"] == "org-test"
    assert sent.headers["content-type"] == "application/json"
    assert orjson.loads(sent.content) == documented


async def test_sends_params_without_none_fields_or_stream(provider: ProviderConfig) -> None:
    stub = Provider(body=fixture("chat_completion_tool_calls.json"))
    documented = fixture("tools_request.json")
    request = request_from({**documented, "max_tokens": 50, "temperature": None, "seed": 7})

    await call(provider, stub, request)

    body = orjson.loads(stub.requests[0].content)
    assert body == {**documented, "max_tokens": 50, "seed": 7}
    assert "stream" not in body
    assert_no_none(body)


async def test_message_fields_that_are_none_are_left_out(provider: ProviderConfig) -> None:
    stub = Provider(body=fixture("chat_completion.json"))
    tool_turn = fixture("chat_completion_tool_calls.json")["choices"][0]["message"]
    request = ProviderRequest(
        model="gpt-4o-mini",
        messages=[
            ChatMessage(role="user", content="What is the weather like in Boston today?"),
            ChatMessage.model_validate(tool_turn),
            ChatMessage(role="tool", tool_call_id="call_abc123", content='{"temp": 22}'),
        ],
        params=CompletionParams(),
    )

    await call(provider, stub, request)

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
    stub = Provider(body=fixture("chat_completion.json"))
    request = simple_request(model="other-model", messages=[], logprobs=True)

    await call(provider, stub, request)

    body = orjson.loads(stub.requests[0].content)
    assert body["model"] == "gpt-4o-mini"
    assert len(body["messages"]) == 1
    assert body["logprobs"] is True


async def test_base_url_with_trailing_slash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    stub = Provider(body=fixture("chat_completion.json"))

    await call(make_provider(base_url="https://api.example.test/v1/"), stub)

    assert str(stub.requests[0].url) == URL


async def test_no_authorization_header_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    stub = Provider(body=fixture("chat_completion.json"))

    await call(make_provider(), stub)
    await call(make_provider(id="mock", type="mock", api_key_env=None, headers={}), stub)

    assert all("authorization" not in sent.headers for sent in stub.requests)


async def test_streaming_is_refused_before_any_call(provider: ProviderConfig) -> None:
    stub = Provider(body=fixture("chat_completion.json"))

    error = await call_error(provider, stub, simple_request(stream=True))

    assert isinstance(error, ProviderInvalidRequest)
    assert "streaming is not supported yet" in error.message
    assert stub.requests == []


# --- the response --------------------------------------------------------------------------


async def test_parses_the_documented_response(provider: ProviderConfig) -> None:
    completion = await call(provider, Provider(body=fixture("chat_completion.json")))

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
    completion = await call(provider, Provider(body=fixture("chat_completion_tool_calls.json")))

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [tool_call] = choice.message.tool_calls
    assert tool_call.id == "call_abc123"
    assert tool_call.function.name == "get_current_weather"
    assert orjson.loads(tool_call.function.arguments) == {"location": "Boston, MA"}
    assert completion.usage is not None
    assert completion.usage.total_tokens == 99


async def test_content_filtered_choice(provider: ProviderConfig) -> None:
    stub = Provider(body=fixture("chat_completion_content_filter.json"))

    error = await call_error(provider, stub)

    assert isinstance(error, ContentFiltered)
    assert "content_filter" in error.message


async def test_content_filter_with_partial_content_is_returned(provider: ProviderConfig) -> None:
    body = fixture("chat_completion_content_filter.json")
    body["choices"][0]["message"]["content"] = "Partial answer"

    completion = await call(provider, Provider(body=body))

    assert completion.choices[0].message.content == "Partial answer"


async def test_body_not_json(provider: ProviderConfig) -> None:
    error = await call_error(provider, Provider(content=b"<html>bad gateway</html>"))

    assert isinstance(error, ProviderProtocolError)
    assert "'openai-test'" in error.message
    assert "not JSON" in error.message


async def test_body_json_but_not_an_object(provider: ProviderConfig) -> None:
    error = await call_error(provider, Provider(body=[1, 2]))

    assert isinstance(error, ProviderProtocolError)
    assert "not an object" in error.message


async def test_missing_choices_names_the_field(provider: ProviderConfig) -> None:
    body = fixture("chat_completion.json")
    del body["choices"]

    error = await call_error(provider, Provider(body=body))

    assert isinstance(error, ProviderProtocolError)
    assert error.message == "provider 'openai-test': response field choices: Field required"


async def test_missing_nested_field_names_its_path(provider: ProviderConfig) -> None:
    body = fixture("chat_completion.json")
    del body["choices"][0]["message"]

    error = await call_error(provider, Provider(body=body))

    assert isinstance(error, ProviderProtocolError)
    assert "provider 'openai-test': response field choices.0.message: Field required" in (
        error.message
    )
    # The response's own text stays out of the message.
    assert "How can I assist" not in error.message


async def test_empty_choices(provider: ProviderConfig) -> None:
    body = {**fixture("chat_completion.json"), "choices": []}

    error = await call_error(provider, Provider(body=body))

    assert isinstance(error, ProviderProtocolError)
    assert "no choices" in error.message


async def test_missing_usage(provider: ProviderConfig) -> None:
    body = fixture("chat_completion.json")
    del body["usage"]

    error = await call_error(provider, Provider(body=body))

    assert isinstance(error, ProviderProtocolError)
    assert "no usage" in error.message


# --- error statuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected", "fragments"),
    [
        (
            400,
            fixture("error_400_context_length.json"),
            ProviderInvalidRequest,
            ["HTTP 400, code context_length_exceeded", "maximum context length is 128000"],
        ),
        (
            404,
            fixture("error_404_model_not_found.json"),
            ProviderInvalidRequest,
            ["HTTP 404, code model_not_found", "does not exist"],
        ),
        (409, {"error": {"message": "Conflict", "code": None}}, ProviderInvalidRequest, ["409"]),
        (413, {"error": "Request too large"}, ProviderInvalidRequest, ["Request too large"]),
        (422, {"message": "Unprocessable"}, ProviderInvalidRequest, ["422", "Unprocessable"]),
        (
            400,
            fixture("error_400_content_policy.json"),
            ContentFiltered,
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
            ContentFiltered,
            ["code content_filter"],
        ),
        (408, {"error": {"message": "Request timeout"}}, ProviderTimeout, ["HTTP 408"]),
        (
            500,
            fixture("error_500_server.json"),
            ProviderServerError,
            ["HTTP 500", "The server had an error"],
        ),
        (503, None, ProviderServerError, ["HTTP 503"]),
        (418, {"error": {"message": "teapot"}}, ProviderServerError, ["unexpected", "HTTP 418"]),
    ],
)
async def test_status_maps_to_error(
    provider: ProviderConfig,
    status: int,
    body: Any,
    expected: type[ProviderError],
    fragments: list[str],
) -> None:
    error = await call_error(provider, Provider(status, body))

    assert type(error) is expected
    assert error.message.startswith("provider 'openai-test'")
    for fragment in fragments:
        assert fragment in error.message


async def test_error_body_not_json_is_tolerated(provider: ProviderConfig) -> None:
    stub = Provider(502, content=b"<html><body>502 Bad Gateway</body></html>")

    error = await call_error(provider, stub)

    assert isinstance(error, ProviderServerError)
    assert error.message == "provider 'openai-test' failed (HTTP 502)"


@pytest.mark.parametrize(
    ("status", "fixture_name"),
    [(401, "error_401_invalid_api_key.json"), (403, "error_403_unsupported_region.json")],
)
async def test_auth_error_never_repeats_the_provider_text(
    provider: ProviderConfig, status: int, fixture_name: str
) -> None:
    body = fixture(fixture_name)

    error = await call_error(provider, Provider(status, body))

    assert isinstance(error, ProviderAuthentication)
    assert error.message.startswith(
        f"provider 'openai-test' refused our credentials (HTTP {status}"
    )
    assert body["error"]["message"] not in error.message
    assert "sk-test" not in error.message


async def test_auth_error_with_the_whole_key_echoed(provider: ProviderConfig) -> None:
    body = {"error": {"message": f"Bad key {KEY}", "type": "auth", "param": None, "code": KEY}}

    error = await call_error(provider, Provider(401, body))

    assert isinstance(error, ProviderAuthentication)
    assert error.message == "provider 'openai-test' refused our credentials (HTTP 401)"


async def test_key_in_a_provider_message_is_redacted(provider: ProviderConfig) -> None:
    body = {"error": {"message": f"invalid header value Bearer {KEY}", "code": "bad_header"}}

    error = await call_error(provider, Provider(400, body))

    assert isinstance(error, ProviderInvalidRequest)
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
    stub = Provider(429, fixture("error_429_rate_limit.json"), headers=headers)

    error = await call_error(provider, stub)

    assert isinstance(error, RateLimited)
    assert error.retry_after == expected
    assert "code rate_limit_exceeded" in error.message
    assert "Please try again in 20s" in error.message
    assert error.to_job_error().retry_after == expected


async def test_rate_limited_with_an_http_date(provider: ProviderConfig) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    stub = Provider(
        429,
        fixture("error_429_rate_limit.json"),
        headers={"retry-after": format_datetime(when, usegmt=True)},
    )

    error = await call_error(provider, stub)

    assert isinstance(error, RateLimited)
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
    error = await call_error(provider, Provider(raises=exc))

    assert isinstance(error, ProviderTimeout)
    assert type(exc).__name__ in error.message


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("connection refused"), httpx.RemoteProtocolError("peer closed")],
)
async def test_connection_failure(provider: ProviderConfig, exc: Exception) -> None:
    error = await call_error(provider, Provider(raises=exc))

    assert isinstance(error, ProviderServerError)
    assert error.message == (f"provider 'openai-test': connection failed: {type(exc).__name__}")


async def test_no_other_exception_escapes(provider: ProviderConfig) -> None:
    error = await call_error(provider, Provider(raises=RuntimeError(f"boom {KEY}")))

    assert isinstance(error, ProviderProtocolError)
    assert "RuntimeError" in error.message
    assert "boom" not in error.message


# --- the HTTP client seam ------------------------------------------------------------------


async def test_make_http_client() -> None:
    provider = make_provider(concurrency=32, timeout_s=5.0)

    async with make_http_client(provider) as http:
        assert http.timeout == httpx.Timeout(5.0, connect=5.0)
        assert http.base_url == httpx.URL("")

    async with make_http_client(make_provider(timeout_s=120.0)) as http:
        assert http.timeout == httpx.Timeout(120.0, connect=10.0)
