"""The webhook dispatcher: consumes ``<ns>.webhooks``, records each event in Postgres, and POSTs
it signed (Standard Webhooks) until it is delivered or dead (``broker.webhooks.attempts``).

An event is acked once its delivery is committed, and its first attempt follows at once. Retries
are kept in Postgres, not in RabbitMQ: a loop claims the deliveries that are due (every second,
and sooner when a retry this process scheduled falls due), so a schedule spanning hours survives
restarts and several dispatchers share the work. Attempts in flight are bounded by the config's
``concurrency`` (also the consumer's prefetch). Neither a body nor a secret is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.errors import InvalidMessage
from broker.core.names import Names
from broker.core.webhook_store import Due, WebhookStore
from broker.core.webhook_urls import RESOLVE_TIMEOUT_S
from broker.core.webhooks import WebhooksConfig, webhook_body
from broker.transport.amqp import Publisher, declare_topology
from broker.transport.runtime import ConsumerSet, Service, Unsettled, connect_server
from broker.transport.webhooks import decode_webhook
from broker.webhooks.attempts import Attempts
from broker.webhooks.sender import Sender
from schemas import WebhookRequest

__all__ = ["POLL_S", "WebhookDispatcher"]

log = logging.getLogger(__name__)

POLL_S = 1.0
"""How often due deliveries are looked for (sooner for a retry this process scheduled)."""
LEASE_MARGIN_S = 60.0
"""A delivery in hand is leased for its attempt's longest time plus this; a dispatcher that
dies leaves the lease to lapse, and another attempts the delivery."""
POOL_SIZE = 10
"""Postgres connections per dispatcher (as many again when busy): a write holds one for a
round trip, so a few serve many attempts in flight."""
STORE_RETRY_S = 1.0
"""The pause before an event Postgres could not take (it is away) goes back to the queue."""


class _Slots:
    """Attempts in flight, at most ``limit`` (a reload may change it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._freed = asyncio.Event()

    @property
    def free(self) -> int:
        return max(0, self.limit - self.in_use)

    async def acquire(self) -> None:
        await self.until_free()
        self.in_use += 1

    async def until_free(self) -> None:
        while self.in_use >= self.limit:
            self._freed.clear()
            await self._freed.wait()

    def release(self) -> None:
        self.in_use -= 1
        self._freed.set()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._freed.set()


class WebhookDispatcher(Service):
    name = "webhooks"

    def __init__(self, amqp_url: str, config: Config, names: Names, *, database_url: str) -> None:
        self.amqp_url = amqp_url
        self.config = config
        self.names = names
        self.database_url = database_url
        self.consumers = ConsumerSet()
        self._slots = _Slots(config.webhooks.concurrency)
        self._sender: Sender | None = None
        self._attempts: Attempts | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._soonest: datetime | None = None
        self._engine: AsyncEngine | None = None
        self._store: WebhookStore | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._publisher: Publisher | None = None
        self._claiming: asyncio.Task[None] | None = None

    @property
    def settings(self) -> WebhooksConfig:
        return self.config.webhooks

    async def apply(self, config: Config) -> None:
        """Take a new config: secrets, allow list, schedule, timeout and concurrency."""
        self.config = config
        self._slots.resize(config.webhooks.concurrency)
        if self._sender is not None:
            self._sender.use(config.webhooks)
        if self._channel is not None:
            await self._channel.set_qos(prefetch_count=config.webhooks.concurrency)

    async def start(self) -> None:
        self._engine = _engine(self.database_url)
        self._store = WebhookStore(self._engine)
        self._sender = Sender(self.settings)
        self._connection = await connect_server(self.amqp_url, name="switchyard-webhooks")
        self._channel = await self._connection.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=self.settings.concurrency)
        queues = await declare_topology(self._channel, self.names, [])
        self._publisher = Publisher(self._channel)
        self._attempts = Attempts(
            self._store,
            self._sender,
            self._publisher,
            self.names,
            lambda: self.settings,
            self._retry_at,
        )
        self._claiming = asyncio.create_task(self._claim_loop())
        await self.consumers.consume(queues[self.names.webhooks], self._take, ack=True)

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.consumers.stop(grace_s)
        if self._claiming is not None:
            self._claiming.cancel()
            await asyncio.wait([self._claiming])  # its end; the caller's own cancel still raises
        if self._in_flight:  # the rest are cancelled: their leases lapse, others retry them
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._sender is not None:
            await self._sender.aclose()
        if self._connection is not None:
            await self._connection.close()
        if self._engine is not None:
            await self._engine.dispose()

    def _lease_until(self) -> datetime:
        lease_s = self.settings.timeout_s + RESOLVE_TIMEOUT_S + LEASE_MARGIN_S
        return utcnow() + timedelta(seconds=lease_s)

    async def _take(self, message: AbstractIncomingMessage) -> None:
        """An event from the queue: recorded (then acked), and its first attempt started. A bad
        one is dead-lettered with why; Postgres away returns it, after a pause."""
        assert self._publisher is not None
        try:
            request = decode_webhook(message.body)
        except InvalidMessage as exc:
            await self._publisher.dead_letter(
                self.names,
                message,
                source_queue=self.names.webhooks,
                code=exc.code.value,
                reason=exc.message,
            )
            return
        await self._slots.acquire()
        due: Due | None = None
        try:
            due = await self._record(request)
        finally:
            if due is None:
                self._slots.release()
        if due is not None:
            self._start(due)

    async def _record(self, request: WebhookRequest) -> Due | None:
        assert self._store is not None
        try:
            body = webhook_body(request)
        except (TypeError, ValueError) as exc:  # data JSON cannot carry (an int past 64 bits)
            raise Unsettled(f"webhook {request.webhook_id}'s data cannot be sent as JSON") from exc
        try:
            due = await self._store.record(request, body, self._lease_until())
        except (IntegrityError, DataError, ProgrammingError) as exc:  # the row, not Postgres
            raise Unsettled(f"Postgres refused webhook {request.webhook_id}") from exc
        except (DBAPIError, OSError):
            log.warning("webhook %s not recorded (Postgres away); returned", request.webhook_id)
            await asyncio.sleep(STORE_RETRY_S)
            raise
        if due is None:
            log.info("webhook %s is already recorded; not sent again", request.webhook_id)
        return due

    def _start(self, due: Due) -> None:
        """Attempt ``due`` in a task of its own, holding the slot the caller acquired."""
        task = asyncio.create_task(self._attempt(due))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _attempt(self, due: Due) -> None:
        assert self._attempts is not None
        try:
            await self._attempts.run(due)
        except Exception:
            log.exception(
                "webhook %s: attempt broke; retried once its lease lapses", due.webhook_id
            )
        finally:
            self._slots.release()

    def _retry_at(self, at: datetime) -> None:
        """A retry falls due at ``at``: the claim loop looks then, if before its next poll."""
        if self._soonest is None or at < self._soonest:
            self._soonest = at
            self._wake.set()

    async def _claim_loop(self) -> None:
        while True:
            await self._sleep()
            await self._slots.until_free()
            try:
                if await self._claim():
                    self._wake.set()  # a full batch: more may be due
            except (DBAPIError, OSError):
                log.warning("could not claim due webhooks (Postgres away); trying again")
            except Exception:  # never end the loop: retries would stop for good
                log.exception("claiming due webhooks failed; trying again")

    async def _sleep(self) -> None:
        """Until the next poll, or the soonest retry this process knows of."""
        timeout_s = POLL_S
        if self._soonest is not None:
            until_s = (self._soonest - utcnow()).total_seconds() + 0.01
            timeout_s = min(POLL_S, max(until_s, 0.0))
        with contextlib.suppress(TimeoutError):  # not wait_for: see the accountant's flush loop
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
        self._wake.clear()

    async def _claim(self) -> bool:
        """Lease what is due, up to the free slots, and attempt it; True if that filled them."""
        assert self._store is not None
        if self._soonest is not None and self._soonest <= utcnow():
            self._soonest = None
        free = self._slots.free
        claimed = await self._store.claim(free, self._lease_until())
        for due in claimed:
            await self._slots.acquire()
            self._start(due)
        return len(claimed) == free


def _engine(database_url: str) -> AsyncEngine:
    """The dispatcher's pool. No ping before each use (``make_engine`` pings): that ping was 0.3
    of the 0.7 ms of CPU a write cost here; a connection gone stale (Postgres restarted) fails
    its statement once, which invalidates the pool, and the write is retried (a returned
    message, a settle written again). Errors never show parameters: a body holds prompts."""
    return create_async_engine(
        database_url,
        pool_size=POOL_SIZE,
        max_overflow=POOL_SIZE,
        pool_pre_ping=False,
        hide_parameters=True,
    )
