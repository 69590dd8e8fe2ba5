"""The baseline: the bare stack with no Switchyard in it. One process consumes a queue with
aio-pika, posts each body to the mock provider with the HTTP client and call the workers use
(``workers.http.post``), and publishes the provider's answer to ``reply_to``; its producer is a
direct reply-to RPC client.

Run as a process: ``python ops/bench/bare.py AMQP_URL QUEUE MOCK_BASE_URL CONCURRENCY``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid

import aio_pika
import httpx
from aio_pika.abc import AbstractIncomingMessage

from broker.core.config import ProviderConfig
from broker.transport.runtime import tune_gc
from workers.http import make_http_client, post

QUEUE_ARGUMENTS = {"x-max-priority": 10}
JSON_HEADERS = httpx.Headers({"content-type": "application/json"})
CALL_TIMEOUT_S = 120.0
"""As long as a Switchyard call of the bench may take (``timeout_s``)."""


async def serve(amqp_url: str, queue_name: str, base_url: str, concurrency: int) -> None:
    provider = ProviderConfig.model_validate(
        {
            "id": "bare",
            "type": "openai",
            "base_url": base_url,
            "concurrency": concurrency,
            "models": {"gpt-4o-mini": {"input": 0, "output": 0}},
        }
    )
    http = make_http_client(provider)
    url = f"{base_url.rstrip('/')}/chat/completions"
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=concurrency)
    queue = await channel.declare_queue(queue_name, durable=True, arguments=QUEUE_ARGUMENTS)

    async def call(body: bytes) -> bytes:
        # Two attempts, as Switchyard's worker retries: the mock closes a keep-alive connection
        # idle for 5 s, and a call that picks it up as it closes fails ("server disconnected").
        # A failure after that is answered as an error, so no caller waits on it.
        error = ""
        for _ in range(2):
            try:
                return (await post(http, url, body, JSON_HEADERS)).content
            except httpx.TransportError as exc:
                error = type(exc).__name__
        return json.dumps({"error": error}).encode()

    async def handle(message: AbstractIncomingMessage) -> None:
        content = await call(message.body)
        if message.reply_to:
            await channel.default_exchange.publish(
                aio_pika.Message(content, correlation_id=message.correlation_id),
                routing_key=message.reply_to,
                mandatory=False,
            )
        await message.ack()

    await queue.consume(handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await connection.close()
    await http.aclose()


class BareClient:
    """Direct reply-to RPC against the bare queue, many calls in flight."""

    def __init__(self, amqp_url: str, queue_name: str) -> None:
        self.amqp_url = amqp_url
        self.queue_name = queue_name
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    async def __aenter__(self) -> BareClient:
        self.connection = await aio_pika.connect_robust(self.amqp_url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.declare_queue(self.queue_name, durable=True, arguments=QUEUE_ARGUMENTS)
        replies = await self.channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await replies.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(self, body: bytes, priority: int) -> bytes:
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                correlation_id=correlation_id,
                reply_to="amq.rabbitmq.reply-to",
                priority=priority,
                # As Switchyard's client sends an RPC job: an answer that can only reach this
                # channel does not outlive it, so neither does the job.
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            routing_key=self.queue_name,
        )
        try:
            return await asyncio.wait_for(future, CALL_TIMEOUT_S)
        finally:
            self._pending.pop(correlation_id, None)


if __name__ == "__main__":
    amqp, queue, base, concurrency = sys.argv[1:5]
    tune_gc()  # as Switchyard's processes: the ratios measure the work, not the collector
    asyncio.run(serve(amqp, queue, base, int(concurrency)))
