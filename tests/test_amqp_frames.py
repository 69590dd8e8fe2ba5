"""Frames on the wire: cut from whatever has arrived (the fast path's frame receiver) however
the stream is split, and encoded and decoded on the fast path (``broker.transport.fastpath``)
exactly as pamqp does."""

from __future__ import annotations

import asyncio
import datetime
import random
import struct
from collections.abc import Callable

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pamqp import commands, frame, header, heartbeat
from pamqp.body import ContentBody

from broker.core.names import Names
from broker.transport.amqp import Publisher, connect
from broker.transport.fastpath import frames
from broker.transport.fastpath.connection import FastFrameReceiver
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
_ORIGINAL_MARSHAL = frames._PAMQP_MARSHAL  # pamqp's own, whatever the fast path installed since
WIRE = b"".join(_ORIGINAL_MARSHAL(value, channel) for channel, value in FRAMES)


def _reader(chunks: list[bytes], *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


async def _read_until_closed(
    receiver: FastFrameReceiver,
) -> tuple[list[aiormq.connection.ReceivedFrame], aiormq.exceptions.AMQPConnectionError]:
    """Every frame before the stream's end, and the error that end raised."""
    got: list[aiormq.connection.ReceivedFrame] = []
    while True:
        try:
            got.append(await receiver.get_frame())
        except aiormq.exceptions.AMQPConnectionError as end:
            return got, end


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

    got, end = await _read_until_closed(FastFrameReceiver(_reader(chunks)))

    assert [_as_compared(g) for g in got] == [_as_compared(e) for e in expected]
    # The socket's end is never a normal end (aiormq stops reading at Close-Ok first): a broken
    # connection, so what awaited a confirm fails as a broker failure and is redelivered.
    assert str(end) == "Server connection unexpectedly closed"
    assert got[2][2].properties.headers == PROPERTIES.headers
    assert b"".join(g[2].value for g in got if isinstance(g[2], ContentBody)) == BODY


async def test_a_frame_cut_off_by_the_connection_closing_is_a_connection_error() -> None:
    got, end = await _read_until_closed(FastFrameReceiver(_reader([WIRE[:-3]])))
    assert len(got) == len(FRAMES) - 1
    assert str(end).startswith("Server connection unexpectedly closed with ")


async def test_a_frame_without_its_end_byte_is_an_invalid_frame() -> None:
    tune = _ORIGINAL_MARSHAL(FRAMES[0][1], 0)
    receiver = FastFrameReceiver(_reader([tune[:-1] + b"\x00"]))
    with pytest.raises(aiormq.exceptions.InvalidFrameError):
        await receiver.get_frame()


async def test_a_server_that_answers_with_its_protocol_header_is_refused() -> None:
    """A broker that does not speak AMQP 0-9-1 answers the client's header with its own."""
    receiver = FastFrameReceiver(_reader([b"AMQP\x01\x01\x00\x0a"]))
    with pytest.raises(aiormq.exceptions.ProtocolSyntaxError):
        await receiver.get_frame()


async def test_a_frame_is_returned_as_soon_as_it_is_whole() -> None:
    tune = _ORIGINAL_MARSHAL(FRAMES[0][1], 0)
    reader = _reader([tune[:5]], eof=False)
    receiver = FastFrameReceiver(reader)
    pending = asyncio.ensure_future(receiver.get_frame())
    await asyncio.sleep(0.01)
    assert not pending.done()  # half a frame: still waiting for the rest
    reader.feed_data(tune[5:])
    weight, channel, value = await asyncio.wait_for(pending, 5)
    assert (weight, channel, dict(value)) == (len(tune), 0, dict(FRAMES[0][1]))


async def test_a_message_larger_than_a_frame_arrives_whole_over_switchyards_connections(
    amqp: AbstractRobustConnection, names: Names, fast_path: None
) -> None:
    """RabbitMQ's frame_max (128 KiB by default) cuts this body into several frames, which
    arrive in reads that straddle frame boundaries."""
    queue_name = names.results("frames")
    body = bytes(range(256)) * 1500  # 384,000 bytes
    connection = await connect(amqp.url.human_repr(), name="test-frames")
    assert aiormq.connection.FrameReceiver is FastFrameReceiver  # what aiormq's connect now builds
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


# --- fastpath.frames: pamqp's results, byte for byte and object for object ----------------------


def _random_properties(rng: random.Random) -> commands.Basic.Properties:
    def text(limit: int = 40) -> str:
        return "".join(rng.choices("abcdefghij.-_é✓0123456789", k=rng.randint(0, limit)))

    values: dict[str, object] = {}
    if rng.random() < 0.8:
        values["content_type"] = rng.choice(["application/json", "text/plain", ""])
    if rng.random() < 0.2:
        values["content_encoding"] = text(10)
    if rng.random() < 0.5:
        values["headers"] = {
            "x-switchyard-key": text(),
            "traceparent": text(55),
            "n": rng.randint(-1000, 1000),
            "nested": {"a": [1, "b", True]},
        }
    if rng.random() < 0.7:
        values["delivery_mode"] = rng.choice([1, 2, aio_pika.DeliveryMode.PERSISTENT])
    if rng.random() < 0.7:
        values["priority"] = rng.randint(0, 9)
    for name in ("correlation_id", "reply_to", "expiration", "message_id", "message_type"):
        if rng.random() < 0.6:
            values[name] = text()
    if rng.random() < 0.2:
        values["timestamp"] = datetime.datetime(
            2026, 11, rng.randint(1, 30), rng.randint(0, 23), tzinfo=datetime.UTC
        )
    if rng.random() < 0.1:
        values["user_id"] = "guest"
    if rng.random() < 0.1:
        values["app_id"] = text(12)
    return commands.Basic.Properties(**values)  # type: ignore[arg-type]


def _random_frames(rng: random.Random) -> list[frame.FrameTypes]:
    body = rng.randbytes(rng.randint(0, 300))
    return [
        commands.Basic.Publish(
            exchange=rng.choice(["", "switchyard.config"]),
            routing_key=rng.choice(["bench-a1.jobs", "amq.rabbitmq.reply-to.g1h2AA==", "é✓"]),
            mandatory=rng.random() < 0.5,
            immediate=rng.random() < 0.1,
        ),
        commands.Basic.Deliver(
            f"ctag-{rng.randint(0, 99)}",
            rng.randint(1, 2**63 - 1),
            rng.random() < 0.3,
            rng.choice(["", "switchyard.config"]),
            rng.choice(["bench-a1.provider.mock", "é✓", ""]),
        ),
        header.ContentHeader(0, len(body), _random_properties(rng)),
        ContentBody(body),
        commands.Basic.Ack(rng.randint(0, 2**63 - 1), rng.random() < 0.5),
    ]


def test_frames_are_encoded_and_decoded_as_pamqp_does(monkeypatch: pytest.MonkeyPatch) -> None:
    left_to_pamqp: list[object] = []
    unmarshal = frame.unmarshal

    def counted_unmarshal(data: bytes) -> aiormq.connection.ReceivedFrame:
        left_to_pamqp.append(data)
        return unmarshal(data)

    def counted_marshal(value: frame.FrameTypes, channel: int) -> bytes:
        left_to_pamqp.append(value)
        return _ORIGINAL_MARSHAL(value, channel)

    monkeypatch.setattr(frame, "unmarshal", counted_unmarshal)
    monkeypatch.setattr(frames, "_PAMQP_MARSHAL", counted_marshal)
    rng = random.Random(20261123)
    for _ in range(300):
        for value in _random_frames(rng):
            channel = rng.randint(1, 2047)
            wire = _ORIGINAL_MARSHAL(value, channel)
            left_to_pamqp.clear()
            assert frames.marshal(value, channel) == wire, value
            # A client never encodes a Basic.Deliver: that one is pamqp's.
            assert not left_to_pamqp or isinstance(value, commands.Basic.Deliver)
            left_to_pamqp.clear()
            assert _outcome(frames.unmarshal, wire) == _outcome(unmarshal, wire), value
            # Nor does it decode a Basic.Publish; and pamqp refuses an empty body frame (no
            # frame at all on the wire), so that is left to it too.
            empty_body = isinstance(value, ContentBody) and not value.value
            assert not left_to_pamqp or isinstance(value, commands.Basic.Publish) or empty_body
            if isinstance(value, header.ContentHeader):
                assert frames.unmarshal(wire)[2].class_id == 60  # type: ignore[union-attr]


def test_frames_off_the_fast_path_are_pamqps_and_so_are_its_errors() -> None:
    tune = commands.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=60)
    assert frames.marshal(tune, 0) == _ORIGINAL_MARSHAL(tune, 0)
    assert _as_compared(frames.unmarshal(_ORIGINAL_MARSHAL(tune, 0)))[2] == (
        commands.Connection.Tune,
        dict(tune),
    )
    too_long = header.ContentHeader(0, 1, commands.Basic.Properties(message_id="x" * 256))
    with pytest.raises(TypeError, match="maximum length"):
        _ORIGINAL_MARSHAL(too_long, 1)
    with pytest.raises(TypeError, match="maximum length"):
        frames.marshal(too_long, 1)
    bad_priority = header.ContentHeader(0, 1, commands.Basic.Properties(priority=300))
    with pytest.raises(struct.error):
        frames.marshal(bad_priority, 1)
    # Frames cut short at every length: both decode the same, or both refuse with pamqp's error.
    for value in (
        header.ContentHeader(0, 5, PROPERTIES),
        commands.Basic.Deliver("ctag", 7, True, "", "bench-a1.jobs"),
        commands.Basic.Ack(7, True),
    ):
        wire = _ORIGINAL_MARSHAL(value, 1)
        for size in range(1, len(wire) - 8):
            cut = wire[:3] + struct.pack(">I", size) + wire[7 : 7 + size] + wire[-1:]
            assert _outcome(frames.unmarshal, cut) == _outcome(frame.unmarshal, cut), (value, size)


def _outcome(
    unmarshal: Callable[[bytes], aiormq.connection.ReceivedFrame], data: bytes
) -> tuple[int, int, object] | type[BaseException]:
    try:
        return _as_compared(unmarshal(data))
    except Exception as e:
        return type(e)
