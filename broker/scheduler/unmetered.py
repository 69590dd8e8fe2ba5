"""Jobs admitted while Redis was away, under ``quota_when_redis_away: admit`` (fail open).

With Redis away no reservation can be made; this setting runs the job anyway and remembers
what its reservation would have charged (the candidate's buckets at its estimates). When Redis
answers again (the scheduler's sweep, every second), each is charged to its counters without
a limit check, once: the limits learn what ran meanwhile, and may stand above their limit
until the window ends. What is remembered lives in this process: a scheduler that dies before
Redis returns takes its unmetered jobs' charges with it (docs/architecture.md, §6).
"""

from __future__ import annotations

import logging
from collections import deque

from broker.state.quota import Bucket, QuotaStore

__all__ = ["MAX_OWED", "Unmetered"]

log = logging.getLogger(__name__)

MAX_OWED = 100_000
"""Unmetered jobs remembered at most (beyond it, the oldest are forgotten, with a warning)."""


class Unmetered:
    def __init__(self) -> None:
        self._owed: deque[list[Bucket]] = deque()

    def __len__(self) -> int:
        return len(self._owed)

    def owe(self, buckets: list[Bucket]) -> None:
        """Remember a job admitted without a reservation."""
        if len(self._owed) >= MAX_OWED:
            self._owed.popleft()
            log.warning("more than %d jobs ran unmetered: the oldest is forgotten", MAX_OWED)
        self._owed.append(buckets)

    async def settle(self, store: QuotaStore) -> int:
        """Charge what is owed (stops at the first Redis failure; the rest waits)."""
        settled = 0
        while self._owed:
            await store.charge_buckets(self._owed[0])
            self._owed.popleft()
            settled += 1
        if settled:
            log.warning("%d jobs that ran while Redis was away are now counted", settled)
        return settled
