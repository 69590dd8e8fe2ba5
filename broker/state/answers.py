"""Which jobs' durable results have been published, so a job's twin publishes none.

A process that dies between publishing and acking leaves its message to be delivered again, and
the job runs twice: a worker killed after its result went out, or a scheduler killed after it
forwarded the job (two copies reach the workers). Before a persistent job's result is published,
its worker claims the job id here (``SET NX``, kept ``ANSWER_TTL_S``): a twin finds it claimed
and publishes no result (its calls are still recorded: the provider served them). A job that
came again (``redelivered``) looks first and is not called at all if it was answered. With
Redis away, results are published (at least once); the client library drops a second result
for one job id either way (``SwitchyardClient.results``).
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from broker.core.names import Names
from broker.state.quota import REDIS_FAILURES

__all__ = ["ANSWER_TTL_S", "Answers"]

log = logging.getLogger(__name__)

ANSWER_TTL_S = 7 * 86_400
"""How long a job id stays claimed: longer than a batch (24 h) and a redelivery can take."""


class Answers:
    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names

    async def claim(self, job_id: str) -> bool:
        """True: this delivery publishes the job's result (first, or Redis is away)."""
        try:
            claimed = await self._redis.set(
                self._names.answered(job_id), b"1", nx=True, ex=ANSWER_TTL_S
            )
        except REDIS_FAILURES:
            log.warning("Redis is away: job %s's result is published unchecked", job_id)
            return True
        return bool(claimed)

    async def answered(self, job_id: str) -> bool:
        """Whether a result for the job was published already (False if Redis is away)."""
        try:
            return bool(await self._redis.exists(self._names.answered(job_id)))
        except REDIS_FAILURES:
            return False
