"""The AMQP seam: connections, the topology, confirmed publishing and dead-lettering.

Plain aio-pika, no framework (docs/architecture.md: FastStream measured against it). Every publish
waits for the broker's confirm; consumers ack only after their own publishes are confirmed, so a
killed process loses nothing. ``broker.transport.fastpath`` plugs faster frames in, opt-in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage

from broker.core import names as n
from broker.core.names import Names
from broker.core.tracing import current

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
    "park_delay",
    "passthrough_headers",
    "ready_messages",
    "use_connection_class",
]

log = logging.getLogger(__name__)

MAX_PRIORITY = 10
PARK_DELAYS_S: tuple[int, ...] = tuple(2**n for n in range(15))
"""Parking queues, 1 s to 16,384 s (4.5 h): one per delay, so a queue-wide TTL expires its head
first (a per-message expiration would wait behind longer ones at the head). Doubling, so a wait
of any length takes a few hops (``park_delay``); the long ones hold jobs deferred to a cheaper
hour."""


def park_delay(wait_s: float, *, late: bool = True) -> int:
    """The parking queue for a job that should wait ``wait_s``: the longest delay not past it,
    or (``late``) the next one up when that is at most a quarter later (one hop instead of
    several). A deferred job may not come late (its deadline is near the end of its wait)."""
    longer = [d for d in PARK_DELAYS_S if d >= wait_s]
    if late and longer and longer[0] <= wait_s * 1.25:
        return longer[0]
    fitting = [d for d in PARK_DELAYS_S if d <= wait_s]
    return fitting[-1] if fitting else PARK_DELAYS_S[0]


JSON = "application/json"
MAX_EXPIRATION_MS = 315_360_000_000
"""RabbitMQ refuses a per-message TTL above ten years (and closes the channel): a deadline
further off is sent with none, as a job without one."""


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


_connection_class: type[aio_pika.RobustConnection] = aio_pika.RobustConnection


def use_connection_class(connection_class: type[aio_pika.RobustConnection]) -> None:
    """The plug-in point of ``broker.transport.fastpath.install``: connections made from now on
    are of this class."""
    global _connection_class
    _connection_class = connection_class


async def connect(amqp_url: str, *, name: str) -> AbstractRobustConnection:
    """A robust connection (reconnects and restores consumers); ``name`` shows in RabbitMQ."""
    return await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": name}, connection_class=_connection_class
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
    work = [
        *(names.jobs, names.reroute, names.usage, names.alerts, names.control, names.webhooks),
        *providers,
    ]
    for queue_name in work:
        queues[queue_name] = await channel.declare_queue(
            queue_name, durable=True, arguments=_work_queue_arguments(names)
        )
    return queues


async def declare_config_exchange(channel: AbstractChannel, names: Names) -> AbstractExchange:
    """The durable fanout exchange that carries each new config version to every process."""
    return await channel.declare_exchange(names.config, aio_pika.ExchangeType.FANOUT, durable=True)


async def ready_messages(channel: AbstractChannel, queue: str) -> int:
    """How many messages wait in ``queue`` now. Asked of the broker itself: aio-pika's robust
    channel answers a passive declare of a queue it knows from its cache, with the count of
    its last real declaration (the accountant's sweeper once read a count frozen since a
    reconnect, and never swept again)."""
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(queue, passive=True)
    return int(declared.message_count or 0)


async def declare_results_queue(channel: AbstractChannel, names: Names, name: str) -> AbstractQueue:
    """A durable results queue for a batch producer; it survives the producer's restarts."""
    return await channel.declare_queue(
        names.results(name), durable=True, arguments=_work_queue_arguments(names)
    )


def passthrough_headers(
    message: AbstractIncomingMessage, *, with_key: bool = False
) -> dict[str, Any]:
    """Headers a hop forwards: the trace context, and the virtual key only
    ``with_key``, for a job that comes back to be authenticated again (a parked one). Past the
    scheduler the key is not needed (the route carries its id), and a message there can end in
    the dead-letter queue by RabbitMQ's own dead-lettering (a deadline passed), headers and all,
    where a secret must not rest."""
    headers = message.headers or {}
    passed = {n.HEADER_KEY: headers[n.HEADER_KEY]} if with_key and n.HEADER_KEY in headers else {}
    # This hop's own (its span, with OpenTelemetry on), else the one the message came with.
    trace = current() or headers.get(n.HEADER_TRACEPARENT)
    if trace is not None:
        passed[n.HEADER_TRACEPARENT] = trace
    return passed


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
    reconnect) and waits for the broker's confirm, not for each frame's socket drain, so
    publishes on one channel do not queue behind each other's drain. The broker's flow control
    still applies (aiormq's bounded write queue), and every caller's work is bounded by its
    prefetch.
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
            # RabbitMQ reports the head message's timestamp: the queue gauges' oldest age.
            timestamp=datetime.now(UTC),
            message_type=message_type,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            priority=priority,
            headers=dict(headers) if headers else None,
            expiration=None
            if expiration is None or expiration.total_seconds() * 1000 > MAX_EXPIRATION_MS
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
