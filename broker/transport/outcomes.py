"""How a job's outcome leaves a process: the result on its reply queue, the job event for the
accountant and, for a message we could not serve, its body in the dead-letter queue; or, for a
job its provider failed (failover), the job back to the scheduler with its attempts.

The scheduler and the worker pools both end jobs here, so the rules live in one place: every
publish is confirmed before the caller acks the incoming message. The result goes first (it is
what a caller waits for); job events go by group commit (``AccountingEvents``), so under load one
accounting message carries many jobs' events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from broker.core.clock import elapsed_ms, utcnow
from broker.core.codec import decode_job, encode, job_id_hint
from broker.core.errors import (
    DeadlineExceeded,
    JobRejected,
    SwitchyardError,
    Unavailable,
    internal_error,
)
from broker.core.names import HEADER_TRACEPARENT, TYPE_CHUNK, Names
from broker.core.priority import queue_priority
from broker.core.records import calls, job_event, job_result
from broker.core.tracing import current, hop
from broker.core.webhook_urls import WebhookRefused
from broker.transport.accounting_events import AccountingEvents
from broker.transport.amqp import BROKER_FAILURES, Publisher, came_persistent, passthrough_headers
from broker.transport.runtime import Unsettled
from broker.transport.webhooks import job_webhook_id, publish_webhook
from schemas import (
    Attempt,
    ChatCompletionChunk,
    CompletionJob,
    ErrorCode,
    JobChunk,
    JobError,
    JobResult,
    JobStatus,
    Timings,
    UsageEvent,
    WebhookRequest,
)

__all__ = ["Outcomes", "reply_target"]

log = logging.getLogger(__name__)


def reply_target(message: AbstractIncomingMessage, job: CompletionJob | None) -> str | None:
    """The AMQP ``reply_to`` property wins; ``job.reply.queue`` serves producers without it."""
    if message.reply_to:
        return message.reply_to
    return job.reply.queue if job is not None else None


class Outcomes:
    def __init__(self, publisher: Publisher, names: Names) -> None:
        self.publisher = publisher
        self.names = names
        self.events = AccountingEvents(publisher, names.usage)

    async def finish(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        result: JobResult,
        usage: list[UsageEvent],
        *,
        answer: bool = True,
    ) -> None:
        """Publish the result and the job event (carrying the usage), both confirmed; only the
        event if ``answer`` is false (the caller publishes the result: ``answer``)."""
        event = job_event(
            job,
            job.job_id,
            result.status,
            utcnow(),
            error_code=result.error.code if result.error else None,
            attempts=result.attempts,
            reservation_calls=_calls_here(job, result.attempts),
            usage=usage,
            answered=result.usage,
            timings=result.timings,
        )
        if answer:
            await self.answer(message, job, result)
        await self.events.send(event)

    async def answer(
        self, message: AbstractIncomingMessage, job: CompletionJob, result: JobResult
    ) -> None:
        """Publish the result to the job's reply queue, if it has one, and to its webhook, if
        it names one; confirmed."""
        await asyncio.gather(*self._answers(message, job, result, reply_target(message, job)))

    def _answers(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob | None,
        result: JobResult,
        target: str | None,
        *,
        hook: bool = True,
    ) -> list[Awaitable[object]]:
        """The result's publishes: to ``target`` (a reply queue), and to the job's webhook."""
        publishes: list[Awaitable[object]] = []
        if target:
            correlation_id = message.correlation_id or result.job_id
            publishes.append(
                self.publisher.reply(target, encode(result), correlation_id=correlation_id)
            )
        if hook and job is not None and job.reply.webhook is not None:
            publishes.append(self._to_webhook(job, result))
        return publishes

    async def _to_webhook(self, job: CompletionJob, result: JobResult) -> None:
        """The result for the webhook dispatcher, under an id every copy of it shares."""
        assert job.reply.webhook is not None
        # A stored batch's line sent again (a new job id) is the same result to its receiver.
        line = job.batch
        identity = f"{line.batch_id}:{line.line}" if line is not None else result.job_id
        request = WebhookRequest(
            webhook_id=job_webhook_id(identity),
            url=job.reply.webhook,
            type=f"job.{result.status.value}",
            data=result.model_dump(mode="json", exclude_none=True),
            owner=job.route.key_id if job.route is not None else None,
            occurred_at=utcnow(),
            traceparent=current(),
        )
        await publish_webhook(self.publisher, self.names, request)

    async def reroute(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        attempts: list[Attempt],
        usage: list[UsageEvent],
    ) -> None:
        """Hand a job its provider failed back to the scheduler for the next candidate, its
        ``attempts`` added to the job's; and tell the accountant, which settles this provider's
        reservation (the scheduler reserves again for the next one). Both confirmed."""
        moved = job.model_copy(update={"attempts": [*job.attempts, *attempts]})
        event = job_event(
            job,
            job.job_id,
            JobStatus.REROUTED,
            utcnow(),
            error_code=attempts[-1].error_code,
            attempts=moved.attempts,
            reservation_calls=calls(attempts),
            usage=usage,
        )
        await self.pass_on(message, moved, self.names.reroute)
        await self.events.send(event)

    async def pass_on(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        queue: str,
        *,
        body: bytes | None = None,
        expiration: timedelta | None = None,
        with_key: bool = False,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Hand a job on to its next queue as its message came: its ids, reply-to, priority,
        trace context (and the key only ``with_key``), ``headers`` added, and delivery mode.
        Confirmed."""
        forwarded = passthrough_headers(message, with_key=with_key)
        if headers:
            forwarded.update(headers)
        await self.publisher.publish(
            queue,
            encode(job) if body is None else body,
            message_id=job.job_id,
            correlation_id=message.correlation_id or job.job_id,
            reply_to=message.reply_to,
            priority=queue_priority(job),
            headers=forwarded,
            expiration=expiration,
            persistent=came_persistent(message),
        )

    async def chunk(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        attempt: int,
        sequence: int,
        chunk: ChatCompletionChunk,
    ) -> None:
        """Send one streamed chunk to the job's reply queue, ahead of its result (same channel,
        so in order). Chunks are transient: the final result is the durable answer."""
        target = reply_target(message, job)
        if target is None:
            return
        body = encode(JobChunk(job_id=job.job_id, attempt=attempt, sequence=sequence, chunk=chunk))
        await self.publisher.reply(
            target,
            body,
            correlation_id=message.correlation_id or job.job_id,
            message_type=TYPE_CHUNK,
            persistent=False,
        )

    async def settle(
        self,
        message: AbstractIncomingMessage,
        source_queue: str,
        serve: Callable[[AbstractIncomingMessage, CompletionJob], Awaitable[None]],
    ) -> None:
        """Decode the job and let ``serve`` do its work; returning means the consumer may ack
        (``ConsumerSet(ack=True)``). A job that is wrong is rejected; a bug ends the job as
        failed (never kills the consumer, never loops the message), and one in rejecting gives
        the message up to the dead-letter queue as it is; a broker failure propagates and the
        message goes back for redelivery."""
        with hop(source_queue, (message.headers or {}).get(HEADER_TRACEPARENT)):
            await self._settle(message, source_queue, serve)

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        source_queue: str,
        serve: Callable[[AbstractIncomingMessage, CompletionJob], Awaitable[None]],
    ) -> None:
        job: CompletionJob | None = None
        try:
            job = decode_job(message.body)
            await serve(message, job)
        except JobRejected as exc:
            status = JobStatus.EXPIRED if isinstance(exc, DeadlineExceeded) else JobStatus.REJECTED
            await self._reject_or_give_up(message, source_queue, exc, job, status)
        except Unavailable as exc:
            # Nothing is wrong with the message: it is answered, not dead-lettered.
            await self._reject_or_give_up(message, source_queue, exc, job, JobStatus.FAILED)
        except BROKER_FAILURES:
            raise
        except Exception as exc:
            log.exception("failed on a job from %s", source_queue)
            await self._reject_or_give_up(
                message, source_queue, internal_error(exc), job, JobStatus.FAILED
            )

    async def _reject_or_give_up(
        self,
        message: AbstractIncomingMessage,
        source_queue: str,
        error: SwitchyardError | JobError,
        job: CompletionJob | None,
        status: JobStatus,
    ) -> None:
        """``reject``; if that fails for any reason but the broker's, the message is given up
        (``Unsettled``) rather than returned to come again for ever."""
        try:
            await self.reject(
                message, source_queue=source_queue, error=error, job=job, status=status
            )
        except BROKER_FAILURES:
            raise
        except Exception as exc:
            raise Unsettled(f"a job from {source_queue} could not be rejected") from exc

    async def reject(
        self,
        message: AbstractIncomingMessage,
        *,
        source_queue: str,
        error: SwitchyardError | JobError,
        job: CompletionJob | None = None,
        status: JobStatus = JobStatus.REJECTED,
    ) -> None:
        """End a job we will not serve: typed result to its reply queue (if any), the message's
        body to the dead-letter queue with the reason (not for ``unavailable`` answered to its
        caller: the message was fine), and its final state to the accountant."""
        job_error = error.to_job_error() if isinstance(error, SwitchyardError) else error
        job_id = job.job_id if job else job_id_hint(message.body, message.message_id)
        log.info(
            "job %s %s: %s (%s)", job_id, status.value, job_error.code.value, job_error.message
        )
        target = reply_target(message, job)
        publishes: list[Awaitable[object]] = []
        # An ``unavailable`` job was fine: its answer goes to its caller. With no one to answer,
        # its body goes to the dead-letter queue all the same, so nothing is lost.
        if job_error.code is not ErrorCode.UNAVAILABLE or not target:
            publishes.append(
                self.publisher.dead_letter(
                    self.names,
                    message,
                    source_queue=source_queue,
                    code=job_error.code.value,
                    reason=job_error.message,
                )
            )
        now = utcnow()
        # Without a job id (a body that is not even JSON), the caller still gets its answer:
        # it matches replies by correlation id, which then names the result too.
        answer_id = job_id or message.correlation_id
        if answer_id:
            result = job_result(job, answer_id, status, now, error=job_error)
            # A webhook refused at submission is not sent the refusal.
            hook = not isinstance(error, WebhookRefused)
            publishes += self._answers(message, job, result, target, hook=hook)
        if job_id is not None:
            event = job_event(
                job,
                job_id,
                status,
                now,
                error_code=job_error.code,
                timings=Timings(total_ms=elapsed_ms(job.submitted_at if job else None, now)),
                as_asked=True,
            )
            publishes.append(self.events.send(event))
        await asyncio.gather(*publishes)


def _calls_here(job: CompletionJob, attempts: list[Attempt]) -> int | None:
    """The calls of this pass (made under the route's reservation) when the job came with
    attempts at other providers (failover); None when they are all of its calls."""
    if not job.attempts:
        return None
    return calls(attempts[len(job.attempts) :])
