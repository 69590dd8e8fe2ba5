"""Which persistent jobs' results have been published, so a job's twin publishes none.

A process that dies between publishing and acking leaves its message to be delivered again, and
the job runs twice: a worker killed after its result went out, or a scheduler killed after it
forwarded the job (two copies reach the workers). A persistent job's worker sends its job event
first, then claims the job id here (``pending``, for ``CLAIM_S``), publishes the result, and
marks it ``done`` (kept ``ANSWER_TTL_S``); a publish that fails gives the claim up. A twin that
finds the claim ``pending`` waits for it to become ``done`` (then publishes nothing) or to lapse
(its holder died: it claims in turn). A job that came again and finds ``done`` is not called:
its result and its event went out. With Redis away the result is published unchecked (at least
once); the client library drops a second result for one job id either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis

from broker.core.names import Names
from broker.state.quota import REDIS_FAILURES

__all__ = ["ANSWER_TTL_S", "CLAIM_S", "Answers"]

log = logging.getLogger(__name__)

ANSWER_TTL_S = 7 * 86_400
"""How long a job id stays ``done``: longer than a batch (24 h) and a redelivery can take."""
CLAIM_S = 30.0
"""How long a claim lasts unless marked done: a result's confirmed publish takes far less."""
_POLL_S = 0.05
_PENDING, _DONE = b"pending", b"done"


class Answers:
    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names

    async def claim(self, job_id: str) -> bool:
        """True: this delivery publishes the job's result (then ``done`` or ``give_up``);
        False: a twin's result went out. Waits while a twin holds the claim (bounded by it)."""
        key = self._names.answered(job_id)
        until = time.monotonic() + CLAIM_S + 1.0
        try:
            while True:
                if await self._redis.set(key, _PENDING, nx=True, px=int(CLAIM_S * 1000)):
                    return True
                if await self._redis.get(key) == _DONE:
                    return False
                if time.monotonic() > until:  # a claim that never lapses: publish rather than lose
                    return True
                await asyncio.sleep(_POLL_S)
        except REDIS_FAILURES:
            log.warning("Redis is away: job %s's result is published unchecked", job_id)
            return True

    async def done(self, job_id: str) -> None:
        """The result is published (confirmed): twins and redeliveries publish none."""
        try:
            await self._redis.set(self._names.answered(job_id), _DONE, ex=ANSWER_TTL_S)
        except REDIS_FAILURES:
            log.warning(
                "Redis is away: job %s's answer is not marked; a twin may answer too", job_id
            )

    async def give_up(self, job_id: str) -> None:
        """The publish failed: let a redelivery claim at once (else the claim lapses)."""
        with contextlib.suppress(*REDIS_FAILURES):
            await self._redis.delete(self._names.answered(job_id))

    async def answered(self, job_id: str) -> bool:
        """Whether the job's result (and, sent before it, its event) went out; False if Redis
        is away."""
        try:
            return bool(await self._redis.get(self._names.answered(job_id)) == _DONE)
        except REDIS_FAILURES:
            return False
