"""The call layer around one adapter: attempts with backoff, streaming, usage, and the record of
each attempt.

Retries wait in-process and hold their concurrency slot, so at most ``MAX_BACKOFF_S``: a provider
asking for a longer wait (its retry-after) ends the job with that rate limit and its
``retry_after`` for the caller. A stream that fails part-way is retried like a call: the next
attempt streams again from sequence 0 under its own attempt number; the broken attempt's usage
(the provider's, else estimated) is recorded, since the provider bills what it generated.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from broker.core.clock import utcnow
from broker.core.errors import ProviderError
from broker.core.tokens import estimate_prompt_tokens, estimate_text_tokens
from schemas import (
    Attempt,
    ChatCompletion,
    ChatCompletionChunk,
    CompletionJob,
    Route,
    Usage,
    UsageEvent,
)
from workers.adapters import ProviderAdapter, ProviderRequest
from workers.streaming import ChunkAccumulator

__all__ = [
    "MAX_BACKOFF_S",
    "CallOutcome",
    "OnChunk",
    "OnStart",
    "backoff_s",
    "call_with_retries",
    "new_call_id",
]

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0

OnChunk = Callable[[int, int, ChatCompletionChunk], Awaitable[None]]
"""Called with (attempt number, sequence, chunk) for each chunk of a streamed attempt, in order."""
OnStart = Callable[[str, int], Awaitable[None]]
"""Called with (call id, attempt number) before each attempt's request leaves; the attempt waits
for it (the ledger records the call first)."""


@dataclass
class CallOutcome:
    completion: ChatCompletion | None = None
    error: ProviderError | None = None
    cancelled: bool = False
    """Not called: the job was cancelled first (``workers.ledger.CallClaim``)."""
    usage_estimated: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    usage: list[UsageEvent] = field(default_factory=list)
    saved_usd: Decimal | None = None
    """A deferred job's answer: its price when it was deferred, less its cost (``Pricing``)."""

    @property
    def provider_ms(self) -> float:
        return round(sum(a.duration_ms for a in self.attempts), 3)


def backoff_s(error: ProviderError, retry: int) -> float:
    """The provider's ``retry_after`` when it gave one, else 0.25 s doubling; capped."""
    wait = error.retry_after if error.retry_after is not None else 0.25 * 2 ** (retry - 1)
    return float(min(wait, MAX_BACKOFF_S))


async def _attempt_once(
    adapter: ProviderAdapter,
    request: ProviderRequest,
    number: int,
    on_chunk: OnChunk | None,
    accumulator: ChunkAccumulator | None,
) -> ChatCompletion:
    if on_chunk is None or accumulator is None:
        return await adapter.complete(request)
    sequence = 0
    async for chunk in adapter.stream(request):
        accumulator.add(chunk)
        await on_chunk(number, sequence, chunk)
        sequence += 1
    return accumulator.result()


def _broken_stream_usage(
    adapter: ProviderAdapter, job: CompletionJob, accumulator: ChunkAccumulator
) -> tuple[Usage, bool] | None:
    """What a stream that broke part-way consumed, and whether it is estimated: the provider
    bills the prompt and the tokens it generated, though the answer never completed. None if
    nothing came (whether a provider bills a stream that sent nothing is not documented)."""
    if not accumulator.chunks:
        return None
    try:
        partial = accumulator.result()
    except ProviderError:  # chunks without any choice: nothing to count the answer from
        return None
    if partial.usage is not None:
        return partial.usage, False
    return _estimated_usage(adapter, job, partial), True


def _estimated_usage(adapter: ProviderAdapter, job: CompletionJob, done: ChatCompletion) -> Usage:
    """Count what a provider that reports no usage (some OpenAI-compatible servers) consumed."""
    family = adapter.provider.type
    prompt = estimate_prompt_tokens(job.messages, family, job.params.tools)
    completion = 0
    for choice in done.choices:
        content = choice.message.content
        if isinstance(content, str):
            completion += estimate_text_tokens(content, family)
        for call in choice.message.tool_calls or []:
            completion += estimate_text_tokens(call.function.name + call.function.arguments, family)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def call_with_retries(
    adapter: ProviderAdapter,
    job: CompletionJob,
    *,
    max_attempts: int,
    on_chunk: OnChunk | None = None,
    on_start: OnStart | None = None,
) -> CallOutcome:
    """Call the job's routed provider until it succeeds, fails for good, or the deadline nears.
    With ``on_chunk`` the call streams and each chunk is handed over as it arrives; each attempt
    is a call with its own id, announced to ``on_start`` before it is made."""
    assert job.route is not None
    route = job.route
    request = ProviderRequest(
        model=route.model, messages=job.messages, params=job.params, output_cap=route.output_cap
    )
    outcome = CallOutcome()
    first = len(job.attempts) + 1
    for number in range(first, first + max_attempts):
        call_id = new_call_id(job.job_id, number)
        if on_start is not None:
            await on_start(call_id, number)
        started = time.perf_counter()
        accumulator = ChunkAccumulator(adapter.provider.id) if on_chunk is not None else None
        try:
            completion = await _attempt_once(adapter, request, number, on_chunk, accumulator)
        except ProviderError as exc:
            outcome.attempts.append(_attempt(call_id, number, route, started, exc, accumulator))
            outcome.error = exc
            consumed = _broken_stream_usage(adapter, job, accumulator) if accumulator else None
            if consumed is not None:
                outcome.usage.append(_usage_event(job, call_id, number, *consumed))
            if not exc.retryable or number == first + max_attempts - 1:
                return outcome
            if exc.retry_after is not None and exc.retry_after > MAX_BACKOFF_S:
                # Longer than an attempt may hold its call slot: retrying sooner would only be
                # refused again. The caller gets the rate limit with its retry_after.
                return outcome
            wait = backoff_s(exc, number - first + 1)
            if _past(job.deadline, wait):
                return outcome
            log.info("job %s attempt %d: %s; retrying in %.2fs", job.job_id, number, exc.code, wait)
            await asyncio.sleep(wait)
            continue
        outcome.attempts.append(_attempt(call_id, number, route, started, None, accumulator))
        if completion.usage is None:
            completion = completion.model_copy(
                update={"usage": _estimated_usage(adapter, job, completion)}
            )
            outcome.usage_estimated = True
        assert completion.usage is not None
        outcome.completion, outcome.error = completion, None
        outcome.usage.append(
            _usage_event(job, call_id, number, completion.usage, outcome.usage_estimated)
        )
        return outcome
    return outcome


def new_call_id(job_id: str, number: int) -> str:
    """Unique per call, readable in the ledger: a job run twice (its worker died) makes two."""
    return f"{job_id}:{number}:{secrets.token_hex(6)}"


def _usage_event(
    job: CompletionJob, call_id: str, number: int, usage: Usage, estimated: bool
) -> UsageEvent:
    assert job.route is not None
    route = job.route
    return UsageEvent(
        call_id=call_id,
        job_id=job.job_id,
        attempt=number,
        provider=route.provider,
        model=route.model,
        public_model=route.public_model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        estimated=estimated,
        free=route.free,
        key_id=route.key_id,
        task_type=job.task_type,
        consumer=job.params.consumer,
        occurred_at=utcnow(),
    )


def _attempt(
    call_id: str,
    number: int,
    route: Route,
    started: float,
    error: ProviderError | None,
    stream: ChunkAccumulator | None,
) -> Attempt:
    first_at = stream.first_at if stream is not None else None
    return Attempt(
        call_id=call_id,
        number=number,
        provider=route.provider,
        model=route.model,
        status="failed" if error else "succeeded",
        error_code=error.code if error else None,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        ttft_ms=round((first_at - started) * 1000, 3) if first_at is not None else None,
    )


def _past(deadline: datetime | None, wait_s: float) -> bool:
    return deadline is not None and deadline.timestamp() <= time.time() + wait_s
