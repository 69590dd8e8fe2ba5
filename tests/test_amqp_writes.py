"""Frames written within one event-loop turn leave in one send, in order, and nothing is lost:
checked on a stand-in writer, then on a real connection to RabbitMQ."""

from __future__ import annotations

import asyncio

import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.core.names import Names
from broker.transport.amqp import BROKER_FAILURES, Publisher, connect
from broker.transport.fastpath.connection import CoalescingWriter
from tests.conftest import delete_queues, queue_depth


class _Writer:
    """The part of ``asyncio.StreamWriter`` aiormq uses, recording what it is given."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return self.closed

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True


async def test_writes_of_one_turn_go_in_one_send_and_drain_and_close_flush_first() -> None:
    inner = _Writer()
    writer = CoalescingWriter(inner)  # type: ignore[arg-type]

    for frame in (b"a", b"b", b"c"):
        writer.write(frame)
    assert inner.sent == []
    await asyncio.sleep(0)  # the rest of this turn
    assert inner.sent == [b"abc"]

    writer.write(b"d")
    await writer.drain()  # aiormq's RPCs and handshake drain: no waiting for the turn to end
    assert inner.sent == [b"abc", b"d"]

    writer.write(b"e")
    writer.close()
    assert inner.sent[-1] == b"e" and inner.closed

    writer.write(b"f")  # after close: dropped, not written to a closing transport
    await asyncio.sleep(0)
    assert inner.sent == [b"abc", b"d", b"e"]
    assert writer.can_write_eof()  # the rest is the real writer's


async def test_a_burst_of_publishes_shares_sends_and_arrives_whole_and_in_order(
    amqp: AbstractRobustConnection, names: Names, sends: list[int]
) -> None:
    connection = await connect(str(amqp.url), name="test-writes")
    queue_name = names.results("writes")
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True)
        publisher = Publisher(channel)
        sends.clear()
        bodies = [f"m{i}".encode() for i in range(300)]
        await asyncio.gather(*(publisher.publish(queue_name, body) for body in bodies))

        # With aiormq's default 10-frame write queue these went one send each.
        assert sum(sends) >= len(bodies)
        assert len(sends) <= 30, f"{len(sends)} sends for {len(bodies)} publishes"

        received: list[bytes] = []
        done = asyncio.Event()

        async def collect(message: AbstractIncomingMessage) -> None:
            received.append(message.body)
            if len(received) == len(bodies):
                done.set()

        await queue.consume(collect, no_ack=True)
        await asyncio.wait_for(done.wait(), 10)
        assert received == bodies  # one channel, one queue: RabbitMQ keeps the publish order
    finally:
        await delete_queues(amqp, queue_name)
        await connection.close()


async def test_a_publish_the_broker_refuses_is_a_broker_failure_and_a_refused_reply_is_dropped(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    """A queue full under ``reject-publish`` nacks what is published to it. A hop's publish then
    fails as the broker's failure (its message is redelivered, not dead-lettered as a bad job);
    a result is dropped, as for a vanished reply queue, instead of re-running a paid call."""
    connection = await connect(str(amqp.url), name="test-refused")
    full = names.results("full")
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(
            full, durable=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        publisher = Publisher(channel)
        with pytest.raises(aiormq.exceptions.DeliveryError) as refused:
            await publisher.publish(full, b"{}")
        assert isinstance(refused.value, BROKER_FAILURES)
        assert await publisher.reply(full, b"{}", correlation_id="c-1") is False
        assert await publisher.reply(names.results("gone"), b"{}", correlation_id="c-2") is False
        assert await queue_depth(amqp, full) == 0
    finally:
        await delete_queues(amqp, full)
        await connection.close()
