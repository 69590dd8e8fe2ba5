"""The mock provider speaks Anthropic Messages and Gemini generateContent as documented, and gives
the same conversation the same answer and token counts on all three APIs.

Every wire request here is written by hand (no adapter is imported), so these tests pin down the
mock's side of the contract the adapters are tested against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from mock_provider import (
    FAULT_KINDS,
    MockSettings,
    count_tokens,
    create_app,
    expected_completion,
    expected_tool_call,
    normalize_anthropic,
    normalize_gemini,
    normalize_openai,
    prompt_tokens,
)

VERSION = {"anthropic-version": "2023-06-01"}
QUESTION = "What is a switchyard?"
PNG = "iVBORw0KGgo="
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
TIME_PARAMS: dict[str, Any] = {"type": "object", "properties": {}}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}},
]
ANTHROPIC_TOOLS = [
    {"name": "get_weather", "description": "Weather", "input_schema": WEATHER_PARAMS},
    {"name": "get_time", "input_schema": TIME_PARAMS},
]
GEMINI_TOOLS = [
    {
        "functionDeclarations": [
            {
                "name": "get_weather",
                "description": "Weather",
                # Gemini's OpenAPI flavour: upper-case types.
                "parameters": {
                    "type": "OBJECT",
                    "properties": {"city": {"type": "STRING"}, "days": {"type": "INTEGER"}},
                    "required": ["city"],
                },
            },
            {"name": "get_time"},
        ]
    }
]
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["title", "score"],
}


@contextlib.asynccontextmanager
async def mock(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(MockSettings(**settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        yield client


def o_user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def a_user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def g_user(*texts: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": t} for t in texts]}


# --- the canonical conversations, written out for each API ------------------------------------


@dataclass
class Case:
    name: str
    openai: dict[str, Any]
    anthropic: dict[str, Any]
    gemini: dict[str, Any]
    finish: str = "end"  # end, stop_sequence, length, tool_call, refusal
    stop_sequence: str | None = None
    tool: tuple[str, dict[str, Any]] | None = None
    tags: set[str] = field(default_factory=set)


def _plain(**o: Any) -> dict[str, Any]:
    return {"messages": [o_user(QUESTION)], **o}


CASES = [
    Case(
        "plain",
        _plain(),
        {"max_tokens": 1024, "messages": [a_user(QUESTION)]},
        {"contents": [g_user(QUESTION)]},
    ),
    Case(
        "system",
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
                o_user(QUESTION),
            ]
        },
        {
            "max_tokens": 1024,
            "system": [
                {"type": "text", "text": "You are terse."},
                {"type": "text", "text": "Answer in English."},
            ],
            "messages": [a_user(QUESTION)],
        },
        {
            # snake_case, as Google's own curl examples write it
            "system_instruction": {
                "parts": [{"text": "You are terse."}, {"text": "Answer in English."}]
            },
            "contents": [g_user(QUESTION)],
        },
    ),
    Case(
        "multi_turn",
        {
            "messages": [
                o_user("Hi"),
                {"role": "assistant", "content": "Hello. How can I help?"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Name a rail yard."},
                        {"type": "text", "text": "Be brief."},
                    ],
                },
            ]
        },
        {
            "max_tokens": 1024,
            "messages": [
                a_user("Hi"),
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "Hello. How can I help?"}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Name a rail yard."},
                        {"type": "text", "text": "Be brief."},
                    ],
                },
            ],
        },
        {
            "contents": [
                g_user("Hi"),
                {"role": "model", "parts": [{"text": "Hello. How can I help?"}]},
                g_user("Name a rail yard.", "Be brief."),
            ]
        },
    ),
    Case(
        "tool_results",
        {
            "tools": OPENAI_TOOLS,
            "messages": [
                o_user("Weather in Paris, and the time?"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"city": "Paris", "days": 2}',
                            },
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "unit": "C"}'},
                {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
            ],
        },
        {
            "max_tokens": 1024,
            "tools": ANTHROPIC_TOOLS,
            "messages": [
                a_user("Weather in Paris, and the time?"),
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"days": 2, "city": "Paris"},
                        },
                        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
                    ],
                },
                {
                    # Anthropic wants alternation: both results in one user message.
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": '{"unit": "C", "temp": 21}',
                        },
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "12:00"}],
                        },
                    ],
                },
            ],
        },
        {
            "tools": GEMINI_TOOLS,
            "contents": [
                g_user("Weather in Paris, and the time?"),
                {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {
                                "name": "get_weather",
                                "args": {"city": "Paris", "days": 2},
                            }
                        },
                        {"functionCall": {"name": "get_time", "args": {}}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {
                            "functionResponse": {
                                "name": "get_weather",
                                "response": {"temp": 21, "unit": "C"},
                            }
                        },
                        {
                            "functionResponse": {
                                "name": "get_time",
                                "response": {"content": "12:00"},
                            }
                        },
                    ],
                },
            ],
        },
    ),
    Case(
        "image",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    ],
                }
            ]
        },
        {
            "max_tokens": 1024,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                        },
                    ],
                }
            ],
        },
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "What is in this picture?"},
                        {"inlineData": {"mimeType": "image/png", "data": PNG}},
                    ],
                }
            ]
        },
    ),
    Case(
        "max_tokens",
        _plain(max_tokens=5),
        {"max_tokens": 5, "messages": [a_user(QUESTION)]},
        {"contents": [g_user(QUESTION)], "generation_config": {"max_output_tokens": 5}},
        finish="length",
    ),
    Case(
        "stop_sequence",
        _plain(stop=["never-in-the-answer", ": "]),
        {
            "max_tokens": 1024,
            "stop_sequences": ["never-in-the-answer", ": "],
            "messages": [a_user(QUESTION)],
        },
        {
            "contents": [g_user(QUESTION)],
            "generationConfig": {"stopSequences": ["never-in-the-answer", ": "]},
        },
        finish="stop_sequence",
        stop_sequence=": ",
    ),
    Case(
        "json_schema",
        _plain(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "review", "schema": SCHEMA},
            }
        ),
        {
            "max_tokens": 1024,
            "messages": [a_user(QUESTION)],
            "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
        },
        {
            "contents": [g_user(QUESTION)],
            "generationConfig": {
                "responseMimeType": "application/json",
                "responseSchema": {
                    "type": "OBJECT",
                    "properties": {"title": {"type": "STRING"}, "score": {"type": "INTEGER"}},
                },
            },
        },
        tags={"json"},
    ),
    Case(
        "json_object",
        _plain(response_format={"type": "json_object"}),
        {
            "max_tokens": 1024,
            "messages": [a_user(QUESTION)],
            # Anthropic has no schemaless JSON mode: a schema without properties is the analogue.
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        },
        {
            "contents": [g_user(QUESTION)],
            "generationConfig": {"responseMimeType": "application/json"},
        },
        tags={"json"},
    ),
    Case(
        "json_schema_cut",
        _plain(
            max_tokens=6,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "review", "schema": SCHEMA},
            },
        ),
        {
            "max_tokens": 6,
            "messages": [a_user(QUESTION)],
            "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
        },
        {
            "contents": [g_user(QUESTION)],
            "generationConfig": {
                "maxOutputTokens": 6,
                "responseMimeType": "application/json",
                "responseJsonSchema": SCHEMA,
            },
        },
        finish="length",
    ),
    Case(
        "tool_call",
        _plain(tools=OPENAI_TOOLS),
        {"max_tokens": 1024, "tools": ANTHROPIC_TOOLS, "messages": [a_user(QUESTION)]},
        {"tools": GEMINI_TOOLS, "contents": [g_user(QUESTION)]},
        finish="tool_call",
        tool=("get_weather", {}),
    ),
    Case(
        "tool_required",
        _plain(tools=OPENAI_TOOLS, tool_choice="required"),
        {
            "max_tokens": 1024,
            "tools": ANTHROPIC_TOOLS,
            "tool_choice": {"type": "any"},
            "messages": [a_user(QUESTION)],
        },
        {
            "tools": GEMINI_TOOLS,
            "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
            "contents": [g_user(QUESTION)],
        },
        finish="tool_call",
        tool=("get_weather", {}),
    ),
    Case(
        "tool_named",
        _plain(
            tools=OPENAI_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        ),
        {
            "max_tokens": 1024,
            "tools": ANTHROPIC_TOOLS,
            "tool_choice": {"type": "tool", "name": "get_time"},
            "messages": [a_user(QUESTION)],
        },
        {
            "tools": GEMINI_TOOLS,
            "toolConfig": {
                "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}
            },
            "contents": [g_user(QUESTION)],
        },
        finish="tool_call",
        tool=("get_time", {}),
    ),
    Case(
        "tool_none",
        _plain(tools=OPENAI_TOOLS, tool_choice="none"),
        {
            "max_tokens": 1024,
            "tools": ANTHROPIC_TOOLS,
            "tool_choice": {"type": "none"},
            "messages": [a_user(QUESTION)],
        },
        {
            "tools": GEMINI_TOOLS,
            "toolConfig": {"functionCallingConfig": {"mode": "NONE"}},
            "contents": [g_user(QUESTION)],
        },
    ),
    Case(
        "safety",
        {"messages": [o_user("Tell me [[mock:safety]] now")]},
        {"max_tokens": 1024, "messages": [a_user("Tell me [[mock:safety]] now")]},
        {"contents": [g_user("Tell me [[mock:safety]] now")]},
        finish="refusal",
    ),
]

# How each API words each way of finishing: (OpenAI, Anthropic, Gemini).
FINISH = {
    "end": ("stop", "end_turn", "STOP"),
    "stop_sequence": ("stop", "stop_sequence", "STOP"),
    "length": ("length", "max_tokens", "MAX_TOKENS"),
    "tool_call": ("tool_calls", "tool_use", "STOP"),
    "refusal": ("content_filter", "refusal", "SAFETY"),
}


@dataclass
class Outcome:
    text: str
    tool: tuple[str, dict[str, Any]] | None
    prompt: int
    completion: int
    finish: str


# --- calling each API and reading its answer ----------------------------------------------------


async def call_openai(
    client: httpx.AsyncClient, body: dict[str, Any], **extra: Any
) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", **body, **extra})


async def call_anthropic(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    return await client.post(
        "/v1/messages",
        json={"model": "claude-sonnet-4-5", **body, **extra},
        headers=VERSION if headers is None else headers,
    )


async def call_gemini(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    *,
    stream: bool = False,
    model: str = "gemini-2.5-flash",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    method = "streamGenerateContent" if stream else "generateContent"
    if stream and params is None:
        params = {"alt": "sse"}
    return await client.post(
        f"/v1beta/models/{model}:{method}", json=body, params=params, headers=headers
    )


def openai_outcome(body: dict[str, Any]) -> Outcome:
    choice = body["choices"][0]
    message = choice["message"]
    tool = None
    if message.get("tool_calls"):
        fn = message["tool_calls"][0]["function"]
        tool = (fn["name"], json.loads(fn["arguments"]))
    usage = body["usage"]
    return Outcome(
        message["content"] or "",
        tool,
        usage["prompt_tokens"],
        usage["completion_tokens"],
        choice["finish_reason"],
    )


def anthropic_outcome(body: dict[str, Any]) -> Outcome:
    text = "".join(b["text"] for b in body["content"] if b["type"] == "text")
    uses = [(b["name"], b["input"]) for b in body["content"] if b["type"] == "tool_use"]
    usage = body["usage"]
    return Outcome(
        text,
        uses[0] if uses else None,
        usage["input_tokens"],
        usage["output_tokens"],
        body["stop_reason"],
    )


def gemini_outcome(body: dict[str, Any]) -> Outcome:
    candidate = body["candidates"][0]
    parts = (candidate.get("content") or {}).get("parts") or []
    text = "".join(p.get("text", "") for p in parts)
    calls = [
        (p["functionCall"]["name"], p["functionCall"]["args"]) for p in parts if "functionCall" in p
    ]
    usage = body["usageMetadata"]
    return Outcome(
        text,
        calls[0] if calls else None,
        usage["promptTokenCount"],
        usage.get("candidatesTokenCount", 0),
        candidate["finishReason"],
    )


def openai_events(response: httpx.Response) -> list[Any]:
    blocks = response.text.split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [b.removeprefix("data: ") for b in blocks[:-1]]


def anthropic_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` pairs, checking the ``event: X\\ndata: {...}\\n\\n`` framing."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-1]:
        m = re.fullmatch(r"event: (\w+)\ndata: (.+)", block)
        assert m, block
        data = json.loads(m.group(2))
        assert data["type"] == m.group(1)
        events.append((m.group(1), data))
    return events


def gemini_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The GenerateContentResponse of each ``data: {...}\\r\\n\\r\\n`` event (no ``[DONE]``)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    if not response.text:
        return []
    blocks = response.text.split("\r\n\r\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1])
    return [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]


def openai_stream_outcome(response: httpx.Response) -> Outcome:
    events = openai_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    deltas = [c["choices"][0] for c in chunks[:-1]]
    text = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls") or []]
    tool = None
    if calls:
        tool = (
            calls[0]["function"]["name"],
            json.loads("".join(c["function"]["arguments"] for c in calls)),
        )
    return Outcome(
        text, tool, usage["prompt_tokens"], usage["completion_tokens"], deltas[-1]["finish_reason"]
    )


def anthropic_stream_outcome(response: httpx.Response) -> Outcome:
    events = anthropic_events(response)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start, delta = events[0][1], events[-2][1]
    text, json_parts, tool_name = "", "", None
    for name, data in events:
        if name == "content_block_start" and data["content_block"]["type"] == "tool_use":
            tool_name = data["content_block"]["name"]
            assert data["content_block"]["input"] == {}
        if name == "content_block_delta":
            d = data["delta"]
            text += d.get("text", "")
            json_parts += d.get("partial_json", "")
    tool = (tool_name, json.loads(json_parts)) if tool_name else None
    return Outcome(
        text,
        tool,
        start["message"]["usage"]["input_tokens"],
        delta["usage"]["output_tokens"],
        delta["delta"]["stop_reason"],
    )


def gemini_stream_outcome(response: httpx.Response) -> Outcome:
    chunks = gemini_events(response)
    assert chunks
    # Only the last chunk finishes and carries the usage.
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    assert all("usageMetadata" not in c for c in chunks[:-1])
    parts = [p for c in chunks for p in (c["candidates"][0].get("content") or {}).get("parts", [])]
    text = "".join(p.get("text", "") for p in parts)
    calls = [
        (p["functionCall"]["name"], p["functionCall"]["args"]) for p in parts if "functionCall" in p
    ]
    usage = chunks[-1]["usageMetadata"]
    return Outcome(
        text,
        calls[0] if calls else None,
        usage["promptTokenCount"],
        usage.get("candidatesTokenCount", 0),
        chunks[-1]["candidates"][0]["finishReason"],
    )


# --- cross-format determinism -------------------------------------------------------------------


def test_normalization_of_the_tool_round_trip_is_the_same_for_all_three() -> None:
    case = next(c for c in CASES if c.name == "tool_results")
    from_openai = normalize_openai(case.openai["messages"])
    from_anthropic = normalize_anthropic(None, case.anthropic["messages"])
    from_gemini = normalize_gemini(None, case.gemini["contents"])
    assert from_openai == [
        ("user", "Weather in Paris, and the time?"),
        ("assistant", 'call:get_weather({"city":"Paris","days":2})\ncall:get_time({})'),
        ("tool", '{"temp":21,"unit":"C"}'),
        ("tool", "12:00"),
    ]
    assert from_anthropic == from_openai
    assert from_gemini == from_openai


def test_normalization_rules() -> None:
    # All system text becomes one first turn, joined with blank lines, wherever it was.
    assert normalize_openai(
        [o_user("q"), {"role": "system", "content": "a"}, {"role": "developer", "content": "b"}]
    ) == [("system", "a\n\nb"), ("user", "q")]
    assert normalize_anthropic("a\n\nb", [a_user("q")]) == [("system", "a\n\nb"), ("user", "q")]
    assert normalize_gemini({"parts": [{"text": "a"}, {"text": "b"}]}, [g_user("q")]) == [
        ("system", "a\n\nb"),
        ("user", "q"),
    ]
    # Text parts join with a newline; each image counts as "[image]".
    image_turn = normalize_openai(next(c for c in CASES if c.name == "image").openai["messages"])
    assert image_turn == [("user", "What is in this picture?\n[image]")]
    # Assistant text comes before its calls; JSON-string arguments are parsed and canonicalised.
    assert normalize_openai(
        [
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"b": 1, "a": [2]}'},
                    }
                ],
            }
        ]
    ) == [("assistant", 'Checking.\ncall:f({"a":[2],"b":1})')]
    # Gemini: {"content": <str>} is that string; any other response object is its JSON.
    responses = [
        {"functionResponse": {"name": "f", "response": {"content": '{"x": 1}'}}},
        {"functionResponse": {"name": "f", "response": {"content": "plain", "extra": 1}}},
    ]
    assert normalize_gemini(None, [{"role": "user", "parts": responses}]) == [
        ("tool", '{"x":1}'),
        ("tool", '{"content":"plain","extra":1}'),
    ]
    # Anthropic: a user message of results then text gives tool turns, then the user turn.
    mixed = [
        {"type": "tool_result", "tool_use_id": "t", "content": "ok"},
        {"type": "text", "text": "And now?"},
    ]
    assert normalize_anthropic(None, [{"role": "user", "content": mixed}]) == [
        ("tool", "ok"),
        ("user", "And now?"),
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_same_answer_and_tokens_on_all_three_apis(case: Case) -> None:
    async with mock() as client:
        o = await call_openai(client, case.openai)
        a = await call_anthropic(client, case.anthropic)
        g = await call_gemini(client, case.gemini)
        assert (o.status_code, a.status_code, g.status_code) == (200, 200, 200), (
            o.text,
            a.text,
            g.text,
        )
        outcomes = openai_outcome(o.json()), anthropic_outcome(a.json()), gemini_outcome(g.json())

        # Streamed, each API gives back exactly its non-streamed answer and usage.
        so = await call_openai(
            client, case.openai, stream=True, stream_options={"include_usage": True}
        )
        sa = await call_anthropic(client, case.anthropic, stream=True)
        sg = await call_gemini(client, case.gemini, stream=True)
        streamed = (
            openai_stream_outcome(so),
            anthropic_stream_outcome(sa),
            gemini_stream_outcome(sg),
        )
    assert streamed == outcomes

    o_out, a_out, g_out = outcomes
    assert (o_out.finish, a_out.finish, g_out.finish) == FINISH[case.finish]
    for out in (a_out, g_out):
        assert (out.text, out.tool, out.prompt, out.completion) == (
            o_out.text,
            o_out.tool,
            o_out.prompt,
            o_out.completion,
        )

    # The OpenAI-format helpers predict what every API answers.
    messages = case.openai["messages"]
    assert o_out.prompt == prompt_tokens(messages)
    if case.tool is None:
        text, finish = expected_completion(
            messages,
            case.openai.get("max_tokens"),
            case.openai.get("stop"),
            response_format=case.openai.get("response_format"),
        )
        assert (o_out.text, o_out.finish) == (text, finish)
        assert o_out.completion == count_tokens(text)
        assert o_out.tool is None
    else:
        call = expected_tool_call(messages, case.openai["tools"], case.openai.get("tool_choice"))
        assert call is not None
        assert o_out.tool == (call["function"]["name"], json.loads(call["function"]["arguments"]))
        assert o_out.tool[0] == case.tool[0]
        assert o_out.completion == count_tokens(
            f"{call['function']['name']} {call['function']['arguments']}"
        )
    if case.stop_sequence is not None:
        assert a.json()["stop_sequence"] == case.stop_sequence
        assert not o_out.text.endswith(case.stop_sequence.strip())
    if "json" in case.tags:
        assert json.loads(o_out.text) == json.loads(g_out.text)
    if case.finish == "refusal":
        assert o_out.completion == 0 and o_out.text == ""


async def test_json_schema_and_tool_arguments_fill_the_schema() -> None:
    async with mock() as client:
        shaped = await call_gemini(client, next(c for c in CASES if c.name == "json_schema").gemini)
        called = await call_anthropic(
            client, next(c for c in CASES if c.name == "tool_call").anthropic
        )
    filled = json.loads(shaped.json()["candidates"][0]["content"]["parts"][0]["text"])
    assert set(filled) == {"title", "score"}
    assert filled["title"].startswith("Mock answer ")
    assert filled["score"] == count_tokens(filled["title"])
    arguments = called.json()["content"][0]["input"]
    assert set(arguments) == {"city", "days"}
    assert re.fullmatch(r"mock-[0-9a-f]{8}", arguments["city"])


# --- Anthropic shapes ---------------------------------------------------------------------------


async def test_anthropic_message_shape() -> None:
    async with mock() as client:
        r = await call_anthropic(client, {"max_tokens": 1024, "messages": [a_user(QUESTION)]})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert re.fullmatch(r"req_\w+", r.headers["request-id"])
    body = r.json()
    assert set(body) == {
        "id",
        "type",
        "role",
        "model",
        "content",
        "stop_reason",
        "stop_sequence",
        "usage",
    }
    assert re.fullmatch(r"msg_[0-9a-f]{24}", body["id"])
    assert (body["type"], body["role"], body["model"]) == (
        "message",
        "assistant",
        "claude-sonnet-4-5",
    )
    text, _ = expected_completion([o_user(QUESTION)])
    assert body["content"] == [{"type": "text", "text": text}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    assert body["usage"] == {
        "input_tokens": prompt_tokens([o_user(QUESTION)]),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": count_tokens(text),
    }


async def test_anthropic_tool_use_shape_and_stream() -> None:
    body = {"max_tokens": 1024, "tools": ANTHROPIC_TOOLS, "messages": [a_user(QUESTION)]}
    async with mock() as client:
        plain = (await call_anthropic(client, body)).json()
        events = anthropic_events(await call_anthropic(client, body, stream=True))
    [block] = plain["content"]
    assert set(block) == {"type", "id", "name", "input"}
    assert block["type"] == "tool_use" and block["name"] == "get_weather"
    assert re.fullmatch(r"toolu_[0-9a-f]{24}", block["id"])
    call = expected_tool_call([o_user(QUESTION)], OPENAI_TOOLS)
    assert call is not None and block["id"] == call["id"].replace("call_", "toolu_")
    assert plain["stop_reason"] == "tool_use"
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"} and len(names[3:-3]) > 1
    assert events[1][1]["content_block"] == {**block, "input": {}}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert all(d["type"] == "input_json_delta" for d in deltas)
    assert json.loads("".join(d["partial_json"] for d in deltas)) == block["input"]


async def test_anthropic_stream_events_exactly_as_documented() -> None:
    async with mock() as client:
        plain = (
            await call_anthropic(client, {"max_tokens": 1024, "messages": [a_user(QUESTION)]})
        ).json()
        r = await call_anthropic(
            client, {"max_tokens": 1024, "messages": [a_user(QUESTION)], "stream": True}
        )
    events = anthropic_events(r)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start == {
        **plain,
        "id": start["id"],
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**plain["usage"], "output_tokens": 1},
    }
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert len(deltas) > 1
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == plain["content"][0]["text"]
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": plain["usage"]["output_tokens"]},
    }
    assert events[-1][1] == {"type": "message_stop"}


async def test_anthropic_refusal_shape() -> None:
    body = {"max_tokens": 1024, "messages": [a_user("[[mock:safety]]")]}
    async with mock() as client:
        plain = (await call_anthropic(client, body)).json()
        events = anthropic_events(await call_anthropic(client, body, stream=True))
    assert plain["content"] == [] and plain["stop_reason"] == "refusal"
    assert plain["stop_details"]["type"] == "refusal"
    assert [n for n, _ in events] == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[2][1]["delta"]["stop_reason"] == "refusal"


# --- Gemini shapes ------------------------------------------------------------------------------


async def test_gemini_response_shape() -> None:
    async with mock() as client:
        r = await call_gemini(client, {"contents": [g_user(QUESTION)]})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"candidates", "usageMetadata", "modelVersion", "responseId"}
    text, _ = expected_completion([o_user(QUESTION)])
    [candidate] = body["candidates"]
    assert set(candidate) == {"content", "finishReason", "index", "safetyRatings"}
    assert candidate["content"] == {"parts": [{"text": text}], "role": "model"}
    assert (candidate["finishReason"], candidate["index"]) == ("STOP", 0)
    assert {r["probability"] for r in candidate["safetyRatings"]} == {"NEGLIGIBLE"}
    assert all(r["category"].startswith("HARM_CATEGORY_") for r in candidate["safetyRatings"])
    prompt = prompt_tokens([o_user(QUESTION)])
    usage = body["usageMetadata"]
    assert (usage["promptTokenCount"], usage["candidatesTokenCount"], usage["totalTokenCount"]) == (
        prompt,
        count_tokens(text),
        prompt + count_tokens(text),
    )
    assert body["modelVersion"] == "gemini-2.5-flash"
    assert isinstance(body["responseId"], str) and body["responseId"]


async def test_gemini_function_call_shape() -> None:
    async with mock() as client:
        body = (
            await call_gemini(client, {"tools": GEMINI_TOOLS, "contents": [g_user(QUESTION)]})
        ).json()
        chunks = gemini_events(
            await call_gemini(
                client, {"tools": GEMINI_TOOLS, "contents": [g_user(QUESTION)]}, stream=True
            )
        )
    [candidate] = body["candidates"]
    [part] = candidate["content"]["parts"]
    assert set(part) == {"functionCall"}
    assert set(part["functionCall"]) == {"name", "args"}
    assert part["functionCall"]["name"] == "get_weather"
    assert candidate["finishReason"] == "STOP"
    # A function call streams whole, in one chunk.
    assert len(chunks) == 1 and chunks[0]["candidates"] == body["candidates"]


async def test_gemini_stream_framing_and_json_array() -> None:
    body = {"contents": [g_user(QUESTION)]}
    async with mock() as client:
        plain = (await call_gemini(client, body)).json()
        sse = await call_gemini(client, body, stream=True)
        array = await call_gemini(client, body, stream=True, params={})
    assert "[DONE]" not in sse.text
    assert sse.text.endswith("\r\n\r\n")
    chunks = gemini_events(sse)
    assert len(chunks) > 2
    for chunk in chunks[:-1]:
        assert set(chunk) == {"candidates", "modelVersion", "responseId"}
        assert chunk["candidates"][0]["content"]["role"] == "model"
    assert chunks[-1]["usageMetadata"] == plain["usageMetadata"]
    assert {c["responseId"] for c in chunks} == {chunks[0]["responseId"]}
    # Without alt=sse, Google streams one JSON array of the same responses.
    assert array.headers["content-type"].startswith("application/json")
    elements = json.loads(array.text)
    assert [{**e, "responseId": ""} for e in elements] == [{**c, "responseId": ""} for c in chunks]


async def test_gemini_safety_and_blocked_prompt() -> None:
    async with mock() as client:
        safety = (await call_gemini(client, {"contents": [g_user("x [[mock:safety]]")]})).json()
        blocked = (await call_gemini(client, {"contents": [g_user("x [[mock:blocked]]")]})).json()
        blocked_stream = gemini_events(
            await call_gemini(client, {"contents": [g_user("x [[mock:blocked]]")]}, stream=True)
        )
        others = [
            (await call_openai(client, {"messages": [o_user("x [[mock:blocked]]")]})).json(),
            (
                await call_anthropic(
                    client, {"max_tokens": 9, "messages": [a_user("x [[mock:blocked]]")]}
                )
            ).json(),
        ]
    prompt = prompt_tokens([o_user("x [[mock:safety]]")])
    [candidate] = safety["candidates"]
    assert set(candidate) == {"finishReason", "index", "safetyRatings"}  # no content
    assert candidate["finishReason"] == "SAFETY"
    assert any(r.get("blocked") and r["probability"] == "HIGH" for r in candidate["safetyRatings"])
    assert safety["usageMetadata"]["promptTokenCount"] == prompt
    assert "candidatesTokenCount" not in safety["usageMetadata"]  # proto3 JSON omits zeros

    assert "candidates" not in blocked
    assert blocked["promptFeedback"]["blockReason"] == "SAFETY"
    assert blocked["promptFeedback"]["safetyRatings"]
    assert blocked["usageMetadata"]["totalTokenCount"] == prompt_tokens(
        [o_user("x [[mock:blocked]]")]
    )
    assert [{**c, "responseId": ""} for c in blocked_stream] == [{**blocked, "responseId": ""}]
    # OpenAI and Anthropic have no separate prompt block: it is a refusal there.
    assert others[0]["choices"][0]["finish_reason"] == "content_filter"
    assert others[0]["choices"][0]["message"]["content"] is None
    assert others[1]["stop_reason"] == "refusal"


async def test_gemini_accepts_the_key_in_header_or_query() -> None:
    body = {"contents": [g_user(QUESTION)]}
    async with mock(api_key="AIza-mock") as client:
        header = await call_gemini(client, body, headers={"x-goog-api-key": "AIza-mock"})
        query = await call_gemini(client, body, params={"key": "AIza-mock"})
        wrong = await call_gemini(client, body, headers={"x-goog-api-key": "AIza-wrong"})
        missing = await call_gemini(client, body)
    assert (header.status_code, query.status_code) == (200, 200)
    assert wrong.status_code == 400
    assert wrong.json() == {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                },
                {
                    "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                    "locale": "en-US",
                    "message": "API key not valid. Please pass a valid API key.",
                },
            ],
        }
    }
    # As the real API does, no key at all is a 403 rather than the 400 of a wrong one.
    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "AIza" not in wrong.text + missing.text


# --- faults, per API ----------------------------------------------------------------------------


async def _send(client: httpx.AsyncClient, api: str, **extra: Any) -> httpx.Response:
    case = CASES[0]
    if api == "openai":
        return await call_openai(client, case.openai, **extra)
    if api == "anthropic":
        return await call_anthropic(client, case.anthropic, **extra)
    return await call_gemini(client, case.gemini, stream=bool(extra.get("stream")))


async def _fail_next(client: httpx.AsyncClient, kind: str, count: int = 1) -> None:
    r = await client.put("/_mock/config", json={"fail_next": {"kind": kind, "count": count}})
    assert r.status_code == 200


def test_fault_kinds() -> None:
    assert FAULT_KINDS == (
        "rate_limit",
        "server_error",
        "malformed",
        "timeout",
        "auth",
        "stream_error",
    )


async def test_rate_limit_per_api() -> None:
    async with mock(rate_limit_rate=1, retry_after_s=2.5) as client:
        o = await _send(client, "openai")
        a = await _send(client, "anthropic")
        g = await _send(client, "gemini")
    assert (o.status_code, a.status_code, g.status_code) == (429, 429, 429)
    assert o.headers["retry-after"] == "3"

    assert a.headers["retry-after"] == "3"
    assert a.headers["anthropic-ratelimit-requests-limit"] == "60"
    assert a.headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = datetime.fromisoformat(a.headers["anthropic-ratelimit-requests-reset"])
    assert 0 <= (reset - datetime.now(UTC)).total_seconds() <= 3
    body = a.json()
    assert set(body) == {"type", "error", "request_id"}
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"] and body["request_id"] == a.headers["request-id"]

    error = g.json()["error"]
    assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
    retry = [
        d for d in error["details"] if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
    ]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.500s"}]
    assert "retry-after" not in g.headers  # Gemini puts the delay in the body only


async def test_server_errors_per_api() -> None:
    async with mock(error_rate=1) as client:
        o = await _send(client, "openai")
        a = await _send(client, "anthropic")
        g = await _send(client, "gemini")
        await client.put("/_mock/config", json={"error_rate": 0})
        for api in ("openai", "anthropic", "gemini"):
            await _fail_next(client, "server_error")
            assert (await _send(client, api)).status_code == {
                "openai": 500,
                "anthropic": 529,
                "gemini": 500,
            }[api]
    assert o.status_code == 500
    assert a.status_code == 529
    assert a.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": a.headers["request-id"],
    }
    assert g.status_code == 500
    assert g.json()["error"]["status"] == "INTERNAL" and g.json()["error"]["code"] == 500


async def test_auth_fault_and_auth_checks_per_api() -> None:
    async with mock() as client:
        for api, status in [("openai", 401), ("anthropic", 401), ("gemini", 400)]:
            await _fail_next(client, "auth", 2)
            assert [(await _send(client, api)).status_code for _ in range(3)] == [
                status,
                status,
                200,
            ]
    async with mock(api_key="sk-ant-mock") as client:
        missing = await _send(client, "anthropic")
        wrong = await call_anthropic(
            client, CASES[0].anthropic, headers={**VERSION, "x-api-key": "nope"}
        )
        right = await call_anthropic(
            client, CASES[0].anthropic, headers={**VERSION, "x-api-key": "sk-ant-mock"}
        )
        bearer = await call_anthropic(
            client, CASES[0].anthropic, headers={**VERSION, "authorization": "Bearer sk-ant-mock"}
        )
    for r in (missing, wrong, bearer):
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert "sk-ant-mock" not in r.text
    assert right.status_code == 200


async def test_malformed_and_timeout_per_api() -> None:
    async with mock() as client:
        for api in ("openai", "anthropic", "gemini"):
            await _fail_next(client, "malformed")
            bad = await _send(client, api)
            assert bad.status_code == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(bad.text)
            await _fail_next(client, "timeout")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_send(client, api), timeout=0.2)
            assert (await _send(client, api)).status_code == 200
        stats = (await client.get("/_mock/stats")).json()
    assert stats["in_flight"] == 0
    assert stats["calls"] == 9
    assert stats["by_status"] == {"200": 6}  # the hung calls never answered


async def test_unknown_model_per_api() -> None:
    async with mock(models=["known"]) as client:
        o = await call_openai(client, CASES[0].openai, model="other")
        a = await call_anthropic(client, CASES[0].anthropic, model="other")
        g = await call_gemini(client, CASES[0].gemini, model="other")
        ok = await call_gemini(client, CASES[0].gemini, model="known")
    assert o.status_code == 404
    assert a.status_code == 404
    assert a.json()["error"] == {"type": "not_found_error", "message": "model: other"}
    assert g.status_code == 404
    assert g.json()["error"]["status"] == "NOT_FOUND"
    assert g.json()["error"]["message"].startswith("models/other is not found")
    assert ok.status_code == 200


async def test_stream_error_per_api() -> None:
    async with mock() as client:
        await _fail_next(client, "stream_error", 3)
        o = await call_openai(
            client, CASES[0].openai, stream=True, stream_options={"include_usage": True}
        )
        a = await call_anthropic(client, CASES[0].anthropic, stream=True)
        g = await call_gemini(client, CASES[0].gemini, stream=True)
        full_text = openai_outcome((await call_openai(client, CASES[0].openai)).json()).text
        # On a call that does not stream, the fault still takes effect.
        await _fail_next(client, "stream_error", 3)
        plain = [await _send(client, api) for api in ("openai", "anthropic", "gemini")]
    assert (o.status_code, a.status_code, g.status_code) == (200, 200, 200)

    events = openai_events(o)
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text and full_text.startswith(text) and text != full_text

    named = anthropic_events(a)
    assert [n for n, _ in named][:3] == ["message_start", "content_block_start", "ping"]
    assert named[-1] == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    assert not {"content_block_stop", "message_delta", "message_stop"} & {n for n, _ in named}
    streamed = "".join(d["delta"]["text"] for n, d in named if n == "content_block_delta")
    assert streamed and full_text.startswith(streamed) and streamed != full_text

    pieces = gemini_events(g)
    assert pieces and all("finishReason" not in c["candidates"][0] for c in pieces)
    assert all("usageMetadata" not in c for c in pieces)

    assert plain[0].status_code == 200 and plain[2].status_code == 200
    for r in (plain[0], plain[2]):
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.text)
    assert plain[1].status_code == 529


# --- validation ---------------------------------------------------------------------------------


async def test_anthropic_version_header_is_required() -> None:
    async with mock() as client:
        r = await call_anthropic(client, CASES[0].anthropic, headers={})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "anthropic-version" in r.json()["error"]["message"]


DROP = object()
TOOL_USE = {
    "role": "assistant",
    "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}],
}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": DROP}, "model"),
        ({"max_tokens": DROP}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ({"messages": [a_user("")]}, "messages.0"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
            "messages.0.content.0",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
            "messages.0.content.0.type",
        ),
        ({"messages": [a_user("q"), TOOL_USE, a_user("no result")]}, "messages"),
        ({"messages": [a_user("q"), {"role": "user", "content": [RESULT]}]}, "messages.1.content"),
        (
            {
                "messages": [
                    a_user("q"),
                    TOOL_USE,
                    {"role": "user", "content": [{"type": "text", "text": "a"}, RESULT]},
                ]
            },
            "messages.2.content",
        ),
        ({"system": 3}, "system"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"temperature": 1.5}, "temperature"),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({"tool_choice": {"type": "auto"}}, "tool_choice"),
        (
            {"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
            "tool_choice.name",
        ),
        ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
    ],
)
async def test_anthropic_invalid_requests(change: dict[str, Any], param: str) -> None:
    body = {"model": "claude", "max_tokens": 100, "messages": [a_user(QUESTION)], **change}
    body = {k: v for k, v in body.items() if v is not DROP}
    async with mock() as client:
        r = await client.post("/v1/messages", json=body, headers=VERSION)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: "), error["message"]


async def test_anthropic_valid_tool_result_order_is_accepted() -> None:
    messages = [
        a_user("q"),
        TOOL_USE,
        {"role": "user", "content": [RESULT, {"type": "text", "text": "and then?"}]},
    ]
    async with mock() as client:
        r = await call_anthropic(
            client, {"max_tokens": 100, "tools": ANTHROPIC_TOOLS, "messages": messages}
        )
    assert r.status_code == 200, r.text
    assert r.json()["stop_reason"] == "tool_use"  # the last turn is the user's text


CALL = {"role": "model", "parts": [{"functionCall": {"name": "get_time", "args": {}}}]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "contents"),
        ({"contents": []}, "contents"),
        ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "contents[0].role"),
        ({"contents": [{"role": "user", "parts": []}]}, "contents[0].parts"),
        ({"contents": [{"role": "user", "parts": [{}]}]}, "contents[0].parts[0].data"),
        ({"contents": [g_user("q"), CALL, g_user("no response")]}, "contents[2]"),
        ({"contents": [CALL]}, "contents[0]"),
        ({"contents": [g_user("q")], "max_tokens": 5}, "max_tokens"),
        (
            {"contents": [g_user("q")], "generationConfig": {"max_tokens": 5}},
            "generation_config.max_tokens",
        ),
        (
            {"contents": [g_user("q")], "generationConfig": {"maxOutputTokens": 0}},
            "generation_config.max_output_tokens",
        ),
        (
            {"contents": [g_user("q")], "generationConfig": {"stopSequences": ["a"] * 6}},
            "generation_config.stop_sequences",
        ),
        (
            {"contents": [g_user("q")], "generationConfig": {"responseMimeType": "text/csv"}},
            "generation_config.response_mime_type",
        ),
        (
            {"contents": [g_user("q")], "generationConfig": {"candidateCount": 2}},
            "generation_config.candidate_count",
        ),
        (
            {
                "contents": [g_user("q")],
                "tools": GEMINI_TOOLS,
                "toolConfig": {
                    "functionCallingConfig": {"mode": "AUTO", "allowedFunctionNames": ["get_time"]}
                },
            },
            "tool_config.function_calling_config.allowed_function_names",
        ),
    ],
)
async def test_gemini_invalid_requests(body: dict[str, Any], field: str) -> None:
    async with mock() as client:
        r = await call_gemini(client, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert error["message"]
    [violation] = error["details"][0]["fieldViolations"]
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert violation["field"] == field


async def test_unparsable_bodies_and_unknown_paths_use_each_api_envelope() -> None:
    bad = {"content": b"{nope", "headers": {"content-type": "application/json", **VERSION}}
    async with mock() as client:
        a = await client.post("/v1/messages", **bad)  # type: ignore[arg-type]
        g = await client.post("/v1beta/models/m:generateContent", **bad)  # type: ignore[arg-type]
        g404 = await client.post("/v1beta/models/m:countTokens", json={})
        a405 = await client.get("/v1/messages")
    assert a.status_code == 400 and a.json()["error"]["type"] == "invalid_request_error"
    assert g.status_code == 400 and g.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert g404.status_code == 404 and g404.json()["error"]["status"] == "NOT_FOUND"
    assert a405.status_code == 405 and a405.json()["type"] == "error"


# --- stats and latency across APIs --------------------------------------------------------------


async def test_stats_and_latency_count_every_api() -> None:
    async with mock(latency_ms=150) as client:
        start = time.monotonic()
        responses = await asyncio.gather(
            *(_send(client, api) for api in ("openai", "anthropic", "gemini") for _ in range(3))
        )
        elapsed = time.monotonic() - start
        await _fail_next(client, "rate_limit")
        await _send(client, "anthropic")
        await call_gemini(client, {"contents": []})
        stats = (await client.get("/_mock/stats")).json()
    assert [r.status_code for r in responses] == [200] * 9
    assert 0.15 <= elapsed < 1.2  # concurrent, each delayed
    assert stats == {
        "calls": 11,
        "in_flight": 0,
        "max_in_flight": 9,
        "by_status": {"200": 9, "429": 1, "400": 1},
        "by_model": {"gpt-4o-mini": 3, "claude-sonnet-4-5": 4, "gemini-2.5-flash": 4},
    }
