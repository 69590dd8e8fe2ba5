"""The async Python client: publish jobs and get their results.

``complete`` and ``stream`` are RPC over RabbitMQ's direct reply-to (``broker.transport.rpc``):
thousands of calls can be in flight at once. Direct reply-to is at-most-once (nothing is buffered
if this connection drops); batch producers use ``submit`` with a durable results queue and read
it back with ``results``.

A job can be delivered twice (a worker killed after its reply was confirmed but before its ack);
the client hands each job id back once.

The connection is robust: after RabbitMQ restarts, the client reconnects, and the next call opens
a new reply consumer (direct reply-to lives only as long as its channel). A call made while the
broker is away, or whose answer the lost connection took, raises ``Unavailable`` (retryable).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from aio_pika.abc import (
    AbstractQueue,
    AbstractRobustConnection,
)

from broker.core.clock import utcnow
from broker.core.codec import encode
from broker.core.names import HEADER_KEY, HEADER_TRACEPARENT, Names
from broker.core.priority import queue_priority
from broker.core.tracing import continued
from broker.transport.amqp import Publisher, connect, declare_results_queue, declare_topology
from broker.transport.rpc import DirectReplies
from schemas import (
    ChatMessage,
    CompletionJob,
    CompletionParams,
    JobChunk,
    JobQuery,
    JobResult,
    JobStandingReply,
)

__all__ = ["SwitchyardClient", "make_job"]

_SEEN_LIMIT = 100_000
LOCATE_WAIT_S = 2.0
LOCATE_POLL_S = 0.02


def make_job(
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    model: str | None = None,
    task_type: str | None = None,
    params: CompletionParams | Mapping[str, Any] | None = None,
    priority: int = 0,
    metadata: Mapping[str, Any] | None = None,
    job_id: str | None = None,
    on_quota: str = "reject",
    deadline: datetime | None = None,
    idempotency_key: str | None = None,
) -> CompletionJob:
    # One validation of the whole job, so an error names its full path (messages.0.role).
    return CompletionJob.model_validate(
        {
            "job_id": job_id or str(uuid.uuid4()),
            "model": model,
            "task_type": task_type,
            "messages": [
                m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else m
                for m in messages
            ],
            "params": params.model_dump(exclude_none=True)
            if isinstance(params, CompletionParams)
            else (params or {}),
            "priority": priority,
            "metadata": dict(metadata or {}),
            "on_quota": on_quota,
            "deadline": deadline,
            "idempotency_key": idempotency_key,
            "submitted_at": utcnow(),
        }
    )


class _Seen:
    """Job ids already handed out (bounded), so a redelivered result is returned once."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._ids

    def add(self, job_id: str) -> None:
        self._ids[job_id] = None
        if len(self._ids) > _SEEN_LIMIT:
            self._ids.popitem(last=False)


class SwitchyardClient:
    def __init__(self, connection: AbstractRobustConnection, names: Names) -> None:
        self._connection = connection
        self.names = names
        self._rpc = DirectReplies(connection, names)
        self._seen = _Seen()
        self._publisher: Publisher | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, amqp_url: str, *, namespace: str = "switchyard") -> SwitchyardClient:
        connection = await connect(amqp_url, name="switchyard-client")
        return cls(connection, Names(namespace))

    async def close(self) -> None:
        self._rpc.close()
        await self._connection.close()

    async def __aenter__(self) -> SwitchyardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _batch_publisher(self) -> Publisher:
        async with self._lock:
            if self._publisher is None:
                channel = await self._connection.channel(publisher_confirms=True)
                await declare_topology(channel, self.names, [])
                self._publisher = Publisher(channel)
            return self._publisher

    async def stream(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]] | None = None,
        *,
        job: CompletionJob | None = None,
        timeout_s: float = 60.0,
        api_key: str | None = None,
        traceparent: str | None = None,
        **fields: Any,
    ) -> AsyncIterator[JobChunk | JobResult]:
        """Publish one streaming job; yield its ``JobChunk``s as they come, then its
        ``JobResult``. A chunk with a higher ``attempt`` than the last means the provider call was
        retried: drop what the earlier attempt produced. Raises ``TimeoutError``. ``traceparent``:
        the caller's W3C trace, continued (else the job starts one)."""
        job = self._job(messages, job, fields)
        job = job.model_copy(update={"params": job.params.model_copy(update={"stream": True})})
        call = await self._rpc.call(job, api_key, headers=_traced(traceparent))
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                reply = await asyncio.wait_for(call.next(), max(remaining, 0))
                yield reply
                if isinstance(reply, JobResult):
                    return
        finally:
            call.close()

    async def complete(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]] | None = None,
        *,
        job: CompletionJob | None = None,
        timeout_s: float = 60.0,
        api_key: str | None = None,
        traceparent: str | None = None,
        **fields: Any,
    ) -> JobResult:
        """Publish one job and wait for its result. Pass ``messages`` and ``make_job`` fields
        (model, params, priority, ...), or a ready ``job``. Raises ``TimeoutError``.
        ``traceparent``: the caller's W3C trace, continued (else the job starts one); the
        result's ``trace_id`` is its trace's."""
        job = self._job(messages, job, fields)
        call = await self._rpc.call(job, api_key, headers=_traced(traceparent))
        try:
            async with asyncio.timeout(timeout_s):
                return await call.result()
        finally:
            call.close()

    @staticmethod
    def _job(
        messages: Sequence[ChatMessage | Mapping[str, Any]] | None,
        job: CompletionJob | None,
        fields: dict[str, Any],
    ) -> CompletionJob:
        if job is not None:
            return job
        if messages is None:
            raise TypeError("pass messages or a job")
        return make_job(messages, **fields)

    async def standing(
        self, job_id: str, *, api_key: str | None = None, timeout_s: float = 10.0
    ) -> JobStandingReply:
        """Where a job sent with ``submit`` stands: ``queued`` with its position and ETA,
        ``running``, ``done``, ``cancelled``; ``scheduling`` until a scheduler has placed it."""
        return await self._rpc.ask(
            JobQuery(op="standing", job_id=job_id), api_key, timeout_s=timeout_s
        )

    async def cancel(
        self, job_id: str, *, api_key: str | None = None, timeout_s: float = 10.0
    ) -> JobStandingReply:
        """Cancel a job sent with ``submit`` before its call: ``cancelled`` (it will not be
        called; its result says ``cancelled``), or ``running``/``done`` if too late."""
        return await self._rpc.ask(
            JobQuery(op="cancel", job_id=job_id), api_key, timeout_s=timeout_s
        )

    async def submit(
        self,
        job: CompletionJob,
        *,
        results_queue: str,
        api_key: str | None = None,
        traceparent: str | None = None,
    ) -> str:
        """Publish a job whose result goes to the durable queue ``results_queue`` (a name made
        by ``open_results``). Returns the job id once the broker has confirmed the job."""
        publisher = await self._batch_publisher()
        headers = _traced(traceparent)
        if api_key:
            headers[HEADER_KEY] = api_key
        await publisher.publish(
            self.names.jobs,
            encode(job),
            message_id=job.job_id,
            correlation_id=job.job_id,
            reply_to=results_queue,
            priority=queue_priority(job),
            headers=headers,
        )
        return job.job_id

    async def submit_located(
        self,
        job: CompletionJob,
        *,
        results_queue: str,
        api_key: str | None = None,
        wait_s: float = LOCATE_WAIT_S,
        traceparent: str | None = None,
    ) -> JobStandingReply:
        """``submit``, then where the job stands once a scheduler has placed it (its provider,
        position, ETA, estimated cost), or as it stands after ``wait_s`` (``scheduling``). A
        round trip to a scheduler per job: a large batch uses ``submit`` and asks later."""
        await self.submit(
            job, results_queue=results_queue, api_key=api_key, traceparent=traceparent
        )
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_s
        while True:
            standing = await self.standing(job.job_id, api_key=api_key)
            if standing.state != "scheduling" or loop.time() >= until:
                return standing
            await asyncio.sleep(LOCATE_POLL_S)

    async def open_results(self, name: str) -> str:
        """Declare the durable results queue ``name`` and return its full queue name."""
        channel = await self._connection.channel()
        queue = await declare_results_queue(channel, self.names, name)
        await channel.close()
        return queue.name

    async def results(self, results_queue: str, *, prefetch: int = 200) -> AsyncIterator[JobResult]:
        """Yield results from ``results_queue`` as they come, each job id once. A result is acked
        when the consumer asks for the next one, so a crash while handling it redelivers it."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue: AbstractQueue = await channel.get_queue(results_queue)
        try:
            async with queue.iterator() as messages:
                async for message in messages:
                    try:
                        result = JobResult.model_validate_json(message.body)
                    except ValueError:
                        # Not a result: the queue dead-letters it to <ns>.dead for a look.
                        await message.nack(requeue=False)
                        continue
                    if result.job_id not in self._seen:
                        yield result
                        # Only once the consumer is done with it: one that fails while
                        # handling it gets it again from the queue.
                        self._seen.add(result.job_id)
                    await message.ack()
        finally:
            await channel.close()

    async def delete_results(self, results_queue: str) -> None:
        channel = await self._connection.channel()
        await channel.queue_delete(results_queue)
        await channel.close()


def _traced(traceparent: str | None) -> dict[str, Any]:
    """A job's first hop's headers: the caller's trace, continued, else a new one."""
    return {HEADER_TRACEPARENT: continued(traceparent)}
