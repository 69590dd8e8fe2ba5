"""Running consumers as processes: start, serve until a signal, stop gracefully.

Each Switchyard process (scheduler, worker pool, accountant) is a ``Service``; ``switchyard up``
runs several in one event loop. Stopping cancels the consumers first, then waits (bounded) for
the handlers in flight; whatever is still unacked is redelivered to another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

__all__ = ["ConsumerSet", "Service", "configure_logging", "run_loop", "run_services"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


def run_loop(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """``asyncio.run`` on the configured event loop (``uvloop`` or the standard one)."""
    if event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aio-pika logs every reconnect attempt with a traceback at ERROR; one line is enough.
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


class ConsumerSet:
    """The consumers of one service and the handlers they have in flight."""

    def __init__(self) -> None:
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._in_flight: set[asyncio.Task[Any]] = set()

    async def consume(self, queue: AbstractQueue, handler: Handler) -> None:
        async def tracked(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                await handler(message)
            except Exception:
                # The broker connection failed under the handler: hand the message back.
                log.warning("handler failed; message returned for redelivery", exc_info=True)
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
            finally:
                self._in_flight.discard(task)

        tag = await queue.consume(tracked)
        self._consumers.append((queue, tag))

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def stop(self, grace_s: float) -> None:
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_s)
            for task in pending:
                task.cancel()


class Service(ABC):
    """A long-running consumer with an explicit start and a graceful stop."""

    name: str = "service"

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self, grace_s: float = 10.0) -> None: ...


async def run_services(services: Sequence[Service], *, grace_s: float = 10.0) -> None:
    """Start every service, serve until SIGINT or SIGTERM, then stop them in reverse order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Service] = []
    try:
        for service in services:
            await service.start()
            started.append(service)
            log.info("%s started", service.name)
        await stop.wait()
        log.info("stopping")
    finally:
        for service in reversed(started):
            try:
                await service.stop(grace_s)
            except Exception:
                log.exception("%s did not stop cleanly", service.name)
