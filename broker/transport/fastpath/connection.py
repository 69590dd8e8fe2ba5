"""The fast path's classes: a coalescing writer, a frame receiver, lean deliveries, and the
robust connection that uses them. ``broker.transport.fastpath.install`` puts them in place."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
import pamqp.exceptions
from aio_pika.abc import AbstractIncomingMessage, ConsumerTag
from aiormq.abc import DeliveredMessage

from broker.transport.fastpath import frames

__all__ = [
    "CoalescingTransport",
    "CoalescingWriter",
    "FastConnection",
    "FastFrameReceiver",
    "LeanDelivery",
]

_FRAME_HEADER_SIZE = 7
_FRAME_SIZE = struct.Struct(">I")
_READ_SIZE = 256 * 1024


class CoalescingWriter:
    """An ``asyncio.StreamWriter`` whose writes within one event-loop turn leave in one send:
    aiormq writes each publish and ack on its own, and on loopback every send wakes RabbitMQ.
    ``drain``, ``write_eof`` and ``close`` flush first, so aiormq's handshake, RPCs and close
    keep their order. It offers exactly the writer methods aiormq calls."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        if not self._writer.is_closing():  # a lost connection: its frames go with it
            self._writer.write(data)

    async def drain(self) -> None:
        self._flush()
        await self._writer.drain()

    def write_eof(self) -> None:
        self._flush()
        self._writer.write_eof()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def can_write_eof(self) -> bool:
        return self._writer.can_write_eof()

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._writer.transport

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()


class CoalescingTransport(aiormq.connection.TransportFactory):
    """aiormq's own TCP or TLS transport, written through a ``CoalescingWriter``."""

    def __init__(self, inner: aiormq.connection.TransportFactory) -> None:
        self._inner = inner

    async def create(self, url: Any, **kwargs: Any) -> tuple[asyncio.StreamReader, Any]:
        reader, writer = await self._inner.create(url, **kwargs)
        return reader, CoalescingWriter(writer)


class FastFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, reading whatever has arrived and cutting it into frames.

    aiormq's own awaits three reads per frame under a lock and copies each through a
    ``BytesIO``; this one awaits a read only when no whole frame is buffered and decodes with
    ``frames`` (pamqp's objects). A closed connection or a bad frame raises aiormq's errors."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = bytearray()

    async def get_frame(self) -> aiormq.connection.ReceivedFrame:
        buffer = self._buffer
        while True:
            if len(buffer) >= _FRAME_HEADER_SIZE:
                if not self.started:
                    if buffer.startswith(b"AMQP"):
                        raise aiormq.exceptions.ProtocolSyntaxError(
                            "Unexpected AMQP protocol header"
                        )
                    self.started = True
                size = _FRAME_SIZE.unpack_from(buffer, 3)[0]
                end = _FRAME_HEADER_SIZE + size + 1
                if len(buffer) >= end:
                    data = bytes(buffer[:end])
                    del buffer[:end]
                    try:
                        return frames.unmarshal(data)
                    except pamqp.exceptions.PAMQPException as e:
                        raise aiormq.exceptions.InvalidFrameError(str(e)) from e
            try:
                chunk = await self.reader.read(_READ_SIZE)
            except OSError as e:
                raise aiormq.exceptions.AMQPConnectionError(
                    f"Server communication error: {e!r}"
                ) from e
            if not chunk:
                # Never a normal end: aiormq's reader returns on Close-Ok, and a server's
                # Connection.Close raises, before the socket's end is read. So it is a broken
                # connection (as aiormq's own receiver reports it), which fails what awaited a
                # confirm with a broker failure, and their messages go back to be redelivered.
                raise aiormq.exceptions.AMQPConnectionError(
                    "Server connection unexpectedly closed"
                    + (f" with {len(buffer)} bytes of a frame read" if buffer else "")
                )
            buffer += chunk


class LeanDelivery(aio_pika.IncomingMessage):
    """aio-pika's incoming message without the check, on each attribute it sets, that the
    message is not locked: a guard for messages being built to publish, which a delivery is
    not."""

    __slots__ = ()
    __setattr__ = object.__setattr__  # type: ignore[assignment]


class FastQueue(aio_pika.RobustQueue):
    """aio-pika's robust queue (its consumers restored after a reconnect) that hands each
    delivery to the callback as a ``LeanDelivery``, in the task aiormq starts for it; aio-pika
    starts a second task per delivery, one more event-loop turn on every hop."""

    async def consume(
        self,
        callback: Callable[[AbstractIncomingMessage], Awaitable[Any]],
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
        consumer_tag: ConsumerTag | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (aio-pika's signature)
        robust: bool = True,
    ) -> ConsumerTag:
        async def deliver(message: DeliveredMessage) -> None:
            await callback(LeanDelivery(message, no_ack=no_ack))

        channel = await self.channel.get_underlay_channel()
        started = await channel.basic_consume(
            queue=self.name,
            consumer_callback=deliver,
            exclusive=exclusive,
            no_ack=no_ack,
            arguments=arguments,
            consumer_tag=consumer_tag,
            timeout=timeout,
        )
        if started.consumer_tag is None:
            raise RuntimeError("the broker gave the consumer no tag")
        if robust:  # what ``RobustQueue.restore`` consumes again, as aio-pika's own does
            self._consumers[started.consumer_tag] = {
                "callback": callback,
                "no_ack": no_ack,
                "exclusive": exclusive,
                "arguments": arguments,
            }
        return started.consumer_tag


class FastChannel(aio_pika.RobustChannel):
    QUEUE_CLASS = FastQueue


class FastConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection on the coalescing transport (each reconnect too: aio-pika
    hands ``kwargs`` to every new aiormq connection), with channels whose queues deliver
    ``LeanDelivery`` messages."""

    CHANNEL_CLASS = FastChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = (
            aiormq.connection.TLSTransportFactory()
            if self.url.scheme == "amqps"
            else aiormq.connection.TCPTransportFactory()
        )
        self.kwargs["transport_factory"] = CoalescingTransport(inner)
