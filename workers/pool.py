"""A worker pool: serves one provider's queue with at most ``concurrency`` calls in flight.

For each job: call the provider through the ordered layers of ``workers.layers`` (call slot,
deadline, provider entry, pricing, circuit breaker, global lease, retries), publish the result
to the job's reply queue and the usage and job events to the accountant, and ack only after all
are confirmed. A job the provider failed for its own reasons, with a candidate it has not tried,
goes back to the scheduler instead (failover).

A new config version (``apply``) takes effect between calls: a changed provider entry gets a new
adapter and HTTP client for the next calls while the calls in flight finish on the old one (closed
after the last); a new ``concurrency`` resizes the slots and the prefetch. A provider dropped from
the config is served on its last entry until its queue is empty, so no routed job is stranded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from broker.core.clock import utcnow
from broker.core.config import Config, ProviderConfig
from broker.core.errors import ConfigError, InvalidMessage
from broker.core.metrics import FAILOVERS
from broker.core.names import HEADER_REDELIVERED, Names
from broker.core.records import cancelled_result
from broker.core.settings import CALL_SETTLE_MARGIN_S
from broker.state.answers import Answers
from broker.state.circuits import Circuits
from broker.state.client import connect_redis
from broker.state.fairness import PrioritySlots
from broker.state.idempotency import Idempotency
from broker.state.job_states import JobStates
from broker.state.provider_stats import StatsRecorder
from broker.state.quota import REDIS_FAILURES, QuotaStore
from broker.state.quota_epoch import QuotaEpoch
from broker.transport.amqp import Publisher, came_persistent, declare_topology, ready_messages
from broker.transport.cancels import HeardCancels, listen_for_cancels
from broker.transport.outcomes import Outcomes, reply_target
from broker.transport.runtime import ConsumerSet, Service, connect_server
from schemas import CallStarted, CompletionJob, JobResult
from workers.clients import ProviderClients
from workers.layers import (
    Call,
    CircuitBreaker,
    GlobalLease,
    Pricing,
    PrioritySlot,
    ProviderVersion,
    call_provider,
    chain,
    deadline,
)
from workers.ledger import CallClaim, CallLedger
from workers.observe import CallMeter
from workers.results import fails_over, result_of
from workers.retry import CallOutcome

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)

PREFETCH_PER_CALL = 2
"""Deliveries in hand per call slot: a job whose call is done holds its delivery until its
result and its accounting event are confirmed (a persistent message waits for RabbitMQ's fsync),
and the next calls must not wait for those confirms."""
SERVED_FLUSH_S = 1.0
DRAIN_CHECK_S = 1.0
"""How often a pool whose provider left the config looks whether its queue is empty."""
_RETIRED_CONSUMER_WAIT_S = 24 * 3600.0
"""A replaced consumer's handlers finish on their own (each bounded by its provider timeouts)."""


class WorkerPool(Service):
    def __init__(
        self,
        amqp_url: str,
        config: Config,
        names: Names,
        provider_id: str,
        *,
        redis_url: str | None = None,
        settle_margin_s: float = CALL_SETTLE_MARGIN_S,
    ) -> None:
        provider = config.provider(provider_id)
        if provider is None:
            known = ", ".join(p.id for p in config.providers)
            raise ConfigError(f"no provider {provider_id!r} in the config; known: {known}")
        self.name = f"worker[{provider_id}]"
        self.amqp_url = amqp_url
        self.config = config
        self.names = names
        self.provider_id = provider_id
        self.redis_url = redis_url
        self.queue_name = names.provider(provider_id)
        self.consumers = ConsumerSet()
        # The slots bound the provider calls (and order them); the prefetch, larger, bounds the
        # deliveries in hand: calls, and jobs waiting for a slot or for their confirms.
        self._slots = PrioritySlots(provider.concurrency)
        # Redis (when configured) holds the provider's circuit and its global leases.
        self._redis = connect_redis(redis_url) if redis_url is not None else None
        self._clients = ProviderClients(provider, names, self._redis)
        self._pricing = Pricing(config)
        circuits = Circuits(self._redis, names) if self._redis is not None else None
        self._answers = Answers(self._redis, names) if self._redis is not None else None
        self._epoch = QuotaEpoch(self._redis, names) if self._redis is not None else None
        self._quota = QuotaStore(self._redis, names) if self._redis is not None else None
        self._jobs = JobStates(self._redis, names) if self._redis is not None else None
        self._heard = HeardCancels()
        self._idempotency = Idempotency(self._redis, names) if self._redis is not None else None
        self._stats = StatsRecorder(self._redis, names) if self._redis is not None else None
        holder = f"{provider_id}-{secrets.token_hex(4)}"
        # The concerns around each call, outermost first (``workers.layers``).
        self._call = chain(
            [
                PrioritySlot(self._slots),
                deadline,
                ProviderVersion(self._clients),
                self._pricing,
                CircuitBreaker(circuits, self.name),
                GlobalLease(holder, self.name),
                CallClaim(self._jobs, provider_id, self._heard),
                CallLedger(self._record_call, self._pricing, settle_margin_s),
                CallMeter(self._stats),
            ],
            call_provider,
        )
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queues: list[AbstractQueue] = []
        self._consuming = False
        self._replaced: dict[ConsumerSet, asyncio.Task[None]] = {}
        self._drainer: asyncio.Task[None] | None = None
        self._counting: asyncio.Task[None] | None = None

    @property
    def provider(self) -> ProviderConfig:
        """The provider entry the next call uses."""
        return self._clients.current.provider

    async def start(self) -> None:
        self._connection = await connect_server(self.amqp_url, name=f"switchyard-{self.name}")
        channel = await self._connection.channel(publisher_confirms=True)
        queues = await declare_topology(
            channel, self.names, [p.id for p in self.config.providers], self.config.fair_lanes
        )
        self.outcomes = Outcomes(Publisher(channel), self.names)
        self._channel = channel
        self._queues = [
            queues[self.names.provider(self.provider_id, lane)]
            for lane in range(self.config.fair_lanes)
        ]
        await listen_for_cancels(self._connection, self.names, self._heard)
        await self._consume()
        if self._jobs is not None:
            self._counting = asyncio.create_task(self._count_served())

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
        if self._counting is not None:
            self._counting.cancel()
        await self.consumers.stop(grace_s)
        for consumers, waiting in list(self._replaced.items()):
            waiting.cancel()
            await consumers.stop(grace_s)  # already cancelled: waits for its handlers, bounded
        if self._connection is not None:
            await self._connection.close()
        await self._clients.close()
        if self._stats is not None:  # the calls that ended during the grace
            await self._stats.flush()
        if self._redis is not None:
            await self._redis.aclose()

    async def _count_served(self) -> None:
        """Write the calls started to the provider's rate (ETAs read it) and the calls' latency
        and health (routing reads them), once a second."""
        assert self._jobs is not None and self._stats is not None
        while True:
            await asyncio.sleep(SERVED_FLUSH_S)
            # Redis away: the count is lost, and the rate reads low for a minute.
            with contextlib.suppress(*REDIS_FAILURES):
                await self._jobs.flush_served()
            await self._stats.flush()

    async def _consume(self) -> None:
        """Start consuming with the current prefetch. RabbitMQ fixes a consumer's prefetch when
        it starts (``basic.qos`` counts for consumers made after it), so a new concurrency needs a
        new consumer; the one it replaces is cancelled and its handlers finish on their own."""
        assert self._channel is not None and self._queues
        await self._channel.set_qos(prefetch_count=PREFETCH_PER_CALL * self.provider.concurrency)
        previous = self.consumers
        self.consumers = ConsumerSet()
        for queue in self._queues:  # every fairness lane: each gets its own prefetch window
            await self.consumers.consume(queue, self.handle, ack=True)
        self._consuming = True
        self._retire(previous)

    def _retire(self, consumers: ConsumerSet) -> None:
        """Cancel a consumer in the background; its handlers finish (``stop`` bounds them)."""
        waiting = asyncio.create_task(consumers.stop(_RETIRED_CONSUMER_WAIT_S))
        self._replaced[consumers] = waiting
        waiting.add_done_callback(lambda _: self._replaced.pop(consumers, None))

    async def apply(self, config: Config) -> None:
        """Call with ``config``'s entry for this provider from the next job on."""
        self.config = config
        provider = config.provider(self.provider_id)
        if provider is None:
            if self._drainer is None and self._consuming:
                log.warning(
                    "provider %r is no longer in the config: %s serves %s until it is empty",
                    self.provider_id,
                    self.name,
                    self.queue_name,
                )
                self._drainer = asyncio.create_task(self._drain())
            return
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        if config.fair_lanes > len(self._queues) and self._channel is not None:
            # More lanes: the scheduler routes to them from now on, so consume them too. Fewer:
            # the lanes above stay consumed, so no job routed there before is stranded.
            queues = await declare_topology(
                self._channel, self.names, [p.id for p in config.providers], config.fair_lanes
            )
            self._queues = [
                queues[self.names.provider(self.provider_id, lane)]
                for lane in range(config.fair_lanes)
            ]
            if self._consuming:
                await self._consume()
        current = self._clients.current.provider
        # The new entry and the new prices together, with no pause between (``Pricing``).
        replaced = self._clients.replace(provider) if provider != current else None
        self._pricing.apply(config)
        if replaced is not None:
            await self._clients.retire(replaced)
        if provider.concurrency != current.concurrency:
            self._slots.resize(provider.concurrency)
            if self._consuming:
                await self._consume()
        if not self._consuming and self._channel is not None:
            log.info("provider %r is back in the config: %s consumes again", provider.id, self.name)
            await self._consume()

    async def _drain(self) -> None:
        """Serve the queue of a provider the config dropped until it is empty, then stop."""
        assert self._connection is not None
        while True:
            await asyncio.sleep(DRAIN_CHECK_S)
            try:
                channel = await self._connection.channel()
                try:
                    waiting = 0
                    for lane in self._queues:
                        waiting += await ready_messages(channel, lane.name)
                finally:
                    await channel.close()
            except Exception:
                log.warning("could not read the depth of %s", self.queue_name, exc_info=True)
                continue
            busy = self.consumers.in_flight + sum(c.in_flight for c in self._replaced)
            if waiting == 0 and busy == 0:
                # A delivery may still race the cancel: its handler finishes, it is not dropped.
                self._retire(self.consumers)
                self.consumers = ConsumerSet()
                self._consuming = False
                self._drainer = None
                log.warning("%s is empty: %s stopped consuming it", self.queue_name, self.name)
                return

    async def handle(self, message: AbstractIncomingMessage) -> None:
        await self.outcomes.settle(message, self.queue_name, self._serve)

    async def _record_call(self, started: CallStarted) -> None:
        await self.outcomes.events.send(started)

    async def _serve(self, message: AbstractIncomingMessage, job: CompletionJob) -> None:
        """Call the provider through the layers, then end the job or hand it to failover."""
        if job.route is None or job.route.provider != self.provider_id:
            raise InvalidMessage(
                f"job reached {self.queue_name} without a route to {self.provider_id!r}"
            )
        on_chunk = (
            functools.partial(self.outcomes.chunk, message, job) if job.params.stream else None
        )
        durable = self._answers is not None and came_persistent(message)
        if durable and _may_have_twin(message) and await self._answered(job):
            return
        if await self._reservation_lost(job):
            await self.outcomes.pass_on(message, job, self.names.reroute)
            return
        call = Call(job, message.priority or 0, on_chunk, persistent=came_persistent(message))
        outcome = await self._call(call)
        if log.isEnabledFor(logging.DEBUG):
            ended = "answered" if outcome.completion is not None else outcome.error
            log.debug("job %s called %s: %s", job.job_id, self.provider_id, ended)
        if outcome.cancelled:
            await self.outcomes.finish(message, job, cancelled_result(job, utcnow()), [])
            return
        if fails_over(job, outcome):
            FAILOVERS.labels(self.provider_id).inc()
            await self.outcomes.reroute(message, job, outcome.attempts, outcome.usage)
            return
        assert call.started is not None
        result = result_of(job, outcome, call.started)
        if self._idempotency is not None:  # kept first: a repeat never misses it
            await self._idempotency.keep(job, result)
        if durable and reply_target(message, job) is not None:
            await self._finish_once(message, job, result, outcome)
        else:
            await self.outcomes.finish(message, job, result, outcome.usage)
        if call.persistent and self._jobs is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                await self._jobs.done(job.job_id)

    async def _finish_once(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        result: JobResult,
        outcome: CallOutcome,
    ) -> None:
        """A persistent job's end: its event first, then its result only if no twin's went
        out (``broker.state.answers``), so a job found ``done`` lacks neither."""
        assert self._answers is not None
        await self.outcomes.finish(message, job, result, outcome.usage, answer=False)
        if not await self._answers.claim(job.job_id):
            log.warning("job %s: a twin was answered first; no second result", job.job_id)
            return
        try:
            await self.outcomes.answer(message, job, result)
        except BaseException:
            await self._answers.give_up(job.job_id)
            raise
        await self._answers.done(job.job_id)

    async def _reservation_lost(self, job: CompletionJob) -> bool:
        """A job whose reservation Redis lost (it came back empty while the job was queued)
        goes back to the scheduler to be admitted again (``broker.state.quota_epoch``)."""
        assert job.route is not None
        epoch = job.route.quota_epoch
        if self._epoch is None or job.route.reservation_id is None or epoch is None:
            return False
        if not await self._epoch.lost(epoch):
            return False
        log.warning("job %s: its reservation was lost with Redis; admitted again", job.job_id)
        return True

    async def _answered(self, job: CompletionJob) -> bool:
        """A job that came again after its result went out is not run again, and the
        reservation it came with (a scheduler's, made again for it) is given back."""
        assert self._answers is not None and job.route is not None
        if not await self._answers.answered(job.job_id):
            return False
        log.warning("job %s came again after it was answered: not run again", job.job_id)
        if job.route.reservation_id is not None and self._quota is not None:
            try:
                await self._quota.release(job.route.reservation_id)
            except REDIS_FAILURES:
                log.warning("job %s: its hold could not be given back; it lapses", job.job_id)
        return True


def _may_have_twin(message: AbstractIncomingMessage) -> bool:
    """Delivered again, or forwarded by a scheduler that got it again (``HEADER_REDELIVERED``)."""
    return bool(message.redelivered) or HEADER_REDELIVERED in (message.headers or {})
