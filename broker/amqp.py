"""The AMQP seam: connections, the topology, confirmed publishing and dead-lettering.

Plain aio-pika, no framework: on this machine FastStream on both ends of an RPC hop moved about
0.6 of what aio-pika did (MEASURED.md). Every publish waits for the broker's confirm; consumers
ack only after their own publishes are confirmed, so a killed process loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, cast

import aio_pika
import aiormq
import pamqp.exceptions
import pamqp.frame
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ConsumerTag,
)
from aiormq.abc import DeliveredMessage

from broker import frames
from broker import names as n
from broker.names import Names

__all__ = [
    "BROKER_FAILURES",
    "PARK_DELAYS_S",
    "Publisher",
    "Unroutable",
    "came_persistent",
    "connect",
    "declare_config_exchange",
    "declare_results_queue",
    "declare_topology",
    "passthrough_headers",
]

log = logging.getLogger(__name__)

MAX_PRIORITY = 10
PARK_DELAYS_S = (1, 5, 30)
"""Parking queues: one per delay, so a queue-wide TTL expires its head first (a per-message
expiration would wait behind longer ones at the head)."""
JSON = "application/json"
_FRAME_HEADER_SIZE = 7
_FRAME_SIZE = struct.Struct(">I")
_READ_SIZE = 256 * 1024


# Failures of the broker connection, not of the message: the handler leaves the message unacked
# so it is redelivered, instead of dead-lettering a good job.
BROKER_FAILURES: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    asyncio.TimeoutError,
)


class Unroutable(Exception):
    """The broker returned a mandatory message: no queue is bound under that name."""


WRITE_QUEUE_FRAMES = 1024
"""aiormq's bound on frames queued for its writer (10 by default). A handler whose publish finds
the queue full waits there holding its channel's lock, so with 10 the publishes of a burst of
deliveries go out one per event-loop turn and cannot share a send. What is queued stays bounded
by the prefetch of each consumer and the confirms each publisher awaits."""


class _CoalescingWriter:
    """An ``asyncio.StreamWriter`` whose writes within one event-loop turn leave in one send.

    aiormq writes each publish and each ack on its own; on loopback every send also runs
    RabbitMQ's side of TCP and wakes it. Measured here (throughput, 10,000 jobs, two alternating
    runs each): RabbitMQ 1.22-1.29 -> 1.09-1.10 ms of CPU per job, the scheduler, worker and
    producer 0.03-0.05 ms less each, the pipeline 0.60-0.61 -> 0.65-0.67 of the bare loop.
    A flush waits at most for the rest of the current loop turn; ``drain``, ``write_eof`` and
    ``close`` flush first, so aiormq's handshake, RPCs and close keep their order."""

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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class _CoalescingTransport(aiormq.connection.TransportFactory):
    """aiormq's own TCP or TLS transport, written through a ``_CoalescingWriter``."""

    def __init__(self, inner: aiormq.connection.TransportFactory) -> None:
        self._inner = inner

    async def create(self, url: Any, **kwargs: Any) -> tuple[asyncio.StreamReader, Any]:
        reader, writer = await self._inner.create(url, **kwargs)
        return reader, _CoalescingWriter(writer)


class _FrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, reading whatever has arrived and cutting it into frames.

    aiormq's own awaits three reads per frame (type and channel, size, payload) under a lock and
    copies each through a ``BytesIO``. This one awaits a read only when no whole frame is
    buffered and decodes each frame with ``broker.frames`` (pamqp's objects); a closed
    connection or a bad frame raises aiormq's errors. Counted with callgrind
    (``ops/bench/instructions.py``), this receiver alone took consuming and acking a message
    from 437k to 364k instructions, the scheduler from 1,135k to 1,051k per job and the worker
    from 2,105k to 2,004k."""

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


class _Delivery(aio_pika.IncomingMessage):
    """aio-pika's incoming message without the check, on each attribute it sets, that the
    message is not locked: a guard for messages being built to publish, which a delivery is not.
    The check's property calls were three quarters of building one: 21 -> 5.4 µs here."""

    __slots__ = ()
    __setattr__ = object.__setattr__  # type: ignore[assignment]


class _Queue(aio_pika.RobustQueue):
    """aio-pika's robust queue (its consumers restored after a reconnect) that hands each
    delivery to the callback as a ``_Delivery``, in the task aiormq starts for it; aio-pika
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
            await callback(_Delivery(message, no_ack=no_ack))

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


class _Channel(aio_pika.RobustChannel):
    QUEUE_CLASS = _Queue


class _RobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection on the coalescing transport (each reconnect too: aio-pika
    hands ``kwargs`` to every new aiormq connection), with channels whose queues deliver
    ``_Delivery`` messages."""

    CHANNEL_CLASS = _Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = (
            aiormq.connection.TLSTransportFactory()
            if self.url.scheme == "amqps"
            else aiormq.connection.TCPTransportFactory()
        )
        self.kwargs["transport_factory"] = _CoalescingTransport(inner)


async def connect(amqp_url: str, *, name: str) -> AbstractRobustConnection:
    """A robust connection (reconnects and restores consumers); ``name`` shows in RabbitMQ."""
    # A class setting, so it holds for every aiormq connection of the process; it only raises a
    # bound, which aio-pika's own publishers (each waiting for its frame's drain) never reach.
    aiormq.Connection.FRAME_BUFFER_SIZE = max(
        aiormq.Connection.FRAME_BUFFER_SIZE, WRITE_QUEUE_FRAMES
    )
    # aiormq's ``connect`` builds its receiver by this module name (no argument reaches it), and
    # aiormq encodes every frame it sends through pamqp's module function; so these too hold for
    # every aiormq connection of the process. ``frames.marshal`` gives pamqp's bytes exactly.
    aiormq.connection.FrameReceiver = _FrameReceiver  # type: ignore[misc]
    pamqp.frame.marshal = frames.marshal
    return await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": name}, connection_class=_RobustConnection
    )


def _work_queue_arguments(names: Names) -> dict[str, Any]:
    return {
        "x-max-priority": MAX_PRIORITY,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.dead,
    }


async def declare_topology(
    channel: AbstractChannel, names: Names, provider_ids: Iterable[str], lanes: int = 1
) -> dict[str, AbstractQueue]:
    """Declare every queue and the config exchange idempotently (same arguments everywhere, so
    redeclaring never fails).

    Work queues dead-letter into ``<ns>.dead``; the dead queue itself has no dead-letter target.
    """
    await declare_config_exchange(channel, names)
    queues: dict[str, AbstractQueue] = {}
    queues[names.dead] = await channel.declare_queue(
        names.dead, durable=True, arguments={"x-max-priority": MAX_PRIORITY}
    )
    for delay_s in PARK_DELAYS_S:
        queues[names.park(delay_s)] = await channel.declare_queue(
            names.park(delay_s),
            durable=True,
            arguments={
                # No x-max-priority: TTL expiry works from a queue's head; the job's priority
                # property survives dead-lettering and counts again in the jobs queue.
                "x-message-ttl": delay_s * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": names.jobs,
            },
        )
    providers = [names.provider(p, lane) for p in provider_ids for lane in range(lanes)]
    work = [names.jobs, names.reroute, names.usage, names.alerts, *providers]
    for queue_name in work:
        queues[queue_name] = await channel.declare_queue(
            queue_name, durable=True, arguments=_work_queue_arguments(names)
        )
    return queues


async def declare_config_exchange(channel: AbstractChannel, names: Names) -> AbstractExchange:
    """The durable fanout exchange that carries each new config version to every process."""
    return await channel.declare_exchange(names.config, aio_pika.ExchangeType.FANOUT, durable=True)


async def declare_results_queue(channel: AbstractChannel, names: Names, name: str) -> AbstractQueue:
    """A durable results queue for a batch producer; it survives the producer's restarts."""
    return await channel.declare_queue(
        names.results(name), durable=True, arguments=_work_queue_arguments(names)
    )


def passthrough_headers(
    message: AbstractIncomingMessage, *, with_key: bool = False
) -> dict[str, Any]:
    """Headers a hop forwards unchanged: the trace context, and the virtual key only
    ``with_key``, for a job that comes back to be authenticated again (a parked one). Past the
    scheduler the key is not needed (the route carries its id), and a message there can end in
    the dead-letter queue by RabbitMQ's own dead-lettering (a deadline passed), headers and all,
    where a secret must not rest."""
    headers = message.headers or {}
    names = (n.HEADER_KEY, n.HEADER_TRACEPARENT) if with_key else (n.HEADER_TRACEPARENT,)
    return {k: headers[k] for k in names if k in headers}


def came_persistent(message: AbstractIncomingMessage) -> bool:
    """A job keeps the delivery mode its producer chose, hop after hop: persistent for a batch
    job with a durable results queue, transient for an RPC whose answer dies with its caller's
    channel (our client's ``complete`` and ``stream``)."""
    return message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


class Publisher:
    """Confirmed publishing, persistent unless ``persistent=False`` (an RPC job, a chunk), to the
    default exchange (routing key = queue name), or to ``exchange`` when one is given (a fanout
    ignores the routing key).

    It publishes on aiormq's channel under aio-pika's (robust: the current one after a
    reconnect) and does not wait for each frame's socket drain, only for the broker's confirm:
    measured here, 0.29 -> 0.20 ms of CPU per publish, and publishes on one channel no longer
    queue behind each other's drain. The broker's flow control still applies (aiormq's bounded
    write queue, ``WRITE_QUEUE_FRAMES``), and every caller's work is bounded by its prefetch.
    """

    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange | None = None) -> None:
        self._channel = channel
        self._exchange = exchange.name if exchange is not None else ""

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        channel = await connection.channel(publisher_confirms=True)
        return cls(channel)

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        priority: int = 0,
        headers: Mapping[str, Any] | None = None,
        expiration: timedelta | None = None,
        mandatory: bool = True,
        message_type: str | None = None,
        persistent: bool = True,
    ) -> None:
        """Publish and wait for the confirm; raise ``Unroutable`` if no queue took it."""
        properties = aiormq.spec.Basic.Properties(
            content_type=JSON,
            delivery_mode=2 if persistent else 1,
            message_type=message_type,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            priority=priority,
            headers=dict(headers) if headers else None,
            expiration=None
            if expiration is None
            else str(max(0, int(expiration.total_seconds() * 1000))),
        )
        if self._channel.is_closed:  # fail fast, as aio-pika does (the robust one would wait)
            raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
        # The concrete channel: its ``basic_publish`` takes ``wait`` (the abstract one omits it).
        channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        confirm = await channel.basic_publish(
            body,
            exchange=self._exchange,
            routing_key=queue,
            properties=properties,
            mandatory=mandatory,
            wait=False,
        )
        if isinstance(confirm, DeliveredMessage):
            raise Unroutable(f"no queue named {queue!r}")
        if confirm is not None and not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise Unroutable(f"broker refused the message for {queue!r}: {confirm!r}")

    async def reply(
        self,
        reply_to: str,
        body: bytes,
        *,
        correlation_id: str | None,
        message_type: str = n.TYPE_RESULT,
        persistent: bool = True,
    ) -> bool:
        """Send a result to a producer's reply queue. A vanished reply queue, or one that
        refuses it (a broker nack: a length limit that rejects publishes), drops the result
        (logged, and ``False``): redelivering the job would call the provider again and not get
        the answer there either; the job's outcome is still recorded in Postgres."""
        # RabbitMQ 3.10 returns a mandatory publish to a direct reply-to name as unroutable even
        # when it delivered it (measured here), so those go without the flag: at-most-once anyway.
        mandatory = not reply_to.startswith(n.DIRECT_REPLY_TO)
        try:
            await self.publish(
                reply_to,
                body,
                correlation_id=correlation_id,
                mandatory=mandatory,
                message_type=message_type,
                persistent=persistent,
            )
        except Unroutable:
            log.warning("reply queue %s is gone; result dropped", reply_to)
            return False
        except aiormq.exceptions.DeliveryError:
            log.warning("reply queue %s refused the result; result dropped", reply_to)
            return False
        return True

    async def dead_letter(
        self,
        names: Names,
        message: AbstractIncomingMessage,
        *,
        source_queue: str,
        code: str,
        reason: str,
    ) -> None:
        """Park a message we cannot process in ``<ns>.dead``, with why, keeping its body."""
        headers = dict(message.headers or {})
        headers.pop(n.HEADER_KEY, None)  # a secret never rests in the dead-letter queue
        headers[n.HEADER_DEAD_REASON] = reason[:1000]
        headers[n.HEADER_DEAD_CODE] = code
        headers[n.HEADER_DEAD_QUEUE] = source_queue
        await self.publish(
            names.dead,
            message.body,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            priority=message.priority or 0,
            headers=headers,
        )
