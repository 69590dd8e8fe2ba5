"""How a job's call outcome ends it: its result (timings, the answer's priced usage), or a
failover when another provider may do better."""

from __future__ import annotations

from datetime import datetime

from broker.core.clock import elapsed_ms, utcnow
from broker.core.records import job_result
from schemas import CompletionJob, ErrorCode, JobResult, JobStatus, Timings
from workers.retry import CallOutcome

__all__ = ["FAILOVER_CODES", "fails_over", "result_of"]


def result_of(job: CompletionJob, outcome: CallOutcome, started: datetime) -> JobResult:
    assert job.route is not None
    route = job.route
    now = utcnow()
    timings = Timings(
        queued_ms=elapsed_ms(job.submitted_at, route.scheduled_at),
        scheduled_ms=elapsed_ms(route.scheduled_at, started),
        provider_ms=outcome.provider_ms,
        total_ms=elapsed_ms(job.submitted_at or route.scheduled_at, now),
    )
    attempts = [*job.attempts, *outcome.attempts]
    if outcome.completion is None:
        assert outcome.error is not None
        error = outcome.error.to_job_error()
        return job_result(
            job, job.job_id, JobStatus.FAILED, now, error=error, attempts=attempts, timings=timings
        )
    # The answering attempt's usage event, priced by ``Pricing``.
    number = outcome.attempts[-1].number
    answered = next((u for u in reversed(outcome.usage) if u.attempt == number), None)
    return job_result(
        job,
        job.job_id,
        JobStatus.SUCCEEDED,
        now,
        attempts=attempts,
        timings=timings,
        response=outcome.completion,
        usage_estimated=outcome.usage_estimated,
        cost_usd=answered.cost_usd if answered is not None else None,
        saved_usd=outcome.saved_usd,
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


def fails_over(job: CompletionJob, outcome: CallOutcome) -> bool:
    """Whether a failed job goes back to the scheduler for a candidate it has not tried."""
    if outcome.error is None or outcome.error.code not in FAILOVER_CODES:
        return False
    assert job.route is not None
    tried = {a.provider for a in job.attempts} | {job.route.provider}
    if all(provider in tried for provider in job.route.alternatives):
        return False
    return job.deadline is None or job.deadline > utcnow()
