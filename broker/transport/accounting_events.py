"""Group commit of accounting events (job ends, call starts) to the accountant's queue."""

from __future__ import annotations

import asyncio

from broker.core.codec import encode
from broker.core.tracing import untraced
from broker.transport.amqp import Publisher
from schemas import AccountingBatch, CallStarted, JobEvent

__all__ = ["MAX_EVENTS_PER_MESSAGE", "AccountingEvents"]

MAX_EVENTS_PER_MESSAGE = 200


class AccountingEvents:
    """Group commit of job ends and call starts to the accountant's queue: one message carries
    every event added while the previous message awaited its confirm. No timer, so a lone event
    goes at once and a busy process sends fewer, larger messages (each AMQP message costs
    RabbitMQ and both ends far more than its bytes). ``send`` resolves once the event's message
    is confirmed."""

    def __init__(
        self, publisher: Publisher, queue: str, *, max_events: int = MAX_EVENTS_PER_MESSAGE
    ) -> None:
        self.publisher = publisher
        self.queue = queue
        self.max_events = max_events
        self._waiting: list[tuple[JobEvent | CallStarted, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    def send(self, event: JobEvent | CallStarted) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Whoever gave up on the event (a cancelled handler) must not leave an error unread.
        future.add_done_callback(_read_error)
        self._waiting.append((event, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting(), context=untraced())
        return future

    async def _send_waiting(self) -> None:
        batch: list[tuple[JobEvent | CallStarted, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self.max_events]
                del self._waiting[: len(batch)]
                events = [event for event, _ in batch]
                try:
                    await self.publisher.publish(
                        self.queue, encode(AccountingBatch.model_construct(events=events))
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


def _settle(
    batch: list[tuple[JobEvent | CallStarted, asyncio.Future[None]]], error: Exception | None
) -> None:
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
