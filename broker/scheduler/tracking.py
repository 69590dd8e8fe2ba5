"""The scheduler's part of job tracking (``broker.state.job_states``): each tracked job is
recorded in its provider's queue as it is handed over, and one cancelled before that (or an
untracked one whose cancel was broadcast: ``broker.transport.cancels``) is ended here instead."""

from __future__ import annotations

import logging
from decimal import Decimal

from aio_pika.abc import AbstractIncomingMessage

from broker.core.priority import queue_priority
from broker.state.job_states import JobStates
from broker.state.quota import REDIS_FAILURES
from broker.transport.amqp import came_persistent
from broker.transport.cancels import HeardCancels
from schemas import CompletionJob

__all__ = ["Tracking"]

log = logging.getLogger(__name__)


class Tracking:
    def __init__(self, jobs: JobStates | None, heard: HeardCancels) -> None:
        self.jobs = jobs
        self.heard = heard

    async def cancelled(
        self, message: AbstractIncomingMessage, job: CompletionJob, est_cost_usd: Decimal
    ) -> bool:
        """Record a tracked (persistent) job as queued for its route's provider; True if it
        was cancelled first (an untracked one: if its cancel was heard). With Redis away the
        job goes on untracked."""
        if job.job_id in self.heard:
            return True
        if self.jobs is None or not came_persistent(message):
            return False
        assert job.route is not None
        try:
            state = await self.jobs.queued(
                job.job_id,
                job.route.provider,
                queue_priority(job),
                owner=job.route.key_id,
                est_cost_usd=str(est_cost_usd),
                model=job.route.public_model,
                deadline=job.deadline,
                again=bool(job.attempts),
            )
        except REDIS_FAILURES:
            log.warning("Redis is away: job %s is not tracked (no position, no cancel)", job.job_id)
            return False
        if state == "cancelled":
            log.info("job %s was cancelled before its call: ended here", job.job_id)
        return state == "cancelled"
