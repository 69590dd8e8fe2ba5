"""AnthropicAdapter against a stand-in provider (``httpx.MockTransport``) serving the bodies
Anthropic documents."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest

from broker.core import errors
from broker.core.config import ProviderConfig
from tests.adapter_cases import AdapterCase, assistant, folded, images, json_format
from tests.provider_stub import Provider
from workers.adapters import adapter_for
from workers.adapters.anthropic import AnthropicAdapter
from workers.adapters.base import ProviderRequest

KEY = "sk-ant-test-abc123supersecret"
URL = "https://api.example.test/v1/messages"
MODEL = "claude-opus-4-6"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "The city and state, e.g. San Francisco, CA",
                }
            },
            "required": ["location"],
        },
    },
}
MODELS = {
    MODEL: {"input": "5", "output": "25"},
    "claude-haiku-4-5": {"input": "1", "output": "5", "max_tokens": 2048},
}
api = AdapterCase("anthropic", AnthropicAdapter, KEY, MODEL, "message.json", {"models": MODELS})
provider = api.provider_fixture()


def events(*pairs: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in pairs)


# --- the request ---------------------------------------------------------------------------


async def test_sends_the_documented_request(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("message.json"))

    await api.call(
        provider, stub, api.request({"role": "user", "content": "Hello, world"}, max_tokens=1024)
    )

    [sent] = stub.requests
    assert sent.method == "POST"
    assert str(sent.url) == URL
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers
    assert stub.body() == api.fixture("messages_request.json")


async def test_configured_headers_and_version_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(api.key_env, raising=False)
    provider = api.make_provider(
        base_url="https://api.example.test/v1/",
        headers={"Anthropic-Version": "2024-01-01", "anthropic-beta": "some-beta"},
    )
    stub = Provider(body=api.fixture("message.json"))

    await api.call(provider, stub)

    [sent] = stub.requests
    assert str(sent.url) == URL
    assert sent.headers.get_list("anthropic-version") == ["2024-01-01"]
    assert sent.headers["anthropic-beta"] == "some-beta"
    assert "x-api-key" not in sent.headers


@pytest.mark.parametrize(
    ("model", "params", "expected"),
    [
        (MODEL, {"max_tokens": 300}, 300),
        (MODEL, {"max_completion_tokens": 200}, 200),
        (MODEL, {}, 4096),
        ("claude-haiku-4-5", {}, 2048),  # the ModelSpec's default
        ("claude-haiku-4-5", {"max_tokens": 10}, 10),
    ],
)
async def test_max_tokens(
    provider: ProviderConfig, model: str, params: dict[str, Any], expected: int
) -> None:
    body = await api.sent_body(
        provider, api.request({"role": "user", "content": "hi"}, model=model, **params)
    )

    assert body["max_tokens"] == expected
    assert "max_completion_tokens" not in body


@pytest.mark.parametrize(
    ("model", "params", "expected"),
    [
        (MODEL, {}, 40),  # the scheduler's reserved cap, not the 4096 default
        ("claude-haiku-4-5", {}, 40),  # nor the model's
        ("claude-haiku-4-5", {"max_tokens": 10}, 10),  # the job's own wins
        (MODEL, {"max_completion_tokens": 200}, 200),
    ],
)
async def test_max_tokens_is_the_cap_reserved_for_a_job_without_its_own(
    provider: ProviderConfig, model: str, params: dict[str, Any], expected: int
) -> None:
    asked = api.request({"role": "user", "content": "hi"}, model=model, **params)
    request = ProviderRequest(asked.model, asked.messages, asked.params, output_cap=40)

    body = await api.sent_body(provider, request)

    assert body["max_tokens"] == expected


async def test_system_and_developer_messages_become_the_system_prompt(
    provider: ProviderConfig,
) -> None:
    body = await api.sent_body(
        provider,
        api.request(
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hello"},
        ),
    )

    assert body["system"] == "You are terse.\n\nAnswer in French."
    assert body["messages"] == [{"role": "user", "content": "Hello"}]


async def test_sampling_params_and_stop(provider: ProviderConfig) -> None:
    sampling = {"temperature": 0.5, "top_p": 0.9, "stop": "\n\nHuman:", "top_k": 40}
    at_openai_defaults = {"n": 1, "frequency_penalty": 0, "logprobs": False}

    body = await api.sent_body(
        provider, api.simple_request(**sampling, **at_openai_defaults, user="end-user-7")
    )

    assert body["temperature"] == 0.5
    assert body["top_p"] == 0.9
    assert body["stop_sequences"] == ["\n\nHuman:"]
    assert body["top_k"] == 40
    assert body["metadata"] == {"user_id": "end-user-7"}
    for absent in ("n", "frequency_penalty", "logprobs", "stop", "stream", "user"):
        assert absent not in body


async def test_openai_only_parameters_are_refused_by_name(provider: ProviderConfig) -> None:
    asked = {"seed": 7, "frequency_penalty": 0.5, "logprobs": True}
    error = await api.refuses(provider, api.simple_request(**asked))
    assert "frequency_penalty, logprobs, seed" in error.message


async def test_stop_list(provider: ProviderConfig) -> None:
    body = await api.sent_body(provider, api.simple_request(stop=["END", "STOP"]))

    assert body["stop_sequences"] == ["END", "STOP"]


async def test_more_than_one_choice_is_refused(provider: ProviderConfig) -> None:
    await api.refuses(provider, api.simple_request(n=2))


async def test_sends_the_documented_tools_request(provider: ProviderConfig) -> None:
    documented = api.fixture("tools_request.json")
    stub = Provider(body=api.fixture("message_tool_use.json"))
    question = {"role": "user", "content": "What is the weather like in San Francisco?"}

    await api.call(
        provider,
        stub,
        api.request(question, max_tokens=1024, tools=[WEATHER_TOOL], tool_choice="required"),
    )

    assert stub.body() == documented


async def test_tool_without_parameters_gets_an_empty_input_schema(
    provider: ProviderConfig,
) -> None:
    tool = {"type": "function", "function": {"name": "now", "strict": True}}

    body = await api.sent_body(provider, api.simple_request(tools=[tool]))

    assert body["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}, "strict": True}
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, None, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
    ],
)
async def test_tool_choice(
    provider: ProviderConfig, choice: Any, parallel: bool | None, expected: Any
) -> None:
    params: dict[str, Any] = {"tools": [WEATHER_TOOL], "tool_choice": choice}
    if parallel is not None:
        params["parallel_tool_calls"] = parallel

    body = await api.sent_body(provider, api.simple_request(**params))

    assert body.get("tool_choice") == expected
    assert "parallel_tool_calls" not in body


@pytest.mark.parametrize(
    "tools",
    [
        [{"type": "custom", "custom": {"name": "x"}}],
        [{"type": "function", "function": {"description": "no name"}}],
    ],
)
async def test_tools_that_are_not_functions_are_refused(
    provider: ProviderConfig, tools: list[dict[str, Any]]
) -> None:
    await api.refuses(provider, api.simple_request(tools=tools))


async def test_tool_calls_and_results_translate(provider: ProviderConfig) -> None:
    body = await api.sent_body(
        provider,
        api.request(
            {"role": "user", "content": "Weather in Paris and Rome?"},
            assistant(
                "Checking both.",
                ("toolu_1", "get_weather", '{"location": "Paris"}'),
                ("toolu_2", "get_weather", '{"location": "Rome"}'),
            ),
            {"role": "tool", "tool_call_id": "toolu_1", "content": "15 degrees"},
            {
                "role": "tool",
                "tool_call_id": "toolu_2",
                "content": [{"type": "text", "text": "22 degrees"}],
            },
            {"role": "user", "content": "Which is warmer?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "Thanks"},
        ),
    )

    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking both."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"location": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 degrees"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "22 degrees"},
                {"type": "text", "text": "Which is warmer?"},
            ],
        },
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Thanks"},
    ]


async def test_assistant_tool_call_without_text(provider: ProviderConfig) -> None:
    turn = assistant(None, ("toolu_1", "now", ""))

    body = await api.sent_body(provider, api.request({"role": "user", "content": "time?"}, turn))

    assert body["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}],
    }


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
async def test_tool_call_arguments_that_are_not_an_object(
    provider: ProviderConfig, arguments: str
) -> None:
    turn = assistant(None, ("t", "f", arguments))

    error = await api.refuses(provider, api.request({"role": "user", "content": "x"}, turn))

    assert "message 1" in error.message
    assert "not a JSON object" in error.message


async def test_images(provider: ProviderConfig) -> None:
    turn = images(
        "What is in these images?",
        "data:image/png;base64,iVBORw0KGgo=",
        {"url": "https://example.test/ant.jpg", "detail": "high"},
    )

    body = await api.sent_body(provider, api.request(turn))

    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is in these images?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.test/ant.jpg"}},
    ]


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAA=", "format": "wav"}},
        {"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}},
        {"type": "image_url", "image_url": {"url": "ftp://example.test/a.png"}},
        {"type": "image_url", "image_url": {}},
    ],
)
async def test_content_parts_it_cannot_send(provider: ProviderConfig, part: dict[str, Any]) -> None:
    error = await api.refuses(provider, api.request({"role": "user", "content": [part]}))

    assert "message 0" in error.message


async def test_tool_message_without_tool_call_id(provider: ProviderConfig) -> None:
    await api.refuses(
        provider, api.request({"role": "user", "content": "x"}, {"role": "tool", "content": "y"})
    )


async def test_json_schema_response_format(provider: ProviderConfig) -> None:
    response_format = json_format("person", "name")
    schema = response_format["json_schema"]["schema"]

    body = await api.sent_body(provider, api.simple_request(response_format=response_format))

    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert "response_format" not in body


async def test_json_object_response_format(provider: ProviderConfig) -> None:
    body = await api.sent_body(
        provider, api.simple_request(response_format={"type": "json_object"})
    )

    assert body["output_config"] == {
        "format": {"type": "json_schema", "schema": {"type": "object"}}
    }


async def test_text_response_format_sends_nothing(provider: ProviderConfig) -> None:
    body = await api.sent_body(provider, api.simple_request(response_format={"type": "text"}))

    assert "output_config" not in body


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "grammar"}],
)
async def test_response_formats_it_cannot_send(
    provider: ProviderConfig, response_format: dict[str, Any]
) -> None:
    await api.refuses(provider, api.simple_request(response_format=response_format))


# --- the response --------------------------------------------------------------------------


async def test_parses_the_documented_response(provider: ProviderConfig) -> None:
    completion = await api.call(provider, Provider(body=api.fixture("message.json")))

    assert completion.id == "msg_013Zva2CMHLNnXjNJJKqJ2EF"
    assert completion.object == "chat.completion"
    assert completion.model == "claude-3-7-sonnet-20250219"
    assert completion.created > 0
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hi! My name is Claude."
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2095
    assert completion.usage.completion_tokens == 503
    assert completion.usage.total_tokens == 2598


async def test_parses_the_documented_tool_use_response(provider: ProviderConfig) -> None:
    completion = await api.call(provider, Provider(body=api.fixture("message_tool_use.json")))

    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I'll check the current weather in San Francisco for you."
    assert choice.message.tool_calls is not None
    [tool_call] = choice.message.tool_calls
    assert tool_call.id == "toolu_01A09q90qw90lq917835lq9"
    assert tool_call.type == "function"
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {
        "location": "San Francisco, CA",
        "unit": "celsius",
    }


async def test_tool_use_only_has_no_content(provider: ProviderConfig) -> None:
    body = api.fixture("message_tool_use.json")
    body["content"] = body["content"][1:]

    completion = await api.call(provider, Provider(body=body))

    assert completion.choices[0].message.content is None
    assert completion.choices[0].message.tool_calls is not None


async def test_text_blocks_are_joined_and_thinking_is_left_out(provider: ProviderConfig) -> None:
    body = api.fixture("message.json")
    body["content"] = [
        {"type": "thinking", "thinking": "Let me think", "signature": "abc"},
        {"type": "text", "text": "Hi! "},
        {"type": "text", "text": "My name is Claude."},
    ]

    completion = await api.call(provider, Provider(body=body))

    assert completion.choices[0].message.content == "Hi! My name is Claude."


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("some_future_reason", "some_future_reason"),
    ],
)
async def test_stop_reasons(provider: ProviderConfig, stop_reason: str, finish_reason: str) -> None:
    body = {**api.fixture("message.json"), "stop_reason": stop_reason}

    completion = await api.call(provider, Provider(body=body))

    assert completion.choices[0].finish_reason == finish_reason


async def test_refusal_without_content(provider: ProviderConfig) -> None:
    body = {**api.fixture("message.json"), "stop_reason": "refusal", "content": []}

    error = await api.fails(provider, Provider(body=body), errors.ContentFiltered)

    assert "stop_reason refusal" in error.message


async def test_refusal_after_partial_content_is_returned(provider: ProviderConfig) -> None:
    body = {**api.fixture("message.json"), "stop_reason": "refusal"}

    completion = await api.call(provider, Provider(body=body))

    assert completion.choices[0].message.content == "Hi! My name is Claude."
    assert completion.choices[0].finish_reason == "content_filter"


async def test_cache_tokens_count_as_prompt_tokens(provider: ProviderConfig) -> None:
    body = api.fixture("message.json")
    body["usage"] = {
        "input_tokens": 50,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 2000,
        "output_tokens": 503,
    }

    completion = await api.call(provider, Provider(body=body))

    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3050, 503, 3553)
    assert usage.model_extra == {
        "prompt_tokens_details": {"cached_tokens": 2000, "cache_creation_tokens": 1000}
    }


test_wrong_shapes_name_the_field = api.wrong_shape_test(
    [
        (lambda b: b.pop("usage"), "response field usage: Field required"),
        (lambda b: b.pop("content"), "response field content: Field required"),
        (lambda b: b["usage"].pop("output_tokens"), "response field usage.output_tokens"),
        (lambda b: b["content"][0].pop("text"), "response field content.0.text: missing"),
        (
            lambda b: b["content"].append({"type": "tool_use", "id": "t", "name": "f"}),
            "response field content.1: a tool_use block needs id, name and an input object",
        ),
    ],
    text="My name is Claude",
)


async def test_body_not_json(provider: ProviderConfig) -> None:
    error = await api.fails(
        provider, Provider(content=b"<html>oops</html>"), errors.ProviderProtocolError
    )

    assert "not JSON" in error.message


# --- error statuses ------------------------------------------------------------------------


test_status_maps_to_error = api.status_test(
    [
        (
            400,
            "error_400_invalid_request.json",
            errors.ProviderInvalidRequest,
            ["HTTP 400, invalid_request_error", "roles must alternate"],
        ),
        (404, "error_404_not_found.json", errors.ProviderInvalidRequest, ["not_found_error"]),
        (
            413,
            "error_413_request_too_large.json",
            errors.ProviderInvalidRequest,
            ["request_too_large"],
        ),
        (500, "error_500_api_error.json", errors.ProviderServerError, ["HTTP 500, api_error"]),
        (
            529,
            "error_529_overloaded.json",
            errors.ProviderServerError,
            ["HTTP 529, overloaded_error"],
        ),
        (504, "error_504_timeout.json", errors.ProviderTimeout, ["HTTP 504, timeout_error"]),
    ]
)


@pytest.mark.parametrize(
    ("status", "fixture_name"),
    [
        (401, "error_401_authentication.json"),
        (402, "error_402_billing.json"),
        (403, "error_403_permission.json"),
    ],
)
async def test_auth_errors_never_repeat_the_provider_text(
    provider: ProviderConfig, status: int, fixture_name: str
) -> None:
    body = api.fixture(fixture_name)

    error = await api.fails(provider, Provider(status, body), errors.ProviderAuthentication)

    kind = body["error"]["type"]
    assert error.message == (
        f"provider 'anthropic-test' refused our credentials (HTTP {status}, {kind})"
    )


@pytest.mark.parametrize(("headers", "expected"), [({"retry-after": "17"}, 17.0), ({}, None)])
async def test_rate_limited(
    provider: ProviderConfig, headers: dict[str, str], expected: float | None
) -> None:
    error = await api.fails(
        provider,
        Provider(429, api.fixture("error_429_rate_limit.json"), headers=headers),
        errors.RateLimited,
    )

    assert error.retry_after == expected
    assert "rate_limit_error" in error.message


async def test_unexpected_status_and_body(provider: ProviderConfig) -> None:
    error = await api.fails(provider, Provider(418, content=b"teapot"), errors.ProviderServerError)

    assert error.message == "provider 'anthropic-test' answered with unexpected status (HTTP 418)"


async def test_key_in_a_provider_message_is_redacted(provider: ProviderConfig) -> None:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": f"bad {KEY}"}}

    error = await api.call_error(provider, Provider(400, body))

    assert "bad [redacted]" in error.message


async def test_transport_failures(provider: ProviderConfig) -> None:
    await api.fails(provider, Provider(raises=httpx.ReadTimeout("slow")), errors.ProviderTimeout)
    refused = Provider(raises=httpx.ConnectError("refused"))
    refused_error = await api.fails(provider, refused, errors.ProviderServerError)
    bug = await api.fails(provider, Provider(raises=KeyError(KEY)), errors.ProviderProtocolError)

    assert refused_error.message == "provider 'anthropic-test': connection failed: ConnectError"
    assert "KeyError" in bug.message


# --- streaming -----------------------------------------------------------------------------


async def test_stream_sends_the_same_request_with_stream(provider: ProviderConfig) -> None:
    stub = api.streaming(api.sse("stream_basic.txt"))

    await api.collect(
        provider, stub, api.request({"role": "user", "content": "Hello"}, max_tokens=256)
    )

    [sent] = stub.requests
    assert str(sent.url) == URL
    assert sent.headers["x-api-key"] == KEY
    assert orjson.loads(sent.content) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 256,
        "stream": True,
    }


async def test_documented_basic_stream(provider: ProviderConfig) -> None:
    chunks = await api.collect(provider, api.streaming(api.sse("stream_basic.txt")))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["Hello", "!"]
    assert chunks[3].choices[0].finish_reason == "stop"
    assert chunks[4].choices == []
    assert chunks[4].usage is not None
    assert len(chunks) == 5
    assert {c.id for c in chunks} == {"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"}
    message = {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 25, "output_tokens": 15},
    }
    await api.folds_like(provider, chunks, message)


async def test_documented_tool_use_stream(provider: ProviderConfig) -> None:
    chunks = await api.collect(provider, api.streaming(api.sse("stream_tool_use.txt")))

    starts = [
        c
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls and c.choices[0].delta.tool_calls[0].id
    ]
    [start] = starts
    [delta] = start.choices[0].delta.tool_calls or []
    assert (delta.index, delta.id, delta.type) == (0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "function")
    assert delta.function is not None and delta.function.name == "get_weather"
    message = {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [
            {"type": "text", "text": "Okay, let's check the weather for San Francisco, CA:"},
            {
                "type": "tool_use",
                "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                "name": "get_weather",
                "input": {"location": "San Francisco, CA", "unit": "fahrenheit"},
            },
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 472, "output_tokens": 89},
    }
    streamed = await api.folds_like(provider, chunks, message)
    assert streamed.choices[0].finish_reason == "tool_calls"


async def test_stream_tool_without_arguments_folds_to_an_empty_object(
    provider: ProviderConfig,
) -> None:
    start = api.fixture("message.json") | {"content": [], "stop_reason": None}
    body = events(
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_9", "name": "now", "input": {}},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 5},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    )
    complete = api.fixture("message.json") | {
        "content": [{"type": "tool_use", "id": "toolu_9", "name": "now", "input": {}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 2095, "output_tokens": 5},
    }

    chunks = await api.collect(provider, api.streaming(body))

    await api.folds_like(provider, chunks, complete)


async def test_stream_usage_includes_cache_tokens(provider: ProviderConfig) -> None:
    body = api.sse("stream_basic.txt").replace(
        b'"usage": {"input_tokens": 25, "output_tokens": 1}',
        b'"usage": {"input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 1}',
    )

    chunks = await api.collect(provider, api.streaming(body))

    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (125, 15)


async def test_stream_error_event(provider: ProviderConfig) -> None:
    error, chunks = await api.stream_fails(
        provider, api.streaming(api.sse("stream_error.txt")), errors.ProviderServerError
    )

    assert (
        error.message
        == "provider 'anthropic-test' failed (error event, overloaded_error): Overloaded"
    )
    assert [c.choices[0].delta.content for c in chunks] == ["", "Hello"]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("rate_limit_error", errors.RateLimited),
        ("invalid_request_error", errors.ProviderInvalidRequest),
        ("authentication_error", errors.ProviderAuthentication),
        ("timeout_error", errors.ProviderTimeout),
        ("api_error", errors.ProviderServerError),
        ("some_new_error", errors.ProviderServerError),
    ],
)
async def test_stream_error_event_types(
    provider: ProviderConfig, kind: str, expected: type[errors.ProviderError]
) -> None:
    body = events(("error", {"type": "error", "error": {"type": kind, "message": "m"}}))

    error, _ = await api.collect_error(provider, api.streaming(body))

    assert type(error) is expected


async def test_stream_that_ends_early(provider: ProviderConfig) -> None:
    body = api.sse("stream_basic.txt").split(b"event: message_delta")[0]

    chunks = await api.ends_early(provider, body)

    assert len(chunks) == 3


async def test_stream_refusal_without_content(provider: ProviderConfig) -> None:
    body = events(
        (
            "message_start",
            {"type": "message_start", "message": api.fixture("message.json") | {"content": []}},
        ),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "refusal"},
                "usage": {"output_tokens": 1},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    )

    await api.stream_fails(provider, api.streaming(body), errors.ContentFiltered)


async def test_stream_event_before_message_start(provider: ProviderConfig) -> None:
    body = events(
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
    )

    error, _ = await api.stream_fails(provider, api.streaming(body), errors.ProviderProtocolError)

    assert "content_block_start came before message_start" in error.message


async def test_stream_event_of_the_wrong_shape(provider: ProviderConfig) -> None:
    body = api.sse("stream_basic.txt").replace(b'"index": 0, "delta"', b'"delta"')

    error, _ = await api.stream_fails(provider, api.streaming(body), errors.ProviderProtocolError)

    assert "stream event content_block_delta field index: Field required" in error.message


async def test_unknown_stream_events_are_ignored(provider: ProviderConfig) -> None:
    extra = b'event: future_event\ndata: {"type": "future_event", "x": 1}\n\n'
    body = api.sse("stream_basic.txt").replace(b"event: ping", extra + b"event: ping")

    chunks = await api.collect(provider, api.streaming(body))

    assert folded(provider, chunks).choices[0].message.content == "Hello!"


@pytest.mark.parametrize(
    ("status", "fixture_name", "expected"),
    [
        (429, "error_429_rate_limit.json", errors.RateLimited),
        (529, "error_529_overloaded.json", errors.ProviderServerError),
        (401, "error_401_authentication.json", errors.ProviderAuthentication),
    ],
)
async def test_stream_error_status(
    provider: ProviderConfig, status: int, fixture_name: str, expected: type[errors.ProviderError]
) -> None:
    stub = Provider(status, api.fixture(fixture_name), headers={"retry-after": "3"})

    error, chunks = await api.collect_error(provider, stub)

    assert type(error) is expected
    assert chunks == []
    if isinstance(error, errors.RateLimited):
        assert error.retry_after == 3.0


# --- the registry --------------------------------------------------------------------------


def test_the_registry_serves_anthropic(provider: ProviderConfig) -> None:
    assert isinstance(adapter_for(provider, httpx.AsyncClient()), AnthropicAdapter)
