"""Admission: which limits and budgets a job touches on a candidate, reserved all at once.

For a (key, candidate) pair the buckets are: the key's RPM/TPM and budgets, its consumer's
budgets, the provider's RPM/TPM, the model's RPM/TPM and, when the call goes to a free tier, the
free tier's limits. The reservation is the estimated prompt tokens plus the output cap, and the
estimated cost (nothing on a free tier). ``QuotaStore`` charges them all or none; the accountant
reconciles the reservation to what the call really used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from broker.core.config import Config, ProviderConfig
from broker.core.limits import Budgets, FreeTier, KeyConfig
from broker.core.names import Names
from broker.core.windows import Period, window
from broker.scheduler.routing import Candidate, ProviderState
from broker.state.quota import Bucket, QuotaStore, Reserved, Short, Unit, usd_to_nanos

__all__ = ["Admission"]

# Every provider's tokens per day are counted (for rules: provider.day_tokens_used) under a
# limit nothing reaches.
_UNCAPPED = 2**62


@dataclass(frozen=True, slots=True)
class _Limit:
    scope: str
    scope_id: str
    metric: str
    unit: Unit
    limit: int
    period: Period
    label: str
    zone: ZoneInfo | None = None
    reset_hour: int = 0


@dataclass(frozen=True, slots=True)
class _Kind:
    """One kind of per-period limit: ``<prefix>_per_<period>`` in the file, counted in ``unit``,
    ``words`` in its label."""

    prefix: str
    unit: Unit
    words: str


_TOKENS = _Kind("tokens", "tokens", "tokens")
_USD = _Kind("usd", "usd_nanos", "USD")
_REQUESTS = _Kind("requests", "requests", "requests")


class Admission:
    """The buckets of a (key, candidate) pair under one config version, and their reservation."""

    def __init__(self, config: Config, store: QuotaStore, names: Names) -> None:
        self.config = config
        self.store = store
        self.names = names

    # --- planning ----------------------------------------------------------------------------

    def _limits(self, key: KeyConfig | None, candidate: Candidate) -> list[_Limit]:
        provider, model = candidate.provider, candidate.model
        spec = provider.models[model]
        limits: list[_Limit] = []
        if key is not None:
            limits += _rate("key", key.id, key.rpm, key.tpm, f"key {key.id}")
            limits += _budgets("key", key.id, key.budgets, f"key {key.id}")
            consumer = self.config.consumers.get(key.consumer) if key.consumer else None
            if consumer is not None and key.consumer is not None:
                limits += _budgets(
                    "consumer", key.consumer, consumer.budgets, f"consumer {key.consumer}"
                )
        limits += _rate("provider", provider.id, provider.rpm, provider.tpm, provider.id)
        label = f"{provider.id}/{model}"
        limits += _rate("model", label, spec.rpm, spec.tpm, label)
        limits.append(
            _Limit("provider", provider.id, "tokens_day", "tokens", _UNCAPPED, Period.DAY, "")
        )
        if candidate.free and provider.free_tier is not None:
            limits += _free_tier(provider.id, provider.free_tier)
        return limits

    def buckets(self, key: KeyConfig | None, candidate: Candidate, now: datetime) -> list[Bucket]:
        amounts: dict[Unit, int] = {
            "requests": 1,
            "tokens": candidate.est_tokens,
            "usd_nanos": 0 if candidate.free else usd_to_nanos(candidate.est_cost_usd),
        }
        return self._buckets(self._limits(key, candidate), amounts, now)

    def _buckets(
        self, limits: Iterable[_Limit], amounts: dict[Unit, int], now: datetime
    ) -> list[Bucket]:
        buckets = []
        for limit in limits:
            w = window(limit.period, now, limit.zone or self.config.zone, limit.reset_hour)
            buckets.append(
                Bucket(
                    key=self.names.quota_bucket(limit.scope, limit.scope_id, limit.metric, w.id),
                    unit=limit.unit,
                    amount=amounts[limit.unit],
                    limit=limit.limit,
                    expires_at=w.expires_at,
                    label=limit.label or f"{limit.scope} {limit.scope_id} {limit.metric}",
                )
            )
        return buckets

    # --- Redis ---------------------------------------------------------------------------------

    async def state(
        self, provider: ProviderConfig, est_tokens: int, now: datetime
    ) -> ProviderState:
        """The quota part of a provider's routing state: tokens used today, free tier left."""
        day = window(Period.DAY, now, self.config.zone)
        used = await self.store.usage(
            self.names.quota_bucket("provider", provider.id, "tokens_day", day.id)
        )
        free = False
        if provider.free_tier is not None:
            # What a free call would charge: one request and the tokens, no money.
            probe: dict[Unit, int] = {"requests": 1, "tokens": est_tokens, "usd_nanos": 0}
            free = True
            for bucket in self._buckets(_free_tier(provider.id, provider.free_tier), probe, now):
                current = await self.store.usage(bucket.key)
                free = free and current + bucket.amount <= bucket.limit
        return ProviderState(day_tokens_used=used, free_remaining=free)

    async def reserve(
        self,
        reservation_id: str,
        key: KeyConfig | None,
        candidate: Candidate,
        now: datetime,
        hold_s: float,
    ) -> Reserved | Short:
        return await self.store.reserve(reservation_id, self.buckets(key, candidate, now), hold_s)


def _rate(scope: str, scope_id: str, rpm: int | None, tpm: int | None, label: str) -> list[_Limit]:
    """Per-minute request and token limits (``rpm``, ``tpm``), where set."""
    rates = (("rpm", _REQUESTS, rpm), ("tpm", _TOKENS, tpm))
    return [
        _Limit(
            scope, scope_id, metric, kind.unit, value, Period.MINUTE, f"{label} {kind.words}/minute"
        )
        for metric, kind, value in rates
        if value
    ]


def _budgets(scope: str, scope_id: str, budgets: Budgets | None, label: str) -> list[_Limit]:
    """Token and USD budgets per day, week and month, where set."""
    if budgets is None:
        return []
    periods = (Period.DAY, Period.WEEK, Period.MONTH)
    return _per_period(
        scope, scope_id, budgets, label, [(p, k) for p in periods for k in (_TOKENS, _USD)]
    )


def _free_tier(provider_id: str, tier: FreeTier) -> list[_Limit]:
    """A free tier's request and token limits per minute, day and month, in its reset zone."""
    periods = (Period.MINUTE, Period.DAY, Period.MONTH)
    return _per_period(
        "free",
        provider_id,
        tier,
        f"free tier of {provider_id}:",
        [(p, k) for k in (_REQUESTS, _TOKENS) for p in periods],
        ZoneInfo(tier.reset.timezone),
        tier.reset.hour,
    )


def _per_period(
    scope: str,
    scope_id: str,
    settings: Budgets | FreeTier,
    label: str,
    wanted: Iterable[tuple[Period, _Kind]],
    zone: ZoneInfo | None = None,
    reset_hour: int = 0,
) -> list[_Limit]:
    """The limits ``settings`` sets among ``wanted``, in that order (the reservation's order)."""
    limits = []
    for period, kind in wanted:
        value = getattr(settings, f"{kind.prefix}_per_{period.value}")
        if value is not None:
            amount = usd_to_nanos(value) if kind is _USD else value
            limits.append(
                _Limit(
                    scope,
                    scope_id,
                    # The unit names the counter (usd_nanos_day), so one never mixes units.
                    f"{kind.unit}_{period.value}",
                    kind.unit,
                    amount,
                    period,
                    f"{label} {kind.words} per {period.value}",
                    zone,
                    reset_hour,
                )
            )
    return limits
