"""The scheduler's part of idempotency keys (``broker.state.idempotency``): the first job with
a key claims it; a repeat is answered with the first job's result, or waits in a parking queue
while the first one runs."""

from __future__ import annotations

from broker.core.errors import Unavailable
from broker.core.limits import KeyConfig
from broker.state.idempotency import Claim, Idempotency
from broker.state.quota import REDIS_FAILURES
from schemas import CompletionJob, JobResult, Timings

__all__ = ["REPEAT_WAIT_S", "Repeats"]

REPEAT_WAIT_S = 3600.0
"""How far a repeat waiting for the first job's result may sleep in one park (the parking
queues' backoff: 1, 2, 4 ... 32 s)."""


class Repeats:
    def __init__(self, idempotency: Idempotency | None) -> None:
        self.idempotency = idempotency

    async def claim(self, job: CompletionJob, key: KeyConfig | None) -> Claim | None:
        """None: no key (or no Redis configured); else whether this job is the first."""
        if job.idempotency_key is None or self.idempotency is None:
            return None
        try:
            return await self.idempotency.claim(
                key.id if key else None, job.idempotency_key, job.job_id, job.deadline
            )
        except REDIS_FAILURES as exc:
            raise Unavailable(
                f"Redis is unreachable ({type(exc).__name__}), so the idempotency key cannot be"
                " checked; the job was not run",
                retry_after=5.0,
            ) from exc

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
            }
        )
