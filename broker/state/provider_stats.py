"""Each provider model's measured health, shared through Redis: a rolling median latency, an
error rate and a status, from the calls every worker made. The ``fastest`` policy orders by the
latency; the CEL variables ``provider.p50_latency_ms``, ``error_rate`` and ``status`` read them.

Workers buffer their calls' outcomes and push them once a second (``StatsRecorder``), one list
per (provider, model) of the last ``SAMPLES`` calls (``Names.provider_stats``), so a call costs
no Redis round trip. Schedulers read every list once a second (``read_stats``) and route from
that snapshot. Only answers time the median; only the failures that say the provider is unwell
(timeouts, 5xx, broken answers: ``UNWELL``, as the circuit breaker counts) are errors; a rate
limit or a refused request is neither (``Outcome``).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from redis.asyncio import Redis

from broker.core.names import Names

__all__ = [
    "DEGRADED_ERROR_RATE",
    "MIN_CALLS",
    "NEVER_ANSWERED_MS",
    "SAMPLES",
    "WINDOW_S",
    "ModelStats",
    "Outcome",
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


class Outcome(IntEnum):
    """A call as the stats count it: only answers time the median, only the provider's own
    failures (``UNWELL``) make the error rate; a rate limit or a refused request is neither
    (a provider answering 429 fast must not look fast)."""

    ANSWERED = 0
    UNWELL = 1
    OTHER = 2


NEVER_ANSWERED_MS = math.inf
"""The median of a model whose recent calls all failed: it ranks last under ``fastest``."""


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

    def record(self, provider: str, model: str, latency_ms: float, outcome: Outcome) -> None:
        sample = f"{time.time():.3f} {latency_ms:.1f} {outcome.value}"
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
    per_provider: dict[str, list[tuple[float, Outcome]]] = {}
    per_model: dict[str, dict[str, ModelStats]] = {}
    for (provider, model), raw in zip(wanted, lists, strict=True):
        samples = [_parse(s) for s in raw]
        recent = [(latency, outcome) for at, latency, outcome in samples if at >= since]
        stats = summarize(recent)
        if stats is not None:
            per_provider.setdefault(provider, []).extend(recent)
            per_model.setdefault(provider, {})[model] = stats
    found = {}
    for provider, merged in per_provider.items():
        overall = summarize(merged)
        assert overall is not None  # one of its models said something
        found[provider] = ProviderStats(overall, per_model[provider])
    return found


def summarize(samples: list[tuple[float, Outcome]]) -> ModelStats | None:
    """``(latency_ms, outcome)`` samples as stats (None if none says anything of health): the
    median is over the answers (``NEVER_ANSWERED_MS`` if the provider failed every call), the
    error rate over answers and the provider's own failures."""
    answered = [latency for latency, outcome in samples if outcome is Outcome.ANSWERED]
    errors = sum(1 for _, outcome in samples if outcome is Outcome.UNWELL)
    if not answered and not errors:
        return None
    p50 = statistics.median(answered) if answered else NEVER_ANSWERED_MS
    return ModelStats(calls=len(answered) + errors, errors=errors, p50_latency_ms=p50)


def _parse(raw: bytes | str) -> tuple[float, float, Outcome]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    at, latency, outcome = text.split(" ")
    return float(at), float(latency), Outcome(int(outcome))
