"""The one home of what a job's outcome is recorded as: its ``JobResult`` (for the producer) and
its ``JobEvent`` (for the accountant), whichever process ends the job."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from broker.core.clock import elapsed_ms
from broker.core.errors import Cancelled, JobRejected
from broker.core.tracing import current_trace_id
from schemas import (
    Attempt,
    ChatCompletion,
    CompletionJob,
    ErrorCode,
    JobError,
    JobEvent,
    JobResult,
    JobStatus,
    Timings,
    Usage,
    UsageEvent,
)

__all__ = ["calls", "cancelled_result", "failover_error", "job_event", "job_result"]


def calls(attempts: Sequence[Attempt]) -> int:
    """The provider calls among a job's attempts: one an open circuit refused was not made."""
    return sum(1 for a in attempts if a.error_code is not ErrorCode.PROVIDER_UNAVAILABLE)


def job_result(
    job: CompletionJob | None,
    job_id: str,
    status: JobStatus,
    now: datetime,
    *,
    error: JobError | None = None,
    attempts: list[Attempt] | None = None,
    timings: Timings | None = None,
    response: ChatCompletion | None = None,
    usage_estimated: bool = False,
    cost_usd: Decimal | None = None,
    saved_usd: Decimal | None = None,
) -> JobResult:
    """A job's result: served by the provider of its last attempt (none if it made none), the
    job's metadata, and its total time when no finer ``timings`` are known."""
    attempts = attempts or []
    last = attempts[-1] if attempts else None
    submitted = job.submitted_at if job is not None else None
    return JobResult(
        job_id=job_id,
        status=status,
        response=response,
        error=error,
        provider=last.provider if last else None,
        model=last.model if last else None,
        usage=response.usage if response is not None else None,
        usage_estimated=usage_estimated,
        cost_usd=cost_usd,
        saved_usd=saved_usd,
        attempts=attempts,
        timings=timings or Timings(total_ms=elapsed_ms(submitted, now)),
        metadata=job.metadata if job is not None else {},
        trace_id=current_trace_id(),
    )


def job_event(
    job: CompletionJob | None,
    job_id: str,
    status: JobStatus,
    finished_at: datetime,
    *,
    error_code: ErrorCode | None = None,
    attempts: Sequence[Attempt] = (),
    reservation_calls: int | None = None,
    usage: Sequence[UsageEvent] = (),
    answered: Usage | None = None,
    timings: Timings | None = None,
    as_asked: bool = False,
) -> JobEvent:
    """A job's event for the accountant: its end, or a failover hop (``rerouted``). Provider and
    model are its last attempt's; ``answered`` is the answer's usage. The public model is the
    route's, or the one the job asked for ``as_asked`` (a job refused before it was served).
    It settles every call among ``attempts`` in the ledger."""
    route = job.route if job is not None else None
    public_model = job.model if job is not None else None
    if route is not None and not as_asked:
        public_model = route.public_model
    batch_id = (job.batch.batch_id if job.batch else job.metadata.get("batch_id")) if job else None
    return JobEvent(
        job_id=job_id,
        status=status,
        priority=job.priority if job is not None else 0,
        public_model=public_model,
        provider=attempts[-1].provider if attempts else None,
        model=attempts[-1].model if attempts else None,
        error_code=error_code,
        attempts=calls(attempts),
        reservation_calls=reservation_calls,
        prompt_tokens=answered.prompt_tokens if answered else 0,
        completion_tokens=answered.completion_tokens if answered else 0,
        timings=timings or Timings(),
        batch_id=str(batch_id) if batch_id is not None else None,
        submitted_at=job.submitted_at if job is not None else None,
        finished_at=finished_at,
        reservation_id=route.reservation_id if route else None,
        key_id=route.key_id if route else None,
        task_type=job.task_type if job is not None else None,
        trace_id=current_trace_id(),
        usage=list(usage),
        call_ids=[a.call_id for a in attempts if a.call_id is not None],
        idempotency_key=job.idempotency_key if job is not None else None,
    )


def cancelled_result(job: CompletionJob, now: datetime) -> JobResult:
    """The result of a job cancelled before its call: no provider was called for it here."""
    error = Cancelled("the job was cancelled before its provider was called").to_job_error()
    return job_result(job, job.job_id, JobStatus.CANCELLED, now, error=error, attempts=job.attempts)


def failover_error(job: CompletionJob, why: JobRejected) -> JobError:
    """A failed-over job no other candidate can take: its last provider's error, and why (a job
    admitted again, with no attempts, gets the refusal itself)."""
    if not job.attempts:
        return why.to_job_error()
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
