"""Cancellations of untracked jobs, broadcast. An RPC job (a waiting caller's; not tracked in
Redis: ``broker.state.job_states``) is cancelled when its caller goes away before its answer:
the gateway publishes the job's id on the fanout exchange ``<ns>.cancels``, and every scheduler
and worker pool remembers the ids it heard for ``HEARD_FOR_S``, ending such a job ``cancelled``
instead of dispatching or calling it. Best effort: a job whose call already started runs on,
and a process started after the broadcast did not hear it."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections import OrderedDict

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection

from broker.core.names import Names
from broker.transport.amqp import Publisher

__all__ = ["HEARD_FOR_S", "HeardCancels", "declare_cancels", "listen_for_cancels", "publish_cancel"]

HEARD_FOR_S = 3600.0
"""How long a process remembers a cancelled job id: an RPC job that waited longer for quota
or in its provider's queue may still be called."""
MAX_HEARD = 100_000


class HeardCancels:
    """The job ids this process heard cancelled (bounded; oldest forgotten first)."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, job_id: str) -> None:
        self._ids[job_id] = time.monotonic() + HEARD_FOR_S
        self._ids.move_to_end(job_id)
        while len(self._ids) > MAX_HEARD or (
            self._ids and next(iter(self._ids.values())) < time.monotonic()
        ):
            self._ids.popitem(last=False)

    def __contains__(self, job_id: str) -> bool:
        until = self._ids.get(job_id)
        return until is not None and until > time.monotonic()


async def declare_cancels(channel: aio_pika.abc.AbstractChannel, names: Names) -> AbstractExchange:
    return await channel.declare_exchange(names.cancels, aio_pika.ExchangeType.FANOUT, durable=True)


async def listen_for_cancels(
    connection: AbstractRobustConnection, names: Names, heard: HeardCancels
) -> None:
    """Bind this process's own queue to ``<ns>.cancels`` and add what comes to ``heard``."""
    channel = await connection.channel()
    exchange = await declare_cancels(channel, names)
    tag = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    # Named (a robust channel redeclares it after a reconnect), exclusive, gone with us.
    queue = await channel.declare_queue(
        names.cancels_listener(tag), exclusive=True, auto_delete=True
    )
    await queue.bind(exchange)

    async def heard_one(message: AbstractIncomingMessage) -> None:
        heard.add(message.body.decode(errors="replace"))

    await queue.consume(heard_one, no_ack=True)


async def publish_cancel(publisher: Publisher, job_id: str) -> None:
    """Tell every scheduler and worker not to start ``job_id`` (``publisher`` on the exchange)."""
    await publisher.publish("", job_id.encode(), mandatory=False, persistent=False)
