"""A consumer set that settles its deliveries: coalesced acks never cover a delivery still being
handled, a handler that fails returns its message, and a killed channel redelivers exactly the
deliveries that were not done."""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.core.names import Names
from broker.transport.amqp import connect
from broker.transport.runtime import ConsumerSet
from tests.conftest import delete_queues, eventually, queue_depth


async def _publish(connection: AbstractRobustConnection, queue: str, bodies: list[str]) -> None:
    channel = await connection.channel(publisher_confirms=True)
    await channel.declare_queue(queue, durable=True)
    for body in bodies:
        await channel.default_exchange.publish(aio_pika.Message(body.encode()), routing_key=queue)
    await channel.close()


async def test_done_deliveries_are_acked_and_one_in_hand_is_redelivered(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    queue_name = names.results("acks")
    bodies = [f"m{i}" for i in range(30)]
    await _publish(amqp, queue_name, bodies)

    connection = await aio_pika.connect_robust(amqp.url)
    release = asyncio.Event()
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        queue = await channel.declare_queue(queue_name, durable=True)
        handled: list[str] = []
        acks: list[tuple[int, bool]] = []
        underlay = await channel.get_underlay_channel()
        real_ack = underlay.basic_ack

        async def counted_ack(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
            acks.append((delivery_tag, multiple))
            await real_ack(delivery_tag, multiple=multiple, wait=wait)

        underlay.basic_ack = counted_ack  # type: ignore[method-assign]

        async def handler(message: AbstractIncomingMessage) -> None:
            body = message.body.decode()
            if body == "m20":  # held: every later delivery finishes before it
                await release.wait()
            elif body == "m7" and not message.redelivered:
                raise ConnectionError("the broker went away under this one")
            handled.append(body)

        consumers = ConsumerSet()
        await consumers.consume(queue, handler, ack=True)

        async def all_but_the_held_one() -> bool:
            return len(handled) == 29

        await eventually(all_but_the_held_one, 10, "29 deliveries handled")
        await asyncio.sleep(0.2)  # let the acks of the last turn go out
        held, failed = 21, 8  # delivery tags of m20 and of m7's first delivery
        covered: set[int] = set()
        for tag, multiple in acks:
            assert tag != held
            if multiple:
                assert tag < held
                covered |= set(range(1, tag + 1))
            else:
                covered.add(tag)
        assert covered - {failed} == set(range(1, 32)) - {held, failed}  # m7 came again as tag 31
        assert len(acks) < 29  # the run below the held delivery took fewer acks than deliveries

        await connection.close()  # m20 was never acked: RabbitMQ puts it back

        async def back() -> bool:
            return await queue_depth(amqp, queue_name) == 1

        await eventually(back, 10, "the held delivery back in the queue")
        channel = await amqp.channel()
        left = await channel.declare_queue(queue_name, passive=True)
        assert (await left.get(no_ack=True)).body.decode() == "m20"
        await channel.close()
    finally:
        release.set()
        await connection.close()
        await delete_queues(amqp, queue_name)


async def test_a_replaced_consumer_sets_delivery_in_hand_is_never_covered(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    """A pool that changes its concurrency starts a new consumer set on the same channel while
    the old one still finishes its handlers (``WorkerPool._consume``)."""
    old_queue, new_queue = names.results("acks-old"), names.results("acks-new")
    await _publish(amqp, old_queue, ["held"])
    connection = await aio_pika.connect_robust(amqp.url)
    release = asyncio.Event()
    try:
        channel = await connection.channel()
        handled: list[str] = []

        async def handler(message: AbstractIncomingMessage) -> None:
            if message.body == b"held":
                await release.wait()
            handled.append(message.body.decode())

        old = ConsumerSet()
        await old.consume(await channel.declare_queue(old_queue, durable=True), handler, ack=True)

        async def holding() -> bool:
            return old.in_flight == 1

        await eventually(holding, 10, "the old set holding its delivery")
        await _publish(amqp, new_queue, [f"n{i}" for i in range(10)])
        new = ConsumerSet()
        await new.consume(await channel.declare_queue(new_queue, durable=True), handler, ack=True)

        async def new_done() -> bool:
            return len(handled) == 10

        await eventually(new_done, 10, "the new set's deliveries")
        await asyncio.sleep(0.2)  # their acks are out
        await connection.close()  # the held one was never acked: it comes back

        async def back() -> bool:
            return await queue_depth(amqp, old_queue) == 1

        await eventually(back, 10, "the old set's held delivery back in its queue")
        assert await queue_depth(amqp, new_queue) == 0
    finally:
        release.set()
        await connection.close()
        await delete_queues(amqp, old_queue, new_queue)


async def test_acks_behind_a_delivery_in_hand_are_written_together(
    amqp: AbstractRobustConnection, names: Names, sends: list[int]
) -> None:
    """With an older delivery in hand (a job waiting for a call slot, a long call) no multiple
    ack may cover it, so the later ones are acked tag by tag. They must still leave together:
    written one after the other, each waiting for its own write, 200 acks took 200 sends, and at
    500 jobs/s the prefetch window filled with deliveries already done."""
    queue_name = names.results("acks-behind")
    await _publish(amqp, queue_name, ["held", *(f"m{i}" for i in range(200))])
    connection = await connect(str(amqp.url), name="test-acks-behind")
    release, go = asyncio.Event(), asyncio.Event()
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=300)
        queue = await channel.declare_queue(queue_name, durable=True)
        arrived: list[str] = []

        async def handler(message: AbstractIncomingMessage) -> None:
            arrived.append(message.body.decode())
            await (release if message.body == b"held" else go).wait()

        consumers = ConsumerSet()
        await consumers.consume(queue, handler, ack=True)

        async def all_in_hand() -> bool:
            return len(arrived) == 201

        await eventually(all_in_hand, 10, "every delivery in hand")
        sends.clear()  # from here on, this connection writes the acks and the consumer's cancel
        go.set()  # 200 handlers finish in one turn; the held one stays

        async def only_the_held_one_in_hand() -> bool:
            return consumers.in_flight == 1

        await eventually(only_the_held_one_in_hand, 10, "the 200 handlers done")
        await consumers.stop(grace_s=0)  # cancels the held one; returns once the acks are written
        ack_sends = len(sends)
        await connection.close()  # the held delivery was never acked: it comes back

        async def only_the_held_one_back() -> bool:
            return await queue_depth(amqp, queue_name) == 1

        await eventually(only_the_held_one_back, 10, "the 200 acked and the held one back")
        assert ack_sends <= 3, f"{ack_sends} sends for 200 acks"
    finally:
        release.set()
        await connection.close()
        await delete_queues(amqp, queue_name)
