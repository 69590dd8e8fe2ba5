"""The scheduler: takes jobs off ``<ns>.jobs``, authenticates, routes and reserves quota for
each, and hands it to its provider's queue. It acks a job only after the provider queue (or a
parking queue) has confirmed the hand-off.

Order per job (docs/architecture.md, "Routing, in order"): the key and its scopes, the router
(explicit model or task route, health, CEL rules, policy), then quota: the candidates are tried in
the router's order and the first whose every bucket can be reserved wins; the rest ride along as the
job's failover list. When none can, the job's ``on_quota`` says: ``reject`` (a ``rate_limited``
result with ``retry_after``) or ``wait`` (parked in a TTL queue that returns it to the jobs queue,
keeping its priority, until its deadline).

Failover: a job its provider failed comes back on ``<ns>.reroute`` from the worker, carrying its
attempts; it is routed the same way among the providers it has not tried, or ends failed with its
provider's error when none can take it now (``_reschedule``).

A new config version (``apply``, from ``broker.transport.reload``) swaps the config, the router
and the admission at once; each job is scheduled start to end on the version it began with.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from broker.core.auth import authenticate
from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.errors import (
    DeadlineExceeded,
    InvalidMessage,
    JobRejected,
    ModelUnavailable,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
)
from broker.core.limits import KeyConfig
from broker.core.metrics import JOBS_SUBMITTED, bounded
from broker.core.names import Names
from broker.core.records import cancelled_result, failover_error, job_result
from broker.core.tokens import load_encoding
from broker.core.webhook_urls import check_webhook
from broker.scheduler.admission import Admission
from broker.scheduler.candidates import ProviderState
from broker.scheduler.control import JobControl
from broker.scheduler.deferral import defer_until
from broker.scheduler.parking import defer, deferred_since, first_pass, park_for_quota, twin_mark
from broker.scheduler.readings import Readings
from broker.scheduler.repeats import Repeats
from broker.scheduler.reservations import (
    REDIS_RETRY_S,
    Admitted,
    Reservations,
    Wait,
    delivery_id,
    queued_s,
    while_redis_is_away,
)
from broker.scheduler.routing import RouteDecision, Router
from broker.scheduler.states import provider_states
from broker.scheduler.tracking import Tracking
from broker.state.circuits import Circuits
from broker.state.client import connect_redis
from broker.state.fairness import lane_for
from broker.state.idempotency import Idempotency
from broker.state.job_states import JobStates
from broker.state.quota import REDIS_FAILURES, REDIS_REFUSES_US
from broker.transport.amqp import (
    Publisher,
    declare_topology,
)
from broker.transport.cancels import HeardCancels, listen_for_cancels
from broker.transport.outcomes import Outcomes
from broker.transport.runtime import ConsumerSet, Service, connect_server
from schemas import CompletionJob, JobError, JobStatus

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Version:
    """What one config version schedules with."""

    config: Config
    router: Router
    admission: Admission | None
    models: frozenset[str]  # the public models: a job naming another is counted as "other"


class Scheduler(Service):
    name = "scheduler"

    def __init__(
        self,
        amqp_url: str,
        config: Config,
        names: Names,
        *,
        redis_url: str | None = None,
        database_url: str | None = None,
        prefetch: int = 256,
        hold_margin_s: float = 60.0,
        queues_at: tuple[str, str] | None = None,
    ) -> None:
        """``queues_at``: RabbitMQ's management API and vhost, for the queue gauges."""
        self.amqp_url = amqp_url
        self.names = names
        self.redis_url = redis_url
        self.prefetch = prefetch
        self.consumers = ConsumerSet()
        # Redis (when configured) holds the providers' circuits and the quota buckets.
        self._redis = connect_redis(redis_url) if redis_url is not None else None
        self._circuits = Circuits(self._redis, names) if self._redis is not None else None
        self._readings = Readings(self._redis, names, self._circuits, queues_at)
        self._reading: asyncio.Task[None] | None = None
        self._reservations = Reservations(self._redis, names, hold_margin_s, database_url)
        jobs = JobStates(self._redis, names) if self._redis else None
        self._repeats = Repeats(Idempotency(self._redis, names) if self._redis else None)
        self._heard = HeardCancels()
        self._tracking = Tracking(jobs, self._heard)
        self._control = JobControl(
            jobs, names, lambda: self.outcomes.publisher, lambda: self.config
        )
        self._version = self._build(config)
        self._round_robin = itertools.count()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None

    @property
    def config(self) -> Config:
        return self._version.config

    @property
    def router(self) -> Router:
        return self._version.router

    @property
    def admission(self) -> Admission | None:
        return self._version.admission

    def _build(self, config: Config) -> _Version:
        admission = self._reservations.admission_for(config)
        return _Version(config, Router(config), admission, frozenset(config.public_models()))

    async def apply(self, config: Config) -> None:
        """Schedule the next jobs by ``config`` (queues for new providers declared first); the
        jobs being scheduled finish on the version they began with."""
        version = self._build(config)
        if self._channel is not None:
            # Idempotent: declares the queues (and lanes) of providers that are new.
            ids = [p.id for p in config.providers]
            await declare_topology(self._channel, self.names, ids, config.fair_lanes)
        self._version = version
        if self._channel is not None:
            self._reservations.start(self.outcomes.publisher)

    async def start(self) -> None:
        await asyncio.to_thread(load_encoding)  # every job's routing estimates its tokens
        self._connection = await connect_server(self.amqp_url, name="switchyard-scheduler")
        channel = await self._connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self.prefetch)
        queues = await declare_topology(
            channel, self.names, [p.id for p in self.config.providers], self.config.fair_lanes
        )
        self.outcomes = Outcomes(Publisher(channel), self.names)
        self._channel = channel
        self._reservations.start(self.outcomes.publisher)
        await self.consumers.consume(queues[self.names.jobs], self.handle, ack=True)
        await self.consumers.consume(queues[self.names.reroute], self.reroute, ack=True)
        await self.consumers.consume(queues[self.names.control], self._control.handle, ack=True)
        await listen_for_cancels(self._connection, self.names, self._heard)
        self._reading = asyncio.create_task(self._readings.run(lambda: self.config))

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._reading is not None:
            self._reading.cancel()
        await self._readings.close()
        await self.consumers.stop(grace_s)
        await self._reservations.stop()
        if self._connection is not None:
            await self._connection.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        await self.outcomes.settle(message, self.names.jobs, self._schedule)

    async def reroute(self, message: AbstractIncomingMessage) -> None:
        """Failover: a job whose provider failed it, handed back by the worker."""
        await self.outcomes.settle(message, self.names.reroute, self._reschedule)

    async def _schedule(self, message: AbstractIncomingMessage, job: CompletionJob) -> None:
        now = utcnow()
        version = self._version
        if job.deadline is not None and job.deadline <= now:
            raise DeadlineExceeded("the job's deadline passed before it was scheduled")
        if job.route is not None or job.attempts:
            raise InvalidMessage(
                "route and attempts are Switchyard's (failover): a job sets neither"
            )
        first = first_pass(message)
        if first:
            model, task = bounded(job.model, version.models), job.task_type
            JOBS_SUBMITTED.labels(job.priority, model, bounded(task, version.config.routes)).inc()
        key = authenticate(message.headers, version.config)
        if job.reply.webhook is not None and first:  # its DNS, once
            hook = str(job.reply.webhook)
            await check_webhook(hook, version.config.webhooks, field="reply.webhook")
        park = partial(park_for_quota, self.outcomes, self.names, message, job, now)
        try:
            answer = partial(self.outcomes.finish, message, job, usage=[])
            repeat = partial(park, reason="repeat")
            if await self._repeats.handled(job, key, now, answer=answer, park=repeat):
                return
        except REDIS_FAILURES as exc:  # a persistent job waits for Redis, as admission's do
            await park(while_redis_is_away(message, job, now, exc), reason="redis")
            return
        reason = "quota"
        try:
            decision, states = await self._route(job, key, version, now)
            if until := defer_until(job, decision, states, version.config, now):
                await defer(self.outcomes, self.names, message, job, now, until)
                return
            admitted = await self._reservations.admit(
                job,
                key,
                decision,
                now,
                version.admission,
                queued_s=queued_s(message, job, now),
                delivery=delivery_id(message),
            )
        except REDIS_FAILURES as exc:
            admitted = while_redis_is_away(message, job, now, exc)
            reason = "redis"
        except JobRejected:
            await self._repeats.release(job, key)  # a first job refused gives its key back
            raise
        if isinstance(admitted, Wait):
            await park(admitted, reason=reason)
            return
        await self._dispatch(message, job, key, decision, admitted, now, version)

    async def _reschedule(self, message: AbstractIncomingMessage, job: CompletionJob) -> None:
        """Route a job to a candidate it has not tried, under a new reservation (the worker's
        event settles the last one); with no attempts, its reservation was lost with Redis and
        it is admitted again. The key is the route's: the worker checked nothing new, and the
        secret went no further than the first pass. No candidate left, or none with quota now:
        the job ends failed with its provider's error, or the refusal (it does not wait)."""
        now = utcnow()
        version = self._version
        if job.route is None:
            raise InvalidMessage("a rerouted job carries its route")
        try:
            if job.deadline is not None and job.deadline <= now:
                raise DeadlineExceeded("the job's deadline passed before it could fail over")
            key = version.config.key(job.route.key_id) if job.route.key_id else None
            if key is None and version.config.keys:
                raise Unauthorized(f"key {job.route.key_id!r} is not configured")
            decision, _ = await self._route(
                job, key, version, now, exclude={a.provider for a in job.attempts}
            )
            admitted = await self._reservations.admit(
                job,
                key,
                decision,
                now,
                version.admission,
                queued_s=queued_s(message, job, now),
                wait=False,
                delivery=delivery_id(message),
            )
        except (ModelUnavailable, QuotaExceeded) as exc:
            await self._end_rerouted(message, job, JobStatus.FAILED, failover_error(job, exc))
            return
        except (DeadlineExceeded, Unauthorized) as exc:
            status = JobStatus.EXPIRED if isinstance(exc, DeadlineExceeded) else JobStatus.REJECTED
            await self._end_rerouted(message, job, status, exc.to_job_error())
            return
        except REDIS_FAILURES as exc:
            if isinstance(exc, REDIS_REFUSES_US):
                raise
            away = Unavailable(
                f"Redis is unreachable ({type(exc).__name__}), so no quota could be reserved for"
                " a failover; the job was not run again",
                retry_after=REDIS_RETRY_S,
            )
            await self._end_rerouted(message, job, JobStatus.FAILED, away.to_job_error())
            return
        assert isinstance(admitted, Admitted)  # a failover does not wait
        await self._dispatch(message, job, key, decision, admitted, now, version)

    async def _route(
        self,
        job: CompletionJob,
        key: KeyConfig | None,
        version: _Version,
        now: datetime,
        exclude: set[str] | None = None,
    ) -> tuple[RouteDecision, dict[str, ProviderState]]:
        """The router's decision, and the provider states it was made on."""
        states = await provider_states(
            job, version.config, version.admission, self._circuits, self._readings.health
        )
        decision = version.router.route(
            job,
            key=key,
            states=states,
            now=now,
            rr_counter=next(self._round_robin),
            exclude=exclude or (),
        )
        return decision, states

    async def _end_rerouted(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        status: JobStatus,
        error: JobError,
    ) -> None:
        """End a failed-over job here, its attempts in the result. Its last reservation was
        settled by its worker's event, so this event carries none (releasing it again could
        refund the request the provider was called with)."""
        assert job.route is not None
        result = job_result(job, job.job_id, status, utcnow(), error=error, attempts=job.attempts)
        settled = job.route.model_copy(update={"reservation_id": None})
        if self._repeats.idempotency is not None:  # kept first: a repeat never misses it
            await self._repeats.idempotency.keep(job, result)
        await self.outcomes.finish(message, job.model_copy(update={"route": settled}), result, [])

    async def _dispatch(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        key: KeyConfig | None,
        decision: RouteDecision,
        admitted: Admitted,
        now: datetime,
        version: _Version,
    ) -> None:
        """Hand the job to its admitted candidate's queue, the route on it."""
        route = decision.to_route(
            now,
            admitted=(admitted.chosen, admitted.alternatives),
            reservation_id=admitted.reservation_id,
            quota_epoch=admitted.quota_epoch,
            key_id=key.id if key else None,
        )
        earlier = job.route.deferred_from if job.route is not None else None  # a failover's
        route.deferred_from = deferred_since(message) or earlier
        if job.attempts:
            last = job.attempts[-1]
            failed = last.error_code.value if last.error_code else "failed"
            route.reason = f"failover from {last.provider} ({failed}); {route.reason}"
        if log.isEnabledFor(logging.DEBUG):  # the dump costs as much as encoding the job
            log.debug("job %s routed: %s", job.job_id, route.model_dump_json())
        update: dict[str, object] = {"route": route}
        priority = decision.priorities.get(admitted.chosen.label)  # quota may have moved it
        if priority is not None:
            update["priority"] = priority
        elif "priority" not in job.model_fields_set and message.priority:
            # An AMQP-native producer may set only the property; the body then carries it on.
            update["priority"] = min(message.priority, 9)
        lane = lane_for(key, version.config.fair_lanes, job.batch.batch_id if job.batch else None)
        routed = job.model_copy(update=update)
        if await self._tracking.cancelled(message, routed, admitted.chosen.est_cost_usd):
            await self.outcomes.finish(message, routed, cancelled_result(routed, utcnow()), [])
            return
        await self._forward(message, routed, now, lane)

    async def _forward(
        self, message: AbstractIncomingMessage, job: CompletionJob, now: datetime, lane: int
    ) -> None:
        assert job.route is not None
        await self.outcomes.pass_on(
            message,
            job,
            self.names.provider(job.route.provider, lane),
            expiration=(job.deadline - now) if job.deadline is not None else None,
            headers=twin_mark(message),
        )
