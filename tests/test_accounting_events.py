"""Job events go to the accountant by group commit: what finished while a message awaited its
confirm rides in the next one, and each ``send`` resolves only once its message is confirmed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson
from aio_pika.abc import AbstractRobustConnection

from broker.core.names import Names
from broker.transport.accounting_events import AccountingEvents
from broker.transport.amqp import Publisher, declare_topology
from schemas import JobEvent, JobStatus
from tests.conftest import eventually


def _event(job_id: str) -> JobEvent:
    return JobEvent(job_id=job_id, status=JobStatus.SUCCEEDED, finished_at=datetime.now(UTC))


async def _job_ids_per_message(
    amqp: AbstractRobustConnection, queue: str, messages: int
) -> list[list[str]]:
    channel = await amqp.channel()
    declared = await channel.declare_queue(queue, passive=True)
    bodies: list[bytes] = []

    async def all_there() -> bool:
        message = await declared.get(fail=False, no_ack=True)
        if message is not None:
            bodies.append(message.body)
        return len(bodies) >= messages

    await eventually(all_there, 10, f"{messages} accounting messages")
    assert await declared.get(fail=False) is None  # and no more than that
    await channel.close()
    decoded = [orjson.loads(body) for body in bodies]
    assert all(d["kind"] == "batch" and d["schema_version"] == 1 for d in decoded)
    return [[e["job_id"] for e in d["events"]] for d in decoded]


async def test_events_sent_together_share_messages_up_to_the_cap(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    await declare_topology(channel, names, [])
    events = AccountingEvents(Publisher(channel), names.usage, max_events=20)

    lone = events.send(_event("lone"))
    await lone  # confirmed: sent alone, nothing waited for company
    sent = [events.send(_event(f"job-{i}")) for i in range(50)]
    await asyncio.gather(*sent)

    per_message = await _job_ids_per_message(amqp, names.usage, 4)
    assert per_message == [
        ["lone"],
        [f"job-{i}" for i in range(20)],
        [f"job-{i}" for i in range(20, 40)],
        [f"job-{i}" for i in range(40, 50)],
    ]
    await channel.close()


async def test_a_broker_failure_reaches_every_sender_of_the_message(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    await declare_topology(channel, names, [])
    events = AccountingEvents(Publisher(channel), names.usage)
    await channel.close()

    sent = [events.send(_event(f"job-{i}")) for i in range(3)]
    results = await asyncio.gather(*sent, return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results), results
    assert len({id(r) for r in results}) == 1  # one failed publish, seen by all three
