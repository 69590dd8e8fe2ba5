"""A concurrency cap shared by every worker process of a provider: a semaphore of expiring leases.

The leases live in one Redis sorted set (lease id -> expiry in ms). Granting prunes the expired
ones first, so a holder that dies without releasing loses its slot when its lease runs out;
a long call ``renew``s before then. Expiry is measured by Redis's clock, never a worker's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from typing import Any

from redis.asyncio import Redis

from broker.state.lua import NOW_MS

__all__ = ["LeaseSemaphore"]

log = logging.getLogger(__name__)


# Every script starts from Redis's clock; the set lives as long as its last lease.
_NOW = (
    NOW_MS
    + """
local function keep_until_last(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, last[2]) end
end
"""
)

# KEYS: leases.  ARGV: capacity, lease_ms, lease id.  -> 1 granted, 0 full
_ACQUIRE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
keep_until_last(KEYS[1])
return 1
"""
)

# KEYS: leases.  ARGV: lease_ms, lease id.  -> 1 renewed, 0 lost (expired or released)
_RENEW = (
    _NOW
    + """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not expiry or tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
keep_until_last(KEYS[1])
return 1
"""
)

# KEYS: leases.  -> live leases
_HELD = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')\n"


class LeaseSemaphore:
    """At most ``capacity`` live leases on ``key`` across all processes; each lasts ``lease_s``."""

    def __init__(self, redis: Redis, key: str, capacity: int, lease_s: float) -> None:
        if capacity < 1 or lease_s <= 0:
            raise ValueError("capacity must be at least 1 and lease_s positive")
        self._redis = redis
        self.key = key
        self.capacity = capacity
        self.lease_s = lease_s
        self._lease_ms = max(1, round(lease_s * 1000))
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._held = redis.register_script(_HELD)
        self._returning: set[asyncio.Task[None]] = set()  # leases given back after a cancel

    async def acquire(self, holder: str) -> str | None:
        """A lease id if a slot is free now, else None. Cancelled while Redis runs the grant,
        it gives the lease back as soon as the grant is known (it held a slot until it expired)."""
        lease_id = f"{holder}:{secrets.token_hex(8)}"
        granting = asyncio.ensure_future(
            self._acquire(keys=[self.key], args=[self.capacity, self._lease_ms, lease_id])
        )
        try:
            granted: Any = await asyncio.shield(granting)
        except asyncio.CancelledError:
            granting.add_done_callback(lambda done: self._give_back(done, lease_id))
            raise
        return lease_id if int(granted) else None

    def _give_back(self, grant: asyncio.Future[Any], lease_id: str) -> None:
        if grant.cancelled() or grant.exception() is not None or not int(grant.result()):
            return
        task = asyncio.get_running_loop().create_task(self._release_quietly(lease_id))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    async def _release_quietly(self, lease_id: str) -> None:
        try:
            await self.release(lease_id)
        except Exception:  # it expires on its own
            log.warning("could not give back a lease granted to a cancelled acquire")

    async def acquire_wait(self, holder: str, timeout_s: float, poll_s: float = 0.05) -> str | None:
        """Retry ``acquire`` with short jittered sleeps for at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            lease_id = await self.acquire(holder)
            if lease_id is not None:
                return lease_id
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Jitter keeps many waiters from polling in lock step.
            await asyncio.sleep(min(remaining, poll_s * random.uniform(0.5, 1.5)))

    async def renew(self, lease_id: str) -> bool:
        """Extend a live lease to ``lease_s`` from now; False if it expired or was released."""
        renewed: Any = await self._renew(keys=[self.key], args=[self._lease_ms, lease_id])
        return bool(int(renewed))

    async def release(self, lease_id: str) -> bool:
        """Free the slot; False if the lease had already gone."""
        removed: Any = await self._redis.zrem(self.key, lease_id)
        return bool(removed)

    async def held(self) -> int:
        """Live leases right now."""
        count: Any = await self._held(keys=[self.key])
        return int(count)
