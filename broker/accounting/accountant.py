"""The accountant: consumes usage and job events and records them in Postgres in batches.

A message carries one event or an ``AccountingBatch`` of them. A batch of messages (up to
``batch_size`` events, or what ``max_delay_s`` gathered) is written in one transaction and its
messages acked after the commit. Writes are idempotent (``broker.accounting.rows``): a call is
identified by its ``call_id`` from its start to its usage row; a job row is replaced only by an
event at least as recent as the one it holds, and a succeeded one by nothing but a success. A
call whose worker died is settled by the sweeper (``broker.accounting.sweeper``).

A call's cost and price version come priced on its usage event (``broker.core.pricing``, by the
worker at the call), so the row and the job's result carry one figure whatever config this
process has loaded since. An event from a worker older than that carries neither: it is priced
here, once, by the same function and this process's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from decimal import Decimal

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.accounting.observed import Observed
from broker.accounting.rows import (
    INSERT_CALL,
    INSERT_USAGE,
    SETTLE_CALLS,
    SETTLE_STARTED_LATE,
    UPSERT_JOB,
    call_row,
    latest_per_job,
    settle_params,
    settled_call_ids,
    usage_id,
    usage_row,
)
from broker.accounting.sweeper import CallSweeper
from broker.core.codec import decode_accounting_event
from broker.core.config import Config
from broker.core.db import make_engine
from broker.core.errors import ConfigError, JobRejected
from broker.core.metrics import ACCOUNTANT_LAG
from broker.core.names import Names
from broker.core.pricing import Unit, price_usage, usd_to_nanos
from broker.state.client import connect_redis
from broker.state.idempotency import Idempotency
from broker.state.quota import REDIS_FAILURES, QuotaStore, ReservationState
from broker.transport.amqp import BROKER_FAILURES, Publisher, declare_topology, ready_messages
from broker.transport.runtime import ConsumerSet, Service, connect_server
from schemas import AccountingBatch, CallStarted, JobEvent, JobStatus, UsageEvent

Event = UsageEvent | JobEvent | CallStarted

__all__ = ["Accountant"]

log = logging.getLogger(__name__)


class Accountant(Service):
    name = "accountant"

    def __init__(
        self,
        amqp_url: str,
        database_url: str,
        config: Config,
        names: Names,
        *,
        redis_url: str | None = None,
        batch_size: int = 500,
        max_delay_s: float = 0.05,
    ) -> None:
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.config = config
        self.names = names
        self.redis_url = redis_url
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self.consumers = ConsumerSet()
        self._pending: list[tuple[AbstractIncomingMessage, list[Event]]] = []
        self._pending_events = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._flusher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._engine: AsyncEngine | None = None
        self._redis = connect_redis(redis_url) if redis_url is not None else None
        self._quota: QuotaStore | None = None
        self._repeats = Idempotency(self._redis, names) if self._redis is not None else None
        self._reconcile_with(config)
        self._version = config.version
        self._observed = Observed(config)

    def _reconcile_with(self, config: Config) -> None:
        """Open Redis when ``config`` sets limits or budgets (their reservations reconcile here)."""
        if self._quota is None and config.needs_quota:
            if self._redis is None:
                raise ConfigError("this config sets limits or budgets: the accountant needs Redis")
            self._quota = QuotaStore(self._redis, self.names)
        if self._quota is not None:
            self._quota.use_thresholds(config.alerts.percents)

    async def apply(self, config: Config) -> None:
        """Take ``config``'s limits, budgets and alert thresholds."""
        self._reconcile_with(config)
        self._observed.apply(config)
        self.config, self._version = config, config.version

    async def start(self) -> None:
        self._engine = make_engine(self.database_url)
        self._connection = await connect_server(self.amqp_url, name="switchyard-accountant")
        channel = await self._connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self.batch_size * 2)
        queues = await declare_topology(
            channel, self.names, [p.id for p in self.config.providers], self.config.fair_lanes
        )
        self.publisher = Publisher(channel)
        self._flusher = asyncio.create_task(self._flush_loop())
        self._usage_queue = queues[self.names.usage]
        sweeper = CallSweeper(self._engine, self._quota, self._caught_up, self._observed)
        self._sweeper = asyncio.create_task(sweeper.run())
        await self.consumers.consume(queues[self.names.usage], self.handle)

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.consumers.stop(grace_s)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])  # its end; the caller's own cancel still raises
        if self._flusher is not None:
            # Not cancelled: told to stop, it ends at its next turn (a write in hand finishes).
            # A cancel could be lost in its timed wait (seen: Python 3.11's wait_for swallowed
            # one, and the stop waited for ever).
            self._stopping = True
            self._wake.set()
            await asyncio.wait([self._flusher], timeout=grace_s)
            self._flusher.cancel()
        while self._pending:
            await self._flush()
        if self._connection is not None:
            await self._connection.close()
        if self._engine is not None:
            await self._engine.dispose()
        if self._redis is not None:
            await self._redis.aclose()

    async def _caught_up(self) -> bool:
        """Nothing waits to be written: no event in hand, none in the queue (the sweeper must
        not take a call for lost while its settle waits here)."""
        if self._pending:
            return False
        return not await ready_messages(self._usage_queue.channel, self._usage_queue.name)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            event = decode_accounting_event(message.body)
        except JobRejected as exc:
            await self.publisher.dead_letter(
                self.names,
                message,
                source_queue=self.names.usage,
                code=exc.code.value,
                reason=exc.message,
            )
            await message.ack()
            return
        events: list[Event] = list(event.events) if isinstance(event, AccountingBatch) else [event]
        self._price_unpriced(events)
        self._pending.append((message, events))
        self._pending_events += len(events)
        if self._pending_events >= self.batch_size:
            self._wake.set()

    def _price_unpriced(self, events: list[Event]) -> None:
        """Price the usage an older worker sent without a price (a rolling upgrade)."""
        for event in events:
            if isinstance(event, CallStarted):
                continue
            for u in event.usage if isinstance(event, JobEvent) else [event]:
                if u.cost_usd is not None or u.price_version is not None:
                    continue
                provider = self.config.provider(u.provider)
                price = provider.models.get(u.model) if provider is not None else None
                price_usage(u, price, self.config.zone, self._version)

    async def _flush_loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.max_delay_s):
                    await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            try:
                await self._flush()
                if self._pending_events >= self.batch_size:
                    self._wake.set()  # a full batch is already waiting
            except Exception:
                # Postgres is down or refused the batch: keep the messages and try again.
                log.exception("accounting batch of %d failed; retrying", len(self._pending))
                await asyncio.sleep(1.0)

    async def _flush(self) -> None:
        # Messages in arrival order, up to ``batch_size`` events (at least one message).
        batch: list[tuple[AbstractIncomingMessage, list[Event]]] = []
        events: list[Event] = []
        for message, carried in self._pending:
            if batch and len(events) + len(carried) > self.batch_size:
                break
            batch.append((message, carried))
            events += carried
        try:
            await self._write(events)
        except (_BadEvent, DBAPIError) as exc:
            if _refusal(exc) is None:
                raise
            batch = await self._write_one_by_one(batch)
            events = [event for _, carried in batch for event in carried]
        ACCOUNTANT_LAG.set(self._observed.count(events))
        await self._reconcile(events)
        await self._release_keys(events)
        del self._pending[: len(batch)]
        self._pending_events -= len(events)
        for message, _ in batch:
            await _ack(message)

    async def _write_one_by_one(
        self, batch: list[tuple[AbstractIncomingMessage, list[Event]]]
    ) -> list[tuple[AbstractIncomingMessage, list[Event]]]:
        """One bad event must not block the rest: write them one by one; a message with a
        refused event is parked whole (replaying it is harmless: writes are idempotent), acked
        and dropped from the pending ones at once, so a later failure of this flush (Redis, an
        ack) does not park it again. Returns the batch without the parked messages."""
        kept = []
        for message, carried in batch:
            refused: list[str] = []
            for event in carried:
                try:
                    await self._write([event])
                except (_BadEvent, DBAPIError) as exc:
                    refusal = _refusal(exc)
                    if refusal is None:
                        raise
                    refused.append(refusal)
            if not refused:
                kept.append((message, carried))
                continue
            await self.publisher.dead_letter(
                self.names,
                message,
                source_queue=self.names.usage,
                code="rejected_by_database",
                reason=f"Postgres refused {len(refused)} of {len(carried)} events: "
                + ", ".join(sorted(set(refused))),
            )
            self._pending = [p for p in self._pending if p[0] is not message]
            self._pending_events -= len(carried)
            await _ack(message)
        return kept

    async def _reconcile(self, events: list[Event]) -> None:
        """Settle each finished job's quota reservation to what it used (after the commit, so a
        crash between the two repeats both, and both are idempotent). A job that never reached
        its provider (expired or rejected in the worker) gives its reservation back whole,
        the request it reserved included."""
        if self._quota is None:
            return
        for event in events:
            if not isinstance(event, JobEvent) or event.reservation_id is None:
                continue
            made = event.attempts if event.reservation_calls is None else event.reservation_calls
            if made == 0:
                await self._quota.release(event.reservation_id)
                continue
            spent = {usage_id(u): _spend(u) for u in event.usage}
            settled = await self._quota.reconcile(
                event.reservation_id,
                {
                    "tokens": sum(s["tokens"] for s in spent.values()),
                    "usd_nanos": sum(s["usd_nanos"] for s in spent.values()),
                },
                calls=list(spent),
            )
            if settled.previous in _SETTLED_BEFORE:
                # A twin of the job (run again after its worker died) settled this
                # reservation first: its calls are charged on top, each once.
                for call_id, amounts in spent.items():
                    await self._quota.charge(event.reservation_id, call_id, amounts)

    async def _release_keys(self, events: list[Event]) -> None:
        """A first job with an idempotency key that ended without a provider's answer (refused,
        expired, cancelled, or failed before any call) gives its key back: a repeat runs."""
        if self._repeats is None:
            return
        for event in events:
            if not isinstance(event, JobEvent) or event.idempotency_key is None:
                continue
            if event.status in _KEPT or (event.status is JobStatus.FAILED and event.attempts):
                continue
            try:
                await self._repeats.release(event.key_id, event.idempotency_key, event.job_id)
            except REDIS_FAILURES:
                log.warning("Redis is away: job %s's idempotency key lapses", event.job_id)

    async def _write(self, events: list[Event]) -> None:
        """One transaction for the whole list; idempotent, so a retry after a crash is harmless."""
        try:
            # Rows in key order: two accountants writing overlapping batches then lock the same
            # rows in the same order, where any other order can deadlock them.
            call_rows = sorted(
                (call_row(e) for e in events if isinstance(e, CallStarted)),
                key=lambda row: str(row["call_id"]),
            )
            usage_rows = sorted(
                (
                    usage_row(u)
                    for e in events
                    if not isinstance(e, CallStarted)
                    for u in (e.usage if isinstance(e, JobEvent) else [e])
                ),
                key=lambda row: str(row["call_id"]),
            )
            settled = settled_call_ids(events)
            job_rows = sorted(
                latest_per_job([e for e in events if isinstance(e, JobEvent)]),
                key=lambda row: str(row["job_id"]),
            )
        except Exception as exc:  # values no row can be made of: retrying cannot help either
            raise _BadEvent(type(exc).__name__) from exc
        assert self._engine is not None
        async with self._engine.begin() as conn:
            # Rows go as parameters of one cached statement (executemany), not as a VALUES
            # list: compiling a new multi-row statement per batch cost more than the insert.
            if call_rows:
                await conn.execute(INSERT_CALL, call_rows)
                started = [str(row["call_id"]) for row in call_rows]
                await conn.execute(SETTLE_STARTED_LATE, settle_params(started))
            if usage_rows:
                await conn.execute(INSERT_USAGE, usage_rows)
            if settled:
                await conn.execute(SETTLE_CALLS, settle_params(settled))
            if job_rows:
                await conn.execute(UPSERT_JOB, job_rows)


class _BadEvent(Exception):
    """An event whose rows could not be made (its values, not the database)."""


async def _ack(message: AbstractIncomingMessage) -> None:
    """Ack, each message on its own: one delivered on a channel that has since closed (a
    reconnect) cannot be acked, RabbitMQ has already put it back, and the ones after it must
    still be acked."""
    try:
        await message.ack()
    except BROKER_FAILURES:
        log.info("an accounting message's channel closed before its ack; it comes again")


_KEPT = frozenset({JobStatus.SUCCEEDED, JobStatus.REROUTED})
"""Job ends whose key stays taken: an answer (kept for repeats), or a failover on its way."""
_SETTLED_BEFORE = frozenset({ReservationState.RECONCILED, ReservationState.RELEASED})


def _spend(event: UsageEvent) -> dict[Unit, int]:
    """A call's spend in quota units (its request is the reservation's)."""
    tokens = event.prompt_tokens + event.completion_tokens
    return {"tokens": tokens, "usd_nanos": usd_to_nanos(event.cost_usd or Decimal(0))}


def _refusal(exc: Exception) -> str | None:
    """The name of the error if the event's values were refused, by Postgres, its driver or
    the making of its rows (retrying cannot help: the message is parked); ``None`` for anything
    else (retried)."""
    if isinstance(exc, _BadEvent):
        return str(exc)
    if not isinstance(exc, DBAPIError):
        return None
    if isinstance(exc, DataError | IntegrityError):
        return type(exc.orig).__name__
    # asyncpg refuses a value its column type cannot hold (an integer out of range) before
    # sending it; SQLAlchemy wraps that in a bare DBAPIError.
    cause = exc.orig.__cause__ if exc.orig is not None else None
    if isinstance(cause, asyncpg.exceptions.DataError):
        return type(cause).__name__
    return None
