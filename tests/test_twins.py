"""Twins: a job delivered twice because a process died between its publish and its ack. Each
call is in the ledger, and the durable results queue gets one result per job."""

from __future__ import annotations

from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractRobustConnection

from broker.client import make_job
from broker.core.clock import utcnow
from broker.core.codec import encode
from broker.core.config import Config
from broker.core.names import HEADER_REDELIVERED, Names
from broker.transport.amqp import declare_results_queue
from schemas import CompletionJob, Route
from tests.conftest import MockProvider, eventually

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
    mock: MockProvider,
) -> None:
    channel = await amqp.channel()
    results = (await declare_results_queue(channel, names, "again")).name
    await channel.close()
    job, after = routed("answered"), routed("after it")
    async with pipeline(config, scheduler=False):
        await send(amqp, names, job, results)

        async def answered() -> bool:
            return await usage_rows(pg, job.job_id) == 1

        await eventually(answered, 20, "the first copy's answer")
        await send(amqp, names, job, results, marked=True)
        await send(amqp, names, after, results)

        async def later_job_done() -> bool:
            return await usage_rows(pg, after.job_id) == 1

        await eventually(later_job_done, 20, "the job sent after the copy")
    # Stopped: the worker finished whatever it had taken, the copy (sent first) included.
    assert mock.stats()["calls"] == 2
    assert sorted(await drain(amqp, results)) == sorted([job.job_id, after.job_id])
    assert await usage_rows(pg, job.job_id) == 1
