"""The scheduler: takes jobs off ``<ns>.jobs``, authenticates, routes and reserves quota for
each, and hands it to its provider's queue. It acks a job only after the provider queue (or a
parking queue) has confirmed the hand-off.

Order per job (ARCHITECTURE.md "Routing, in order"): the key and its scopes, the router (explicit
model or task route, health, CEL rules, policy), then quota: the candidates are tried in the
router's order and the first whose every bucket can be reserved wins; the rest ride along as the
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
import contextlib
import itertools
import logging
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from redis.asyncio import BlockingConnectionPool, Redis

from broker.core.clock import elapsed_ms, utcnow
from broker.core.config import Config
from broker.core.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidMessage,
    JobRejected,
    ModelUnavailable,
    QuotaExceeded,
    Unauthorized,
)
from broker.core.limits import KeyConfig
from broker.core.metrics import QUOTA_ALERTS
from broker.core.names import HEADER_KEY, Names
from broker.core.tokens import estimate_prompt_tokens, load_encoding
from broker.scheduler.admission import Admission
from broker.scheduler.routing import Candidate, ProviderState, RouteDecision, Router
from broker.state.circuits import Circuits, CircuitState
from broker.state.fairness import lane_for
from broker.state.quota import QuotaStore, Reserved, Short, ThresholdCrossed
from broker.transport.amqp import (
    PARK_DELAYS_S,
    Publisher,
    came_persistent,
    declare_topology,
)
from broker.transport.outcomes import Outcomes
from broker.transport.runtime import ConsumerSet, Service, connect_server
from schemas import CompletionJob, ErrorCode, JobError, JobResult, JobStatus, Timings

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

MAX_WAIT_S = 600.0
"""How long an ``on_quota: wait`` job without a deadline may wait for quota."""
SWEEP_EVERY_S = 1.0
QUEUED_HOLD_S = 24 * 3600.0
"""How long a persistent job without a deadline may wait in its provider's queue with its quota
still held (a batch's backlog): its hold lasts this much longer than its call's worst case."""


@dataclass(frozen=True, slots=True)
class _Version:
    """What one config version schedules with."""

    config: Config
    router: Router
    admission: Admission | None


_NOTHING_KNOWN = ProviderState()  # frozen: one for every job that has no quota state


@dataclass(frozen=True, slots=True)
class _Admitted:
    chosen: Candidate
    alternatives: list[Candidate]
    reservation_id: str | None


class Scheduler(Service):
    name = "scheduler"

    def __init__(
        self,
        amqp_url: str,
        config: Config,
        names: Names,
        *,
        redis_url: str | None = None,
        prefetch: int = 256,
        hold_margin_s: float = 60.0,
    ) -> None:
        self.amqp_url = amqp_url
        self.names = names
        self.redis_url = redis_url
        self.prefetch = prefetch
        # A reservation is held for the provider's worst case (every attempt timing out), the
        # time the job may wait in the provider's queue (``_queued_s``) and this margin; a
        # holder that died returns it when the hold passes.
        self.hold_margin_s = hold_margin_s
        self.consumers = ConsumerSet()
        # Redis (when configured) holds the providers' circuits and the quota buckets.
        self._redis = (
            Redis(connection_pool=BlockingConnectionPool.from_url(redis_url))
            if redis_url is not None
            else None
        )
        self._circuits = Circuits(self._redis, names) if self._redis is not None else None
        self._store: QuotaStore | None = None
        self._version = self._build(config)
        self._round_robin = itertools.count()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._sweeper: asyncio.Task[None] | None = None

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
        admission = None
        if config.needs_quota:
            if self._store is None:
                if self._redis is None:
                    raise ConfigError(
                        "this config sets limits or budgets: the scheduler needs Redis"
                    )
                self._store = QuotaStore(self._redis, self.names)
            self._store.use_thresholds(config.alerts.percents)
            admission = Admission(config, self._store, self.names)
        return _Version(config, Router(config), admission)

    async def apply(self, config: Config) -> None:
        """Schedule the next jobs by ``config`` (queues for new providers declared first); the
        jobs being scheduled finish on the version they began with."""
        version = self._build(config)
        if self._channel is not None:
            # Idempotent: declares the queues (and lanes) of providers that are new.
            ids = [p.id for p in config.providers]
            await declare_topology(self._channel, self.names, ids, config.fair_lanes)
        self._version = version
        if self._store is not None and self._sweeper is None and self._channel is not None:
            self._sweeper = asyncio.create_task(self._sweep())

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
        if self._store is not None:
            self._sweeper = asyncio.create_task(self._sweep())
        await self.consumers.consume(queues[self.names.jobs], self.handle, ack=True)
        await self.consumers.consume(queues[self.names.reroute], self.reroute, ack=True)

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.consumers.stop(grace_s)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._connection is not None:
            await self._connection.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        async def schedule(job: CompletionJob) -> None:
            await self._schedule(message, job)

        await self.outcomes.settle(message, self.names.jobs, schedule)

    async def reroute(self, message: AbstractIncomingMessage) -> None:
        """Failover: a job whose provider failed it, handed back by the worker."""

        async def schedule_again(job: CompletionJob) -> None:
            await self._reschedule(message, job)

        await self.outcomes.settle(message, self.names.reroute, schedule_again)

    async def _schedule(self, message: AbstractIncomingMessage, job: CompletionJob) -> None:
        now = utcnow()
        version = self._version
        if job.deadline is not None and job.deadline <= now:
            raise DeadlineExceeded("the job's deadline passed before it was scheduled")
        key = self._authenticate(message, version.config)
        decision = await self._route(job, key, version, now)
        admitted = await self._admit(
            job, key, decision, now, version.admission, queued_s=_queued_s(message, job, now)
        )
        if admitted is None:
            await self._park(message, job, now)
            return
        await self._dispatch(message, job, key, decision, admitted, now, version)

    async def _reschedule(self, message: AbstractIncomingMessage, job: CompletionJob) -> None:
        """Route a job to a candidate it has not tried, under a new reservation (the worker's
        event settles the last one). The key is the route's: the worker checked nothing new,
        and the secret went no further than the first pass. No candidate left, or none with
        quota now: the job ends failed with its provider's error (it does not wait)."""
        now = utcnow()
        version = self._version
        if job.route is None or not job.attempts:
            raise InvalidMessage("a rerouted job carries its route and the attempts made")
        try:
            if job.deadline is not None and job.deadline <= now:
                raise DeadlineExceeded("the job's deadline passed before it could fail over")
            key = version.config.key(job.route.key_id) if job.route.key_id else None
            if key is None and version.config.keys:
                raise Unauthorized(f"key {job.route.key_id!r} is not configured")
            decision = await self._route(
                job, key, version, now, exclude={a.provider for a in job.attempts}
            )
            admitted = await self._admit(
                job,
                key,
                decision,
                now,
                version.admission,
                queued_s=_queued_s(message, job, now),
                wait=False,
            )
        except (ModelUnavailable, QuotaExceeded) as exc:
            await self._end_rerouted(message, job, JobStatus.FAILED, _provider_error(job, exc))
            return
        except (DeadlineExceeded, Unauthorized) as exc:
            status = JobStatus.EXPIRED if isinstance(exc, DeadlineExceeded) else JobStatus.REJECTED
            await self._end_rerouted(message, job, status, exc.to_job_error())
            return
        assert admitted is not None
        await self._dispatch(message, job, key, decision, admitted, now, version)

    async def _route(
        self,
        job: CompletionJob,
        key: KeyConfig | None,
        version: _Version,
        now: datetime,
        exclude: set[str] | None = None,
    ) -> RouteDecision:
        return version.router.route(
            job,
            key=key,
            states=await self._states(job, version),
            now=now,
            rr_counter=next(self._round_robin),
            exclude=exclude or (),
        )

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
        last = job.attempts[-1]
        result = JobResult(
            job_id=job.job_id,
            status=status,
            error=error,
            provider=last.provider,
            model=last.model,
            attempts=job.attempts,
            timings=Timings(total_ms=elapsed_ms(job.submitted_at, utcnow())),
            metadata=job.metadata,
        )
        settled = job.route.model_copy(update={"reservation_id": None})
        await self.outcomes.finish(message, job.model_copy(update={"route": settled}), result, [])

    async def _dispatch(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        key: KeyConfig | None,
        decision: RouteDecision,
        admitted: _Admitted,
        now: datetime,
        version: _Version,
    ) -> None:
        """Hand the job to its admitted candidate's queue, the route on it."""
        route = decision.to_route(
            now,
            admitted=(admitted.chosen, admitted.alternatives),
            reservation_id=admitted.reservation_id,
            key_id=key.id if key else None,
        )
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
        lane = lane_for(key, version.config.fair_lanes)
        await self._forward(message, job.model_copy(update=update), now, lane)

    def _authenticate(self, message: AbstractIncomingMessage, config: Config) -> KeyConfig | None:
        """With keys configured, every job must carry a known one; without, jobs are anonymous."""
        if not config.keys:
            return None
        secret = (message.headers or {}).get(HEADER_KEY)
        if isinstance(secret, bytes):
            secret = secret.decode(errors="replace")
        key = config.key_for_secret(secret) if isinstance(secret, str) else None
        if key is None:
            raise Unauthorized(
                f"a known virtual key is required in the {HEADER_KEY} header"
                + ("" if secret else " (none was given)")
            )
        return key

    async def _states(self, job: CompletionJob, version: _Version) -> dict[str, ProviderState]:
        admission, circuits = version.admission, self._circuits
        if admission is None and circuits is None:
            return {}
        tokens, now = 0, None
        if admission is not None:
            tokens = estimate_prompt_tokens(job.messages) + (job.params.max_tokens or 0)
            now = utcnow()
        states = {}
        for provider in version.config.providers:
            state = _NOTHING_KNOWN
            if admission is not None and now is not None:
                state = await admission.state(provider, tokens, now)
            if circuits is not None:
                view = circuits.fresh(provider.id) or await circuits.view(provider.id)
                circuit = view.state(provider.circuit.failures)
                if circuit is not CircuitState.CLOSED:
                    state = replace(state, circuit=circuit.value, open_s=view.open_s_left())
            states[provider.id] = state
        return states

    async def _admit(
        self,
        job: CompletionJob,
        key: KeyConfig | None,
        decision: RouteDecision,
        now: datetime,
        admission: Admission | None,
        *,
        queued_s: float,
        wait: bool = True,
    ) -> _Admitted | None:
        """Reserve quota on the first candidate that fits, held for the call's worst case, the
        margin, and ``queued_s``, the time the job may wait in the provider's queue. ``None``:
        park the job (only if it may ``wait``)."""
        if admission is None:
            return _Admitted(decision.chosen, decision.alternatives, None)
        ordered = [decision.chosen, *decision.alternatives]
        # A provider's free tier running out leaves its paid tier: try that after the rest.
        ordered += [replace(c, free=False) for c in ordered if c.free]
        # One per scheduling pass, not per job id: the producer chooses job ids, and a
        # reservation id already known is taken as this job's (an idempotent replay), so two
        # jobs sharing an id were admitted on one charge. A job scheduled again after a crash
        # between its reserve and its forward holds twice until the first hold passes.
        reservation_id = f"{job.job_id}:{len(job.attempts)}:{secrets.token_hex(4)}"
        shorts: list[Short] = []
        for index, candidate in enumerate(ordered):
            provider = candidate.provider
            hold_s = provider.timeout_s * provider.max_attempts + self.hold_margin_s + queued_s
            outcome = await admission.reserve(reservation_id, key, candidate, now, hold_s)
            if isinstance(outcome, Reserved):
                await self._alert(outcome.crossed)
                return _Admitted(candidate, ordered[index + 1 :], reservation_id)
            shorts.append(outcome)
        # The soonest a candidate could take the job; one whose limit is smaller than the job
        # never will, so it neither decides nor stops a wait while another could.
        can_fit = [s for s in shorts if not s.never_fits]
        short = min(can_fit or shorts, key=lambda s: s.retry_after_s)
        waited_from = job.submitted_at or now
        give_up = job.deadline or (waited_from + timedelta(seconds=MAX_WAIT_S))
        if wait and job.on_quota == "wait" and can_fit and give_up > now:
            return None
        raise QuotaExceeded(
            f"quota short for every candidate: {short.bucket_label} has {short.current} of "
            f"{short.limit} used",
            retry_after=round(short.retry_after_s, 3),
        )

    async def _park(
        self, message: AbstractIncomingMessage, job: CompletionJob, now: datetime
    ) -> None:
        """Hold the job in the shortest parking queue, then it comes back to the jobs queue. A
        job that came without ``submitted_at`` (an AMQP producer's) gets it now, so its wait
        is counted from here and ends (``MAX_WAIT_S``) instead of starting again each time."""
        delay = PARK_DELAYS_S[0]
        log.info("job %s waits for quota (%d s)", job.job_id, delay)
        stamped = job.model_copy(update={"submitted_at": now}) if job.submitted_at is None else None
        await self.outcomes.pass_on(
            message,
            stamped or job,
            self.names.park(delay),
            body=None if stamped else message.body,
            with_key=True,
        )

    async def _alert(self, crossed: tuple[ThresholdCrossed, ...]) -> None:
        for alert in crossed:
            log.warning(
                "%s reached %d%% (%d of %d)", alert.label, alert.threshold, alert.used, alert.limit
            )
            QUOTA_ALERTS.labels(alert.label, str(alert.threshold)).inc()
            body = orjson.dumps(
                {
                    "label": alert.label,
                    "threshold_percent": alert.threshold,
                    "used": alert.used,
                    "limit": alert.limit,
                    "at": utcnow().isoformat(),
                }
            )
            await self.outcomes.publisher.publish(self.names.alerts, body)

    async def _sweep(self) -> None:
        """Return reservations whose holder died (the job never reached the accountant)."""
        assert self._store is not None
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                returned = await self._store.expire_holds()
            except Exception:
                log.warning("quota sweep failed", exc_info=True)
                continue
            if returned:
                log.info("returned %d expired quota reservations", returned)

    async def _forward(
        self, message: AbstractIncomingMessage, job: CompletionJob, now: datetime, lane: int
    ) -> None:
        assert job.route is not None
        await self.outcomes.pass_on(
            message,
            job,
            self.names.provider(job.route.provider, lane),
            expiration=(job.deadline - now) if job.deadline is not None else None,
        )


def _provider_error(job: CompletionJob, why: JobRejected) -> JobError:
    """A failed-over job no other candidate can take: its last provider's error, and why."""
    last = job.attempts[-1]
    code = last.error_code or ErrorCode.SERVER_ERROR
    return JobError(
        type="provider_error",
        code=code,
        message=f"provider {last.provider!r} failed the job ({code.value}) and no other provider"
        f" could take it: {why.message}",
        retry_after=why.retry_after,
        provider=last.provider,
    )


def _queued_s(message: AbstractIncomingMessage, job: CompletionJob, now: datetime) -> float:
    """How long the job may wait in its provider's queue before its call, so its reservation
    is held that long too. The sweeper refunds a hold that passes, as if its holder had died: a
    reservation whose job is only queued (a batch's backlog) was refunded, later jobs were
    admitted past the limits, and the accountant then charged the queued ones afresh. A job
    with a deadline waits at most until it (RabbitMQ drops it then); a persistent one without
    waits for a worker however long; a transient one, an RPC whose caller waits for the
    answer, may be lost with the broker, so it gets no more than the margin."""
    if job.deadline is not None:
        return max(0.0, (job.deadline - now).total_seconds())
    return QUEUED_HOLD_S if came_persistent(message) else 0.0
