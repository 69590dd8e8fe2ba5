"""The retry layer around one adapter: attempts, backoff and the record of each attempt.

Retries wait in-process and hold their concurrency slot; the scheduler issue moves long waits
(quota, long retry-after) to TTL parking queues.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from broker.errors import ProviderError
from broker.outcomes import utcnow
from schemas import Attempt, ChatCompletion, CompletionJob, UsageEvent
from workers.adapters import ProviderAdapter, ProviderRequest

__all__ = ["CallOutcome", "backoff_s", "call_with_retries"]

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0


@dataclass
class CallOutcome:
    completion: ChatCompletion | None = None
    error: ProviderError | None = None
    attempts: list[Attempt] = field(default_factory=list)
    usage: list[UsageEvent] = field(default_factory=list)

    @property
    def provider_ms(self) -> float:
        return round(sum(a.duration_ms for a in self.attempts), 3)


def backoff_s(error: ProviderError, retry: int) -> float:
    """The provider's ``retry_after`` when it gave one, else 0.25 s doubling; capped."""
    retry_after = getattr(error, "retry_after", None)
    wait = retry_after if retry_after is not None else 0.25 * 2 ** (retry - 1)
    return float(min(wait, MAX_BACKOFF_S))


async def call_with_retries(
    adapter: ProviderAdapter, job: CompletionJob, *, max_attempts: int
) -> CallOutcome:
    """Call the job's routed provider until it succeeds, fails for good, or the deadline nears."""
    assert job.route is not None
    route = job.route
    request = ProviderRequest(model=route.model, messages=job.messages, params=job.params)
    outcome = CallOutcome()
    first = len(job.attempts) + 1
    for number in range(first, first + max_attempts):
        started = time.perf_counter()
        try:
            completion = await adapter.complete(request)
        except ProviderError as exc:
            outcome.attempts.append(_attempt(number, route.provider, route.model, started, exc))
            outcome.error = exc
            if not exc.retryable or number == first + max_attempts - 1:
                return outcome
            wait = backoff_s(exc, number - first + 1)
            if _past(job.deadline, wait):
                return outcome
            log.info("job %s attempt %d: %s; retrying in %.2fs", job.job_id, number, exc.code, wait)
            await asyncio.sleep(wait)
            continue
        outcome.attempts.append(_attempt(number, route.provider, route.model, started, None))
        outcome.completion, outcome.error = completion, None
        if completion.usage is not None:
            outcome.usage.append(
                UsageEvent(
                    job_id=job.job_id,
                    attempt=number,
                    provider=route.provider,
                    model=route.model,
                    public_model=route.public_model,
                    prompt_tokens=completion.usage.prompt_tokens,
                    completion_tokens=completion.usage.completion_tokens,
                    occurred_at=utcnow(),
                )
            )
        return outcome
    return outcome


def _attempt(
    number: int, provider: str, model: str, started: float, error: ProviderError | None
) -> Attempt:
    return Attempt(
        number=number,
        provider=provider,
        model=model,
        status="failed" if error else "succeeded",
        error_code=error.code if error else None,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )


def _past(deadline: datetime | None, wait_s: float) -> bool:
    return deadline is not None and deadline.timestamp() <= time.time() + wait_s
