"""Consumers on Switchyard's connections (``broker.transport.amqp.connect``): each delivery comes as
a lean message carrying every property it was published with, and a consumer is restored after its
connection drops, on the same lean path."""

from __future__ import annotations

from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.core.names import Names
from broker.transport.amqp import connect
from broker.transport.fastpath.connection import CoalescingTransport, CoalescingWriter, LeanDelivery
from broker.transport.runtime import ConsumerSet
from tests.conftest import delete_queues, eventually, queue_depth


async def _publish(amqp: AbstractRobustConnection, queue: str, body: bytes) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    await channel.default_exchange.publish(
        aio_pika.Message(
            body,
            correlation_id=f"corr-{body.decode()}",
            message_id=f"id-{body.decode()}",
            reply_to="somewhere",
            priority=7,
            headers={"x-test": "kept"},
            type="switchyard.result",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=queue,
    )
    await channel.close()


async def test_deliveries_are_lean_and_whole_and_the_consumer_survives_a_dropped_connection(
    amqp: AbstractRobustConnection, names: Names, monkeypatch: pytest.MonkeyPatch, fast_path: None
) -> None:
    writers: list[CoalescingWriter] = []
    create = CoalescingTransport.create

    async def kept(self: CoalescingTransport, url: Any, **kwargs: Any) -> tuple[Any, Any]:
        reader, writer = await create(self, url, **kwargs)
        writers.append(writer)
        return reader, writer

    monkeypatch.setattr(CoalescingTransport, "create", kept)
    queue_name = names.results("consume")
    connection = await connect(f"{amqp.url}?reconnect_interval=0.2", name="test-consume")
    got: list[AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)
        queue = await channel.declare_queue(queue_name, durable=True)

        async def handler(message: AbstractIncomingMessage) -> None:
            got.append(message)

        consumers = ConsumerSet()
        await consumers.consume(queue, handler, ack=True)
        await _publish(amqp, queue_name, b"before")

        async def first() -> bool:
            return len(got) == 1

        await eventually(first, 10, "the first delivery")
        message = got[0]
        assert isinstance(message, LeanDelivery)
        assert (message.body, message.correlation_id, message.message_id) == (
            b"before",
            "corr-before",
            "id-before",
        )
        assert (message.reply_to, message.priority, message.type) == (
            "somewhere",
            7,
            "switchyard.result",
        )
        assert message.headers == {"x-test": "kept"}
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.redelivered is False and message.delivery_tag == 1

        assert len(writers) == 1
        writers[0].transport.abort()  # the TCP connection drops under the consumer

        async def reconnected() -> bool:
            return len(writers) == 2 and not connection.is_closed

        await eventually(reconnected, 10, "the connection back")
        await _publish(amqp, queue_name, b"after")  # waits in the queue until the consumer is back

        async def second() -> bool:
            return len(got) == 2

        await eventually(second, 10, "a delivery to the restored consumer")
        assert isinstance(got[1], LeanDelivery) and got[1].body == b"after"
        await consumers.stop(grace_s=5)

        async def all_acked() -> bool:
            return await queue_depth(amqp, queue_name) == 0

        await eventually(all_acked, 10, "both deliveries acked")
    finally:
        await connection.close()
        await delete_queues(amqp, queue_name)
