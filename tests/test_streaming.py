"""Streaming over AMQP: chunks on the reply queue in order, then one final result."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractRobustConnection

from broker.client import SwitchyardClient
from broker.core.config import load_config
from broker.core.names import TYPE_CHUNK, TYPE_RESULT, Names
from mock_provider import expected_completion
from schemas import JobChunk, JobResult
from tests.conftest import AMQP_URL, MockProvider, eventually


async def test_a_streaming_job_delivers_its_chunks_in_order_then_one_result(
    amqp: AbstractRobustConnection,
    names: Names,
    config_file: Path,
    pipeline: Any,
    mock: MockProvider,
) -> None:
    messages = [{"role": "user", "content": "Stream me a long answer about rivers, please."}]
    job = {
        "schema_version": 1,
        "job_id": f"stream-{uuid.uuid4()}",
        "model": "gpt-4o-mini",
        "messages": messages,
        "params": {"stream": True},
    }
    channel = await amqp.channel()
    replies = await channel.declare_queue(f"{names.namespace}.stream-replies", exclusive=True)
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with pipeline(load_config(config_file), accountant=False):
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(job).encode(), reply_to=replies.name, correlation_id="s1"),
            routing_key=names.jobs,
        )
        async with replies.iterator(timeout=20) as iterator:
            async for message in iterator:
                await message.ack()
                received.append(message)
                if message.type == TYPE_RESULT:
                    break
    leftover = await replies.get(fail=False, timeout=1)
    await channel.close()

    assert leftover is None  # one final result, nothing after it
    assert {m.correlation_id for m in received} == {"s1"}
    *chunk_messages, result_message = received
    assert [m.type for m in chunk_messages] == [TYPE_CHUNK] * len(chunk_messages)
    chunks = [JobChunk.model_validate_json(m.body) for m in chunk_messages]
    assert len(chunks) >= 3
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert {c.attempt for c in chunks} == {1}
    streamed = "".join(choice.delta.content or "" for c in chunks for choice in c.chunk.choices)
    text, finish_reason = expected_completion(messages)
    assert streamed == text
    result = JobResult.model_validate_json(result_message.body)
    assert result.status.value == "succeeded"
    assert result.response is not None
    assert result.response.choices[0].message.content == text
    assert result.response.choices[0].finish_reason == finish_reason
    assert result.usage is not None and result.usage.completion_tokens > 0
    assert not result.usage_estimated


async def test_a_stream_cut_short_is_retried_and_the_client_sees_the_new_attempt(
    names: Names, config_file: Path, pipeline: Any, mock: MockProvider
) -> None:
    mock.configure(fail_next={"kind": "stream_error", "count": 1})
    messages = [{"role": "user", "content": "An answer that breaks the first time."}]
    replies: list[JobChunk | JobResult] = []
    async with pipeline(load_config(config_file), accountant=False):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            async for reply in client.stream(messages, model="gpt-4o-mini", timeout_s=30):
                replies.append(reply)
    *chunks, result = replies
    assert isinstance(result, JobResult)
    assert all(isinstance(c, JobChunk) for c in chunks)
    first = [c for c in chunks if isinstance(c, JobChunk) and c.attempt == 1]
    second = [c for c in chunks if isinstance(c, JobChunk) and c.attempt == 2]
    assert first and second
    assert [c.sequence for c in second] == list(range(len(second)))
    text, _ = expected_completion(messages)
    assert "".join(ch.delta.content or "" for c in second for ch in c.chunk.choices) == text
    assert result.status.value == "succeeded"
    assert [a.status for a in result.attempts] == ["failed", "succeeded"]
    assert result.attempts[0].error_code is not None
    assert result.attempts[0].error_code.value == "server_error"


async def test_the_tokens_a_broken_stream_generated_are_recorded_for_its_attempt(
    names: Names, config_file: Path, pipeline: Any, mock: MockProvider, pg: asyncpg.Connection
) -> None:
    """The provider bills what it generated before the stream broke; that attempt's usage was
    not recorded, so budgets and cost missed it."""
    mock.configure(fail_next={"kind": "stream_error", "count": 1})
    messages = [{"role": "user", "content": "An answer that breaks the first time, and costs."}]
    async with pipeline(load_config(config_file)):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            replies = [r async for r in client.stream(messages, model="gpt-4o-mini", timeout_s=30)]
        result = replies[-1]
        assert isinstance(result, JobResult) and result.status.value == "succeeded"
        broken = [c for c in replies if isinstance(c, JobChunk) and c.attempt == 1]
        sent = "".join(ch.delta.content or "" for c in broken for ch in c.chunk.choices)

        async def recorded() -> bool:
            count = await pg.fetchval("SELECT count(*) FROM usage WHERE job_id = $1", result.job_id)
            return bool(count == 2)

        await eventually(recorded, 10, "both attempts' usage rows")
    rows = await pg.fetch(
        "SELECT attempt, prompt_tokens, completion_tokens, estimated, cost_usd FROM usage"
        " WHERE job_id = $1 ORDER BY attempt",
        result.job_id,
    )
    assert [r["attempt"] for r in rows] == [1, 2]
    first, _ = rows
    assert sent and first["completion_tokens"] > 0 and first["prompt_tokens"] > 0
    assert first["estimated"]  # the stream broke before the usage it ends with
    assert first["cost_usd"] > 0
