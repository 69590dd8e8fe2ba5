"""One conformance suite every adapter passes against the mock provider over real HTTP.

The mock speaks each provider's documented wire format and answers the same canonical
conversation with the same text and token counts in every format, so each case states one
expectation (computed by ``mock_provider.answers``) and checks it for all adapter types.
Adding a provider: one entry in ``ADAPTERS``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import pytest

from broker.core.config import ProviderConfig
from broker.core.errors import (
    ContentFiltered,
    ProviderAuthentication,
    ProviderProtocolError,
    ProviderServerError,
    ProviderTimeout,
    RateLimited,
)
from mock_provider import expected_completion, expected_tool_call, prompt_tokens
from schemas import ChatCompletion, ChatMessage, CompletionParams
from tests.conftest import MockProvider
from workers.adapters import ProviderAdapter, ProviderRequest, adapter_for
from workers.http import make_http_client
from workers.streaming import ChunkAccumulator

# type → the path its base_url adds to the mock's root (the API version, as the real base URLs)
ADAPTERS = {
    "openai": "/v1",
    "openai_compatible": "/v1",
    "anthropic": "/v1",
    "gemini": "/v1beta",
}
MODEL = "conformance-model"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(params=["aiohttp", "httpx"])
def transport(request: pytest.FixtureRequest) -> Literal["aiohttp", "httpx"]:
    """Every case runs on both HTTP transports (``workers/http.py``)."""
    return cast(Literal["aiohttp", "httpx"], request.param)


@pytest.fixture(params=list(ADAPTERS))
async def adapter(
    request: pytest.FixtureRequest, mock: MockProvider, transport: Literal["aiohttp", "httpx"]
) -> AsyncIterator[ProviderAdapter]:
    provider = ProviderConfig.model_validate(
        {
            "id": f"conf-{request.param}",
            "type": request.param,
            "base_url": mock.base_url + ADAPTERS[request.param],
            "timeout_s": 1.0,
            "models": {MODEL: {"input": 1, "output": 2, "max_tokens": 512}},
        }
    )
    http = make_http_client(provider, transport)
    try:
        yield adapter_for(provider, http)
    finally:
        await http.aclose()


def call(messages: list[dict[str, Any]], **params: Any) -> ProviderRequest:
    return ProviderRequest(
        model=MODEL,
        messages=[ChatMessage.model_validate(m) for m in messages],
        params=CompletionParams.model_validate(params),
    )


def text_of(completion: ChatCompletion) -> str | None:
    content = completion.choices[0].message.content
    assert content is None or isinstance(content, str)
    return content


PLAIN = [{"role": "user", "content": "What is the capital of France?"}]
WITH_SYSTEM = [
    {"role": "system", "content": "You are a geography teacher. Answer briefly."},
    {"role": "user", "content": "What is the capital of Peru?"},
]
MULTI_TURN = [
    {"role": "system", "content": "Be concise."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And one larger than a hundred?"},
]


@pytest.mark.parametrize(
    "messages", [PLAIN, WITH_SYSTEM, MULTI_TURN], ids=["plain", "system", "multi-turn"]
)
async def test_answer_text_finish_and_usage(
    adapter: ProviderAdapter, messages: list[dict[str, Any]]
) -> None:
    completion = await adapter.complete(call(messages))
    text, finish = expected_completion(messages)
    assert text_of(completion) == text
    assert completion.choices[0].finish_reason == finish == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens(messages)
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_max_tokens_cuts_the_answer_with_finish_length(adapter: ProviderAdapter) -> None:
    completion = await adapter.complete(call(PLAIN, max_tokens=3))
    text, finish = expected_completion(PLAIN, max_tokens=3)
    assert finish == "length"
    assert (text_of(completion), completion.choices[0].finish_reason) == (text, finish)
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_a_stop_sequence_cuts_the_answer(adapter: ProviderAdapter) -> None:
    full, _ = expected_completion(PLAIN)
    stop = full.split()[3]  # a word inside the answer
    completion = await adapter.complete(call(PLAIN, stop=[stop]))
    text, finish = expected_completion(PLAIN, stop=[stop])
    assert text == full[: full.index(stop)]
    assert (text_of(completion), completion.choices[0].finish_reason) == (text, finish)


async def test_json_mode_answers_a_json_object(adapter: ProviderAdapter) -> None:
    response_format = {"type": "json_object"}
    if isinstance(adapter, _anthropic()):
        # Anthropic has no schema-less JSON mode; the adapter sends a {"type": "object"} schema.
        expected, _ = expected_completion(
            PLAIN,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "o", "schema": {"type": "object"}},
            },
        )
    else:
        expected, _ = expected_completion(PLAIN, response_format=response_format)
    completion = await adapter.complete(call(PLAIN, response_format=response_format))
    content = text_of(completion)
    assert content == expected
    assert isinstance(json.loads(content or ""), dict)


async def test_a_json_schema_shapes_the_answer(adapter: ProviderAdapter) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {
            "name": "capital",
            "schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                "required": ["city", "country"],
            },
        },
    }
    completion = await adapter.complete(call(PLAIN, response_format=response_format))
    expected, _ = expected_completion(PLAIN, response_format=response_format)
    assert text_of(completion) == expected
    assert set(json.loads(expected)) == {"city", "country"}


async def test_a_tool_call_round_trip(adapter: ProviderAdapter) -> None:
    ask = [{"role": "user", "content": "What's the weather in Lima?"}]
    first = await adapter.complete(call(ask, tools=TOOLS))
    expected_call = expected_tool_call(ask, TOOLS)
    assert expected_call is not None
    assert first.choices[0].finish_reason == "tool_calls"
    [tool_call] = first.choices[0].message.tool_calls or []
    assert tool_call.function.name == expected_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call.function.arguments) == json.loads(
        expected_call["function"]["arguments"]
    )
    conversation = [
        *ask,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [tool_call.model_dump(exclude_none=True)],
        },
        {"role": "tool", "tool_call_id": tool_call.id, "content": '{"temp_c": 19, "sky": "grey"}'},
    ]
    second = await adapter.complete(call(conversation, tools=TOOLS))
    text, finish = expected_completion(conversation)
    assert (text_of(second), second.choices[0].finish_reason) == (text, finish)
    assert second.usage is not None
    assert second.usage.prompt_tokens == prompt_tokens(conversation)


async def test_streaming_yields_the_same_answer_in_order_with_usage(
    adapter: ProviderAdapter,
) -> None:
    non_streamed = await adapter.complete(call(WITH_SYSTEM))
    accumulator = ChunkAccumulator(adapter.provider.id)
    pieces = []
    async for chunk in adapter.stream(call(WITH_SYSTEM, stream=True)):
        accumulator.add(chunk)
        pieces.extend(c.delta.content for c in chunk.choices if c.delta.content)
    assert len(pieces) >= 2  # it really streamed
    streamed = accumulator.result()
    assert "".join(pieces) == text_of(non_streamed)
    assert text_of(streamed) == text_of(non_streamed)
    assert streamed.choices[0].finish_reason == non_streamed.choices[0].finish_reason
    assert streamed.usage is not None and non_streamed.usage is not None
    assert streamed.usage.prompt_tokens == non_streamed.usage.prompt_tokens
    assert streamed.usage.completion_tokens == non_streamed.usage.completion_tokens


async def test_a_streamed_tool_call_accumulates_to_the_same_call(adapter: ProviderAdapter) -> None:
    ask = [{"role": "user", "content": "What's the weather in Quito?"}]
    accumulator = ChunkAccumulator(adapter.provider.id)
    async for chunk in adapter.stream(call(ask, tools=TOOLS, stream=True)):
        accumulator.add(chunk)
    [tool_call] = accumulator.result().choices[0].message.tool_calls or []
    expected_call = expected_tool_call(ask, TOOLS)
    assert expected_call is not None
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == json.loads(
        expected_call["function"]["arguments"]
    )


async def test_429_is_rate_limited_with_retry_after(
    adapter: ProviderAdapter, mock: MockProvider
) -> None:
    mock.configure(retry_after_s=7, fail_next={"kind": "rate_limit", "count": 1})
    with pytest.raises(RateLimited) as caught:
        await adapter.complete(call(PLAIN))
    assert caught.value.retry_after == pytest.approx(7, abs=0.5)
    assert caught.value.provider == adapter.provider.id


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("server_error", ProviderServerError),
        ("timeout", ProviderTimeout),
        ("malformed", ProviderProtocolError),
        ("auth", ProviderAuthentication),
    ],
)
async def test_faults_map_to_typed_errors(
    adapter: ProviderAdapter, mock: MockProvider, fault: str, error: type[Exception]
) -> None:
    mock.configure(fail_next={"kind": fault, "count": 1})
    with pytest.raises(error) as caught:
        await adapter.complete(call(PLAIN))
    assert getattr(caught.value, "provider", None) == adapter.provider.id


@pytest.mark.parametrize("key", ["sk-conformance", "sk-wrong"])
async def test_the_key_goes_in_the_providers_header(
    mock: MockProvider,
    transport: Literal["aiohttp", "httpx"],
    monkeypatch: pytest.MonkeyPatch,
    key: str,
) -> None:
    mock.configure(api_key="sk-conformance")
    monkeypatch.setenv("CONFORMANCE_KEY", key)
    for kind, path in ADAPTERS.items():
        provider = ProviderConfig.model_validate(
            {
                "id": f"conf-{kind}",
                "type": kind,
                "base_url": mock.base_url + path,
                "api_key_env": "CONFORMANCE_KEY",
                "models": {MODEL: {"input": 1, "output": 2}},
            }
        )
        async with make_http_client(provider, transport) as http:
            adapter = adapter_for(provider, http)
            if key == "sk-conformance":
                answer = await adapter.complete(call(PLAIN))
                assert text_of(answer) == expected_completion(PLAIN)[0]
            else:
                with pytest.raises(ProviderAuthentication):
                    await adapter.complete(call(PLAIN))


@pytest.mark.parametrize("server", ["refuses", "hangs_up"])
async def test_a_connection_that_fails_is_a_server_error_on_either_transport(
    transport: Literal["aiohttp", "httpx"], server: str
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the request has begun; answer nothing
        writer.close()

    listening = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    if server == "refuses":
        listening.close()
        await listening.wait_closed()
    provider = ProviderConfig.model_validate(
        {
            "id": "conf-down",
            "type": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "timeout_s": 2.0,
            "models": {MODEL: {"input": 1, "output": 2}},
        }
    )
    http = make_http_client(provider, transport)
    try:
        with pytest.raises(ProviderServerError) as caught:
            await adapter_for(provider, http).complete(call(PLAIN))
    finally:
        await http.aclose()
        listening.close()
    assert caught.value.retryable
    assert caught.value.message.startswith("provider 'conf-down': connection failed: ")


async def test_a_stream_that_breaks_is_a_retryable_error(
    adapter: ProviderAdapter, mock: MockProvider
) -> None:
    mock.configure(fail_next={"kind": "stream_error", "count": 1})
    with pytest.raises(ProviderServerError):
        async for _ in adapter.stream(call(PLAIN, stream=True)):
            pass


async def test_a_safety_refusal_is_content_filtered(adapter: ProviderAdapter) -> None:
    with pytest.raises(ContentFiltered):
        await adapter.complete(call([{"role": "user", "content": "[[mock:safety]] do it"}]))


def _anthropic() -> type[ProviderAdapter]:
    from workers.adapters.anthropic import AnthropicAdapter

    return AnthropicAdapter
