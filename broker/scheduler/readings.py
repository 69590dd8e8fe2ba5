"""What the scheduler reads in the background rather than per job: once a second the providers'
measured stats (routing uses this snapshot: ``health``) and circuits; every few seconds the quota
counters against their limits and RabbitMQ's queues. Each is exported as gauges; several
schedulers export the same values (dashboards take the max)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx
from redis.asyncio import Redis

from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.metrics import (
    CIRCUIT_STATE,
    PROVIDER_ERROR_RATE,
    PROVIDER_P50,
    PROVIDER_STATUS,
    QUEUE_AGE,
    QUEUE_CONSUMERS,
    QUEUE_MESSAGES,
    QUOTA_LIMIT,
    QUOTA_USED,
)
from broker.core.names import Names
from broker.core.quota_plan import UNCAPPED, Limit, all_limits
from broker.state.circuits import Circuits, CircuitState
from broker.state.provider_stats import ProviderStats, read_stats
from broker.transport.queue_levels import queue_levels

__all__ = ["Readings"]

log = logging.getLogger(__name__)

EVERY_S = 1.0
SLOW_EVERY = 5
"""Quota counters and queues are read every this many rounds (5 s)."""
STATUSES = ("up", "degraded", "down")
_CIRCUIT_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
# Each process's own queues (a reloader's, a cancels listener's): not worth a series each.
_PRIVATE = (".config.", ".cancels.")


class Readings:
    """The background reads of one scheduler; ``health`` is the stats snapshot routing uses."""

    def __init__(
        self,
        redis: Redis | None,
        names: Names,
        circuits: Circuits | None,
        queues_at: tuple[str, str] | None,
    ) -> None:
        """``queues_at``: RabbitMQ's management API URL and the vhost, or None to skip queues."""
        self.health: dict[str, ProviderStats] = {}
        self._redis = redis
        self._names = names
        self._circuits = circuits
        self._queues_at = queues_at
        self._http = httpx.AsyncClient() if queues_at is not None else None

    async def run(self, config: Callable[[], Config]) -> None:
        rounds = 0
        while True:
            current = config()
            await self._quietly(self._stats(current), "provider stats")
            await self._quietly(self._circuit_states(current), "circuits")
            if rounds % SLOW_EVERY == 0:
                await self._quietly(self._quota(current), "quota counters")
                await self._quietly(self._queues(), "queue levels")
            rounds += 1
            await asyncio.sleep(EVERY_S)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    @staticmethod
    async def _quietly(read: Awaitable[None], what: str) -> None:
        """One read failing (Redis or RabbitMQ's API away) leaves the last values standing."""
        try:
            await read
        except Exception as exc:
            log.info("could not read %s: %s", what, type(exc).__name__)

    async def _stats(self, config: Config) -> None:
        if self._redis is None:
            return
        pairs = [(p.id, model) for p in config.providers for model in p.models]
        self.health = await read_stats(self._redis, self._names, pairs)
        for provider in config.providers:
            stats = self.health.get(provider.id)
            status = stats.overall.status if stats is not None else "up"
            for name in STATUSES:
                PROVIDER_STATUS.labels(provider.id, name).set(1 if name == status else 0)
            for model, measured in (stats.models if stats is not None else {}).items():
                PROVIDER_ERROR_RATE.labels(provider.id, model).set(measured.error_rate)
                if measured.p50_latency_ms is not None:
                    PROVIDER_P50.labels(provider.id, model).set(measured.p50_latency_ms / 1000)

    async def _circuit_states(self, config: Config) -> None:
        if self._circuits is None:
            return
        for provider in config.providers:
            view = await self._circuits.view(provider.id)
            state = view.state(provider.circuit.failures)
            CIRCUIT_STATE.labels(provider.id).set(_CIRCUIT_VALUE[state])

    async def _quota(self, config: Config) -> None:
        if self._redis is None:
            return
        now = utcnow()
        limits = [limit for limit in all_limits(config) if limit.limit < UNCAPPED]
        if not limits:
            return
        keys = [limit.key(self._names, limit.window(now, config.zone)) for limit in limits]
        values = await self._redis.mget(keys)
        for limit, value in zip(limits, values, strict=True):
            scale = 1e9 if limit.unit == "usd_nanos" else 1.0
            labels = (limit.scope, limit.scope_id, _as_configured(limit))
            QUOTA_USED.labels(*labels).set(int(value or 0) / scale)
            QUOTA_LIMIT.labels(*labels).set(limit.limit / scale)

    async def _queues(self) -> None:
        if self._queues_at is None or self._http is None:
            return
        api_url, vhost = self._queues_at
        prefix = f"{self._names.namespace}."
        for level in await queue_levels(self._http, api_url, vhost, prefix):
            if any(private in level.name for private in _PRIVATE):
                continue
            label = level.name.removeprefix(prefix)
            QUEUE_MESSAGES.labels(label).set(level.ready)
            QUEUE_CONSUMERS.labels(label).set(level.consumers)
            QUEUE_AGE.labels(label).set(level.oldest_age_s)


def _as_configured(limit: Limit) -> str:
    """The limit as the config file names it (``usd_per_day``), not its counter
    (``usd_nanos_day``): the gauge is in dollars."""
    if limit.metric in ("rpm", "tpm"):
        return limit.metric
    prefix = "usd" if limit.unit == "usd_nanos" else limit.unit
    return f"{prefix}_per_{limit.period.value}"
