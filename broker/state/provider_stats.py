"""Each provider model's measured health, shared through Redis: a rolling median latency, an
error rate and a status, from the calls every worker made. The ``fastest`` policy orders by the
latency; the CEL variables ``provider.p50_latency_ms``, ``error_rate`` and ``status`` read them.

Workers buffer their calls' outcomes and push them once a second (``StatsRecorder``), one list
per (provider, model) of the last ``SAMPLES`` calls (``Names.provider_stats``), so a call costs
no Redis round trip. Schedulers read every list once a second (``read_stats``) and route from
that snapshot. Only the failures that say the provider is unwell (timeouts, 5xx, broken answers:
``UNWELL``, as the circuit breaker counts) are errors; a rate limit or a refused request is not.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from broker.core.names import Names

__all__ = [
    "DEGRADED_ERROR_RATE",
    "MIN_CALLS",
    "SAMPLES",
    "WINDOW_S",
    "ModelStats",
    "ProviderStats",
    "StatsRecorder",
    "read_stats",
    "summarize",
]

log = logging.getLogger(__name__)

SAMPLES = 200
"""Calls kept per (provider, model): the median and the rate are over at most these."""
WINDOW_S = 300.0
"""Calls older than this are left out: a provider that recovered is not judged by last hour."""
MIN_CALLS = 5
"""Below this many calls in the window the error rate is 0 and the status up: too few to tell."""
DEGRADED_ERROR_RATE = 0.25
"""A provider whose calls fail at least this often is ``degraded`` (``down`` is the health
probes' word: a provider nobody calls cannot be measured back up)."""


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One provider model's (or, merged, one provider's) recent calls."""

    calls: int
    errors: int
    p50_latency_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls >= MIN_CALLS else 0.0

    @property
    def status(self) -> str:
        return "degraded" if self.error_rate >= DEGRADED_ERROR_RATE else "up"


class StatsRecorder:
    """A worker process's calls, buffered here and pushed to Redis by ``flush``."""

    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names
        self._pending: dict[tuple[str, str], list[str]] = {}

    def record(self, provider: str, model: str, latency_ms: float, unwell: bool) -> None:
        sample = f"{time.time():.3f} {latency_ms:.1f} {int(unwell)}"
        self._pending.setdefault((provider, model), []).append(sample)

    async def flush(self) -> None:
        """Push what was recorded; Redis failing loses these samples, never a call."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self._redis.pipeline(transaction=False)
        for (provider, model), samples in pending.items():
            key = self._names.provider_stats(provider, model)
            pipe.lpush(key, *samples[-SAMPLES:])
            pipe.ltrim(key, 0, SAMPLES - 1)
            pipe.expire(key, int(WINDOW_S * 2))
        try:
            await pipe.execute()
        except Exception:
            log.warning("could not record %d calls' latency in Redis", len(pending), exc_info=True)


@dataclass(frozen=True, slots=True)
class ProviderStats:
    """A provider's recent calls: over all its models, and per model."""

    overall: ModelStats
    models: dict[str, ModelStats]


async def read_stats(
    redis: Redis, names: Names, models: Iterable[tuple[str, str]]
) -> dict[str, ProviderStats]:
    """The stats of each provider (of these (provider, model) pairs) with calls in the window."""
    wanted = list(models)
    pipe = redis.pipeline(transaction=False)
    for provider, model in wanted:
        pipe.lrange(names.provider_stats(provider, model), 0, SAMPLES - 1)
    lists = await pipe.execute()
    since = time.time() - WINDOW_S
    per_provider: dict[str, list[tuple[float, bool]]] = {}
    per_model: dict[str, dict[str, ModelStats]] = {}
    for (provider, model), raw in zip(wanted, lists, strict=True):
        samples = [_parse(s) for s in raw]
        recent = [(latency, unwell) for at, latency, unwell in samples if at >= since]
        if recent:
            per_provider.setdefault(provider, []).extend(recent)
            per_model.setdefault(provider, {})[model] = summarize(recent)
    return {
        provider: ProviderStats(summarize(samples), per_model[provider])
        for provider, samples in per_provider.items()
    }


def summarize(samples: list[tuple[float, bool]]) -> ModelStats:
    """``(latency_ms, unwell)`` samples as stats: the median is over the calls that answered."""
    answered = [latency for latency, unwell in samples if not unwell]
    errors = len(samples) - len(answered)
    p50 = statistics.median(answered) if answered else None
    return ModelStats(calls=len(samples), errors=errors, p50_latency_ms=p50)


def _parse(raw: bytes | str) -> tuple[float, float, bool]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    at, latency, unwell = text.split(" ")
    return float(at), float(latency), unwell == "1"
