"""A worker pool: serves one provider's queue with at most ``concurrency`` calls in flight.

For each job: call the adapter (through the retry layer), publish the result to the job's reply
queue and the usage and job events to the accountant, and ack only after all are confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from redis.asyncio import Redis

from broker.amqp import Publisher, connect, declare_topology
from broker.config import Config, ProviderConfig
from broker.errors import ConfigError, DeadlineExceeded, InvalidMessage
from broker.leases import LeaseSemaphore, lease_key
from broker.names import Names
from broker.outcomes import Outcomes, elapsed_ms, utcnow
from broker.pricing import cost_usd
from broker.runtime import ConsumerSet, Service
from schemas import ChatCompletionChunk, CompletionJob, JobResult, JobStatus, Timings
from workers.adapters import adapter_for
from workers.http import make_http_client
from workers.retry import MAX_BACKOFF_S, CallOutcome, call_with_retries

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)


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
        self.provider: ProviderConfig = provider
        self.queue_name = names.provider(provider_id)
        self.consumers = ConsumerSet()
        # Prefetch bounds deliveries; the semaphore also bounds calls if a reconnect
        # redelivers while old handlers still run.
        self._slots = asyncio.Semaphore(provider.concurrency)
        self._http = make_http_client(provider)
        self._adapter = adapter_for(provider, self._http)
        self._connection: AbstractRobustConnection | None = None
        self._redis: Redis | None = None
        self._leases: LeaseSemaphore | None = None
        self._holder = f"{provider_id}-{secrets.token_hex(4)}"
        if provider.global_concurrency is not None:
            if redis_url is None:
                raise ConfigError(f"provider {provider_id!r} sets global_concurrency: needs Redis")
            self._redis = Redis.from_url(redis_url)
            # A lease outlives the worst case of one job (every attempt timing out, backoffs
            # between), so it is never taken from a live call; a dead worker's expires.
            lease_s = (
                provider.timeout_s * provider.max_attempts
                + MAX_BACKOFF_S * (provider.max_attempts - 1)
                + 2
            )
            self._leases = LeaseSemaphore(
                self._redis,
                lease_key(names, provider_id),
                provider.global_concurrency,
                lease_s,
            )

    async def start(self) -> None:
        self._connection = await connect(self.amqp_url, name=f"switchyard-{self.name}")
        channel = await self._connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self.provider.concurrency)
        queues = await declare_topology(channel, self.names, [p.id for p in self.config.providers])
        self.outcomes = Outcomes(Publisher(channel), self.names)
        await self.consumers.consume(queues[self.queue_name], self.handle)

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.consumers.stop(grace_s)
        if self._connection is not None:
            await self._connection.close()
        await self._http.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        async with self._slots:
            await self._serve(message)

    async def _serve(self, message: AbstractIncomingMessage) -> None:
        async def call(job: CompletionJob) -> None:
            started = utcnow()
            if job.route is None or job.route.provider != self.provider.id:
                raise InvalidMessage(
                    f"job reached {self.queue_name} without a route to {self.provider.id!r}"
                )
            if job.deadline is not None and job.deadline <= started:
                raise DeadlineExceeded("the job's deadline passed while it waited for a worker")
            on_chunk = None
            if job.params.stream:

                async def on_chunk(attempt: int, sequence: int, chunk: ChatCompletionChunk) -> None:
                    await self.outcomes.chunk(message, job, attempt, sequence, chunk)

            async with self._global_slot():
                outcome = await call_with_retries(
                    self._adapter, job, max_attempts=self.provider.max_attempts, on_chunk=on_chunk
                )
            result = self._result(job, outcome, started)
            await self.outcomes.finish(message, job, result, outcome.usage)

        await self.outcomes.settle(message, self.queue_name, call)

    @contextlib.asynccontextmanager
    async def _global_slot(self) -> AsyncIterator[None]:
        """Hold one of the provider's global leases for the call (when a global cap is set)."""
        if self._leases is None:
            yield
            return
        lease = None
        while lease is None:
            lease = await self._leases.acquire_wait(self._holder, timeout_s=30)
        try:
            yield
        finally:
            await self._leases.release(lease)

    def _result(self, job: CompletionJob, outcome: CallOutcome, started: datetime) -> JobResult:
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
            "attempts": outcome.attempts,
            "timings": timings,
            "metadata": job.metadata,
        }
        if outcome.completion is None:
            assert outcome.error is not None
            return JobResult(status=JobStatus.FAILED, error=outcome.error.to_job_error(), **common)
        usage = outcome.completion.usage
        cost = None
        if usage is not None:
            price = self.config.price(route.provider, route.model)
            cost = (
                Decimal(0)
                if route.free
                else cost_usd(price, usage.prompt_tokens, usage.completion_tokens)
            )
        return JobResult(
            status=JobStatus.SUCCEEDED,
            response=outcome.completion,
            usage=usage,
            usage_estimated=outcome.usage_estimated,
            cost_usd=cost,
            **common,
        )
