"""How a job's outcome leaves a process: the result on its reply queue, the job event for the
accountant and, for a message we could not serve, its body in the dead-letter queue; or, for a
job its provider failed (failover), the job back to the scheduler with its attempts.

The scheduler and the worker pools both end jobs here, so the rules live in one place: every
publish is confirmed before the caller acks the incoming message. The result goes first (it is
what a caller waits for); job events go by group commit (``JobEvents``), so under load one
accounting message carries many jobs' events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from aio_pika.abc import AbstractIncomingMessage

from broker.core.clock import elapsed_ms, utcnow
from broker.core.codec import decode_job, encode, job_id_hint
from broker.core.errors import DeadlineExceeded, JobRejected, SwitchyardError, internal_error
from broker.core.names import TYPE_CHUNK, Names
from broker.transport.amqp import BROKER_FAILURES, Publisher, came_persistent, passthrough_headers
from broker.transport.runtime import Unsettled
from schemas import (
    Attempt,
    ChatCompletionChunk,
    CompletionJob,
    ErrorCode,
    JobChunk,
    JobError,
    JobEvent,
    JobEventBatch,
    JobResult,
    JobStatus,
    Timings,
    UsageEvent,
)

__all__ = ["JobEvents", "Outcomes", "reply_target"]

log = logging.getLogger(__name__)

MAX_EVENTS_PER_MESSAGE = 200


def reply_target(message: AbstractIncomingMessage, job: CompletionJob | None) -> str | None:
    """The AMQP ``reply_to`` property wins; ``job.reply.queue`` serves producers without it."""
    if message.reply_to:
        return message.reply_to
    return job.reply.queue if job is not None else None


class JobEvents:
    """Group commit of job events to the accountant's queue: one message carries every event
    added while the previous message awaited its confirm. No timer, so a lone event goes at once
    and a busy process sends fewer, larger messages (each AMQP message costs RabbitMQ and both
    ends far more than its bytes). ``send`` resolves once the event's message is confirmed."""

    def __init__(
        self, publisher: Publisher, queue: str, *, max_events: int = MAX_EVENTS_PER_MESSAGE
    ) -> None:
        self.publisher = publisher
        self.queue = queue
        self.max_events = max_events
        self._waiting: list[tuple[JobEvent, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    def send(self, event: JobEvent) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Whoever gave up on the event (a cancelled handler) must not leave an error unread.
        future.add_done_callback(_read_error)
        self._waiting.append((event, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting())
        return future

    async def _send_waiting(self) -> None:
        batch: list[tuple[JobEvent, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self.max_events]
                del self._waiting[: len(batch)]
                events = [event for event, _ in batch]
                try:
                    await self.publisher.publish(
                        self.queue, encode(JobEventBatch.model_construct(events=events))
                    )
                except Exception as exc:  # each job's handler sees the broker failure
                    _settle(batch, exc)
                else:
                    _settle(batch, None)
                batch = []
        except asyncio.CancelledError:
            # Stopping: each waiting handler sees a broker failure and returns its message.
            _settle([*batch, *self._waiting], ConnectionError("job events were not sent"))
            self._waiting.clear()
            raise
        finally:
            self._sender = None


def _settle(batch: list[tuple[JobEvent, asyncio.Future[None]]], error: Exception | None) -> None:
    for _, future in batch:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _read_error(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class Outcomes:
    def __init__(self, publisher: Publisher, names: Names) -> None:
        self.publisher = publisher
        self.names = names
        self.events = JobEvents(publisher, names.usage)

    async def finish(
        self,
        message: AbstractIncomingMessage,
        job: CompletionJob,
        result: JobResult,
        usage: list[UsageEvent],
    ) -> None:
        """Publish the result and the job event (carrying the usage), both confirmed."""
        finished_at = utcnow()
        event = JobEvent(
            job_id=job.job_id,
            status=result.status,
            priority=job.priority,
            public_model=job.route.public_model if job.route else job.model,
            provider=result.provider,
            model=job.route.model if job.route else None,
            error_code=result.error.code if result.error else None,
            attempts=calls(result.attempts),
            reservation_calls=_calls_here(job, result.attempts),
            prompt_tokens=result.usage.prompt_tokens if result.usage else 0,
            completion_tokens=result.usage.completion_tokens if result.usage else 0,
            timings=result.timings,
            batch_id=_batch_id(job),
            submitted_at=job.submitted_at,
            finished_at=finished_at,
            reservation_id=job.route.reservation_id if job.route else None,
            key_id=job.route.key_id if job.route else None,
            usage=usage,
        )
        target = reply_target(message, job)
        if target:
            await self.publisher.reply(
                target, encode(result), correlation_id=message.correlation_id or job.job_id
            )
        await self.events.send(event)

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
        assert job.route is not None
        route = job.route
        moved = job.model_copy(update={"attempts": [*job.attempts, *attempts]})
        event = JobEvent(
            job_id=job.job_id,
            status=JobStatus.REROUTED,
            priority=job.priority,
            public_model=route.public_model,
            provider=route.provider,
            model=route.model,
            error_code=attempts[-1].error_code,
            attempts=calls(moved.attempts),
            reservation_calls=calls(attempts),
            batch_id=_batch_id(job),
            submitted_at=job.submitted_at,
            finished_at=utcnow(),
            reservation_id=route.reservation_id,
            key_id=route.key_id,
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
    ) -> None:
        """Hand a job on to its next queue as its message came: its ids, reply-to, priority,
        trace context (and the key only ``with_key``) and delivery mode. Confirmed."""
        await self.publisher.publish(
            queue,
            encode(job) if body is None else body,
            message_id=job.job_id,
            correlation_id=message.correlation_id or job.job_id,
            reply_to=message.reply_to,
            priority=job.priority,
            headers=passthrough_headers(message, with_key=with_key),
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
        serve: Callable[[CompletionJob], Awaitable[None]],
    ) -> None:
        """Decode the job and let ``serve`` do its work; returning means the consumer may ack
        (``ConsumerSet(ack=True)``). A job that is wrong is rejected; a bug ends the job as
        failed (never kills the consumer, never loops the message), and one in rejecting gives
        the message up to the dead-letter queue as it is; a broker failure propagates and the
        message goes back for redelivery."""
        job: CompletionJob | None = None
        try:
            job = decode_job(message.body)
            await serve(job)
        except JobRejected as exc:
            status = JobStatus.EXPIRED if isinstance(exc, DeadlineExceeded) else JobStatus.REJECTED
            await self._reject_or_give_up(message, source_queue, exc, job, status)
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
        body to the dead-letter queue with the reason, and its final state to the accountant."""
        job_error = error.to_job_error() if isinstance(error, SwitchyardError) else error
        job_id = job.job_id if job else job_id_hint(message.body, message.message_id)
        log.info(
            "job %s %s: %s (%s)", job_id, status.value, job_error.code.value, job_error.message
        )
        publishes: list[Awaitable[object]] = [
            self.publisher.dead_letter(
                self.names,
                message,
                source_queue=source_queue,
                code=job_error.code.value,
                reason=job_error.message,
            )
        ]
        now = utcnow()
        submitted = job.submitted_at if job else None
        timings = Timings(total_ms=elapsed_ms(submitted, now))
        target = reply_target(message, job)
        if job_id is not None and target:
            result = JobResult(
                job_id=job_id,
                status=status,
                error=job_error,
                timings=timings,
                metadata=job.metadata if job else {},
            )
            publishes.append(
                self.publisher.reply(
                    target, encode(result), correlation_id=message.correlation_id or job_id
                )
            )
        if job_id is not None:
            event = JobEvent(
                job_id=job_id,
                status=status,
                priority=job.priority if job else 0,
                public_model=job.model if job else None,
                error_code=job_error.code,
                timings=timings,
                batch_id=_batch_id(job) if job else None,
                submitted_at=submitted,
                finished_at=now,
                reservation_id=job.route.reservation_id if job and job.route else None,
                key_id=job.route.key_id if job and job.route else None,
            )
            publishes.append(self.events.send(event))
        await asyncio.gather(*publishes)


def calls(attempts: list[Attempt]) -> int:
    """The provider calls among a job's attempts: one an open circuit refused was not made."""
    return sum(1 for a in attempts if a.error_code is not ErrorCode.PROVIDER_UNAVAILABLE)


def _calls_here(job: CompletionJob, attempts: list[Attempt]) -> int | None:
    """The calls of this pass (made under the route's reservation) when the job came with
    attempts at other providers (failover); None when they are all of its calls."""
    if not job.attempts:
        return None
    return calls(attempts[len(job.attempts) :])


def _batch_id(job: CompletionJob) -> str | None:
    value = job.metadata.get("batch_id")
    return str(value) if value is not None else None
