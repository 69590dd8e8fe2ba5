"""The HTTP gateway through the official ``openai`` SDK (no Switchyard import on the client's
side), in front of the real pipeline: scheduler, worker pool and accountant on RabbitMQ, Redis
and Postgres, the mock provider behind them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai import AsyncOpenAI

from broker.core.config import Config, load_config
from broker.core.names import Names
from mock_provider import expected_completion, expected_tool_call
from tests.conftest import MockProvider, write_config

SECRET = "sk-gateway-test-key"
SCOPED = "sk-gateway-scoped-key"
LIMITED = "sk-gateway-limited-key"


def _key(key_id: str, secret: str, **fields: Any) -> dict[str, Any]:
    return {"id": key_id, "key_sha256": hashlib.sha256(secret.encode()).hexdigest(), **fields}


@pytest.fixture
def gateway_config(tmp_path: Path, mock: MockProvider) -> Config:
    providers = [
        {
            "id": "mock",
            "concurrency": 8,
            "models": {
                "gpt-4o-mini": {"input": 0.15, "output": 0.60},
                "gpt-4o": {"input": 2.5, "output": 10},
            },
        }
    ]
    keys = [
        _key("team", SECRET),
        _key("scoped", SCOPED, scopes=["gpt-4o"]),
        _key("limited", LIMITED, rpm=1),
    ]
    return load_config(write_config(tmp_path / "gw.yaml", mock, providers, keys=keys))


@pytest.fixture
async def gateway(gateway_config: Config, gateway_in_front: Any) -> AsyncIterator[str]:
    """The pipeline and a gateway in front of it; yields the gateway's base URL."""
    async with gateway_in_front(gateway_config) as url:
        yield url


def sdk(base_url: str, key: str = SECRET) -> AsyncOpenAI:
    # No retries: each test sees the first answer the gateway gave.
    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=30)


QUESTION = [{"role": "user", "content": "What is a priority queue?"}]


async def test_a_completion_comes_back_in_openai_shape_and_is_recorded(
    gateway: str, pg: asyncpg.Connection, mock: MockProvider
) -> None:
    client = sdk(gateway)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=QUESTION, max_tokens=64
    )
    completion = raw.parse()
    content, finish = expected_completion(QUESTION, max_tokens=64)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == content
    assert completion.choices[0].finish_reason == finish
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert mock.stats()["calls"] == 1
    job_id = raw.headers["x-switchyard-job-id"]
    assert raw.headers["x-switchyard-provider"] == "mock"

    async def recorded() -> bool:
        return bool(await pg.fetchval("SELECT count(*) FROM usage WHERE job_id = $1", job_id))

    from tests.conftest import eventually

    await eventually(recorded, 10, "the call's usage row")
    row = await pg.fetchrow(
        "SELECT key_id, prompt_tokens, completion_tokens FROM usage WHERE job_id = $1", job_id
    )
    assert row is not None and row["key_id"] == "team"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )


async def test_a_stream_ends_with_its_usage_and_done(gateway: str) -> None:
    client = sdk(gateway)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_completion(QUESTION)[0]
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * len(chunks)
    *content, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0
    assert all(c.usage is None for c in content)
    assert len({c.id for c in chunks}) == 1


async def test_the_raw_stream_is_server_sent_events_ending_with_done(gateway: str) -> None:
    body = {"model": "gpt-4o-mini", "messages": QUESTION, "stream": True}
    headers = {"authorization": f"Bearer {SECRET}"}
    async with (
        httpx.AsyncClient(base_url=gateway, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([part async for part in response.aiter_bytes()])
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # not asked for


async def test_a_tool_call_round_trip(gateway: str) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "properties": {"term": {"type": "string"}},
                    "required": ["term"],
                },
            },
        }
    ]
    client = sdk(gateway)
    first = await client.chat.completions.create(
        model="gpt-4o-mini", messages=QUESTION, tools=tools
    )
    [call] = first.choices[0].message.tool_calls or []
    assert call.model_dump(exclude_none=True) == expected_tool_call(QUESTION, tools)
    turn = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "a heap-ordered queue"},
    ]
    second = await client.chat.completions.create(model="gpt-4o-mini", messages=turn, tools=tools)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == expected_completion(turn)[0]


async def test_json_mode_answers_a_json_object(gateway: str) -> None:
    client = sdk(gateway)
    response_format = {"type": "json_object"}
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Describe a queue as JSON."}],
        response_format=response_format,  # type: ignore[arg-type]
    )
    content = completion.choices[0].message.content
    assert content is not None and isinstance(json.loads(content), dict)


@pytest.mark.parametrize(
    ("key", "kwargs", "error", "status", "code"),
    [
        ("sk-unknown", {}, openai.AuthenticationError, 401, "unauthorized"),
        (SCOPED, {}, openai.PermissionDeniedError, 403, "forbidden"),
        (SECRET, {"model": "no-such-model"}, openai.NotFoundError, 404, "model_unavailable"),
        (SECRET, {"temperature": 5}, openai.BadRequestError, 400, "invalid_message"),
        (
            SECRET,
            {"extra_body": {"colour": "blue"}},
            openai.BadRequestError,
            400,
            "invalid_message",
        ),
        (
            SECRET,
            {"extra_headers": {"x-switchyard-deadline": "2020-01-01T00:00:00Z"}},
            openai.InternalServerError,
            504,
            "deadline_exceeded",
        ),
    ],
    ids=["unknown-key", "out-of-scope", "unknown-model", "bad-value", "unknown-field", "late"],
)
async def test_each_refusal_is_the_sdks_own_exception(
    gateway: str,
    mock: MockProvider,
    key: str,
    kwargs: dict[str, Any],
    error: type[openai.APIStatusError],
    status: int,
    code: str,
) -> None:
    client = sdk(gateway, key)
    request: dict[str, Any] = {"model": "gpt-4o-mini", "messages": QUESTION, **kwargs}
    with pytest.raises(error) as caught:
        await client.chat.completions.create(**request)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == code and body["message"]
    assert mock.stats()["calls"] == 0


async def test_a_spent_rate_limit_is_429_with_retry_after(gateway: str, mock: MockProvider) -> None:
    client = sdk(gateway, LIMITED)
    await client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["code"] == "rate_limited"  # type: ignore[index]
    assert mock.stats()["calls"] == 1


async def test_two_requests_with_one_idempotency_key_make_one_call_and_one_usage_row(
    gateway: str, mock: MockProvider, pg: asyncpg.Connection
) -> None:
    import asyncio

    mock.configure(latency_ms=300)
    client = sdk(gateway)
    key = {"x-switchyard-idempotency-key": "order-17"}

    async def ask(**extra: Any) -> Any:
        return await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=QUESTION, **extra
        )

    # The second joins the first's wait; the third comes after it ended (by the body field).
    first, second = await asyncio.gather(ask(extra_headers=key), ask(extra_headers=key))
    third = await ask(extra_body={"idempotency_key": "order-17"})
    answers = [r.parse().choices[0].message.content for r in (first, second, third)]
    assert answers == [expected_completion(QUESTION)[0]] * 3
    assert mock.stats()["calls"] == 1
    job_ids = [r.headers["x-switchyard-job-id"] for r in (first, second, third)]
    assert len(set(job_ids)) == 3

    async def recorded() -> bool:
        sql = "SELECT count(*) FROM jobs WHERE job_id = ANY($1::text[])"
        return bool(await pg.fetchval(sql, job_ids) == 3)

    from tests.conftest import eventually

    await eventually(recorded, 10, "the three jobs' rows")
    sql = "SELECT count(*) FROM usage WHERE job_id = ANY($1::text[])"
    assert await pg.fetchval(sql, job_ids) == 1
    # Another key is another caller: its own call.
    await sdk(gateway, LIMITED).chat.completions.create(
        model="gpt-4o-mini", messages=QUESTION, extra_headers=key
    )
    assert mock.stats()["calls"] == 2


async def test_health_and_readiness(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"rabbitmq": True, "redis": True, "postgres": True}
        openapi = (await http.get("/openapi.json")).json()
        assert {"/v1/chat/completions", "/v1/models", "/v1/jobs"} <= set(openapi["paths"])
        assert "text/html" in (await http.get("/docs")).headers["content-type"]
        asyncapi = (await http.get("/asyncapi.json")).json()
        assert asyncapi["asyncapi"] == "3.0.0"
        assert "CompletionJob" in asyncapi["components"]["messages"]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [', 400, "not valid JSON"),
        (b'{"model": "gpt-4o-mini", "messages": "hello"}', 400, "messages"),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            400,
            "",
        ),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
            + b"x" * (10 * 1024 * 1024)
            + b'"}]}',
            413,
            "bytes",
        ),
        (b"", 400, ""),
    ],
    ids=["malformed", "wrong-type", "invalid-utf8", "model-not-string", "10-mb", "empty"],
)
async def test_bad_bodies_are_refused_at_the_door_in_openai_shape(
    gateway: str, mock: MockProvider, body: bytes, status: int, says: str
) -> None:
    headers = {"authorization": f"Bearer {SECRET}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        response = await http.post("/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == status
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and says in error["message"]
        assert error["code"] == "invalid_message"
        # The gateway still serves after each.
        assert (await http.get("/healthz")).status_code == 200
    assert mock.stats()["calls"] == 0


async def test_a_thousand_concurrent_requests_half_streaming_all_answered_right(
    gateway: str, mock: MockProvider
) -> None:
    import asyncio

    client = AsyncOpenAI(
        base_url=f"{gateway}/v1",
        api_key=SECRET,
        max_retries=0,
        timeout=120,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=1000), timeout=120),
    )

    async def ask(i: int) -> tuple[str, str]:
        messages = [{"role": "user", "content": f"question number {i}"}]
        if i % 2:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,
                stream=True,  # type: ignore[arg-type]
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        else:
            done = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,  # type: ignore[arg-type]
            )
            text = done.choices[0].message.content or ""
        return text, expected_completion(messages)[0]

    answers = await asyncio.gather(*(ask(i) for i in range(1000)))
    wrong = [i for i, (got, expected) in enumerate(answers) if got != expected]
    assert wrong == []
    assert mock.stats()["calls"] == 1000


async def test_models_list_every_model_with_providers_prices_limits_and_circuits(
    gateway: str, gateway_config: Config, names: Names, redis: Any
) -> None:
    from broker.state.circuits import Circuits

    provider = gateway_config.providers[0]
    await Circuits(redis, names).failed("mock", provider.circuit, provider.circuit.failures)
    client = sdk(gateway)
    listed = [m.id async for m in client.models.list()]
    assert sorted(listed) == ["gpt-4o", "gpt-4o-mini"]
    one = await client.models.retrieve("gpt-4o")
    assert one.id == "gpt-4o" and one.object == "model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")
    scoped = sdk(gateway, SCOPED)  # its key may use gpt-4o only
    assert [m.id async for m in scoped.models.list()] == ["gpt-4o"]
    with pytest.raises(openai.NotFoundError):
        await scoped.models.retrieve("gpt-4o-mini")
    with pytest.raises(openai.AuthenticationError):
        await sdk(gateway, "sk-unknown").models.list()
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as http:
        assert (await http.get("/v1/models")).status_code == 401  # keys configured: one needed
        headers = {"authorization": f"Bearer {SECRET}"}
        body = (await http.get("/v1/models", headers=headers)).json()
    entry = next(m for m in body["data"] if m["id"] == "gpt-4o")
    [served] = entry["switchyard"]["providers"]
    assert served["provider"] == "mock" and served["model"] == "gpt-4o"
    assert served["price_per_million"] == {"input": "2.5", "output": "10"}
    assert served["limits"]["concurrency"] == 8
    assert served["capabilities"] == {
        "streaming": True,
        "tools": True,
        "json_mode": True,
        "vision": False,
    }
    assert "context_window" in served and "discount" in served
    assert served["circuit"] == "open"


async def test_no_provider_available_is_503_naming_each_candidate_with_retry_after(
    fresh_views: None,
    gateway: str,
    gateway_config: Config,
    names: Names,
    redis: Any,
    mock: MockProvider,
) -> None:
    from broker.state.circuits import Circuits

    provider = gateway_config.providers[0]
    await Circuits(redis, names).failed("mock", provider.circuit, provider.circuit.failures)
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk(gateway).chat.completions.create(model="gpt-4o-mini", messages=QUESTION)
    assert caught.value.status_code == 503
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "no_provider_available"
    assert "mock/gpt-4o-mini: circuit open" in body["message"]
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert mock.stats()["calls"] == 0


async def test_a_client_gone_before_its_call_leaves_its_job_uncalled(
    gateway: str, mock: MockProvider, pg: asyncpg.Connection, names: Names
) -> None:
    import asyncio

    from tests.conftest import eventually

    mock.configure(latency_ms=1500)
    began = await pg.fetchval("SELECT now()")
    client = sdk(gateway)
    busy = [  # every one of the provider's 8 slots
        asyncio.create_task(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"slow {i}"}]
            )
        )
        for i in range(8)
    ]

    async def all_slots_busy() -> bool:
        return bool(mock.stats()["in_flight"] == 8)

    await eventually(all_slots_busy, 10, "8 calls in flight")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "never mind"}]}
    headers = {"authorization": f"Bearer {SECRET}"}
    async with httpx.AsyncClient(base_url=gateway, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its job waits
            await http.post("/v1/chat/completions", json=body, headers=headers)
    await asyncio.gather(*busy)

    async def ended_cancelled() -> bool:
        sql = "SELECT count(*) FROM jobs WHERE status = 'cancelled' AND recorded_at > $1"
        return bool(await pg.fetchval(sql, began) == 1)

    await eventually(ended_cancelled, 10, "the abandoned job ended cancelled")
    await asyncio.sleep(0.5)
    assert mock.stats()["calls"] == 8
