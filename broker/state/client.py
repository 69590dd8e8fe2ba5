"""How a server process opens Redis: a blocking pool, so a call waits for a free connection
instead of failing with "Too many connections" (which reads as Redis away: a worker at
concurrency 64 under a batch hit redis-py's default cap of 100 and lost its idempotency
records), and timeouts, so a partitioned Redis does not hold callers for the OS's TCP
timeout (``REDIS_FAILURES`` then)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

__all__ = ["REDIS_TIMEOUT_S", "connect_redis"]

REDIS_TIMEOUT_S = 2.0
POOL_SIZE = 50
POOL_WAIT_S = 20.0
"""How long a call waits for a free connection before it counts as Redis away."""


def connect_redis(url: str) -> Redis:
    return Redis(
        connection_pool=BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
        )
    )
