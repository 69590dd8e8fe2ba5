"""The records a call leaves before its request goes: its claim on a tracked job (so a
cancellation is never late) and its start in the ledger of calls (so a worker that dies
mid-call leaves the call counted)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from broker.core.clock import utcnow
from broker.core.config import ProviderConfig
from broker.core.tokens import estimate_prompt_tokens, expected_output_tokens
from broker.state.job_states import JobStates
from broker.state.quota import REDIS_FAILURES
from broker.transport.cancels import HeardCancels
from schemas import CallStarted, CompletionJob
from workers.layers import Call, Pricing, Proceed
from workers.retry import MAX_BACKOFF_S, CallOutcome

__all__ = ["CallClaim", "CallLedger", "reserved_tokens", "settle_within_s"]

log = logging.getLogger(__name__)


class CallClaim:
    """A tracked (persistent) job's call is claimed in its record first
    (``JobStates.start``): one cancelled before is not called, and a cancel after is told it
    is too late; an untracked job whose cancel was broadcast (``broker.transport.cancels``) is
    not called either. Every call is counted for the provider's rate, which the ETAs read."""

    def __init__(self, jobs: JobStates | None, provider_id: str, heard: HeardCancels) -> None:
        self.jobs = jobs
        self.provider_id = provider_id
        self.heard = heard

    async def __call__(self, proceed: Proceed, call: Call) -> CallOutcome:
        if call.job.job_id in self.heard:  # an untracked job whose caller went away
            return CallOutcome(cancelled=True)
        if self.jobs is None:
            return await proceed(call)
        if call.persistent:
            try:
                if not await self.jobs.start(call.job.job_id, self.provider_id):
                    return CallOutcome(cancelled=True)
            except REDIS_FAILURES:
                log.warning("Redis is away: job %s is called unclaimed", call.job.job_id)
        self.jobs.served(self.provider_id)
        return await proceed(call)


class CallLedger:
    """Each call is recorded as started, confirmed by the broker, before its request leaves: a
    worker that dies mid-call leaves the record, and the accountant's sweeper counts the call at
    its reservation (``CallStarted``), so every call a provider may bill is in the ledger."""

    def __init__(
        self, send: Callable[[CallStarted], Awaitable[None]], pricing: Pricing, margin_s: float
    ) -> None:
        self.send = send
        self.pricing = pricing
        self.margin_s = margin_s

    async def __call__(self, proceed: Proceed, call: Call) -> CallOutcome:
        call.on_start = functools.partial(self._record, call)
        return await proceed(call)

    async def _record(self, call: Call, call_id: str, number: int) -> None:
        job, provider = call.job, call.provider
        assert job.route is not None
        route = job.route
        prompt, completion = reserved_tokens(job, provider)
        cost, version = self.pricing.quote(
            provider, route.model, prompt, completion, free=route.free
        )
        now = utcnow()
        await self.send(
            CallStarted(
                call_id=call_id,
                job_id=job.job_id,
                attempt=number,
                provider=route.provider,
                model=route.model,
                public_model=route.public_model,
                key_id=route.key_id,
                reservation_id=route.reservation_id,
                reserved_prompt_tokens=prompt,
                reserved_completion_tokens=completion,
                reserved_cost_usd=cost,
                free=route.free,
                price_version=version,
                task_type=job.task_type,
                consumer=job.params.consumer,
                started_at=now,
                settle_by=now + timedelta(seconds=settle_within_s(provider) + self.margin_s),
            )
        )


def settle_within_s(provider: ProviderConfig) -> float:
    """The longest a call may go unsettled while its worker lives: a job's calls are settled
    together when it ends, so the job's worst case from its first call, every attempt timing
    out after the longest backoff."""
    return (provider.timeout_s + MAX_BACKOFF_S) * provider.max_attempts


def reserved_tokens(job: CompletionJob, provider: ProviderConfig) -> tuple[int, int]:
    """A call's reserved prompt and output tokens, as the scheduler estimated them (on the
    route); a route from an older scheduler has none: they are estimated here as it did."""
    assert job.route is not None
    route = job.route
    prompt = route.est_prompt_tokens
    if prompt is None:
        prompt = estimate_prompt_tokens(job.messages, provider.type, job.params.tools)
    completion = route.est_completion_tokens
    if completion is None:
        spec = provider.models.get(route.model)
        model_cap = spec.max_tokens if spec is not None else None
        completion = expected_output_tokens(job.params.own_max_tokens, model_cap)
    return prompt, completion
