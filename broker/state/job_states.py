"""Where a tracked job stands (queued in its provider's queue, its call running, done,
cancelled), its position and ETA, and cancellation that is never late.

A job is tracked when it came persistent (a batch or an async HTTP job; a waiting RPC caller
needs neither a position nor this cost: two Redis round trips per job). The scheduler records
the job as it hands it to its provider's queue (``queued``); the worker claims the job just
before its first call (``start``) and marks it ``done`` at its end. ``cancel`` and ``start``
meet in one key, so exactly one wins: a job cancelled first is never called (its worker or
scheduler ends it ``cancelled`` and gives its reservation back whole), and a job whose call
started answers ``running`` to the canceller.

Position: the tracked jobs ahead of it in its provider's queue, higher priorities first, then
by arrival (a sorted set per provider; jobs a scheduler handles at once may arrive in another
order than sent). RPC jobs in the same queue are not counted, and the fairness lanes' rotation
is not modelled. ETA: (position + 1) / the provider's calls started per second over the last
minute (``rate``); none while it served nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from redis.asyncio import Redis

from broker.core.names import Names
from broker.state.lua import NOW_MS

__all__ = ["JOB_TTL_S", "JobStanding", "JobStates"]

log = logging.getLogger(__name__)

JOB_TTL_S = 7 * 86_400
"""How long a queued job's record lasts (a batch backlog may wait days)."""
ENDED_TTL_S = 3_600
CANCEL_TTL_S = 8 * 86_400
"""A cancel recorded before its job was placed is kept this long: the job may wait, deferred or
parked, until its deadline (a batch's window is at most 168 h) before a scheduler places it."""
"""How long a record lasts once the job ended or was cancelled."""
RATE_WINDOW_S = 60
"""Calls started are counted per second; the rate is their mean over the last minute, or
since the first second with a call in it (a provider that just started serving)."""

_QUEUED = (
    NOW_MS
    + """
local job, provider, again = ARGV[1], ARGV[2], ARGV[8] == '1'
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'cancelled' then
  local by = redis.call('HGET', KEYS[1], 'owner')
  if not by or by == ARGV[4] then return state end
elseif state == 'done' or (state == 'running' and not again) then
  return state
end
local old = redis.call('HGET', KEYS[1], 'provider')
if old and old ~= provider then
  redis.call('ZREM', ARGV[10] .. old, job)
  redis.call('ZREM', ARGV[11] .. old, job)
end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], gone)
  redis.call('ZREM', KEYS[3], gone)
end
local score = (10 - tonumber(ARGV[3])) * 1e13 + now
local lapse = tonumber(ARGV[9])
if lapse <= 0 then lapse = now + tonumber(ARGV[7]) * 1000 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'provider', provider, 'priority', ARGV[3],
  'owner', ARGV[4], 'est_cost_usd', ARGV[5], 'model', ARGV[6], 'queued_at', now)
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], score, job)
redis.call('ZADD', KEYS[3], lapse, job)
return 'queued'
"""
)
"""KEYS: the job's record, its provider's queue and expiry sets. ARGV: job id, provider,
queue priority (``broker.core.priority``: 0 … 10), owner, estimated cost, model, record TTL,
again (a failover) 1/0, deadline ms (0: none: the record's TTL), the queue and expiry set
prefixes. Jobs whose deadline passed (RabbitMQ dropped them) leave the sets first; a job queued
again for another provider leaves the last one's. A cancel recorded before the job was placed is
obeyed if its own caller (or an operator) made it: another caller cannot cancel a job by
guessing its id."""

_DONE = """
local provider = redis.call('HGET', KEYS[1], 'provider')
if provider then
  redis.call('ZREM', ARGV[2] .. provider, ARGV[1])
  redis.call('ZREM', ARGV[3] .. provider, ARGV[1])
end
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

_START = (
    NOW_MS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'cancelled' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', now)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

_CANCEL = (
    NOW_MS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[2] and ARGV[2] ~= '*' then return 'not_found' end
if state == 'running' or state == 'done' or state == 'cancelled' then return state end
if state == 'queued' then
  local provider = redis.call('HGET', KEYS[1], 'provider')
  redis.call('ZREM', ARGV[3] .. provider, ARGV[1])
  redis.call('ZREM', ARGV[4] .. provider, ARGV[1])
end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancelled_at', now)
if not owner and ARGV[2] ~= '*' then redis.call('HSET', KEYS[1], 'owner', ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 'cancelled'
"""
)
"""ARGV: job id, the caller (its key id, ``-`` anonymous, ``*`` an operator), the queue and
expiry set prefixes, the TTL. A job with no record yet (still being scheduled) gets one that
says cancelled, which its scheduler reads."""


_STANDING = """
local record = redis.call('HGETALL', KEYS[1])
local rank = false
local state = redis.call('HGET', KEYS[1], 'state')
local provider = redis.call('HGET', KEYS[1], 'provider')
if state == 'queued' and provider then
  rank = redis.call('ZRANK', ARGV[1] .. provider, ARGV[2])
end
return {record, rank}
"""
"""The record and, while queued, its rank, read at one instant (a worker's claim between two
reads would leave a queued job without a place)."""


@dataclass(frozen=True, slots=True)
class JobStanding:
    """Where a job stands now."""

    job_id: str
    state: str  # scheduling | queued | running | done | cancelled
    provider: str | None = None
    model: str | None = None
    priority: int | None = None
    position: int | None = None
    eta_s: float | None = None
    est_cost_usd: str | None = None
    owner: str | None = None


class JobStates:
    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names
        self._queued = redis.register_script(_QUEUED)
        self._start = redis.register_script(_START)
        self._cancel = redis.register_script(_CANCEL)
        self._standing = redis.register_script(_STANDING)
        self._done = redis.register_script(_DONE)
        self._served: dict[str, int] = {}

    async def queued(
        self,
        job_id: str,
        provider: str,
        priority: int,
        *,
        owner: str | None,
        est_cost_usd: str,
        model: str,
        deadline: datetime | None,
        again: bool,
    ) -> str:
        """Record the job in its provider's queue; answers ``queued``, or ``cancelled`` (end
        it), ``running`` or ``done`` (a twin's record: leave it)."""
        names = self._names
        deadline_ms = int(deadline.timestamp() * 1000) if deadline is not None else 0
        state = await self._queued(
            keys=[names.job(job_id), names.job_queue(provider), names.job_expiry(provider)],
            args=[
                job_id,
                provider,
                priority,
                owner or "-",
                est_cost_usd,
                model,
                JOB_TTL_S,
                1 if again else 0,
                deadline_ms,
                names.job_queue(""),
                names.job_expiry(""),
            ],
        )
        return _text(state)

    async def start(self, job_id: str, provider: str) -> bool:
        """Claim the job's call; False: it was cancelled first (do not call)."""
        names = self._names
        started = await self._start(
            keys=[names.job(job_id), names.job_queue(provider), names.job_expiry(provider)],
            args=[job_id, JOB_TTL_S],
        )
        return bool(started)

    async def done(self, job_id: str) -> None:
        names = self._names
        await self._done(
            keys=[names.job(job_id)],
            args=[job_id, names.job_queue(""), names.job_expiry(""), ENDED_TTL_S],
        )

    async def cancel(self, job_id: str, caller: str | None) -> str:
        """``cancelled`` (it will not be called), ``running`` or ``done`` (too late),
        ``not_found`` (another caller's job). ``caller``: a key id, None for anonymous, ``*``
        for an operator."""
        names = self._names
        result = await self._cancel(
            keys=[names.job(job_id)],
            args=[
                job_id,
                caller or "-",
                names.job_queue(""),
                names.job_expiry(""),
                CANCEL_TTL_S,
            ],
        )
        return _text(result)

    async def standing(self, job_id: str) -> JobStanding:
        """The job's state, and while queued its position and ETA."""
        raw, rank = await self._standing(
            keys=[self._names.job(job_id)], args=[self._names.job_queue(""), job_id]
        )
        record = {_text(k): _text(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}
        if not record:
            return JobStanding(job_id, "scheduling")
        state, provider = record.get("state", "scheduling"), record.get("provider")
        position = rank if isinstance(rank, int) else None
        eta: float | None = None
        if position is not None and provider is not None:
            rate = await self.rate(provider)
            if position is not None and rate > 0:
                eta = round((position + 1) / rate, 1)
        owner = record.get("owner")
        return JobStanding(
            job_id,
            state,
            provider=provider,
            model=record.get("model"),
            # Recorded as the queue priority: the job's own is one less (a batch line's, 0).
            priority=max(int(record["priority"]) - 1, 0) if "priority" in record else None,
            position=position,
            eta_s=eta,
            est_cost_usd=record.get("est_cost_usd"),
            owner=None if owner in (None, "-") else owner,
        )

    def served(self, provider: str, calls: int = 1) -> None:
        """Count calls started (in memory; ``flush_served`` writes them)."""
        self._served[provider] = self._served.get(provider, 0) + calls

    async def flush_served(self) -> None:
        """Add the counted calls to this minute's counters (one write per provider)."""
        counted, self._served = self._served, {}
        if not counted:
            return
        second = int(time.time())
        pipe = self._redis.pipeline(transaction=False)
        for provider, calls in counted.items():
            key = self._names.job_served(provider, second)
            pipe.incrby(key, calls)
            pipe.expire(key, 2 * RATE_WINDOW_S)
        await pipe.execute()

    async def rate(self, provider: str) -> float:
        """Calls started per second (``RATE_WINDOW_S``); 0 when none were."""
        now = int(time.time())
        seconds = range(now - RATE_WINDOW_S, now)  # whole seconds: the current one is partial
        counts = await self._redis.mget([self._names.job_served(provider, s) for s in seconds])
        served = [int(c) if c is not None else 0 for c in counts]
        first = next((i for i, c in enumerate(served) if c), None)
        if first is None:
            return 0.0
        return sum(served) / (len(served) - first)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
