"""Running consumers as processes: start, serve until a signal, stop gracefully.

Each Switchyard process (scheduler, worker pool, accountant) is a ``Service``; ``switchyard up``
runs several in one event loop. Stopping cancels the consumers first, then waits (bounded) for
the handlers in flight; whatever is still unacked is redelivered to another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from pythonjsonlogger.json import JsonFormatter

from broker.core.settings import get_settings
from broker.core.tracing import TraceFilter, untraced
from broker.transport.amqp import BROKER_FAILURES, connect

__all__ = [
    "ConsumerSet",
    "Service",
    "configure_logging",
    "connect_server",
    "run_loop",
    "run_services",
    "tune_gc",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


async def connect_server(amqp_url: str, *, name: str) -> AbstractRobustConnection:
    """A server process's connection: on the AMQP fast path unless the setting turns it off."""
    if get_settings().amqp_fast_path:
        # Imported only when on: with it off, nothing reads aiormq's or pamqp's internals.
        from broker.transport import fastpath

        fastpath.install()
    return await connect(amqp_url, name=name)


def run_loop(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """``asyncio.run`` on the configured event loop (``uvloop`` or the standard one)."""
    if event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


GC_THRESHOLDS = (50_000, 20, 100)
"""The cycle collector's thresholds in Switchyard's processes (CPython's are 700, 10, 10): with
hundreds of calls in flight, a worker's objects reach the oldest generation and the defaults
walked every live object every second or two, stalling the loop. Reference counting frees most
garbage; the collector only finds cycles, now in larger and rarer passes (figures:
docs/architecture.md)."""


def tune_gc() -> None:
    """Freeze what startup made (modules, config, schemas: never garbage, so no collection
    should walk it again) and collect cycles less often (``GC_THRESHOLDS``). For Switchyard's
    own long-running processes; a program that embeds the client keeps its own settings."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def configure_logging(level: str, form: str = "json") -> None:
    """Log lines to stderr, each with the trace id of the job being handled (``TraceFilter``):
    JSON objects (``form`` "json", one per line, for a log pipeline) or plain text."""
    handler = logging.StreamHandler()
    handler.addFilter(TraceFilter())
    if form == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{trace_id}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(trace_id)s]: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # aio-pika logs every reconnect attempt with a traceback at ERROR; one line is enough.
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


class _ChannelAcks:
    """The acks of one channel's deliveries, coalesced: once per loop turn, one
    ``basic.ack(multiple)`` covers every settled tag below the oldest delivery still being
    handled, and only those above it go one by one. RabbitMQ numbers a channel's deliveries in
    order and handlers start in that order, so every tag not yet registered is above every
    registered one and a multiple ack never covers a delivery in hand. One per aiormq channel,
    shared by every consumer set on it (a pool's replaced set still finishes its handlers)."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = weakref.ref(channel)  # the registry's key: the entry goes with it
        self.in_hand: set[int] = set()
        self.settled: list[int] = []
        self._flush: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, channel: aiormq.abc.AbstractChannel) -> _ChannelAcks:
        acks = _ACKS.get(channel)
        if acks is None:
            acks = _ACKS[channel] = cls(channel)
        return acks

    def ack(self, tag: int) -> None:
        self.in_hand.discard(tag)
        self.settled.append(tag)
        if self._flush is None:
            self._flush = asyncio.create_task(self._send(), context=untraced())

    async def nack(self, tag: int, *, requeue: bool = True) -> None:
        """Return a delivery (or, ``requeue=False``, hand it to its queue's dead-letter target).
        It stays in hand until its nack is queued on the channel, so no multiple ack can be
        written before it and cover it."""
        channel = self._channel()
        try:
            if channel is not None:
                await channel.basic_nack(tag, requeue=requeue)
        finally:
            self.in_hand.discard(tag)

    async def sent(self) -> None:
        """Wait until the acks settled so far are written."""
        while self._flush is not None:
            await asyncio.shield(self._flush)

    async def _send(self) -> None:
        try:
            settled = sorted(self.settled)
            self.settled.clear()
            channel = self._channel()
            if channel is None:
                return
            oldest = min(self.in_hand, default=None)
            covered = [tag for tag in settled if oldest is None or tag < oldest]
            acks = [(tag, False) for tag in settled[len(covered) :]]
            if covered:
                acks.insert(0, (covered[-1], True))
            # Queued together; only the last waits for its write, so acks behind a delivery in
            # hand leave in one writer pass, not one each.
            for i, (tag, multiple) in enumerate(acks, start=1):
                await channel.basic_ack(tag, multiple=multiple, wait=i == len(acks))
        except BROKER_FAILURES:
            # The channel closed: RabbitMQ redelivers what it had not seen acked.
            log.warning("acks lost with their channel; those deliveries come again")
        finally:
            self._flush = None
            if self.settled:
                self._flush = asyncio.create_task(self._send(), context=untraced())


class Unsettled(Exception):
    """A handler could not settle its message, not even by rejecting it with a typed result (a
    bug on that path). The message goes to its queue's dead-letter target as it is (RabbitMQ
    adds an ``x-death`` header), not back to the queue, where it would come again for ever and
    a worker would call the provider each time."""


_ACKS: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, _ChannelAcks] = (
    weakref.WeakKeyDictionary()
)


class ConsumerSet:
    """The consumers of one service and the handlers they have in flight.

    With ``ack=True`` the set settles each delivery itself: acked (coalesced, ``_ChannelAcks``)
    when the handler returns, returned to the queue when it raises. Every consumer on such a
    channel must use it, or a multiple ack could cover another consumer's delivery."""

    def __init__(self) -> None:
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._acks: set[_ChannelAcks] = set()

    async def consume(self, queue: AbstractQueue, handler: Handler, *, ack: bool = False) -> None:
        async def tracked(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            acks: _ChannelAcks | None = None
            tag = message.delivery_tag
            try:
                if ack and tag is not None:
                    # aiormq's channel: a reconnect brings a new one, numbering from 1 again
                    acks = _ChannelAcks.of(message.channel)
                    self._acks.add(acks)
                    acks.in_hand.add(tag)
                await handler(message)
            except Exception as exc:
                # Unsettled: the handler gave the message up. Anything else: the broker
                # connection failed under the handler, so the message goes back for redelivery.
                requeue = not isinstance(exc, Unsettled)
                if requeue:
                    log.warning("handler failed; message returned for redelivery", exc_info=True)
                else:
                    log.error("handler gave a message up; it is dead-lettered", exc_info=True)
                with contextlib.suppress(Exception):
                    if acks is not None and tag is not None:
                        await acks.nack(tag, requeue=requeue)
                    else:
                        await message.nack(requeue=requeue)
            else:
                if acks is not None and tag is not None:
                    acks.ack(tag)
            finally:
                # A cancelled handler's delivery stays in hand (never covered by an ack) until
                # its channel closes and RabbitMQ redelivers it.
                self._in_flight.discard(task)

        consumer_tag = await queue.consume(tracked)
        self._consumers.append((queue, consumer_tag))

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def stop(self, grace_s: float) -> None:
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_s)
            for task in pending:
                task.cancel()
        for acks in list(self._acks):  # the last acks go before the connection closes
            await acks.sent()


class Service(ABC):
    """A long-running consumer with an explicit start and a graceful stop."""

    name: str = "service"

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self, grace_s: float = 10.0) -> None: ...


async def run_services(services: Sequence[Service], *, grace_s: float = 10.0) -> None:
    """Start every service, serve until SIGINT or SIGTERM, then stop them in reverse order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Service] = []
    try:
        for service in services:
            await service.start()
            started.append(service)
            log.info("%s started", service.name)
        await stop.wait()
        log.info("stopping")
    finally:
        for service in reversed(started):
            try:
                await service.stop(grace_s)
            except Exception:
                log.exception("%s did not stop cleanly", service.name)
