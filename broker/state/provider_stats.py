"""Each provider model's measured health, shared through Redis: a rolling median latency, an
error rate and a status, from the calls every worker made. The ``fastest`` policy orders by the
latency; the CEL variables ``provider.p50_latency_ms``, ``error_rate`` and ``status`` read them.

Workers buffer their calls' outcomes and push them once a second (``StatsRecorder``), one list
per (provider, model) of the last ``SAMPLES`` calls (``Names.provider_stats``), so a call costs
no Redis round trip. Schedulers read what was pushed since their last read once a second
(``StatsReader``) and route from that snapshot. Only answers time the median; only the failures
that say the provider is unwell (timeouts, 5xx, broken answers: ``UNWELL``, as the circuit
breaker counts) are errors; a rate limit or a refused request is neither (``Outcome``).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
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
    "StatsReader",
    "StatsRecorder",
    "summarize",
]

log = logging.getLogger(__name__)

SAMPLES = 200
"""Calls kept per (provider, model): the median and the rate are over at most these."""
WINDOW_S = 300.0
"""Calls older than this are left out: a provider that recovered is not judged by last hour."""
KEEP_S = int(WINDOW_S * 2)
"""How long a quiet provider model's samples and count stay in Redis."""
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
        # MULTI: a reader sees a list and its count move together (``StatsReader``).
        pipe = self._redis.pipeline(transaction=True)
        for (provider, model), samples in pending.items():
            key, count = self._names.provider_stats(provider, model), len(samples[-SAMPLES:])
            pipe.lpush(key, *samples[-SAMPLES:])
            pipe.ltrim(key, 0, SAMPLES - 1)
            pipe.expire(key, KEEP_S)
            pipe.incrby(self._names.provider_stats_pushed(provider, model), count)
            pipe.expire(self._names.provider_stats_pushed(provider, model), KEEP_S)
        try:
            await pipe.execute()
        except Exception:
            log.warning("could not record %d calls' latency in Redis", len(pending), exc_info=True)


@dataclass(frozen=True, slots=True)
class ProviderStats:
    """A provider's recent calls: over all its models, and per model."""

    overall: ModelStats
    models: dict[str, ModelStats]


# KEYS: the list, its count of samples ever pushed.  ARGV: the count at the reader's last read.
# -> {count now, the samples pushed since (newest first; all kept if the count went back)}
_SINCE = f"""
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
local new = count - tonumber(ARGV[1])
if new < 0 or tonumber(ARGV[1]) < 0 or new > {SAMPLES} then new = {SAMPLES} end
if new == 0 then return {{count, {{}}}} end
return {{count, redis.call('LRANGE', KEYS[1], 0, new - 1)}}
"""


class StatsReader:
    """A scheduler's reads of the stats: each reads only the samples pushed since its last one
    (a count beside each list), so the work follows the call rate, not the number of provider
    models times ``SAMPLES``."""

    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names
        self._since = redis.register_script(_SINCE)
        self._seen: dict[tuple[str, str], int] = {}
        self._samples: dict[tuple[str, str], deque[tuple[float, float, Outcome]]] = {}

    async def read(self, models: Iterable[tuple[str, str]]) -> dict[str, ProviderStats]:
        """The stats of each provider (of these (provider, model) pairs) with calls in the
        window."""
        wanted = list(models)
        pipe = self._redis.pipeline(transaction=False)
        for provider, model in wanted:
            keys = [
                self._names.provider_stats(provider, model),
                self._names.provider_stats_pushed(provider, model),
            ]
            await self._since(keys=keys, args=[self._seen.get((provider, model), -1)], client=pipe)
        for pair, (count, raw) in zip(wanted, await pipe.execute(), strict=True):
            seen = self._seen.get(pair, -1)
            if seen < 0 or count < seen or count - seen > SAMPLES:  # first, lost, or lapped
                self._samples[pair] = deque(maxlen=SAMPLES)
            self._seen[pair] = int(count)
            self._samples[pair].extend(_parse(s) for s in reversed(raw))  # oldest first
        return _summaries(wanted, self._samples, time.time() - WINDOW_S)


def _summaries(
    wanted: list[tuple[str, str]],
    samples: dict[tuple[str, str], deque[tuple[float, float, Outcome]]],
    since: float,
) -> dict[str, ProviderStats]:
    per_provider: dict[str, list[tuple[float, Outcome]]] = {}
    per_model: dict[str, dict[str, ModelStats]] = {}
    for provider, model in wanted:
        kept = samples.get((provider, model), ())
        recent = [(latency, outcome) for at, latency, outcome in kept if at >= since]
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
