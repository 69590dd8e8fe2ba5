"""Every provider's worker pool in one process (``switchyard up``)."""

from __future__ import annotations

import asyncio
import logging

from broker.core.config import Config
from broker.core.names import Names
from broker.core.settings import CALL_SETTLE_MARGIN_S
from broker.transport.runtime import Service
from workers.pool import WorkerPool

__all__ = ["WorkerPools"]

log = logging.getLogger(__name__)


class WorkerPools(Service):
    """One worker pool per provider of the config (``switchyard up``). A provider a new config
    version adds gets a pool; one it drops drains its queue (``WorkerPool.apply``)."""

    name = "workers"

    def __init__(
        self,
        amqp_url: str,
        config: Config,
        names: Names,
        *,
        redis_url: str | None = None,
        settle_margin_s: float = CALL_SETTLE_MARGIN_S,
    ) -> None:
        self.amqp_url = amqp_url
        self.names = names
        self.redis_url = redis_url
        self.settle_margin_s = settle_margin_s
        self.pools = {p.id: self._pool(config, p.id) for p in config.providers}
        self._started = False

    def _pool(self, config: Config, provider_id: str) -> WorkerPool:
        return WorkerPool(
            self.amqp_url,
            config,
            self.names,
            provider_id,
            redis_url=self.redis_url,
            settle_margin_s=self.settle_margin_s,
        )

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.start()
            log.info("%s started", pool.name)
        self._started = True

    async def stop(self, grace_s: float = 10.0) -> None:
        results = await asyncio.gather(
            *(pool.stop(grace_s) for pool in self.pools.values()), return_exceptions=True
        )
        for pool, result in zip(self.pools.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.error("%s did not stop cleanly: %r", pool.name, result)

    async def apply(self, config: Config) -> None:
        for pool in list(self.pools.values()):
            try:
                await pool.apply(config)
            except Exception:
                log.exception("%s could not take config version %s", pool.name, config.version)
        for provider in config.providers:
            if provider.id not in self.pools:
                pool = self._pool(config, provider.id)
                self.pools[provider.id] = pool
                if self._started:
                    await pool.start()
                    log.info("%s started (provider added to the config)", pool.name)
