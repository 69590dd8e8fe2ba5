"""RPC over RabbitMQ's direct reply-to: the producer library's ``complete``/``stream`` and the
HTTP gateway send jobs and read their chunks and results through it.

One reply consumer per connection and a map from correlation id to a pending call, so thousands
of calls can be in flight at once. Direct reply-to is at-most-once: nothing is buffered if the
connection drops, so every call waiting then is answered ``Unavailable`` (retryable), and the
next call opens a new reply channel (direct reply-to lives only as long as its channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from broker.core.codec import encode
from broker.core.errors import Unavailable
from broker.core.names import DIRECT_REPLY_TO, HEADER_KEY, TYPE_CHUNK, TYPE_STANDING, Names
from broker.core.priority import queue_priority
from broker.transport.amqp import BROKER_FAILURES, Publisher, declare_topology
from schemas import CompletionJob, JobChunk, JobQuery, JobResult, JobStandingReply

__all__ = ["RECONNECT_RETRY_S", "DirectReplies", "Reply", "RpcCall"]

RECONNECT_RETRY_S = 5.0
"""The ``retry_after`` of a call refused while the broker is away, when the connection does not
say its reconnect interval (aio-pika's default is 5 s)."""

Reply = JobChunk | JobResult
_Any = JobChunk | JobResult | JobStandingReply


class RpcCall:
    """One published job's replies, in order: its chunks, then its result."""

    def __init__(self, owner: DirectReplies, correlation_id: str) -> None:
        self.correlation_id = correlation_id
        self._owner = owner
        self._replies: asyncio.Queue[_Any | Exception] = asyncio.Queue()

    def put(self, reply: _Any | Exception) -> None:
        self._replies.put_nowait(reply)

    async def next(self) -> Reply:
        """The next reply; raises what ended the call (``Unavailable``, a malformed reply)."""
        reply = await self._replies.get()
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, JobStandingReply):
            raise ValueError("a job's reply queue got a standing")
        return reply

    async def standing(self) -> JobStandingReply:
        """The answer to a ``JobQuery``."""
        reply = await self._replies.get()
        if isinstance(reply, Exception):
            raise reply
        if not isinstance(reply, JobStandingReply):
            raise ValueError("a job query got a job's reply")
        return reply

    async def result(self) -> JobResult:
        """The job's result, its chunks skipped."""
        while True:
            reply = await self.next()
            if isinstance(reply, JobResult):
                return reply

    def close(self) -> None:
        """Stop waiting: a later reply for this call is dropped."""
        self._owner.forget(self.correlation_id)


class DirectReplies:
    def __init__(self, connection: AbstractRobustConnection, names: Names) -> None:
        self._connection = connection
        self.names = names
        self._pending: dict[str, RpcCall] = {}
        self._channel: AbstractChannel | None = None
        self._publisher: Publisher | None = None
        self._lock = asyncio.Lock()
        connection.close_callbacks.add(self._on_connection_lost)
        # When to try again while the connection is down: its next reconnect attempt.
        self.retry_after = float(getattr(connection, "reconnect_interval", RECONNECT_RETRY_S))

    def close(self, reason: str = "the client was closed") -> None:
        for call in self._pending.values():
            call.put(ConnectionError(reason))

    def forget(self, correlation_id: str) -> None:
        self._pending.pop(correlation_id, None)

    def _on_connection_lost(self, _sender: object, _exc: BaseException | None = None) -> None:
        for call in self._pending.values():
            call.put(
                Unavailable(
                    "the connection to RabbitMQ was lost before the answer came; the job may or"
                    " may not have run",
                    retry_after=self.retry_after,
                )
            )
        self._publisher = None

    async def _reply_publisher(self) -> Publisher:
        """The channel that publishes jobs and consumes their direct replies: one channel, as
        direct reply-to requires."""
        async with self._lock:
            if self._publisher is None:
                if self._channel is not None:  # the lost connection's: its consumer is gone
                    with contextlib.suppress(Exception):
                        await self._channel.close()
                channel = await self._connection.channel(publisher_confirms=True)
                await declare_topology(channel, self.names, [])
                replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
                await replies.consume(self._on_reply, no_ack=True)
                # The reply channel alone can close (a refused publish): its calls end too.
                channel.close_callbacks.add(self._on_connection_lost)
                self._channel = channel
                self._publisher = Publisher(channel)
            return self._publisher

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        call = self._pending.get(message.correlation_id or "")
        if call is None:
            return  # a late or duplicate reply for a call already answered
        try:
            reply: _Any
            if message.type == TYPE_CHUNK:
                reply = JobChunk.model_validate_json(message.body)
            elif message.type == TYPE_STANDING:
                reply = JobStandingReply.model_validate_json(message.body)
            else:
                reply = JobResult.model_validate_json(message.body)
        except ValueError as exc:
            call.put(exc)
            return
        call.put(reply)

    async def ask(
        self, query: JobQuery, api_key: str | None = None, *, timeout_s: float = 10.0
    ) -> JobStandingReply:
        """Ask a scheduler where a job stands, or to cancel it (``<ns>.control``)."""
        call = await self._publish(
            self.names.control, query.model_dump_json().encode(), query.job_id, 0, api_key, None
        )
        try:
            async with asyncio.timeout(timeout_s):
                return await call.standing()
        finally:
            call.close()

    async def call(
        self,
        job: CompletionJob,
        api_key: str | None = None,
        *,
        headers: Mapping[str, Any] | None = None,
    ) -> RpcCall:
        """Publish ``job`` (transient) with its replies coming here; raises ``Unavailable`` if
        the broker did not take it."""
        return await self._publish(
            self.names.jobs, encode(job), job.job_id, queue_priority(job), api_key, headers
        )

    async def _publish(
        self,
        queue: str,
        body: bytes,
        message_id: str,
        priority: int,
        api_key: str | None,
        headers: Mapping[str, Any] | None,
    ) -> RpcCall:
        if not self._connection.connected.is_set():
            raise Unavailable(
                "RabbitMQ is not reachable now (reconnecting); the job was not sent",
                retry_after=self.retry_after,
            )
        try:
            publisher = await self._reply_publisher()
        except BROKER_FAILURES as exc:
            raise Unavailable(
                f"RabbitMQ refused the reply channel ({type(exc).__name__}); the job was not sent",
                retry_after=self.retry_after,
            ) from exc
        # Each call its own: a caller may send the same job again (after a timeout, say), and
        # each call gets the answer to its own message.
        call = RpcCall(self, str(uuid.uuid4()))
        self._pending[call.correlation_id] = call
        all_headers = dict(headers or {})
        if api_key:
            all_headers[HEADER_KEY] = api_key
        try:
            await publisher.publish(
                queue,
                body,
                message_id=message_id,
                correlation_id=call.correlation_id,
                reply_to=DIRECT_REPLY_TO,
                priority=priority,
                headers=all_headers or None,
                # Its answer can only reach this channel: a job kept across a broker restart
                # would call the provider (and bill) for a caller that has already given up.
                persistent=False,
            )
        except BROKER_FAILURES as exc:
            call.close()
            self._publisher = None  # the next call opens a new reply channel
            raise Unavailable(
                f"the job could not be published ({type(exc).__name__}); it was not sent",
                retry_after=self.retry_after,
            ) from exc
        except BaseException:
            call.close()
            raise
        return call
