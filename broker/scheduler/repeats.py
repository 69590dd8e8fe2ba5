"""The scheduler's part of idempotency keys (``broker.state.idempotency``): the first job with
a key claims it; a repeat is answered with the first job's result, or waits in a parking queue
while the first one runs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal

from broker.core.errors import Unavailable
from broker.core.limits import KeyConfig
from broker.scheduler.reservations import Wait
from broker.state.idempotency import Claim, Idempotency
from broker.state.quota import REDIS_FAILURES
from schemas import CompletionJob, JobResult, Timings

__all__ = ["REPEAT_MAX_WAIT_S", "Repeats"]

log = logging.getLogger(__name__)

REPEAT_MAX_WAIT_S = 600.0
"""How long a repeat waits for the first job with its key to end (from its own
``submitted_at``) before it is answered ``unavailable``, to try again later."""
_PARK = Wait(REPEAT_MAX_WAIT_S, at_window_end=False)
"""Parks of 1, 2, 4 ... 32 s (the parking queues' backoff)."""


class Repeats:
    def __init__(self, idempotency: Idempotency | None) -> None:
        self.idempotency = idempotency

    async def handled(
        self,
        job: CompletionJob,
        key: KeyConfig | None,
        now: datetime,
        *,
        answer: Callable[[JobResult], Awaitable[None]],
        park: Callable[[Wait], Awaitable[None]],
    ) -> bool:
        """True if ``job`` repeats a key: answered with the first job's result, or parked
        while the first one runs. False: it runs (the first with its key, or no key)."""
        claim = await self.claim(job, key)
        if claim is None or claim.outcome == "first":
            return False
        if claim.outcome == "replay":
            await answer(self.replayed(job, claim))
            return True
        waited = (now - job.submitted_at).total_seconds() if job.submitted_at else 0.0
        # A stored batch's line sent again waits for its first copy as long as its batch may
        # (the copy may be deferred or waiting for quota); its deadline ends the wait.
        if waited > REPEAT_MAX_WAIT_S and job.batch is None:
            raise Unavailable(
                f"the first job with this idempotency key ({claim.first_job_id}) has not ended"
                f" after {REPEAT_MAX_WAIT_S:g} s; try again later",
                retry_after=60.0,
            )
        await park(_PARK)
        return True

    async def release(self, job: CompletionJob, key: KeyConfig | None) -> None:
        """A first job refused here gives its key back (a repeat of it runs afresh)."""
        if job.idempotency_key is None or self.idempotency is None:
            return
        with contextlib.suppress(*REDIS_FAILURES):
            await self.idempotency.release(key.id if key else None, job.idempotency_key, job.job_id)

    async def claim(self, job: CompletionJob, key: KeyConfig | None) -> Claim | None:
        """None: no key (or no Redis configured); else whether this job is the first. Redis
        away raises (``REDIS_FAILURES``): the scheduler parks a persistent job until it is back
        and answers an RPC job ``unavailable``."""
        if job.idempotency_key is None or self.idempotency is None:
            return None
        return await self.idempotency.claim(
            key.id if key else None, job.idempotency_key, job.job_id, job.deadline
        )

    @staticmethod
    def replayed(job: CompletionJob, claim: Claim) -> JobResult:
        """The first job's result, as this job's (its own id, metadata and time)."""
        assert claim.result is not None
        first = JobResult.model_validate_json(claim.result)
        return first.model_copy(
            update={
                "job_id": job.job_id,
                "replay_of": first.job_id,
                "attempts": [],
                "metadata": job.metadata,
                "timings": Timings(),
                # A batch line's copy answers the line itself: its batch's usage is that call's.
                "cost_usd": first.cost_usd
                if job.batch is not None or first.cost_usd is None
                else Decimal(0),
            }
        )
