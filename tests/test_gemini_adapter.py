"""GeminiAdapter against a stand-in provider (``httpx.MockTransport``) serving the bodies the
Gemini API documents."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest

from broker.core import errors
from broker.core.config import ProviderConfig
from tests.adapter_cases import AdapterCase, assistant, images, json_format, only_tool_call
from tests.provider_stub import Provider
from workers.adapters import adapter_for
from workers.adapters.base import ProviderRequest
from workers.adapters.gemini import GeminiAdapter

KEY = "AIzaSyTEST-abc123supersecret"
BASE = "https://generativelanguage.example.test/v1beta"
MODEL = "gemini-2.5-flash"
URL = f"{BASE}/models/{MODEL}:generateContent"
STREAM_URL = f"{BASE}/models/{MODEL}:streamGenerateContent?alt=sse"
MEETING_TOOL = {
    "type": "function",
    "function": {
        "name": "schedule_meeting",
        "description": "Schedules a meeting with specified attendees at a given time and date.",
        "parameters": {
            "type": "object",
            "properties": {
                "attendees": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "List of people attending the meeting.",
                },
                "date": {
                    "type": "string",
                    "description": "Date of the meeting (e.g., '2024-07-29')",
                },
                "time": {"type": "string", "description": "Time of the meeting (e.g., '15:00')"},
                "topic": {"type": "string", "description": "The subject or topic of the meeting."},
            },
            "required": ["attendees", "date", "time", "topic"],
        },
    },
}
MODELS = {
    MODEL: {"input": "0.30", "output": "2.50"},
    "gemini-2.5-pro": {"input": "1.25", "output": "10", "max_tokens": 8192},
}
CONFIG = {"base_url": BASE, "models": MODELS}
api = AdapterCase(
    "gemini", GeminiAdapter, KEY, MODEL, "generate_response.json", CONFIG, "text/event-stream"
)
provider = api.provider_fixture()


def data_events(*bodies: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(body) + b"\r\n\r\n" for body in bodies)


# --- the request ---------------------------------------------------------------------------


async def test_sends_the_documented_request(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("generate_response.json"))

    await api.call(
        provider,
        stub,
        api.request(
            {"role": "system", "content": "You are a cat. Your name is Neko."},
            {"role": "user", "content": "Hello there"},
        ),
    )

    [sent] = stub.requests
    assert sent.method == "POST"
    assert str(sent.url) == URL
    assert sent.headers["x-goog-api-key"] == KEY
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers
    assert stub.body() == api.fixture("generate_request.json")


async def test_no_key_header_without_a_key_and_configured_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(api.key_env, raising=False)
    stub = Provider(body=api.fixture("generate_response.json"))

    await api.call(
        api.make_provider(base_url=BASE + "/", headers={"x-goog-user-project": "p"}), stub
    )

    [sent] = stub.requests
    assert str(sent.url) == URL
    assert "x-goog-api-key" not in sent.headers
    assert sent.headers["x-goog-user-project"] == "p"


async def test_model_names_with_the_models_prefix(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("generate_response.json"))

    await api.call(
        provider, stub, api.request({"role": "user", "content": "x"}, model=f"models/{MODEL}")
    )

    assert str(stub.requests[0].url) == URL


async def test_generation_config(provider: ProviderConfig) -> None:
    sampling = {"max_tokens": 100, "temperature": 0.2, "top_p": 0.95, "stop": "END", "seed": 7}
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 0.25, "top_k": 40}

    body = await api.sent_body(
        provider, api.simple_request(**sampling, **penalties, logprobs=False)
    )

    assert body["generationConfig"] == {
        "maxOutputTokens": 100,
        "temperature": 0.2,
        "topP": 0.95,
        "stopSequences": ["END"],
        "seed": 7,
        "presencePenalty": 0.5,
        "frequencyPenalty": 0.25,
        "topK": 40,
    }
    assert set(body) == {"contents", "generationConfig"}


@pytest.mark.parametrize("asked", [{"logprobs": True}, {"user": "u-1"}, {"logit_bias": {"1": 2}}])
async def test_a_parameter_gemini_has_no_place_for_is_refused_by_name(
    provider: ProviderConfig, asked: dict[str, Any]
) -> None:
    error = await api.refuses(provider, api.simple_request(**asked))
    assert next(iter(asked)) in error.message and "refused rather than dropped" in error.message


@pytest.mark.parametrize(
    ("model", "params", "expected"),
    [
        (MODEL, {}, None),
        (MODEL, {"max_completion_tokens": 64}, 64),
        ("gemini-2.5-pro", {}, 8192),  # the ModelSpec's default
        ("gemini-2.5-pro", {"max_tokens": 5}, 5),
    ],
)
async def test_max_output_tokens(
    provider: ProviderConfig, model: str, params: dict[str, Any], expected: int | None
) -> None:
    body = await api.sent_body(
        provider, api.request({"role": "user", "content": "x"}, model=model, **params)
    )

    assert body.get("generationConfig", {}).get("maxOutputTokens") == expected


@pytest.mark.parametrize(
    ("model", "params", "expected"),
    [
        (MODEL, {}, 40),  # the scheduler's reserved cap where none was sent before
        ("gemini-2.5-pro", {}, 40),  # rather than the model's
        ("gemini-2.5-pro", {"max_tokens": 5}, 5),  # the job's own wins
        (MODEL, {"max_completion_tokens": 64}, 64),
    ],
)
async def test_max_output_tokens_is_the_cap_reserved_for_a_job_without_its_own(
    provider: ProviderConfig, model: str, params: dict[str, Any], expected: int
) -> None:
    asked = api.request({"role": "user", "content": "x"}, model=model, **params)
    request = ProviderRequest(asked.model, asked.messages, asked.params, output_cap=40)

    body = await api.sent_body(provider, request)

    assert body["generationConfig"]["maxOutputTokens"] == expected


async def test_json_object_mode(provider: ProviderConfig) -> None:
    body = await api.sent_body(
        provider, api.simple_request(response_format={"type": "json_object"})
    )

    assert body["generationConfig"] == {"responseMimeType": "application/json"}


async def test_json_schema_mode(provider: ProviderConfig) -> None:
    response_format = json_format("recipe", "recipe_name")
    schema = response_format["json_schema"]["schema"]

    body = await api.sent_body(provider, api.simple_request(response_format=response_format))

    assert body["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": schema,
    }


async def test_more_than_one_choice_is_refused(provider: ProviderConfig) -> None:
    await api.refuses(provider, api.simple_request(n=3))


async def test_sends_the_documented_function_calling_request(provider: ProviderConfig) -> None:
    stub = Provider(body=api.fixture("function_call_response.json"))
    prompt = (
        "Schedule a meeting with Bob and Alice for 03/27/2025 at 10:00 AM about the Q3 planning."
    )

    await api.call(
        provider, stub, api.request({"role": "user", "content": prompt}, tools=[MEETING_TOOL])
    )

    assert stub.body() == api.fixture("function_call_request.json")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "schedule_meeting"}},
            {"mode": "ANY", "allowedFunctionNames": ["schedule_meeting"]},
        ),
    ],
)
async def test_tool_choice(provider: ProviderConfig, choice: Any, expected: Any) -> None:
    body = await api.sent_body(
        provider, api.simple_request(tools=[MEETING_TOOL], tool_choice=choice)
    )

    assert body["toolConfig"] == {"functionCallingConfig": expected}


async def test_tool_choice_it_cannot_send(provider: ProviderConfig) -> None:
    request = api.simple_request(tools=[MEETING_TOOL], tool_choice={"type": "allowed_tools"})

    await api.refuses(provider, request)


async def test_function_calls_and_responses_translate(provider: ProviderConfig) -> None:
    calls = [
        ("call_0", "get_weather", '{"city": "Paris"}'),
        ("call_1", "get_time", '{"city": "Rome"}'),
    ]

    body = await api.sent_body(
        provider,
        api.request(
            {"role": "user", "content": "Weather in Paris and Rome?"},
            assistant("Checking.", *calls),
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 15}'},
            {"role": "tool", "tool_call_id": "call_1", "content": "10:00"},
            {"role": "user", "content": "Thanks"},
        ),
    )

    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
        {
            "role": "model",
            "parts": [
                {"text": "Checking."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_time", "args": {"city": "Rome"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 15}}},
                {"functionResponse": {"name": "get_time", "response": {"content": "10:00"}}},
            ],
        },
        {"role": "user", "parts": [{"text": "Thanks"}]},
    ]


async def test_tool_message_for_an_unknown_call(provider: ProviderConfig) -> None:
    messages = (
        {"role": "user", "content": "x"},
        {"role": "tool", "tool_call_id": "c9", "content": "y"},
    )

    error = await api.refuses(provider, api.request(*messages))

    assert "message 1" in error.message


async def test_invalid_tool_call_arguments(provider: ProviderConfig) -> None:
    turn = assistant(None, ("c", "f", "{x"))

    await api.refuses(provider, api.request({"role": "user", "content": "x"}, turn))


async def test_images(provider: ProviderConfig) -> None:
    body = await api.sent_body(
        provider,
        api.request(
            images(
                "Caption these.",
                "data:image/webp;base64,UklGRg==",
                "https://example.test/a/cat.png?x=1",
                "https://example.test/photo",
            )
        ),
    )

    assert body["contents"][0]["parts"] == [
        {"text": "Caption these."},
        {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
        {"fileData": {"mimeType": "image/png", "fileUri": "https://example.test/a/cat.png?x=1"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.test/photo"}},
    ]


async def test_unsupported_content_part(provider: ProviderConfig) -> None:
    part = {"type": "file", "file": {"file_id": "f"}}

    await api.refuses(provider, api.request({"role": "user", "content": [part]}))


# --- the response --------------------------------------------------------------------------


async def test_parses_the_documented_response(provider: ProviderConfig) -> None:
    completion = await api.call(provider, Provider(body=api.fixture("generate_response.json")))

    assert completion.id == "xk2FaO3zLrGLz7IPnfXt0AQ"
    assert completion.model == "gemini-2.5-flash"
    [choice] = completion.choices
    assert choice.message.content == "Mrow? *stretches* Hello there, human. I am Neko."
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    # Thinking tokens are billed as output.
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (13, 39, 52)
    assert usage.model_extra == {"completion_tokens_details": {"reasoning_tokens": 24}}


async def test_parses_the_documented_function_call(provider: ProviderConfig) -> None:
    completion = await api.call(provider, Provider(body=api.fixture("function_call_response.json")))

    tool_call = only_tool_call(completion)
    assert tool_call.id == "call_0"
    assert tool_call.function.name == "schedule_meeting"
    assert json.loads(tool_call.function.arguments) == {
        "attendees": ["Bob", "Alice"],
        "date": "2025-03-27",
        "time": "10:00",
        "topic": "Q3 planning",
    }


async def test_function_call_ids_from_the_response_are_kept(provider: ProviderConfig) -> None:
    body = api.fixture("function_call_response.json")
    parts = body["candidates"][0]["content"]["parts"]
    parts[0]["functionCall"]["id"] = "fc-123"
    parts.append({"functionCall": {"name": "notify", "args": {}}})

    completion = await api.call(provider, Provider(body=body))

    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert [c.id for c in calls] == ["fc-123", "call_1"]
    assert calls[1].function.arguments == "{}"


async def test_thoughts_are_left_out_and_ids_generated(provider: ProviderConfig) -> None:
    body = api.fixture("generate_response.json")
    body["candidates"][0]["content"]["parts"].insert(0, {"text": "thinking...", "thought": True})
    del body["responseId"], body["modelVersion"]

    completion = await api.call(provider, Provider(body=body))

    assert (
        completion.choices[0].message.content == "Mrow? *stretches* Hello there, human. I am Neko."
    )
    assert completion.id.startswith("gemini-")
    assert completion.model == MODEL


@pytest.mark.parametrize(
    ("reason", "finish_reason"),
    [("MAX_TOKENS", "length"), ("STOP", "stop"), ("OTHER", "other"), ("LANGUAGE", "language")],
)
async def test_finish_reasons(provider: ProviderConfig, reason: str, finish_reason: str) -> None:
    body = api.fixture("generate_response.json")
    body["candidates"][0]["finishReason"] = reason

    completion = await api.call(provider, Provider(body=body))

    assert completion.choices[0].finish_reason == finish_reason


@pytest.mark.parametrize(
    "reason",
    ["SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"],
)
async def test_filtered_candidates(provider: ProviderConfig, reason: str) -> None:
    body = api.fixture("response_safety.json")
    body["candidates"][0]["finishReason"] = reason

    error = await api.fails(provider, Provider(body=body), errors.ContentFiltered)

    assert f"finishReason {reason}" in error.message


async def test_filtered_after_partial_content_is_returned(provider: ProviderConfig) -> None:
    body = api.fixture("generate_response.json")
    body["candidates"][0]["finishReason"] = "SAFETY"

    completion = await api.call(provider, Provider(body=body))

    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content


async def test_blocked_prompt(provider: ProviderConfig) -> None:
    error = await api.fails(
        provider, Provider(body=api.fixture("response_prompt_blocked.json")), errors.ContentFiltered
    )

    assert error.message == "provider 'gemini-test' blocked the prompt (blockReason SAFETY)"


test_wrong_shapes_name_the_field = api.wrong_shape_test(
    [
        (lambda b: b.pop("candidates"), "response has no candidates"),
        (lambda b: b.pop("usageMetadata"), "response has no usageMetadata"),
        (lambda b: b.update(candidates={"x": 1}), "response field candidates: Input should be"),
        (
            lambda b: b["candidates"][0]["content"]["parts"].append({"functionCall": {"args": {}}}),
            "response field candidates.0.content.parts.1.functionCall.name: Field required",
        ),
        (
            lambda b: b["usageMetadata"].update(promptTokenCount=-1),
            "response field usageMetadata.promptTokenCount",
        ),
    ],
    text="Neko",
)


# --- error statuses ------------------------------------------------------------------------


test_status_maps_to_error = api.status_test(
    [
        (
            400,
            "error_400_invalid_argument.json",
            errors.ProviderInvalidRequest,
            ["HTTP 400, INVALID_ARGUMENT", "Unknown name"],
        ),
        (
            400,
            "error_400_failed_precondition.json",
            errors.ProviderInvalidRequest,
            ["FAILED_PRECONDITION"],
        ),
        (
            404,
            "error_404_not_found.json",
            errors.ProviderInvalidRequest,
            ["NOT_FOUND", "is not found"],
        ),
        (500, "error_500_internal.json", errors.ProviderServerError, ["HTTP 500, INTERNAL"]),
        (
            503,
            "error_503_unavailable.json",
            errors.ProviderServerError,
            ["UNAVAILABLE", "overloaded"],
        ),
        (504, "error_504_deadline_exceeded.json", errors.ProviderTimeout, ["DEADLINE_EXCEEDED"]),
    ]
)


@pytest.mark.parametrize(
    ("status", "fixture_name", "label"),
    [
        (400, "error_400_api_key_invalid.json", "HTTP 400, INVALID_ARGUMENT"),
        (403, "error_403_permission_denied.json", "HTTP 403, PERMISSION_DENIED"),
        (401, None, "HTTP 401"),
    ],
)
async def test_auth_errors_never_repeat_the_provider_text(
    provider: ProviderConfig, status: int, fixture_name: str | None, label: str
) -> None:
    body = api.fixture(fixture_name) if fixture_name else None

    error = await api.fails(provider, Provider(status, body), errors.ProviderAuthentication)

    assert error.message == f"provider 'gemini-test' refused our credentials ({label})"


@pytest.mark.parametrize(
    ("delay", "headers", "expected"),
    [
        ("43s", {}, 43.0),
        ("1.5s", {"retry-after": "9"}, 1.5),
        (None, {"retry-after": "9"}, 9.0),
        ("soon", {}, None),
        (None, {}, None),
    ],
)
async def test_rate_limited_with_retry_info(
    provider: ProviderConfig, delay: str | None, headers: dict[str, str], expected: float | None
) -> None:
    body = api.fixture("error_429_resource_exhausted.json")
    details = body["error"]["details"]
    if delay is None:
        details.pop()
    else:
        details[-1]["retryDelay"] = delay

    error = await api.fails(provider, Provider(429, body, headers=headers), errors.RateLimited)

    assert error.retry_after == expected
    assert "HTTP 429, RESOURCE_EXHAUSTED" in error.message
    assert "exceeded your current quota" in error.message


async def test_error_body_wrapped_in_a_list(provider: ProviderConfig) -> None:
    body = [api.fixture("error_429_resource_exhausted.json")]

    error = await api.fails(provider, Provider(429, body), errors.RateLimited)

    assert error.retry_after == 43.0


async def test_transport_failures(provider: ProviderConfig) -> None:
    timeout = Provider(raises=httpx.ConnectTimeout("slow"))
    refused = Provider(raises=httpx.ConnectError("refused"))

    await api.fails(provider, timeout, errors.ProviderTimeout)
    await api.fails(provider, refused, errors.ProviderServerError)


# --- streaming -----------------------------------------------------------------------------


async def test_stream_url_and_body(provider: ProviderConfig) -> None:
    stub = api.streaming(api.sse("stream.txt"))

    await api.collect(provider, stub, api.request({"role": "user", "content": "Hello there"}))

    [sent] = stub.requests
    assert str(sent.url) == STREAM_URL
    assert sent.headers["x-goog-api-key"] == KEY
    assert orjson.loads(sent.content) == {
        "contents": [{"role": "user", "parts": [{"text": "Hello there"}]}]
    }


async def test_stream_folds_into_the_non_streamed_result(provider: ProviderConfig) -> None:
    chunks = await api.collect(provider, api.streaming(api.sse("stream.txt")))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:4]] == [
        "The",
        " quick brown fox jumps over",
        " the lazy dog.",
    ]
    assert chunks[4].choices[0].finish_reason == "stop"
    assert chunks[5].choices == []
    assert len(chunks) == 6
    whole = {
        "candidates": [
            {
                "content": {
                    "parts": [{"text": "The quick brown fox jumps over the lazy dog."}],
                    "role": "model",
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 10, "totalTokenCount": 19},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "8E2FaNW1D-CLz7IPo-vqkAw",
    }
    await api.folds_like(provider, chunks, whole)


async def test_streamed_function_call_folds_into_the_non_streamed_result(
    provider: ProviderConfig,
) -> None:
    chunks = await api.collect(provider, api.streaming(api.sse("stream_function_call.txt")))

    [call_chunk] = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    [delta] = call_chunk.choices[0].delta.tool_calls or []
    assert (delta.index, delta.id, delta.type) == (0, "call_0", "function")
    await api.folds_like(provider, chunks, api.fixture("function_call_response.json"))


async def test_stream_error_status(provider: ProviderConfig) -> None:
    stub = Provider(429, api.fixture("error_429_resource_exhausted.json"))

    error, chunks = await api.stream_fails(provider, stub, errors.RateLimited)

    assert error.retry_after == 43.0
    assert chunks == []


async def test_stream_error_event(provider: ProviderConfig) -> None:
    first = api.sse("stream.txt").split(b"\n\n")[0] + b"\n\n"
    body = first + data_events(api.fixture("error_503_unavailable.json"))

    error, chunks = await api.stream_fails(
        provider, api.streaming(body), errors.ProviderServerError
    )

    assert "error event, UNAVAILABLE" in error.message
    assert len(chunks) == 2


async def test_stream_that_ends_early(provider: ProviderConfig) -> None:
    body = b"\n\n".join(api.sse("stream.txt").split(b"\n\n")[:2]) + b"\n\n"

    chunks = await api.ends_early(provider, body)

    assert len(chunks) == 3


async def test_stream_without_usage(provider: ProviderConfig) -> None:
    events = [json.loads(line[6:]) for line in api.sse("stream.txt").decode().split("\n\n") if line]
    for event in events:
        del event["usageMetadata"]

    error, _ = await api.stream_fails(
        provider, api.streaming(data_events(*events)), errors.ProviderProtocolError
    )

    assert "stream has no usageMetadata" in error.message


async def test_stream_blocked_prompt(provider: ProviderConfig) -> None:
    body = data_events(api.fixture("response_prompt_blocked.json"))

    await api.stream_fails(provider, api.streaming(body), errors.ContentFiltered)


async def test_stream_safety_stop_without_content(provider: ProviderConfig) -> None:
    body = data_events(api.fixture("response_safety.json"))

    await api.stream_fails(provider, api.streaming(body), errors.ContentFiltered)


async def test_stream_chunk_of_the_wrong_shape(provider: ProviderConfig) -> None:
    body = data_events({"candidates": [{"content": {"parts": "oops"}}]})

    error, _ = await api.stream_fails(provider, api.streaming(body), errors.ProviderProtocolError)

    assert "stream chunk field candidates.0.content.parts" in error.message


# --- the registry --------------------------------------------------------------------------


def test_the_registry_serves_gemini(provider: ProviderConfig) -> None:
    assert isinstance(adapter_for(provider, httpx.AsyncClient()), GeminiAdapter)
