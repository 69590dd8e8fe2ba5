"""Frames read off the wire (``broker.amqp._FrameReceiver``): cut from whatever has arrived, and
equal to what pamqp decodes from each frame's bytes however the stream is split."""

from __future__ import annotations

import asyncio
import datetime

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pamqp import commands, frame, header, heartbeat
from pamqp.body import ContentBody

from broker.amqp import Publisher, _FrameReceiver, connect
from broker.names import Names
from tests.conftest import delete_queues, eventually

PROPERTIES = commands.Basic.Properties(
    content_type="application/json",
    headers={"x-switchyard-key": "sk-test", "traceparent": "00-abc-def-01", "n": 3},
    delivery_mode=2,
    priority=7,
    correlation_id="job-1",
    reply_to="amq.rabbitmq.reply-to.g1h2",
    expiration="60000",
    message_id="job-1",
    timestamp=datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.UTC),
    message_type="switchyard.result",
)
BODY = b'{"job_id": "job-1", "status": "succeeded"}' * 5
FRAMES: list[tuple[int, frame.FrameTypes]] = [
    (0, commands.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=60)),
    (1, commands.Basic.Deliver("ctag-1", 42, False, "", "bench.jobs")),
    (1, header.ContentHeader(0, len(BODY), PROPERTIES)),
    (1, ContentBody(BODY[:100])),
    (1, ContentBody(BODY[100:])),
    (0, heartbeat.Heartbeat()),
    (2, commands.Basic.Ack(delivery_tag=7, multiple=True)),
]
WIRE = b"".join(frame.marshal(value, channel) for channel, value in FRAMES)


def _reader(chunks: list[bytes], *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


async def _read_all(receiver: _FrameReceiver) -> list[aiormq.connection.ReceivedFrame]:
    return [received async for received in receiver]


def _as_compared(received: aiormq.connection.ReceivedFrame) -> tuple[int, int, object]:
    """pamqp compares only properties by value; the rest by what they carry."""
    weight, channel, value = received
    if isinstance(value, header.ContentHeader):
        return weight, channel, (value.body_size, value.properties)
    if isinstance(value, ContentBody):
        return weight, channel, (ContentBody, value.value)
    if isinstance(value, heartbeat.Heartbeat):
        return weight, channel, heartbeat.Heartbeat
    return weight, channel, (type(value), dict(value))


@pytest.mark.parametrize("chunk_size", [1, 2, 6, 7, 8, 9, 13, 64, 200, len(WIRE)])
async def test_frames_equal_pamqps_however_the_stream_is_split(chunk_size: int) -> None:
    expected = []
    offset = 0
    while offset < len(WIRE):
        expected.append(frame.unmarshal(WIRE[offset:]))
        offset += expected[-1][0]
    chunks = [WIRE[i : i + chunk_size] for i in range(0, len(WIRE), chunk_size)]

    got = await _read_all(_FrameReceiver(_reader(chunks)))

    assert [_as_compared(g) for g in got] == [_as_compared(e) for e in expected]
    assert got[2][2].properties.headers == PROPERTIES.headers
    assert b"".join(g[2].value for g in got if isinstance(g[2], ContentBody)) == BODY


async def test_a_frame_cut_off_by_the_connection_closing_is_a_connection_error() -> None:
    receiver = _FrameReceiver(_reader([WIRE[:-3]]))
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="unexpectedly closed"):
        await _read_all(receiver)


async def test_a_frame_without_its_end_byte_is_an_invalid_frame() -> None:
    tune = frame.marshal(FRAMES[0][1], 0)
    receiver = _FrameReceiver(_reader([tune[:-1] + b"\x00"]))
    with pytest.raises(aiormq.exceptions.InvalidFrameError):
        await receiver.get_frame()


async def test_a_server_that_answers_with_its_protocol_header_is_refused() -> None:
    """A broker that does not speak AMQP 0-9-1 answers the client's header with its own."""
    receiver = _FrameReceiver(_reader([b"AMQP\x01\x01\x00\x0a"]))
    with pytest.raises(aiormq.exceptions.ProtocolSyntaxError):
        await receiver.get_frame()


async def test_a_frame_is_returned_as_soon_as_it_is_whole() -> None:
    tune = frame.marshal(FRAMES[0][1], 0)
    reader = _reader([tune[:5]], eof=False)
    receiver = _FrameReceiver(reader)
    pending = asyncio.ensure_future(receiver.get_frame())
    await asyncio.sleep(0.01)
    assert not pending.done()  # half a frame: still waiting for the rest
    reader.feed_data(tune[5:])
    weight, channel, value = await asyncio.wait_for(pending, 5)
    assert (weight, channel, dict(value)) == (len(tune), 0, dict(FRAMES[0][1]))


async def test_a_message_larger_than_a_frame_arrives_whole_over_switchyards_connections(
    amqp: AbstractRobustConnection, names: Names
) -> None:
    """RabbitMQ's frame_max (128 KiB by default) cuts this body into several frames, which
    arrive in reads that straddle frame boundaries."""
    queue_name = names.results("frames")
    body = bytes(range(256)) * 1500  # 384,000 bytes
    connection = await connect(amqp.url.human_repr(), name="test-frames")
    assert aiormq.connection.FrameReceiver is _FrameReceiver  # what aiormq's connect now builds
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True)
        publisher = Publisher(channel)
        for i in range(3):
            await publisher.publish(queue_name, body[i:], message_id=f"m{i}", priority=i)
        got: list[AbstractIncomingMessage] = []

        async def handler(message: AbstractIncomingMessage) -> None:
            got.append(message)
            await message.ack()

        await queue.consume(handler)

        async def all_three() -> bool:
            return len(got) == 3

        await eventually(all_three, 15, "three large messages")
        assert [(m.message_id, m.body) for m in got] == [(f"m{i}", body[i:]) for i in range(3)]
        assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in got)
    finally:
        await connection.close()
        await delete_queues(amqp, queue_name)
