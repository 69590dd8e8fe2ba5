"""The scheduler: takes jobs off ``<ns>.jobs``, validates and routes them, and hands each to its
provider's queue. It acks a job only after the provider queue has confirmed the hand-off."""

from __future__ import annotations

import logging
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.amqp import Publisher, connect, declare_topology, passthrough_headers
from broker.codec import encode
from broker.config import Config
from broker.errors import DeadlineExceeded, ModelUnavailable
from broker.names import Names
from broker.outcomes import Outcomes, utcnow
from broker.runtime import ConsumerSet, Service
from schemas import CompletionJob, Route

__all__ = ["Scheduler", "route_job"]

log = logging.getLogger(__name__)


def route_job(job: CompletionJob, config: Config, now: datetime) -> Route:
    """Pick the provider for a job: for now the first configured candidate of its model.

    Full routing (task types, policies, rules, health, quotas) replaces this in the scheduler
    issue; the ``Route`` it returns keeps the same shape.
    """
    public_model = job.model or config.default_model
    if public_model is None:
        reason = "the job names no model" + (
            f" (task_type {job.task_type!r} routing is not configured)" if job.task_type else ""
        )
        raise ModelUnavailable(
            f"{reason} and no default_model is set; available: {', '.join(config.public_models())}"
        )
    candidates = config.candidates(public_model)
    provider, upstream = candidates[0]
    return Route(
        provider=provider.id,
        model=upstream,
        public_model=public_model,
        reason="first configured provider for the model",
        alternatives=[p.id for p, _ in candidates[1:]],
        scheduled_at=now,
    )


class Scheduler(Service):
    name = "scheduler"

    def __init__(self, amqp_url: str, config: Config, names: Names, *, prefetch: int = 256) -> None:
        self.amqp_url = amqp_url
        self.config = config
        self.names = names
        self.prefetch = prefetch
        self.consumers = ConsumerSet()
        self._connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await connect(self.amqp_url, name="switchyard-scheduler")
        channel = await self._connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self.prefetch)
        queues = await declare_topology(channel, self.names, [p.id for p in self.config.providers])
        self.outcomes = Outcomes(Publisher(channel), self.names)
        await self.consumers.consume(queues[self.names.jobs], self.handle)

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.consumers.stop(grace_s)
        if self._connection is not None:
            await self._connection.close()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        async def schedule(job: CompletionJob) -> None:
            now = utcnow()
            if job.deadline is not None and job.deadline <= now:
                raise DeadlineExceeded("the job's deadline passed before it was scheduled")
            update: dict[str, object] = {"route": route_job(job, self.config, now)}
            if "priority" not in job.model_fields_set and message.priority:
                # An AMQP-native producer may set only the property; the body then carries it on.
                update["priority"] = min(message.priority, 9)
            await self._forward(message, job.model_copy(update=update), now)

        await self.outcomes.settle(message, self.names.jobs, schedule)

    async def _forward(
        self, message: AbstractIncomingMessage, job: CompletionJob, now: datetime
    ) -> None:
        assert job.route is not None
        await self.outcomes.publisher.publish(
            self.names.provider(job.route.provider),
            encode(job),
            message_id=job.job_id,
            correlation_id=message.correlation_id or job.job_id,
            reply_to=message.reply_to,
            priority=job.priority,
            headers=passthrough_headers(message),
            expiration=(job.deadline - now) if job.deadline is not None else None,
        )
