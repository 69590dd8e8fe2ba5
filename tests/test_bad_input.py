"""Bad input: a typed ``rejected`` result on reply_to, the message in the dead-letter queue with
its reason, and the consumer keeps serving."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from pamqp import commands

from broker.accounting.accountant import Accountant
from broker.core.config import load_config
from broker.core.db import make_engine
from broker.core.names import (
    HEADER_DEAD_CODE,
    HEADER_DEAD_QUEUE,
    HEADER_DEAD_REASON,
    HEADER_KEY,
    Names,
)
from broker.transport.outcomes import Outcomes
from schemas import JobEvent, JobStatus
from tests.conftest import AMQP_URL, MockProvider, eventually, queue_depth
from tests.raw_amqp import publish_raw

GOOD_MESSAGES = [{"role": "user", "content": "still serving?"}]

BAD_JOBS = [
    pytest.param(b"this is not {json", "invalid_message", "not valid JSON", id="not-json"),
    pytest.param(
        b'{"schema_version": 1, "job_id": "JOB", "model": "gpt-4o-mini"}',
        "invalid_message",
        "messages: Field required",
        id="missing-field",
    ),
    pytest.param(
        b'{"schema_version": 99, "job_id": "JOB", "messages": [{"role": "user", "content": "x"}]}',
        "unsupported_schema_version",
        "reads version 1",
        id="unknown-schema-version",
    ),
    pytest.param(
        b'{"schema_version": 1, "job_id": "JOB", "model": "gpt-9-ultra",'
        b' "messages": [{"role": "user", "content": "x"}]}',
        "model_unavailable",
        "unknown model 'gpt-9-ultra'; available: gpt-4o-mini",
        id="unknown-model",
    ),
    pytest.param(
        b'{"schema_version": 1, "job_id": "JOB", "model": "gpt-4o-mini",'
        b' "messages": [{"role": "user", "content": "x"}], "reply": {"queue": "'
        + "é".encode() * 128
        + b'"}}',
        "invalid_message",
        "reply.queue: Value error, a queue name is at most 255 bytes",
        id="reply-queue-name-too-long",
    ),
]


@pytest.mark.parametrize(("body", "code", "reason"), BAD_JOBS)
async def test_a_bad_job_is_rejected_dead_lettered_and_the_scheduler_goes_on(
    body: bytes,
    code: str,
    reason: str,
    amqp: AbstractRobustConnection,
    names: Names,
    config_file: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    job_id = f"bad-{uuid.uuid4()}"
    body = body.replace(b"JOB", job_id.encode())
    channel = await amqp.channel()
    replies = await channel.declare_queue(f"{names.namespace}.replies", exclusive=True)
    async with pipeline(load_config(config_file)):
        for payload, message_id in ((body, job_id), (_good_job("good-after"), "good-after")):
            await channel.default_exchange.publish(
                aio_pika.Message(
                    payload,
                    message_id=message_id,
                    correlation_id=f"c-{message_id}",
                    reply_to=replies.name,
                    headers={HEADER_KEY: "sk-virtual-secret"},
                ),
                routing_key=names.jobs,
            )
        got: dict[str, dict[str, Any]] = {}
        async with replies.iterator(timeout=20) as messages:
            async for message in messages:
                await message.ack()
                got[message.correlation_id or ""] = json.loads(message.body)
                if len(got) == 2:
                    break

    rejected = got[f"c-{job_id}"]
    assert rejected["job_id"] == job_id
    assert rejected["status"] == "rejected"
    assert rejected["error"]["code"] == code
    assert rejected["error"]["type"] == "invalid_request"
    assert reason in rejected["error"]["message"]
    assert "response" not in rejected
    assert got["c-good-after"]["status"] == "succeeded"

    dead = await (await channel.declare_queue(names.dead, passive=True)).get(timeout=5)
    assert dead is not None
    await dead.ack()
    assert dead.body == body
    assert dead.message_id == job_id
    assert dead.headers[HEADER_DEAD_CODE] == code
    assert reason in str(dead.headers[HEADER_DEAD_REASON])
    assert dead.headers[HEADER_DEAD_QUEUE] == names.jobs
    assert HEADER_KEY not in dead.headers  # the virtual key never rests in the dead letters
    await channel.close()

    async def recorded() -> bool:
        return await pg.fetchval("SELECT status FROM jobs WHERE job_id = $1", job_id) is not None

    await eventually(recorded, 10, "the rejected job's row")
    row = await pg.fetchrow("SELECT status, error_code FROM jobs WHERE job_id = $1", job_id)
    assert row is not None
    assert (row["status"], row["error_code"]) == ("rejected", code)


async def test_a_body_that_is_not_json_is_answered_by_its_correlation_id(
    amqp: AbstractRobustConnection, names: Names, config_file: Path, pipeline: Any
) -> None:
    """No job id anywhere (no body to read it from, no message_id): the caller, who matches
    replies by correlation id, still gets its rejection instead of waiting out its timeout."""
    channel = await amqp.channel()
    replies = await channel.declare_queue(f"{names.namespace}.replies", exclusive=True)
    correlation_id = f"corr-{uuid.uuid4()}"
    async with pipeline(load_config(config_file), workers=[], accountant=False):
        # A bare producer: aiormq would give the message an id, other clients often do not.
        properties = commands.Basic.Properties(correlation_id=correlation_id, reply_to=replies.name)
        url = urlsplit(AMQP_URL)
        host, port = url.hostname or "127.0.0.1", url.port or 5672
        await publish_raw(host, port, names.jobs, b"not json at all", properties)
        message = None
        deadline = asyncio.get_running_loop().time() + 10
        while message is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            message = await replies.get(timeout=10, fail=False)
    assert message is not None, "no reply to a message without a job id"
    await message.ack()
    result = json.loads(message.body)
    assert message.correlation_id == correlation_id
    assert (result["job_id"], result["status"]) == (correlation_id, "rejected")
    assert result["error"]["code"] == "invalid_message"
    dead = await (await channel.declare_queue(names.dead, passive=True)).get(timeout=5)
    assert dead is not None and dead.body == b"not json at all"
    await dead.ack()
    await channel.close()


async def test_a_bad_usage_event_is_dead_lettered_and_the_accountant_goes_on(
    amqp: AbstractRobustConnection,
    names: Names,
    config_file: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    job_id = f"acct-{uuid.uuid4()}"
    good = {
        "schema_version": 1,
        "kind": "usage",
        "job_id": job_id,
        "attempt": 1,
        "provider": "mock",
        "model": "gpt-4o-mini",
        "public_model": "gpt-4o-mini",
        "prompt_tokens": 1000,
        "completion_tokens": 2000,
        "occurred_at": "2026-11-23T10:00:00Z",
    }
    channel = await amqp.channel()
    async with pipeline(load_config(config_file), scheduler=False, workers=[]):
        # The sentinel follows the duplicate on the same queue, so once it is recorded the
        # duplicate has been through the accountant too.
        sentinel = {**good, "job_id": f"{job_id}-sentinel"}
        # A worker's event comes priced; an older worker's (``good``) is priced here.
        priced = {**good, "job_id": f"{job_id}-priced", "cost_usd": "0.5", "price_version": "v1"}
        # A time without its zone is refused at the door; it used to stop all accounting (its
        # pricing compared it with aware times and the batch was retried for ever).
        naive = {**good, "job_id": f"{job_id}-naive", "occurred_at": "2026-11-23T10:00:00"}
        for event in (b"[1, 2", good, naive, good, priced, sentinel):
            body = event if isinstance(event, bytes) else json.dumps(event).encode()
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=names.usage)

        async def recorded() -> bool:
            sql = "SELECT count(*) FROM usage WHERE job_id = $1"
            return bool(await pg.fetchval(sql, sentinel["job_id"]))

        await eventually(recorded, 10, "the sentinel's usage row")
    sql = "SELECT attempt, cost_usd, price_version FROM usage WHERE job_id = $1"
    rows = await pg.fetch(sql, job_id)
    assert len(rows) == 1  # the redelivered duplicate inserted nothing
    version = load_config(config_file).version
    assert (str(rows[0]["cost_usd"]), rows[0]["price_version"]) == ("0.001350000", version)
    [row] = await pg.fetch(sql, priced["job_id"])
    assert (str(row["cost_usd"]), row["price_version"]) == ("0.500000000", "v1")
    dead_queue = await channel.declare_queue(names.dead, passive=True)
    dead = [await dead_queue.get(timeout=5), await dead_queue.get(timeout=5)]
    assert [d.body for d in dead] == [b"[1, 2", json.dumps(naive).encode()]
    assert all(d.headers[HEADER_DEAD_QUEUE] == names.usage for d in dead)
    assert "occurred_at: Input should have timezone info" in str(
        dead[1].headers[HEADER_DEAD_REASON]
    )
    await channel.close()


async def test_an_event_postgres_refuses_parks_its_batch_and_the_others_are_recorded(
    amqp: AbstractRobustConnection,
    names: Names,
    config_file: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = f"batch-{uuid.uuid4()}"

    def job_event(job: str, prompt_tokens: int) -> dict[str, Any]:
        return {
            "kind": "job",
            "job_id": job,
            "status": "succeeded",
            "provider": "mock",
            "model": "gpt-4o-mini",
            "prompt_tokens": prompt_tokens,
            "finished_at": "2026-11-23T10:00:00Z",
        }

    # pydantic takes 3e9 tokens; Postgres's integer column refuses them (a DataError).
    batch = {
        "schema_version": 1,
        "kind": "batch",
        "events": [job_event(job_id, 10), job_event(f"{job_id}-huge", 3_000_000_000)],
    }
    body = json.dumps(batch).encode()
    # The flush fails once after parking (Redis unreachable, say) and is retried: the message
    # is parked once, not once per retry.
    reconciles: list[int] = []
    reconcile = Accountant._reconcile

    async def failing_once(self: Accountant, events: Any) -> None:
        reconciles.append(len(events))
        if len(reconciles) == 1:
            raise ConnectionError("Redis is away")
        await reconcile(self, events)

    monkeypatch.setattr(Accountant, "_reconcile", failing_once)
    channel = await amqp.channel()
    async with pipeline(load_config(config_file), scheduler=False, workers=[]):
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=names.usage)
        sentinel = {"schema_version": 1, **job_event(f"{job_id}-sentinel", 1)}
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(sentinel).encode()), routing_key=names.usage
        )
        dead_queue = await channel.declare_queue(names.dead, passive=True)

        async def sentinel_recorded() -> bool:
            sql = "SELECT count(*) FROM jobs WHERE job_id = $1"
            return bool(await pg.fetchval(sql, sentinel["job_id"]))

        await eventually(sentinel_recorded, 10, "the sentinel's row, after the retried flush")
    assert len(reconciles) >= 2
    parked = [await dead_queue.get(timeout=5)]
    assert await dead_queue.get(fail=False) is None  # once
    dead = parked[0]
    assert dead.body == body
    assert dead.headers[HEADER_DEAD_CODE] == "rejected_by_database"
    assert dead.headers[HEADER_DEAD_REASON] == "Postgres refused 1 of 2 events: DataError"
    statuses = await pg.fetch(
        "SELECT job_id, prompt_tokens FROM jobs WHERE job_id LIKE $1", f"{job_id}%"
    )
    assert sorted((r["job_id"], r["prompt_tokens"]) for r in statuses) == [
        (job_id, 10),
        (f"{job_id}-sentinel", 1),
    ]
    await channel.close()


def _good_job(job_id: str) -> bytes:
    return json.dumps(
        {"schema_version": 1, "job_id": job_id, "model": "gpt-4o-mini", "messages": GOOD_MESSAGES}
    ).encode()


async def test_a_job_that_cannot_even_be_rejected_is_dead_lettered_by_the_broker_not_looped(
    amqp: AbstractRobustConnection,
    names: Names,
    config_file: Path,
    pipeline: Any,
    mock: MockProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug on the reject path used to return the message to its queue, to fail again for
    ever; it is given up to the queue's dead-letter target, once, and the scheduler goes on."""

    async def broken_reject(self: Outcomes, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug while rejecting")

    monkeypatch.setattr(Outcomes, "reject", broken_reject)
    channel = await amqp.channel()
    replies = await channel.declare_queue(f"{names.namespace}.replies", exclusive=True)
    async with pipeline(load_config(config_file)):
        good = _good_job(f"{names.namespace}-good-after")  # the session's jobs table is shared
        for payload, message_id in ((b"not json", "poison"), (good, "good")):
            await channel.default_exchange.publish(
                aio_pika.Message(payload, message_id=message_id, reply_to=replies.name),
                routing_key=names.jobs,
            )
        dead_queue = await channel.declare_queue(names.dead, passive=True)
        got: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}

        async def both_there() -> bool:
            for name, queue in (("answer", replies), ("dead", dead_queue)):
                if name not in got and (message := await queue.get(fail=False)) is not None:
                    got[name] = message
            return len(got) == 2

        await eventually(both_there, 20, "the good job's answer and the poison in the dead queue")

    assert json.loads(got["answer"].body)["status"] == "succeeded"
    dead = got["dead"]
    assert dead.body == b"not json" and dead.message_id == "poison"
    [death] = dead.headers["x-death"]  # RabbitMQ's own record: rejected once from the jobs queue
    assert (death["reason"], death["queue"], death["count"]) == ("rejected", names.jobs, 1)
    assert await dead_queue.get(fail=False) is None
    assert await queue_depth(amqp, names.jobs) == 0
    await channel.close()


async def test_a_succeeded_job_row_is_not_replaced_by_a_later_failure_of_the_same_job(
    amqp: AbstractRobustConnection,
    names: Names,
    config_file: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
) -> None:
    """A job delivered again after it succeeded (its ack lost) can end expired the second time;
    its row keeps the success, whether the two events come in one batch or in two."""
    job_id = f"twice-{uuid.uuid4()}"

    def event(job: str, status: str, at: str, tokens: int) -> dict[str, Any]:
        return {
            "kind": "job",
            "job_id": job,
            "status": status,
            "provider": "mock" if tokens else None,
            "prompt_tokens": tokens,
            "finished_at": at,
        }

    later = "2026-11-23T10:00:05Z"
    separate = [
        event(job_id, "succeeded", "2026-11-23T10:00:00Z", 7),
        event(job_id, "expired", later, 0),
    ]
    together = {
        "kind": "batch",
        "events": [
            event(f"{job_id}-b", "succeeded", "2026-11-23T10:00:00Z", 7),
            event(f"{job_id}-b", "expired", later, 0),
        ],
    }
    channel = await amqp.channel()
    async with pipeline(load_config(config_file), scheduler=False, workers=[]):
        for body in (separate[0], separate[1], together):
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps({"schema_version": 1, **body}).encode()),
                routing_key=names.usage,
            )
            await asyncio.sleep(0.2)  # past the accountant's 50 ms batch window: own batches

        async def both_recorded() -> bool:
            sql = "SELECT count(*) FROM jobs WHERE job_id LIKE $1"
            return await pg.fetchval(sql, f"{job_id}%") == 2

        await eventually(both_recorded, 10, "both jobs' rows")
    rows = await pg.fetch(
        "SELECT job_id, status, prompt_tokens FROM jobs WHERE job_id LIKE $1 ORDER BY job_id",
        f"{job_id}%",
    )
    assert [(r["status"], r["prompt_tokens"]) for r in rows] == [("succeeded", 7)] * 2
    await channel.close()


async def test_two_accountants_writing_the_same_jobs_in_opposite_orders_do_not_deadlock(
    names: Names, database_url: str, config: Any, pg: asyncpg.Connection
) -> None:
    """Competing accountants get overlapping batches (a redelivery, a job's two events). Rows
    upserted in arrival order lock in opposite orders and Postgres aborted one batch as a
    deadlock; in key order they never do."""
    ids = [f"{names.namespace}-dl-{i:04d}" for i in range(400)]
    writers = [Accountant("amqp://unused", database_url, config, names) for _ in range(2)]
    for writer in writers:
        writer._engine = make_engine(database_url)
    try:
        for round_ in range(3):
            now = datetime.now(UTC)
            events = [
                JobEvent(job_id=i, status=JobStatus.FAILED, attempts=round_, finished_at=now)
                for i in ids
            ]
            await asyncio.gather(
                writers[0]._write(list(events)), writers[1]._write(list(reversed(events)))
            )
    finally:
        for writer in writers:
            assert writer._engine is not None
            await writer._engine.dispose()
    assert (
        await pg.fetchval("SELECT count(*) FROM jobs WHERE attempts = 2 AND job_id = ANY($1)", ids)
        == 400
    )


async def test_a_deadline_past_rabbitmqs_longest_ttl_is_served_and_stalls_nothing(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    """RabbitMQ refuses a message TTL over ten years by closing the publishing channel: the
    scheduler's consumers went with it and every later job waited (found by the fuzz test)."""
    from broker.client import SwitchyardClient
    from tests.conftest import write_config

    config = load_config(write_config(tmp_path / "p.yaml", mock, [{"id": "p"}]))
    far = datetime(9999, 12, 31, tzinfo=UTC)
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with pipeline(config), client:
        prompt = [{"role": "user", "content": "no hurry"}]
        distant = await client.complete(prompt, model="gpt-4o-mini", deadline=far, timeout_s=20)
        after = await client.complete(prompt, model="gpt-4o-mini", timeout_s=20)
    assert (distant.status.value, after.status.value) == ("succeeded", "succeeded")
