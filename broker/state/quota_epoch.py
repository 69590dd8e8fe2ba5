"""The quota epoch as a worker sees it: a job reserved in an epoch Redis no longer holds (Redis
came back empty and the counters were rebuilt) has lost its reservation, which the rebuild could
not see (the job was still queued), so it must be admitted again before its call."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from broker.core.names import Names
from broker.state.quota import REDIS_FAILURES

__all__ = ["REFRESH_S", "QuotaEpoch"]

REFRESH_S = 1.0
"""A process reads the epoch at most this often; one read serves every job meanwhile."""


class QuotaEpoch:
    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._key = names.quota_epoch
        self._value: str | None = None
        self._read_at = float("-inf")

    async def lost(self, epoch: str) -> bool:
        """Whether a reservation made in ``epoch`` is gone: Redis holds another epoch, or none.
        A match is trusted for ``REFRESH_S``; a mismatch is read again first (epochs change
        rarely, so a stale view must not send jobs back). Unknown (Redis away) counts as not
        lost: the call goes on, as it would have."""
        if self._value == epoch and time.monotonic() - self._read_at < REFRESH_S:
            return False
        try:
            value = await self._redis.get(self._key)
        except REDIS_FAILURES:
            return False
        self._value = value.decode() if isinstance(value, bytes) else value
        self._read_at = time.monotonic()
        return self._value != epoch
