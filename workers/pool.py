"""A worker pool: serves one provider's queue with at most ``concurrency`` calls in flight.

For each job: call the adapter (through the retry layer) unless the provider's circuit is open
(``broker.state.circuits``), publish the result to the job's reply queue and the usage and job
events to the accountant, and ack only after all are confirmed. A job the provider failed for its
own reasons, with a candidate it has not tried, goes back to the scheduler instead (failover).

A new config version (``apply``) takes effect between calls: a changed provider entry gets a new
adapter and HTTP client for the next calls while the calls in flight finish on the old one (closed
after the last); a new ``concurrency`` resizes the slots and the prefetch. A provider dropped from
the config is served on its last entry until its queue is empty, so no routed job is stranded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import httpx
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from redis.asyncio import Redis

from broker.core.clock import elapsed_ms, utcnow
from broker.core.config import Config, ProviderConfig
from broker.core.errors import ConfigError, DeadlineExceeded, InvalidMessage, ProviderUnavailable
from broker.core.names import Names
from broker.core.pricing import cost_usd
from broker.state.circuits import REFRESH_S, Circuits, CircuitState, failures_in
from broker.state.fairness import PrioritySlots
from broker.state.leases import LeaseSemaphore, lease_key
from broker.transport.amqp import Publisher, declare_topology
from broker.transport.outcomes import Outcomes
from broker.transport.runtime import ConsumerSet, Service, connect_server
from schemas import (
    Attempt,
    ChatCompletionChunk,
    CompletionJob,
    ErrorCode,
    JobResult,
    JobStatus,
    Timings,
)
from workers.adapters import ProviderAdapter, adapter_for
from workers.http import make_http_client
from workers.retry import MAX_BACKOFF_S, CallOutcome, call_with_retries

__all__ = ["WorkerPool", "WorkerPools"]

log = logging.getLogger(__name__)

PREFETCH_PER_CALL = 2
"""Deliveries in hand per call slot. A job whose call is done holds its delivery until its
result and its accounting event are confirmed (RabbitMQ confirms a persistent message after its
fsync: 40-130 ms at the median, 300 ms at p90, measured with 500 calls in flight). With the
prefetch equal to the concurrency, those jobs kept the next calls from starting: 1 s calls at a
cap of 500 ran 366/s; with twice the prefetch, 433-439/s (three times gave no more)."""
LEASE_WAIT_S = 30.0
"""How long one wait for a global lease lasts before it starts again (and looks at the
job's deadline)."""
DRAIN_CHECK_S = 1.0
"""How often a pool whose provider left the config looks whether its queue is empty."""
_RETIRED_CONSUMER_WAIT_S = 24 * 3600.0
"""A replaced consumer's handlers finish on their own (each bounded by its provider timeouts)."""


@dataclass(eq=False)
class _Client:
    """One version of the provider's entry: its adapter over its own HTTP client, and the global
    leases. Calls hold it from start to end; once replaced it closes after its last call."""

    provider: ProviderConfig
    http: httpx.AsyncClient
    adapter: ProviderAdapter
    leases: LeaseSemaphore | None
    calls: int = 0
    retired: bool = False


class WorkerPool(Service):
    def __init__(
        self,
        amqp_url: str,
        config: Config,
        names: Names,
        provider_id: str,
        *,
        redis_url: str | None = None,
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
        self._redis = Redis.from_url(redis_url) if redis_url is not None else None
        self._circuits = Circuits(self._redis, names) if self._redis is not None else None
        self._trial = False  # a half-open circuit's one trial call from this process runs
        self._holder = f"{provider_id}-{secrets.token_hex(4)}"
        self._client = self._build(provider)
        self._open: set[_Client] = {self._client}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queues: list[AbstractQueue] = []
        self._consuming = False
        self._replaced: dict[ConsumerSet, asyncio.Task[None]] = {}
        self._drainer: asyncio.Task[None] | None = None

    @property
    def provider(self) -> ProviderConfig:
        """The provider entry the next call uses."""
        return self._client.provider

    def _build(self, provider: ProviderConfig) -> _Client:
        http = make_http_client(provider)
        leases = None
        if provider.global_concurrency is not None:
            if self._redis is None:
                raise ConfigError(f"provider {provider.id!r} sets global_concurrency: needs Redis")
            # A lease outlives the worst case of one job (every attempt timing out, backoffs
            # between), so it is never taken from a live call; a dead worker's expires.
            lease_s = (
                provider.timeout_s * provider.max_attempts
                + MAX_BACKOFF_S * (provider.max_attempts - 1)
                + 2
            )
            leases = LeaseSemaphore(
                self._redis,
                lease_key(self.names, provider.id),
                provider.global_concurrency,
                lease_s,
            )
        return _Client(provider, http, adapter_for(provider, http), leases)

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
        await self._consume()

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
        await self.consumers.stop(grace_s)
        for consumers, waiting in list(self._replaced.items()):
            waiting.cancel()
            await consumers.stop(grace_s)  # already cancelled: waits for its handlers, bounded
        if self._connection is not None:
            await self._connection.close()
        for client in list(self._open):
            await self._close(client)
        if self._redis is not None:
            await self._redis.aclose()

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
        current = self._client
        if provider != current.provider:
            self._client = self._build(provider)
            self._open.add(self._client)
            current.retired = True
            if current.calls == 0:
                await self._close(current)
        if provider.concurrency != current.provider.concurrency:
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
                        queue = await channel.declare_queue(lane.name, passive=True)
                        waiting += queue.declaration_result.message_count or 0
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

    async def _close(self, client: _Client) -> None:
        self._open.discard(client)
        await client.http.aclose()

    @contextlib.asynccontextmanager
    async def _use(self) -> AsyncIterator[_Client]:
        """The client for one job's calls; a replaced one closes after its last call."""
        client = self._client
        client.calls += 1
        try:
            yield client
        finally:
            client.calls -= 1
            if client.retired and client.calls == 0 and client in self._open:
                await self._close(client)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        async def call(job: CompletionJob) -> None:
            if job.route is None or job.route.provider != self.provider_id:
                raise InvalidMessage(
                    f"job reached {self.queue_name} without a route to {self.provider_id!r}"
                )
            on_chunk = None
            if job.params.stream:

                async def on_chunk(attempt: int, sequence: int, chunk: ChatCompletionChunk) -> None:
                    await self.outcomes.chunk(message, job, attempt, sequence, chunk)

            # Only the provider call holds a slot: calls start by priority, then arrival,
            # whichever lane the job came through, and the next one starts while this job's
            # result and event wait for their confirms.
            async with self._slots.slot(message.priority or 0):
                started = utcnow()
                if job.deadline is not None and job.deadline <= started:
                    raise DeadlineExceeded("the job's deadline passed while it waited for a worker")
                async with self._use() as client:
                    refusal, trial = await self._gate(client.provider)
                    try:
                        if refusal is not None:
                            outcome = CallOutcome(error=refusal, attempts=[_refused(job, refusal)])
                        else:
                            async with self._global_slot(client.leases, job.deadline):
                                outcome = await call_with_retries(
                                    client.adapter,
                                    job,
                                    max_attempts=client.provider.max_attempts,
                                    on_chunk=on_chunk,
                                )
                            await self._count(client.provider, outcome)
                    finally:
                        if trial:
                            self._trial = False
                    provider = client.provider
            if _fails_over(job, outcome):
                await self.outcomes.reroute(message, job, outcome.attempts, outcome.usage)
            else:
                result = self._result(job, outcome, started, provider)
                await self.outcomes.finish(message, job, result, outcome.usage)

        await self.outcomes.settle(message, self.queue_name, call)

    async def _gate(self, provider: ProviderConfig) -> tuple[ProviderUnavailable | None, bool]:
        """What the circuit says of the next call: ``(None, False)`` it may go; ``(None, True)``
        it may go as the half-open circuit's one trial call from this process (the caller ends
        the trial); ``(error, False)`` it may not, and the error answers the job."""
        circuits = self._circuits
        if circuits is None:
            return None, False
        view = circuits.fresh(provider.id) or await circuits.view(provider.id)
        state = view.state(provider.circuit.failures)
        if state is CircuitState.CLOSED:
            return None, False
        if state is CircuitState.HALF_OPEN and not self._trial:
            self._trial = True
            return None, True
        wait = view.open_s_left() if state is CircuitState.OPEN else REFRESH_S
        refusal = ProviderUnavailable(
            f"provider {provider.id!r} is unavailable: its circuit is {state.value} after"
            f" {view.failures} failed calls in a row; the job was not sent to it",
            provider=provider.id,
            retry_after=round(max(wait, 0.001), 3),
        )
        return refusal, False

    async def _count(self, provider: ProviderConfig, outcome: CallOutcome) -> None:
        """Tell the circuit how the call went. Its Redis failing must not fail a paid call."""
        if self._circuits is None:
            return
        try:
            if outcome.completion is not None:
                await self._circuits.succeeded(provider.id)
            elif failures := failures_in(outcome.attempts):
                await self._circuits.failed(provider.id, provider.circuit, failures)
        except Exception:
            log.warning("could not count a call in the circuit of %s", self.name, exc_info=True)

    @contextlib.asynccontextmanager
    async def _global_slot(
        self, leases: LeaseSemaphore | None, deadline: datetime | None
    ) -> AsyncIterator[None]:
        """Hold one of the provider's global leases for the call (when a global cap is set),
        waiting for one no later than the job's deadline."""
        if leases is None:
            yield
            return
        lease = None
        while lease is None:
            wait_s = LEASE_WAIT_S
            if deadline is not None:
                wait_s = min(wait_s, (deadline - utcnow()).total_seconds())
                if wait_s <= 0:
                    raise DeadlineExceeded(
                        "the job's deadline passed while it waited for the provider's global"
                        " concurrency"
                    )
            lease = await leases.acquire_wait(self._holder, timeout_s=wait_s)
        keeping = asyncio.create_task(self._keep(leases, lease))
        try:
            yield
        finally:
            keeping.cancel()
            try:
                await leases.release(lease)
            except Exception:
                # The call is done (and paid for): its result must not turn into a failure.
                # An unreturned lease expires on its own (``lease_s``).
                log.warning("could not return a global lease of %s; it expires", self.name)

    async def _keep(self, leases: LeaseSemaphore, lease: str) -> None:
        """Renew a held lease at a third of its life: ``timeout_s`` bounds each read, not a
        call, so a stream (or a slow answer) can outlast the lease, and another worker would
        then take the slot while this call still runs."""
        while True:
            await asyncio.sleep(leases.lease_s / 3)
            try:
                if not await leases.renew(lease):
                    log.warning("a global lease of %s expired during its call", self.name)
                    return
            except Exception:
                log.warning("could not renew a global lease of %s", self.name, exc_info=True)

    def _result(
        self, job: CompletionJob, outcome: CallOutcome, started: datetime, provider: ProviderConfig
    ) -> JobResult:
        assert job.route is not None
        route = job.route
        now = utcnow()
        timings = Timings(
            queued_ms=elapsed_ms(job.submitted_at, route.scheduled_at),
            scheduled_ms=elapsed_ms(route.scheduled_at, started),
            provider_ms=outcome.provider_ms,
            total_ms=elapsed_ms(job.submitted_at or route.scheduled_at, now),
        )
        common = {
            "job_id": job.job_id,
            "provider": route.provider,
            "model": route.model,
            "attempts": [*job.attempts, *outcome.attempts],
            "timings": timings,
            "metadata": job.metadata,
        }
        if outcome.completion is None:
            assert outcome.error is not None
            return JobResult(status=JobStatus.FAILED, error=outcome.error.to_job_error(), **common)
        usage = outcome.completion.usage
        cost = None
        price = provider.models.get(route.model)
        if usage is not None and route.free:
            cost = Decimal(0)
        elif usage is not None and price is not None:
            multiplier = price.multiplier_at(now, self.config.zone)
            cost = cost_usd(price, usage.prompt_tokens, usage.completion_tokens, multiplier)
        elif usage is not None:
            log.warning("no price for %s/%s; cost left empty", route.provider, route.model)
        return JobResult(
            status=JobStatus.SUCCEEDED,
            response=outcome.completion,
            usage=usage,
            usage_estimated=outcome.usage_estimated,
            cost_usd=cost,
            **common,
        )


FAILOVER_CODES = frozenset(
    {
        ErrorCode.TIMEOUT,
        ErrorCode.SERVER_ERROR,
        ErrorCode.PROVIDER_PROTOCOL_ERROR,
        ErrorCode.PROVIDER_UNAVAILABLE,
        ErrorCode.RATE_LIMITED,
        ErrorCode.AUTHENTICATION,
    }
)
"""Failures another provider may not share: this one's health, limits, credit or credentials.
A refused request or a content filter would meet the same answer elsewhere (or should)."""


def _fails_over(job: CompletionJob, outcome: CallOutcome) -> bool:
    """Whether a failed job goes back to the scheduler for a candidate it has not tried."""
    if outcome.error is None or outcome.error.code not in FAILOVER_CODES:
        return False
    assert job.route is not None
    tried = {a.provider for a in job.attempts} | {job.route.provider}
    if all(provider in tried for provider in job.route.alternatives):
        return False
    return job.deadline is None or job.deadline > utcnow()


def _refused(job: CompletionJob, refusal: ProviderUnavailable) -> Attempt:
    """The record of a call an open circuit did not make: failover skips the provider."""
    assert job.route is not None
    return Attempt(
        number=len(job.attempts) + 1,
        provider=job.route.provider,
        model=job.route.model,
        status="failed",
        error_code=refusal.code,
        duration_ms=0,
    )


class WorkerPools(Service):
    """One worker pool per provider of the config (``switchyard up``). A provider a new config
    version adds gets a pool; one it drops drains its queue (``WorkerPool.apply``)."""

    name = "workers"

    def __init__(
        self, amqp_url: str, config: Config, names: Names, *, redis_url: str | None = None
    ) -> None:
        self.amqp_url = amqp_url
        self.names = names
        self.redis_url = redis_url
        self.pools = {p.id: self._pool(config, p.id) for p in config.providers}
        self._started = False

    def _pool(self, config: Config, provider_id: str) -> WorkerPool:
        return WorkerPool(self.amqp_url, config, self.names, provider_id, redis_url=self.redis_url)

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.start()
            log.info("%s started", pool.name)
        self._started = True

    async def stop(self, grace_s: float = 10.0) -> None:
        results = await asyncio.gather(
            *(pool.stop(grace_s) for pool in self.pools.values()), return_exceptions=True
        )
        for pool, result in zip(self.pools.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.error("%s did not stop cleanly: %r", pool.name, result)

    async def apply(self, config: Config) -> None:
        for pool in list(self.pools.values()):
            try:
                await pool.apply(config)
            except Exception:
                log.exception("%s could not take config version %s", pool.name, config.version)
        for provider in config.providers:
            if provider.id not in self.pools:
                pool = self._pool(config, provider.id)
                self.pools[provider.id] = pool
                if self._started:
                    await pool.start()
                    log.info("%s started (provider added to the config)", pool.name)
