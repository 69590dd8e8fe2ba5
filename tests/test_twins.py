"""Twins: a job delivered twice because a process died between its publish and its ack. Each
call is in the ledger, and the durable results queue gets one result per job."""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

from broker.client import SwitchyardClient, make_job
from broker.core.clock import utcnow
from broker.core.codec import encode
from broker.core.config import Config, load_config
from broker.core.names import HEADER_REDELIVERED, Names
from broker.core.windows import Period, window
from broker.state.quota import Bucket, QuotaStore, ReservationState, Reserved
from broker.transport.amqp import declare_results_queue, declare_topology
from schemas import CompletionJob, Route
from tests.conftest import AMQP_URL, MockProvider, eventually, write_config

MODEL = "gpt-4o-mini"


def routed(content: str) -> CompletionJob:
    """A job as the scheduler hands it to the ``mock`` provider's queue."""
    job = make_job([{"role": "user", "content": content}], model=MODEL)
    route = Route(
        provider="mock", model=MODEL, public_model=MODEL, reason="test", scheduled_at=utcnow()
    )
    return job.model_copy(update={"route": route})


async def send(
    amqp: AbstractRobustConnection,
    names: Names,
    job: CompletionJob,
    results: str,
    *,
    marked: bool = False,
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(
                encode(job),
                message_id=job.job_id,
                correlation_id=job.job_id,
                reply_to=results,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={HEADER_REDELIVERED: 1} if marked else {},
            ),
            routing_key=names.provider("mock"),
        )
    finally:
        await channel.close()


async def drain(amqp: AbstractRobustConnection, queue_name: str) -> list[str]:
    """The job ids of the results waiting in ``queue_name``, taken off it."""
    ids = []
    channel = await amqp.channel()
    try:
        queue = await channel.get_queue(queue_name)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            ids.append(orjson.loads(message.body)["job_id"])
    finally:
        await channel.close()
    return ids


async def usage_rows(pg: asyncpg.Connection, job_id: str) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM usage WHERE job_id = $1", job_id))


async def test_two_copies_of_a_job_make_two_ledger_rows_and_one_result(
    amqp: AbstractRobustConnection,
    names: Names,
    config: Config,
    pipeline: Any,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    mock.configure(latency_ms=200)  # both copies are in their calls at once
    channel = await amqp.channel()
    results = (await declare_results_queue(channel, names, "twins")).name
    await channel.close()
    job = routed("twin")
    async with pipeline(config, scheduler=False):
        await send(amqp, names, job, results)
        await send(amqp, names, job, results, marked=True)

        async def both_recorded() -> bool:
            return await usage_rows(pg, job.job_id) == 2

        await eventually(both_recorded, 20, "both calls in the ledger")
        assert mock.stats()["calls"] == 2  # the provider served (and bills) both
        assert await drain(amqp, results) == [job.job_id]


async def test_a_job_that_comes_again_after_its_answer_is_not_called_again(
    amqp: AbstractRobustConnection,
    names: Names,
    config: Config,
    pipeline: Any,
    pg: asyncpg.Connection,
    redis: Redis,
    mock: MockProvider,
) -> None:
    """The copy came with a reservation of its own (a scheduler reserved for it again): not
    called, it gives that hold back, which would otherwise stand until it lapsed."""
    channel = await amqp.channel()
    results = (await declare_results_queue(channel, names, "again")).name
    await channel.close()
    job, after = routed("answered"), routed("after it")
    store = QuotaStore(redis, names)
    counter = names.quota_bucket("key", "k", "tokens_day", "test")
    hold = Bucket(counter, "tokens", 500, 100_000, utcnow().timestamp() + 3600, "key budget")
    assert isinstance(await store.reserve("twin-hold", [hold], 3600), Reserved)
    assert job.route is not None
    twin = job.model_copy(
        update={"route": job.route.model_copy(update={"reservation_id": "twin-hold"})}
    )
    async with pipeline(config, scheduler=False):
        await send(amqp, names, job, results)

        async def answered() -> bool:
            return await usage_rows(pg, job.job_id) == 1

        await eventually(answered, 20, "the first copy's answer")
        await send(amqp, names, twin, results, marked=True)
        await send(amqp, names, after, results)

        async def later_job_done() -> bool:
            return await usage_rows(pg, after.job_id) == 1

        await eventually(later_job_done, 20, "the job sent after the copy")
    # Stopped: the worker finished whatever it had taken, the copy (sent first) included.
    assert mock.stats()["calls"] == 2
    assert sorted(await drain(amqp, results)) == sorted([job.job_id, after.job_id])
    assert await usage_rows(pg, job.job_id) == 1
    assert await store.state("twin-hold") is ReservationState.RELEASED
    assert await store.usage(counter) == 0


async def test_a_job_delivered_again_gives_back_the_hold_its_dead_scheduler_left(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
    redis: Redis,
    mock: MockProvider,
) -> None:
    """A scheduler killed between its reserve and its ack left a hold (a day long for a batch
    job); the job, delivered again, names its reservation as before, finds that hold, gives it
    back and reserves afresh: the counter ends equal to the ledger (it stood above it by the
    dead hold: the faults bench counted 102 such holds after one scheduler kill)."""
    secret = f"sk-{names.namespace}"
    key_id = f"k-{names.namespace.replace('.', '-')}"
    key = {
        "id": key_id,
        "key_sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "budgets": {"tokens_per_day": 100_000},
    }
    config = load_config(write_config(tmp_path / "p.yaml", mock, [{"id": "mock"}], keys=[key]))
    counter = names.quota_bucket(
        "key", key_id, "tokens_day", window(Period.DAY, utcnow(), config.zone).id
    )
    job = make_job([{"role": "user", "content": "again"}], model=MODEL, params={"max_tokens": 40})
    # The dead scheduler's hold, under the name this delivery gives its reservation.
    dead = f"{job.job_id}:0:{zlib.crc32(encode(job)):08x}"
    hold = Bucket(counter, "tokens", 500, 100_000, utcnow().timestamp() + 86_400, "key budget")
    assert isinstance(await QuotaStore(redis, names).reserve(dead, [hold], 86_400), Reserved)
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:
        results = await client.open_results("again")
        channel = await amqp.channel()
        await declare_topology(channel, names, ["mock"], config.fair_lanes)
        await client.submit(job, results_queue=results, api_key=secret)
        # Taken and returned unacked, as by the scheduler that died: now a redelivery.
        taken = await (await channel.get_queue(names.jobs)).get(timeout=5)
        await taken.nack(requeue=True)
        await channel.close()
        async with pipeline(config):
            async with asyncio.timeout(30):
                result = await anext(aiter(client.results(results)))
    assert result.status.value == "succeeded"

    async def equal_to_the_ledger() -> bool:
        sql = "SELECT coalesce(sum(total_tokens), 0) FROM usage WHERE key_id = $1"
        spent = int(await pg.fetchval(sql, key_id))
        return spent > 0 and int(await redis.get(counter) or 0) == spent

    await eventually(equal_to_the_ledger, 20, "the counter equal to the ledger")
