"""The mock provider speaks OpenAI's Chat Completions API with deterministic answers and faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from mock_provider import (
    MockSettings,
    MockState,
    answer_text,
    count_tokens,
    create_app,
    expected_completion,
)
from mock_provider.answers import VOCABULARY

USER = [{"role": "user", "content": "What is a switchyard?"}]
OTHER = [{"role": "user", "content": "What is a marshalling yard?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
ERROR_KEYS = {"message", "type", "param", "code"}


@contextlib.asynccontextmanager
async def mock(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(MockSettings(**settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        yield client


async def chat(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", USER)
    return await client.post("/v1/chat/completions", json=body)


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an event stream, checking the framing on the way."""
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [b.removeprefix("data: ") for b in blocks[:-1]]


# --- answers ------------------------------------------------------------------------------------


async def test_completion_has_openai_shape() -> None:
    async with mock() as client:
        r = await chat(client)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "system_fingerprint",
    }
    assert re.fullmatch(r"chatcmpl-[0-9a-f]+", body["id"])
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    assert body["model"] == "gpt-4o-mini"
    assert isinstance(body["system_fingerprint"], str)
    text, finish = expected_completion(USER)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }
    ]
    assert finish == "stop"
    assert set(body["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    }
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


async def test_answers_are_deterministic_and_depend_on_the_prompt() -> None:
    async with mock() as client:
        first = (await chat(client)).json()
        again = (await chat(client)).json()
        other = (await chat(client, messages=OTHER)).json()
    text = first["choices"][0]["message"]["content"]
    assert again["choices"][0]["message"]["content"] == text
    assert other["choices"][0]["message"]["content"] != text
    assert first["id"] != again["id"]  # ids stay unique per call
    # The model is not part of the answer: only the messages are.
    assert answer_text(USER) == text


def test_answer_text_format_and_length() -> None:
    lengths = set()
    for i in range(200):
        text = answer_text([{"role": "user", "content": f"prompt {i}"}])
        m = re.fullmatch(r"Mock answer ([0-9a-f]{8}): ([a-z ]+)\.", text)
        assert m, text
        words = m.group(2).split(" ")
        assert 3 <= len(words) <= 40
        assert set(words) <= set(VOCABULARY)
        lengths.add(len(words))
    assert len(lengths) > 10  # the length varies with the prompt
    # Unset fields serialised as null do not change the answer.
    assert answer_text([{"role": "user", "content": "x", "name": None}]) == answer_text(
        [{"role": "user", "content": "x"}]
    )


def test_count_tokens() -> None:
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("") == 0
    assert count_tokens("Mock answer 1a2b3c4d: amber reef.") == 7


async def test_usage_follows_openai_chat_accounting() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi, there!", "name": "ann"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Count me."}]},
    ]
    async with mock() as client:
        usage = (await chat(client, messages=messages)).json()["usage"]
    # Per message 3 + content tokens; 3 more prime the reply. Names do not count: the other APIs
    # have none, and the count must be the same on all of them.
    expected_prompt = (3 + 4) + (3 + 4) + (3 + 2) + (3 + 3) + 3
    assert usage["prompt_tokens"] == expected_prompt
    assert usage["completion_tokens"] == count_tokens(answer_text(messages))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_the_answer(field: str) -> None:
    full = answer_text(USER)
    async with mock() as client:
        body = (await chat(client, **{field: 5})).json()
        roomy = (await chat(client, **{field: 1000})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    # 5 tokens: "Mock", "answer", "<hex>", ":", and the first word.
    assert choice["message"]["content"] == " ".join(full.split(" ")[:4])
    assert body["usage"]["completion_tokens"] == 5
    assert roomy["choices"][0]["message"]["content"] == full
    assert roomy["choices"][0]["finish_reason"] == "stop"


async def test_stop_sequence_cuts_before_it() -> None:
    full = answer_text(USER)
    second_word = full.split(" ")[4]
    stop = ["never-in-the-answer", f" {second_word}"]
    async with mock() as client:
        listed = (await chat(client, stop=stop)).json()["choices"][0]
        single = (await chat(client, stop=": ")).json()["choices"][0]
        absent = (await chat(client, stop="never-in-the-answer")).json()["choices"][0]
    assert listed["message"]["content"] == full[: full.index(f" {second_word}")]
    assert listed["finish_reason"] == "stop"
    assert single["message"]["content"] == full[: full.index(":")]
    assert absent["message"]["content"] == full
    assert expected_completion(USER, stop=stop) == (listed["message"]["content"], "stop")


async def test_json_modes_return_json_objects() -> None:
    full = answer_text(USER)
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "score": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mood": {"enum": ["calm", "busy"]},
        },
    }
    json_schema = {"type": "json_schema", "json_schema": {"name": "review", "schema": schema}}
    async with mock() as client:
        plain = (await chat(client, response_format={"type": "json_object"})).json()
        shaped = (await chat(client, response_format=json_schema)).json()
        text = (await chat(client, response_format={"type": "text"})).json()
    assert json.loads(plain["choices"][0]["message"]["content"]) == {"answer": full}
    filled = json.loads(shaped["choices"][0]["message"]["content"])
    assert filled == {"title": full, "score": count_tokens(full), "tags": [], "mood": "calm"}
    assert text["choices"][0]["message"]["content"] == full


async def test_tools_give_a_tool_call_then_text_after_the_tool_result() -> None:
    async with mock() as client:
        body = (await chat(client, tools=[WEATHER_TOOL, TIME_TOOL])).json()
        choice = body["choices"][0]
        call = choice["message"]["tool_calls"][0]
        follow_up: list[dict[str, Any]] = [
            *USER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'},
        ]
        after = (await chat(client, messages=follow_up, tools=[WEATHER_TOOL])).json()
        named = (
            await chat(
                client,
                tools=[WEATHER_TOOL, TIME_TOOL],
                tool_choice={"type": "function", "function": {"name": "get_time"}},
            )
        ).json()
        declined = (await chat(client, tools=[WEATHER_TOOL], tool_choice="none")).json()
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["tool_calls"]) == 1
    assert set(call) == {"id", "type", "function"}
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert set(arguments) == {"city", "days"}
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    fn = call["function"]
    assert body["usage"]["completion_tokens"] == count_tokens(f"{fn['name']} {fn['arguments']}")

    assert after["choices"][0]["finish_reason"] == "stop"
    assert after["choices"][0]["message"]["content"] == answer_text(follow_up)
    assert "tool_calls" not in after["choices"][0]["message"]
    assert named["choices"][0]["message"]["tool_calls"][0]["function"] == {
        "name": "get_time",
        "arguments": "{}",
    }
    assert declined["choices"][0]["message"]["content"] == answer_text(USER)


# --- streaming ----------------------------------------------------------------------------------


async def test_stream_concatenates_to_the_plain_answer_with_usage() -> None:
    async with mock() as client:
        plain = (await chat(client)).json()
        r = await chat(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert set(chunk) == {
            "id",
            "object",
            "created",
            "model",
            "system_fingerprint",
            "choices",
            "usage",
        }
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == chunks[0]["id"] and chunk["id"].startswith("chatcmpl-")
        assert chunk["model"] == "gpt-4o-mini"
    *content_chunks, usage_chunk = chunks
    assert content_chunks[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert content_chunks[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert all(c["usage"] is None for c in content_chunks)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in content_chunks]
    assert len([p for p in pieces if p]) > 1  # really streamed in pieces
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain["usage"]


async def test_stream_without_usage_and_cut_by_max_tokens() -> None:
    async with mock() as client:
        r = await chat(client, stream=True, max_tokens=6)
    chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert (text, chunks[-1]["choices"][0]["finish_reason"]) == expected_completion(USER, 6)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stream_tool_call_arguments_concatenate() -> None:
    async with mock() as client:
        plain = (await chat(client, tools=[WEATHER_TOOL])).json()
        r = await chat(client, tools=[WEATHER_TOOL], stream=True)
    call = plain["choices"][0]["message"]["tool_calls"][0]
    chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    head = chunks[0]["choices"][0]["delta"]
    assert head["role"] == "assistant" and head["content"] is None
    assert head["tool_calls"] == [
        {
            "index": 0,
            "id": call["id"],
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    args = "".join(
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]
    )
    assert args == call["function"]["arguments"]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }


# --- models -------------------------------------------------------------------------------------


async def test_models_list_and_retrieve() -> None:
    async with mock(models=["gpt-4o-mini", "gpt-4o"]) as client:
        listing = (await client.get("/v1/models")).json()
        one = await client.get("/v1/models/gpt-4o")
        missing = await client.get("/v1/models/gpt-9")
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["gpt-4o-mini", "gpt-4o"]
    for m in listing["data"]:
        assert set(m) == {"id", "object", "created", "owned_by"}
        assert m["object"] == "model" and m["owned_by"] == "switchyard-mock"
        assert isinstance(m["created"], int)
    assert one.json()["id"] == "gpt-4o"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_unknown_model_is_404_and_any_model_is_fine_without_a_list() -> None:
    async with mock(models=["gpt-4o-mini"]) as client:
        r = await chat(client, model="gpt-nope")
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "The model `gpt-nope` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    async with mock() as client:
        assert (await chat(client, model="anything-at-all")).status_code == 200
        assert (await client.get("/v1/models")).json() == {"object": "list", "data": []}


# --- errors and faults --------------------------------------------------------------------------


async def test_auth_required_when_an_api_key_is_set() -> None:
    key = "sk-mock-secret-123"
    async with mock(api_key=key) as client:
        missing = await chat(client)
        wrong = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": USER},
            headers={"Authorization": "Bearer sk-wrong"},
        )
        models = await client.get("/v1/models")
        client.headers["Authorization"] = f"Bearer {key}"
        good = await chat(client)
    for r in (missing, wrong, models):
        assert r.status_code == 401
        error = r.json()["error"]
        assert set(error) == ERROR_KEYS
        assert error["message"].startswith("Incorrect API key provided.")
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
        assert "sk-wrong" not in r.text and key not in r.text
    assert good.status_code == 200


DROP = object()  # marks a field to remove from the valid base body


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": DROP}, "model"),
        ({"model": 3}, "model"),
        ({"messages": DROP}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [*USER, {"content": "x"}]}, "messages[1].role"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "9"}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"n": 2}, "n"),
    ],
)
async def test_invalid_bodies_are_400_naming_the_param(change: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": USER, **change}
    body = {k: v for k, v in body.items() if v is not DROP}
    async with mock() as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] is None
    assert param.split("[")[0].split(".")[0] in error["message"]


async def test_unparsable_json_is_400() -> None:
    async with mock() as client:
        r = await client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        not_object = await client.post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["param"] is None
    assert not_object.status_code == 400


async def test_rate_limit_fault_headers_and_body() -> None:
    async with mock(rate_limit_rate=1, retry_after_s=2.5) as client:
        r = await chat(client)
        await client.put("/_mock/config", json={"retry_after_s": 0.2})
        short = await chat(client)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.headers["retry-after-ms"] == "2500"
    assert r.headers["x-ratelimit-limit-requests"] == "60"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"] == "2.5s"
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["message"].startswith("Rate limit reached for requests")
    assert (error["type"], error["param"], error["code"]) == (
        "requests",
        None,
        "rate_limit_exceeded",
    )
    assert short.headers["retry-after"] == "1"  # never 0, so naive clients do not spin
    assert short.headers["retry-after-ms"] == "200"


async def test_server_error_fault_body() -> None:
    async with mock(error_rate=1) as client:
        r = await chat(client)
    assert r.status_code == 500
    assert r.json() == {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


async def test_random_faults_follow_the_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        async with mock(error_rate=0.3, rate_limit_rate=0.2, seed=seed) as client:
            return [(await chat(client)).status_code for _ in range(60)]

    first, again, other = await statuses(7), await statuses(7), await statuses(8)
    assert first == again
    assert first != other
    assert {200, 429, 500} == set(first)
    assert 15 <= first.count(200) <= 45


async def test_fail_next_fails_exactly_count_calls_then_recovers() -> None:
    async with mock() as client:
        for kind, status in [("rate_limit", 429), ("server_error", 500), ("auth", 401)]:
            put = await client.put("/_mock/config", json={"fail_next": {"kind": kind, "count": 2}})
            assert put.json()["fail_next"] == {"kind": kind, "count": 2}
            assert [(await chat(client)).status_code for _ in range(3)] == [status, status, 200]
            assert (await client.get("/_mock/config")).json()["fail_next"] is None

        await client.put("/_mock/config", json={"fail_next": {"kind": "malformed", "count": 1}})
        bad = await chat(client)
        assert bad.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(bad.text)
        assert (await chat(client)).json()["choices"][0]["message"]["content"] == answer_text(USER)

        # A null fail_next cancels what is pending.
        await client.put("/_mock/config", json={"fail_next": {"kind": "server_error", "count": 5}})
        await client.put("/_mock/config", json={"fail_next": None})
        assert (await chat(client)).status_code == 200


async def test_fail_next_timeout_hangs_until_the_client_gives_up() -> None:
    async with mock() as client:
        await client.put("/_mock/config", json={"fail_next": {"kind": "timeout", "count": 1}})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(chat(client), timeout=0.3)
        stats = (await client.get("/_mock/stats")).json()
        assert stats["in_flight"] == 0
        assert stats["calls"] == 1
        assert stats["by_status"] == {}  # no response was ever sent
        assert (await chat(client)).status_code == 200


# --- control ------------------------------------------------------------------------------------


async def test_put_config_changes_behaviour_at_run_time() -> None:
    async with mock() as client:
        assert (await client.get("/_mock/config")).json() == {
            "latency_ms": 0.0,
            "jitter_ms": 0.0,
            "error_rate": 0.0,
            "rate_limit_rate": 0.0,
            "retry_after_s": 1.0,
            "api_key": None,
            "models": [],
            "seed": 0,
            "fail_next": None,
        }
        assert (await chat(client, model="gpt-x")).status_code == 200
        put = await client.put("/_mock/config", json={"models": ["gpt-y"], "api_key": "sk-k"})
        assert put.status_code == 200
        config = (await client.get("/_mock/config")).json()
        assert config["api_key"] == "***" and config["models"] == ["gpt-y"]
        assert (await chat(client, model="gpt-y")).status_code == 401
        client.headers["Authorization"] = "Bearer sk-k"
        assert (await chat(client, model="gpt-x")).status_code == 404
        assert (await chat(client, model="gpt-y")).status_code == 200
        await client.put("/_mock/config", json={"api_key": None, "error_rate": 1})
        assert (await client.get("/_mock/config")).json()["api_key"] is None
        assert (await chat(client, model="gpt-y")).status_code == 500


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"models": "gpt-4o"}, "models"),
        ({"error_rate": 0.6, "rate_limit_rate": 0.6}, None),
        ({"no_such_knob": 1}, "no_such_knob"),
        ({"fail_next": {"kind": "explode"}}, "fail_next.kind"),
        ({"fail_next": {"kind": "auth", "count": -1}}, "fail_next.count"),
    ],
)
async def test_bad_config_is_400_and_changes_nothing(
    patch: dict[str, Any], param: str | None
) -> None:
    async with mock(latency_ms=0) as client:
        before = (await client.get("/_mock/config")).json()
        # The valid half of a patch must not be applied either.
        r = await client.put("/_mock/config", json={"seed": 99, **patch})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == param
        assert error["message"]
        assert (await client.get("/_mock/config")).json() == before
        assert (await client.put("/_mock/config", content=b"[1]")).status_code == 400
        assert (await client.put("/_mock/config", content=b"nope")).status_code == 400


def test_latency_and_jitter_bounds() -> None:
    state = MockState(MockSettings(latency_ms=100, jitter_ms=20))
    delays = [state.delay_s() for _ in range(200)]
    assert all(0.08 <= d <= 0.12 for d in delays)
    assert len(set(delays)) > 100
    assert MockState(MockSettings(latency_ms=5, jitter_ms=50)).delay_s() >= 0


async def test_latency_delays_answers_and_faults() -> None:
    async with mock(latency_ms=150) as client:
        start = time.monotonic()
        assert (await chat(client)).status_code == 200
        await client.put("/_mock/config", json={"fail_next": {"kind": "server_error"}})
        assert (await chat(client)).status_code == 500
        assert time.monotonic() - start >= 0.3


async def test_in_flight_counts_the_latency_sleep() -> None:
    async with mock(latency_ms=300) as client:
        call = asyncio.ensure_future(chat(client))
        await asyncio.sleep(0.1)
        during = (await client.get("/_mock/stats")).json()
        assert (await call).status_code == 200
        after = (await client.get("/_mock/stats")).json()
    assert during["in_flight"] == 1 and during["calls"] == 1
    assert after["in_flight"] == 0 and after["by_status"] == {"200": 1}


async def test_max_in_flight_with_concurrent_calls_and_reset() -> None:
    async with mock(latency_ms=200) as client:
        responses = await asyncio.gather(*(chat(client) for _ in range(10)))
        assert [r.status_code for r in responses] == [200] * 10
        await chat(client, model="gpt-4o")  # alone: does not raise the peak
        stats = (await client.get("/_mock/stats")).json()
        assert stats == {
            "calls": 11,
            "in_flight": 0,
            "max_in_flight": 10,
            "by_status": {"200": 11},
            "by_model": {"gpt-4o-mini": 10, "gpt-4o": 1},
        }
        reset = await client.post("/_mock/reset")
        assert reset.status_code == 200
        zero = {"calls": 0, "in_flight": 0, "max_in_flight": 0, "by_status": {}, "by_model": {}}
        assert (await client.get("/_mock/stats")).json() == zero
        assert (await client.get("/_mock/config")).json()["latency_ms"] == 200  # settings kept


async def test_healthz_and_unknown_paths() -> None:
    async with mock() as client:
        health = await client.get("/healthz")
        unknown = await client.get("/v1/nope")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert unknown.status_code == 404
    assert set(unknown.json()["error"]) == ERROR_KEYS


# --- the real server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_run_serves_real_http() -> None:
    port = _free_port()
    code = (
        "from mock_provider import MockSettings, run; "
        f"run('127.0.0.1', {port}, MockSettings(api_key='sk-real', models=['gpt-4o-mini']))"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            deadline = time.monotonic() + 15
            while True:
                assert proc.returncode is None, "server exited early"
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not start"
                await asyncio.sleep(0.05)
            client.headers["Authorization"] = "Bearer sk-real"
            r = await chat(client)
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == answer_text(USER)

            # A "timeout" fault ends as soon as the real client hangs up, not after an hour.
            await client.put("/_mock/config", json={"fail_next": {"kind": "timeout"}})
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": USER},
                    timeout=0.3,
                )
            deadline = time.monotonic() + 10
            while (await client.get("/_mock/stats")).json()["in_flight"]:
                assert time.monotonic() < deadline, "the hung call never ended"
                await asyncio.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await asyncio.wait_for(proc.wait(), timeout=10)
