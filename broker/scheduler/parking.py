"""How a job waits in the scheduler: parked for quota (or for Redis), or deferred to a cheaper
hour (``deferral.defer_until`` decides when), in the durable parking queues. Each hop keeps the
job's key header (it is admitted again when it comes back), the redelivered mark of a job that
may have a twin, and since when a deferred job has waited."""

from __future__ import annotations

import logging
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage

from broker.core.metrics import PARKED
from broker.core.names import HEADER_DEFERRED, HEADER_PARKED, HEADER_REDELIVERED, Names
from broker.scheduler.reservations import Wait, parking
from broker.transport.amqp import park_delay
from broker.transport.outcomes import Outcomes
from schemas import CompletionJob

__all__ = [
    "defer",
    "deferral_header",
    "deferred_since",
    "first_pass",
    "park_for_quota",
    "twin_mark",
]

log = logging.getLogger(__name__)


def twin_mark(message: AbstractIncomingMessage) -> dict[str, int]:
    """A job that came again (its last holder died before its ack) may have a twin already on
    its way: the mark tells its worker to look whether the job was answered
    (``broker.state.answers``)."""
    headers = message.headers or {}
    return {HEADER_REDELIVERED: 1} if message.redelivered or HEADER_REDELIVERED in headers else {}


def first_pass(message: AbstractIncomingMessage) -> bool:
    """The job has not come back from a parking queue (what was checked once holds)."""
    headers = message.headers or {}
    return HEADER_PARKED not in headers and HEADER_DEFERRED not in headers


async def park_for_quota(
    outcomes: Outcomes,
    names: Names,
    message: AbstractIncomingMessage,
    job: CompletionJob,
    now: datetime,
    wait: Wait,
    *,
    reason: str = "quota",
) -> None:
    """Hold the job in a parking queue until its limit may have freed (or Redis is back, or a
    repeat's first job ended: ``reason``), then it comes back to the jobs queue. A job that
    came without ``submitted_at`` (an AMQP producer's) gets it now, so its wait is counted from
    here and ends (``MAX_WAIT_S``) instead of starting again each time."""
    PARKED.labels(reason).inc()
    delay, parked = parking(message, wait)
    log.info("job %s waits for quota (%d s)", job.job_id, delay)
    stamped = job.model_copy(update={"submitted_at": now}) if job.submitted_at is None else None
    await outcomes.pass_on(
        message,
        stamped or job,
        names.park(delay),
        body=None if stamped else message.body,
        with_key=True,
        headers={HEADER_PARKED: parked, **twin_mark(message), **deferral_header(message)},
    )


def deferred_since(message: AbstractIncomingMessage) -> datetime | None:
    """Since when the job has waited for a cheaper hour (its header), if it has."""
    value = (message.headers or {}).get(HEADER_DEFERRED)
    if not isinstance(value, str):
        return None
    try:
        since = datetime.fromisoformat(value)
    except ValueError:
        return None
    return since if since.tzinfo is not None else None


def deferral_header(message: AbstractIncomingMessage) -> dict[str, str]:
    """The header a deferred job keeps on every later hop (a quota wait too)."""
    since = deferred_since(message)
    return {HEADER_DEFERRED: since.isoformat()} if since is not None else {}


async def defer(
    outcomes: Outcomes,
    names: Names,
    message: AbstractIncomingMessage,
    job: CompletionJob,
    now: datetime,
    until: datetime,
) -> None:
    """Park the job toward ``until``; it comes back to the jobs queue and is routed again."""
    PARKED.labels("deferral").inc()
    since = deferred_since(message) or now
    delay = park_delay((until - now).total_seconds(), late=False)
    log.info("job %s waits for a cheaper hour at %s (a %d s hop)", job.job_id, until, delay)
    stamped = job.model_copy(update={"submitted_at": now}) if job.submitted_at is None else None
    await outcomes.pass_on(
        message,
        stamped or job,
        names.park(delay),
        body=None if stamped else message.body,
        with_key=True,
        headers={HEADER_DEFERRED: since.isoformat(), **twin_mark(message)},
    )
