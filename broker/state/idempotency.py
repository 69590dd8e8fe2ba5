"""Idempotency keys: a second job with the same ``idempotency_key`` from the same caller within
``IDEMPOTENCY_TTL_S`` gets the first job's result, without a provider call or a charge.

The scheduler claims the key for the first job it sees (``claim``). A repeat finds either the
first job's result (``replay``: the scheduler answers it at once) or the first still running
(``pending``: the repeat waits in a parking queue and looks again). The first job's result is
stored where it ends after a provider call (its worker, or a scheduler ending a failover:
``store``); a first job that ended without one (rejected, expired, cancelled) gives the key
back (``release``, by the accountant, which sees every job's end), so a repeat runs afresh.
A first job RabbitMQ dropped at its deadline leaves a claim that lapses 15 minutes later. A
first job that failed for a reason a retry may not meet (a timeout, a rate limit, a server
error) keeps nothing: its repeat runs afresh.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from redis.asyncio import Redis

from broker.core.codec import encode
from broker.core.names import Names
from broker.core.records import calls
from broker.state.lua import NOW_MS
from broker.state.quota import REDIS_FAILURES
from schemas import CompletionJob, ErrorCode, JobResult

__all__ = ["IDEMPOTENCY_TTL_S", "RETRY_MAY_SUCCEED", "Claim", "Idempotency"]

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_S = 86_400
RETRY_MAY_SUCCEED = frozenset(
    {
        ErrorCode.TIMEOUT,
        ErrorCode.RATE_LIMITED,
        ErrorCode.SERVER_ERROR,
        ErrorCode.PROVIDER_UNAVAILABLE,
        ErrorCode.UNAVAILABLE,
    }
)
"""Failures not kept for repeats: the caller's retry with the same key runs again."""
LAPSE_AFTER_DEADLINE_S = 900
"""A claim outlives its job's deadline by this much: a call started before the deadline may
run past it (its attempts are bounded by the provider's timeout, not the deadline)."""

_CLAIM = (
    NOW_MS
    + """
local first = redis.call('HGET', KEYS[1], 'job_id')
if first == ARGV[1] then return {'first', first} end
if first then
  local result = redis.call('HGET', KEYS[1], 'result')
  if result then return {'replay', result} end
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if lease == 0 or lease > now then return {'pending', first} end
end
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'lease_until', ARGV[2])
redis.call('HDEL', KEYS[1], 'result')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'first', ARGV[1]}
"""
)
"""KEYS: the key's record. ARGV: this job's id, when its claim lapses (ms; 0: never), TTL.
The first job itself, delivered again, keeps its claim as it was."""

_STORE = """
if redis.call('HGET', KEYS[1], 'job_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'result', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'job_id') ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'result') == 1 then return 0 end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True, slots=True)
class Claim:
    outcome: Literal["first", "replay", "pending"]
    first_job_id: str | None = None
    result: bytes | None = None
    """``replay``: the first job's result (a ``JobResult``, JSON)."""


class Idempotency:
    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names
        self._claim = redis.register_script(_CLAIM)
        self._store = redis.register_script(_STORE)
        self._release = redis.register_script(_RELEASE)

    def _key(self, caller: str | None, idempotency_key: str) -> str:
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
        return self._names.idempotency(caller or "-", digest)

    async def claim(
        self, caller: str | None, idempotency_key: str, job_id: str, deadline: datetime | None
    ) -> Claim:
        lapse_ms = int((deadline.timestamp() + LAPSE_AFTER_DEADLINE_S) * 1000) if deadline else 0
        # A job allowed to run longer than the record lives (a batch of up to 168 h) keeps it
        # until its claim lapses.
        ttl = max(IDEMPOTENCY_TTL_S, int(lapse_ms / 1000 - time.time()) + 1)
        outcome, value = await self._claim(
            keys=[self._key(caller, idempotency_key)], args=[job_id, lapse_ms, ttl]
        )
        kind = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if kind == "replay":
            return Claim(
                "replay", result=value if isinstance(value, bytes) else str(value).encode()
            )
        first = value.decode() if isinstance(value, bytes) else str(value)
        return Claim("first" if kind == "first" else "pending", first_job_id=first)

    async def store(
        self, caller: str | None, idempotency_key: str, job_id: str, result: bytes
    ) -> None:
        """The first job's result, for its repeats (only while the key is this job's)."""
        await self._store(
            keys=[self._key(caller, idempotency_key)], args=[job_id, result, IDEMPOTENCY_TTL_S]
        )

    async def keep(self, job: CompletionJob, result: JobResult) -> None:
        """A job's result for its repeats, if it has a key and called a provider (a job that
        called none is given back by the accountant instead). Redis away: repeats run afresh
        once the claim is gone."""
        if job.idempotency_key is None or job.route is None or not calls(result.attempts):
            return
        caller, key = job.route.key_id, job.idempotency_key
        try:
            if result.error is not None and result.error.code in RETRY_MAY_SUCCEED:
                await self.release(caller, key, job.job_id)
            else:
                await self.store(caller, key, job.job_id, encode(result))
        except REDIS_FAILURES:
            log.warning("Redis is away: job %s's result is not kept for repeats", job.job_id)

    async def release(self, caller: str | None, idempotency_key: str, job_id: str) -> None:
        """The first job ended without a result worth repeating: a repeat runs afresh."""
        await self._release(keys=[self._key(caller, idempotency_key)], args=[job_id])
