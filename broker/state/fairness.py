"""Fairness between producers of the same priority: provider lanes and priority-ordered slots.

A flood from one key must not make every other key wait behind it. Jobs wait where the provider
is the bottleneck, in the provider's queue, so that queue is split into ``lanes``: the scheduler
puts a job in the lane of its consumer (or key; anonymous jobs in lane 0), and a worker consumes
every lane of its provider. RabbitMQ delivers to each lane's consumer up to its prefetch, so a
flooded lane holds at most that many of a worker's waiting places; the jobs that came in through
every lane then take the worker's call slots in priority order, first come first served within
a priority (``PrioritySlots``). A key that sends 10 jobs after another sent 1,000 so waits behind
at most one prefetch window of the flood, not behind the flood.

Chosen over weighted fair queueing in the scheduler because the scheduler moves jobs on at once:
a flood would sit in the provider queue before any fair choice could be made.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broker.core.limits import KeyConfig

__all__ = ["PrioritySlots", "lane_for"]


def lane_for(key: KeyConfig | None, lanes: int, batch_id: str | None = None) -> int:
    """A stable lane per consumer (or key), and per stored batch, so two batches share their
    provider as two keys do; anonymous jobs outside a batch and a single lane use lane 0."""
    if (key is None and batch_id is None) or lanes <= 1:
        return 0
    identity = (key.consumer or key.id) if key is not None else ""
    if batch_id is not None:
        identity = f"{identity}/{batch_id}"
    return 1 + zlib.crc32(identity.encode()) % (lanes - 1)


class PrioritySlots:
    """A semaphore whose waiters are served highest priority first, then in arrival order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._busy = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @property
    def busy(self) -> int:
        return self._busy

    @asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: int) -> None:
        if self._busy < self.capacity and not self._waiters:
            self._busy += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._arrival), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # it was granted as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        if self._busy > self.capacity:  # the cap shrank: retire this slot
            self._busy -= 1
            return
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next waiter
                return
        self._busy -= 1

    def resize(self, capacity: int) -> None:
        """A new cap (config reload): wake waiters if it grew; a smaller one takes effect as
        slots are released."""
        self.capacity = capacity
        while self._waiters and self._busy < self.capacity:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                self._busy += 1
                waiter.set_result(None)
