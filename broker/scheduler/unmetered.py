"""Jobs admitted while Redis was away, under ``quota_when_redis_away: admit`` (fail open).

With Redis away no reservation can be made; this setting runs the job anyway and remembers
what its reservation would have charged (the candidate's buckets at its estimates). When Redis
answers again (the scheduler's sweep, every second), each is charged to its counters without
a limit check, once: the limits learn what ran meanwhile, and may stand above their limit
until the window ends. What is remembered lives in this process: a scheduler that dies before
Redis returns takes its unmetered jobs' charges with it (docs/architecture.md, §6). Redis
that comes back empty has its counters rebuilt from the ledger, unmetered calls included: then
nothing is charged again (the epoch tells: the one last seen before the outage is gone).
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
        self._epoch: str | None = None

    def __len__(self) -> int:
        return len(self._owed)

    def owe(self, buckets: list[Bucket], epoch: str | None) -> None:
        """Remember a job admitted without a reservation; ``epoch``: the quota epoch last seen
        (its counters are the ones the job was not charged to)."""
        if not self._owed:
            self._epoch = epoch
        if len(self._owed) >= MAX_OWED:
            self._owed.popleft()
            log.warning("more than %d jobs ran unmetered: the oldest is forgotten", MAX_OWED)
        self._owed.append(buckets)

    async def settle(self, store: QuotaStore) -> int:
        """Charge what is owed, once Redis answers with the counters the jobs missed. A Redis
        failure raises (the sweep tries again); what was charged before it is not owed."""
        epoch = await store.epoch()
        if epoch is None:
            return 0  # lost: the next reserve rebuilds them from the ledger
        if epoch != self._epoch:
            log.warning("%d unmetered jobs were counted by the rebuild", len(self._owed))
            self._owed.clear()
            return 0
        settled = 0
        while self._owed:
            await store.charge_buckets(self._owed[0])
            self._owed.popleft()
            settled += 1
        if settled:
            log.warning("%d jobs that ran while Redis was away are now counted", settled)
        return settled
