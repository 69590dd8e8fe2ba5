"""What the scheduler reads in the background rather than per job: once a second the providers'
measured stats (routing uses this snapshot: ``health``) and circuits; every few seconds the quota
counters against their limits and RabbitMQ's queues. Each is exported as gauges; several
schedulers export the same values (dashboards take the max)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client import Gauge
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
from broker.state.provider_stats import ProviderStats, StatsReader
from broker.transport.queue_levels import queue_levels

__all__ = ["Readings"]

log = logging.getLogger(__name__)

EVERY_S = 1.0
SLOW_EVERY = 5
"""Quota counters and queues are read every this many rounds (5 s)."""
STATUSES = ("up", "degraded", "down")
_CIRCUIT_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
_QUEUES = re.compile(
    r"(jobs|reroute|usage|dead|alerts|webhooks|control|results\.(gateway|batches)"
    r"|provider\.[^.]+(\.\d+)?|park\.\d+s)"
)
"""The queues exported (by their name past ``<ns>.``): the pipeline's own, never one a process
or a batch producer made for itself (a series per batch would grow without end)."""


class _Series:
    """A gauge's series set in one round of reads; those not set again are removed (a key
    taken out of the config, a model gone quiet), so none keeps a stale value."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self._last: set[tuple[str, ...]] = set()
        self._now: set[tuple[str, ...]] = set()

    def set(self, labels: tuple[str, ...], value: float) -> None:
        self.gauge.labels(*labels).set(value)
        self._now.add(labels)

    def end_round(self) -> None:
        for gone in self._last - self._now:
            self.gauge.remove(*gone)
        self._last, self._now = self._now, set()


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
        self._stats_reader = StatsReader(redis, names) if redis is not None else None
        self._circuits = circuits
        self._queues_at = queues_at
        self._http = httpx.AsyncClient() if queues_at is not None else None
        self._status, self._circuit = _Series(PROVIDER_STATUS), _Series(CIRCUIT_STATE)
        self._error_rate, self._p50 = _Series(PROVIDER_ERROR_RATE), _Series(PROVIDER_P50)
        self._used, self._limit = _Series(QUOTA_USED), _Series(QUOTA_LIMIT)
        self._ready, self._age = _Series(QUEUE_MESSAGES), _Series(QUEUE_AGE)
        self._consumers = _Series(QUEUE_CONSUMERS)

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
        if self._stats_reader is None:
            return
        pairs = [(p.id, model) for p in config.providers for model in p.models]
        self.health = await self._stats_reader.read(pairs)
        for provider in config.providers:
            stats = self.health.get(provider.id)
            status = stats.overall.status if stats is not None else "up"
            for name in STATUSES:
                self._status.set((provider.id, name), 1 if name == status else 0)
            for model, measured in (stats.models if stats is not None else {}).items():
                self._error_rate.set((provider.id, model), measured.error_rate)
                if measured.p50_latency_ms is not None:
                    self._p50.set((provider.id, model), measured.p50_latency_ms / 1000)
        for series in (self._status, self._error_rate, self._p50):
            series.end_round()

    async def _circuit_states(self, config: Config) -> None:
        if self._circuits is None:
            return
        for provider in config.providers:
            view = await self._circuits.view(provider.id)
            state = view.state(provider.circuit.failures)
            self._circuit.set((provider.id,), _CIRCUIT_VALUE[state])
        self._circuit.end_round()

    async def _quota(self, config: Config) -> None:
        if self._redis is None:
            return
        now = utcnow()
        limits = [limit for limit in all_limits(config) if limit.limit < UNCAPPED]
        keys = [limit.key(self._names, limit.window(now, config.zone)) for limit in limits]
        values = await self._redis.mget(keys) if keys else []
        for limit, value in zip(limits, values, strict=True):
            scale = 1e9 if limit.unit == "usd_nanos" else 1.0
            labels = (limit.scope, limit.scope_id, _as_configured(limit))
            self._used.set(labels, int(value or 0) / scale)
            self._limit.set(labels, limit.limit / scale)
        self._used.end_round()
        self._limit.end_round()

    async def _queues(self) -> None:
        if self._queues_at is None or self._http is None:
            return
        api_url, vhost = self._queues_at
        prefix = f"{self._names.namespace}."
        for level in await queue_levels(self._http, api_url, vhost, prefix):
            label = level.name.removeprefix(prefix)
            if not _QUEUES.fullmatch(label):
                continue
            self._ready.set((label,), level.ready)
            self._consumers.set((label,), level.consumers)
            self._age.set((label,), level.oldest_age_s)
        for series in (self._ready, self._consumers, self._age):
            series.end_round()


def _as_configured(limit: Limit) -> str:
    """The limit as the config file names it (``usd_per_day``), not its counter
    (``usd_nanos_day``): the gauge is in dollars."""
    if limit.metric in ("rpm", "tpm"):
        return limit.metric
    prefix = "usd" if limit.unit == "usd_nanos" else limit.unit
    return f"{prefix}_per_{limit.period.value}"
