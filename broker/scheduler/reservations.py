"""Quota for routed jobs: a reservation on the first candidate whose every bucket fits, held for
as long as the job may wait; threshold alerts; and the sweeper that returns the reservations of
holders that died."""

from __future__ import annotations

import asyncio
import logging
import secrets
import zlib
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import orjson
from aio_pika.abc import AbstractIncomingMessage
from pydantic import HttpUrl
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.db import make_engine
from broker.core.errors import ConfigError, QuotaExceeded, Unavailable
from broker.core.limits import KeyConfig
from broker.core.metrics import QUOTA_ALERTS
from broker.core.names import HEADER_PARKED, Names
from broker.scheduler.admission import Admission, Held
from broker.scheduler.routing import Candidate, RouteDecision
from broker.scheduler.unmetered import Unmetered
from broker.state.quota import (
    REDIS_FAILURES,
    REDIS_REFUSES_US,
    QuotaStore,
    ReservationState,
    Reserved,
    Short,
    ThresholdCrossed,
)
from broker.state.quota_rebuild import QuotaRebuilder
from broker.transport.amqp import Publisher, came_persistent, park_delay
from broker.transport.webhooks import alert_webhook_id, publish_webhook
from schemas import CompletionJob, WebhookRequest

__all__ = [
    "LONGEST_SLEEP_S",
    "REDIS_RETRY_S",
    "Admitted",
    "Reservations",
    "Wait",
    "delivery_id",
    "parking",
    "queued_s",
    "while_redis_is_away",
]

log = logging.getLogger(__name__)

MAX_WAIT_S = 600.0
"""How long an ``on_quota: wait`` job without a deadline may wait for quota."""
SWEEP_EVERY_S = 1.0
LONGEST_SLEEP_S = 32.0
"""The longest a waiting job sleeps in one hop before it looks at its limits again."""
QUEUED_HOLD_S = 24 * 3600.0
"""How long a persistent job without a deadline may wait in its provider's queue with its quota
still held (a batch's backlog): its hold lasts this much longer than its call's worst case."""


@dataclass(frozen=True, slots=True)
class Admitted:
    chosen: Candidate
    alternatives: list[Candidate]
    reservation_id: str | None
    quota_epoch: str | None = None
    """The counters' epoch the reservation was made in (``QuotaStore``)."""


@dataclass(frozen=True, slots=True)
class Wait:
    """No candidate fits now; the job may wait up to ``wait_s`` (until the soonest window ends,
    no later than its deadline or the wait's end) and try again. ``at_window_end``: every
    shortfall is a request count, which a reconcile never gives back, so the job sleeps (up to
    ``LONGEST_SLEEP_S`` a hop, since a released request can free one sooner); tokens and money
    come back when a reservation is reconciled down, so the job looks again sooner."""

    wait_s: float
    at_window_end: bool


class Reservations:
    def __init__(
        self,
        redis: Redis | None,
        names: Names,
        hold_margin_s: float,
        database_url: str | None = None,
    ) -> None:
        self._redis = redis
        self._names = names
        # With the ledger at hand, counters Redis lost are rebuilt from it before a reserve.
        self._database_url = database_url
        self._engine: AsyncEngine | None = None
        self._rebuilder: QuotaRebuilder | None = None
        self._unmetered = Unmetered()
        self._epoch: str | None = None  # the quota epoch of the last reservation made
        # A reservation is held for the provider's worst case (every attempt timing out), the
        # time the job may wait in the provider's queue (``queued_s``) and this margin; a
        # holder that died returns it when the hold passes.
        self.hold_margin_s = hold_margin_s
        self.store: QuotaStore | None = None
        self._publisher: Publisher | None = None
        self._alert_webhook: HttpUrl | None = None  # the config's alerts.webhook
        self._sweeper: asyncio.Task[None] | None = None

    def admission_for(self, config: Config) -> Admission | None:
        """What admits jobs under ``config``'s limits and budgets (None: it sets none)."""
        self._alert_webhook = config.alerts.webhook
        if not config.needs_quota:
            return None
        if self.store is None:
            if self._redis is None:
                raise ConfigError("this config sets limits or budgets: the scheduler needs Redis")
            if self._database_url is None:
                raise ConfigError(
                    "this config sets limits or budgets: the scheduler needs the database, whose"
                    " ledger rebuilds the quota counters when Redis loses them"
                )
            self.store = QuotaStore(self._redis, self._names)
            self._engine = make_engine(self._database_url)
            self._rebuilder = QuotaRebuilder(self._engine, self._redis, self._names, config)
            self.store.on_lost = self._rebuilder.ensure
        if self._rebuilder is not None:
            self._rebuilder.config = config
        self.store.use_thresholds(config.alerts.percents)
        return Admission(config, self.store, self._names)

    def start(self, publisher: Publisher) -> None:
        """Publish alerts with ``publisher``; sweep once a config has needed the store."""
        self._publisher = publisher
        if self.store is not None and self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])  # its end; the caller's own cancel still raises
        if self._engine is not None:
            await self._engine.dispose()

    async def admit(
        self,
        job: CompletionJob,
        key: KeyConfig | None,
        decision: RouteDecision,
        now: datetime,
        admission: Admission | None,
        *,
        queued_s: float,
        wait: bool = True,
        delivery: str = "",
    ) -> Admitted | Wait:
        """Reserve quota on the first candidate that fits, held for the call's worst case, the
        margin, and ``queued_s``, the time the job may wait in the provider's queue. ``Wait``:
        park the job that long (only if it may ``wait``)."""
        if admission is None:
            return Admitted(decision.chosen, decision.alternatives, None)
        try:
            return await self._reserve(job, key, decision, now, admission, queued_s, wait, delivery)
        except REDIS_FAILURES as exc:
            if admission.config.quota_when_redis_away != "admit" or isinstance(
                exc, REDIS_REFUSES_US
            ):
                raise
            log.warning("job %s runs unmetered: Redis is away (%s)", job.job_id, exc)
            self._unmetered.owe(admission.buckets(key, decision.chosen, now), self._epoch)
            return Admitted(decision.chosen, decision.alternatives, None)

    async def _reserve(
        self,
        job: CompletionJob,
        key: KeyConfig | None,
        decision: RouteDecision,
        now: datetime,
        admission: Admission,
        queued_s: float,
        wait: bool,
        delivery: str,
    ) -> Admitted | Wait:
        ordered = [decision.chosen, *decision.alternatives]
        # A provider's free tier running out leaves its paid tier: try that after the rest.
        ordered += [replace(c, free=False) for c in ordered if c.free]
        # Named by the delivery (its body's checksum), so a job delivered again finds the hold
        # of a scheduler that died before its ack (``_afresh``); without one, by chance.
        pass_id = f"{job.job_id}:{len(job.attempts)}"
        again = delivery.endswith("!")
        reservation_id = f"{pass_id}:{delivery.rstrip('!') or secrets.token_hex(4)}"
        shorts: list[Short] = []
        for index, candidate in enumerate(ordered):
            provider = candidate.provider
            hold_s = provider.timeout_s * provider.max_attempts + self.hold_margin_s + queued_s
            outcome = await admission.reserve(reservation_id, key, candidate, now, hold_s)
            if isinstance(outcome, Held) and outcome.reserved.replayed:
                reservation_id = await self._afresh(admission, outcome.reserved, pass_id, again)
                outcome = await admission.reserve(reservation_id, key, candidate, now, hold_s)
            if isinstance(outcome, Held):
                await self._alert(outcome.reserved.crossed)
                # The candidate as reserved: a job without its own cap carries the one sized.
                self._epoch = outcome.reserved.epoch or self._epoch
                return Admitted(
                    outcome.candidate, ordered[index + 1 :], reservation_id, self._epoch
                )
            shorts.append(outcome)
        # The soonest a candidate could take the job; one whose limit is smaller than the job
        # never will, so it neither decides nor stops a wait while another could.
        can_fit = [s for s in shorts if not s.never_fits]
        short = min(can_fit or shorts, key=lambda s: s.retry_after_s)
        waited_from = job.submitted_at or now
        give_up = job.deadline or (waited_from + timedelta(seconds=MAX_WAIT_S))
        if wait and job.on_quota == "wait" and can_fit and give_up > now:
            wait_s = min(short.retry_after_s, (give_up - now).total_seconds())
            return Wait(wait_s, at_window_end=all(s.unit == "requests" for s in can_fit))
        raise QuotaExceeded(
            f"quota short for every candidate: {short.describe()}",
            retry_after=round(short.retry_after_s, 3),
        )

    async def _afresh(
        self, admission: Admission, replayed: Reserved, pass_id: str, again: bool
    ) -> str:
        """This job was reserved before under this delivery's name. Delivered ``again``, by a
        scheduler that died before its ack: a hold still held is given back (a call made under
        it is charged when it settles: ``QuotaStore.charge``), so it does not stand for a day.
        Otherwise a producer sent the same job twice: that hold is the other job's. Either way
        this job is reserved afresh under a new id."""
        if again and replayed.state is ReservationState.HELD:
            await admission.store.release(replayed.reservation_id)
            log.info("job %s came again: its earlier hold is given back", pass_id)
        return f"{pass_id}:{secrets.token_hex(4)}"

    async def _alert(self, crossed: tuple[ThresholdCrossed, ...]) -> None:
        assert self._publisher is not None
        for alert in crossed:
            log.warning(
                "%s reached %d%% (%d of %d)", alert.label, alert.threshold, alert.used, alert.limit
            )
            QUOTA_ALERTS.labels(alert.label, str(alert.threshold)).inc()
            at = utcnow()
            data = {
                "label": alert.label,
                "threshold_percent": alert.threshold,
                "used": alert.used,
                "limit": alert.limit,
                "at": at.isoformat(),
            }
            await self._publisher.publish(self._names.alerts, orjson.dumps(data))
            if self._alert_webhook is not None:
                request = WebhookRequest(
                    webhook_id=alert_webhook_id(alert.label, alert.threshold, at.isoformat()),
                    url=self._alert_webhook,
                    type="quota.alert",
                    data=data,
                    occurred_at=at,
                )
                await publish_webhook(self._publisher, self._names, request)

    async def _sweep(self) -> None:
        """Return reservations whose holder died (the job never reached the accountant)."""
        assert self.store is not None
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                returned = await self.store.expire_holds()
                if self._unmetered:
                    await self._unmetered.settle(self.store)
            except Exception:
                log.warning("quota sweep failed", exc_info=True)
                continue
            if returned:
                log.info("returned %d expired quota reservations", returned)


def delivery_id(message: AbstractIncomingMessage) -> str:
    """The same for every delivery of one message (its body's CRC-32): a job delivered again
    names its reservation as it did the first time. ``!`` marks a delivery RabbitMQ made again
    (its earlier holder died), whose earlier hold is its own to give back."""
    return f"{zlib.crc32(message.body):08x}" + ("!" if message.redelivered else "")


def queued_s(message: AbstractIncomingMessage, job: CompletionJob, now: datetime) -> float:
    """How long the job may wait in its provider's queue before its call, so its reservation is
    held that long too (the sweeper refunds a hold that passes, as if its holder had died). A job
    with a deadline waits at most until it (RabbitMQ drops it then); a persistent one without
    waits for a worker however long; a transient one, an RPC whose caller waits for the answer,
    may be lost with the broker, so it gets no more than the margin."""
    if job.deadline is not None:
        return max(0.0, (job.deadline - now).total_seconds())
    return QUEUED_HOLD_S if came_persistent(message) else 0.0


REDIS_RETRY_S = 5.0
"""How long a job waits (or its caller is told to wait) while Redis is unreachable."""


def while_redis_is_away(
    message: AbstractIncomingMessage, job: CompletionJob, now: datetime, exc: BaseException
) -> Wait:
    """No quota can be reserved without Redis. A persistent job waits (parked, looking again
    every few seconds, no later than its deadline or the wait's end); a transient RPC job, whose
    caller is waiting, is answered ``unavailable`` at once, with when to try again. Refused
    credentials are not an outage: they raise as they are (an ``internal_error``, logged)."""
    if isinstance(exc, REDIS_REFUSES_US):
        raise exc
    give_up = job.deadline or (job.submitted_at or now) + timedelta(seconds=MAX_WAIT_S)
    if came_persistent(message) and give_up > now:
        log.info("job %s waits: Redis is unreachable (%s)", job.job_id, type(exc).__name__)
        return Wait(min(REDIS_RETRY_S, (give_up - now).total_seconds()), at_window_end=True)
    raise Unavailable(
        f"Redis is unreachable ({type(exc).__name__}), so no quota can be reserved; the job was"
        " not run",
        retry_after=REDIS_RETRY_S,
    )


def parking(message: AbstractIncomingMessage, wait: Wait) -> tuple[int, int]:
    """Which parking queue a waiting job goes to, and its park count to carry on. Tokens and
    money may come back before the window ends, so the job looks again after 1, 2, 4 ... s (the
    count, a header, says how far along); a request count sleeps toward its window's end."""
    value = (message.headers or {}).get(HEADER_PARKED, 0)
    parked = 0 if isinstance(value, bool) or not isinstance(value, int) else max(0, value)
    if wait.at_window_end:
        return park_delay(min(wait.wait_s, LONGEST_SLEEP_S)), parked
    backoff = 2.0 ** min(parked, 5)
    return park_delay(min(wait.wait_s, backoff)), min(parked + 1, 1_000)
