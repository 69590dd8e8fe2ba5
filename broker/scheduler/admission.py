"""Admission: which limits and budgets a job touches on a candidate, reserved all at once.

For a (key, candidate) pair the buckets are: the key's RPM/TPM and budgets, its consumer's
budgets, the provider's RPM/TPM, the model's RPM/TPM and, when the call goes to a free tier, the
free tier's limits. The reservation is the estimated prompt tokens plus the output cap, and the
estimated cost (nothing on a free tier). ``QuotaStore`` charges them all or none; the accountant
reconciles the reservation to what the call really used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from broker.core.config import Config, ProviderConfig
from broker.core.limits import Budgets, KeyConfig
from broker.core.names import Names
from broker.core.windows import Period, window
from broker.scheduler.routing import Candidate, ProviderState
from broker.state.quota import Bucket, QuotaStore, Reserved, Short, Unit, bucket_key, usd_to_micros

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


class Admission:
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
            limits += _rate("key", key.id, key.rpm, key.tpm, f"key {key.id}", Period.MINUTE)
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
            tier = provider.free_tier
            zone = ZoneInfo(tier.reset.timezone)
            for unit, prefix in (("requests", "requests"), ("tokens", "tokens")):
                for period in (Period.MINUTE, Period.DAY, Period.MONTH):
                    value = getattr(tier, f"{prefix}_per_{period.value}")
                    if value is not None:
                        limits.append(
                            _Limit(
                                "free",
                                provider.id,
                                f"{prefix}_{period.value}",
                                unit,  # type: ignore[arg-type]
                                value,
                                period,
                                f"free tier of {provider.id}: {prefix} per {period.value}",
                                zone,
                                tier.reset.hour,
                            )
                        )
        return limits

    def buckets(self, key: KeyConfig | None, candidate: Candidate, now: datetime) -> list[Bucket]:
        amounts: dict[Unit, int] = {
            "requests": 1,
            "tokens": candidate.est_tokens,
            "usd_micros": 0 if candidate.free else usd_to_micros(candidate.est_cost_usd),
        }
        buckets = []
        for limit in self._limits(key, candidate):
            w = window(limit.period, now, limit.zone or self.config.zone, limit.reset_hour)
            buckets.append(
                Bucket(
                    key=bucket_key(self.names, limit.scope, limit.scope_id, limit.metric, w.id),
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
            bucket_key(self.names, "provider", provider.id, "tokens_day", day.id)
        )
        free = False
        if provider.free_tier is not None:
            probe = Candidate(
                provider=provider,
                model=next(iter(provider.models)),
                public_model="",
                free=True,
                est_cost_usd=Decimal(0),
                est_prompt_tokens=est_tokens,
                est_output_tokens=0,
            )
            free = True
            for bucket in self.buckets(None, probe, now):
                if ":free:" in bucket.key:
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


def _rate(
    scope: str,
    scope_id: str,
    rpm: int | None,
    tpm: int | None,
    label: str,
    period: Period = Period.MINUTE,
) -> list[_Limit]:
    limits = []
    if rpm:
        limits.append(
            _Limit(scope, scope_id, "rpm", "requests", rpm, period, f"{label} requests/minute")
        )
    if tpm:
        limits.append(
            _Limit(scope, scope_id, "tpm", "tokens", tpm, period, f"{label} tokens/minute")
        )
    return limits


def _budgets(scope: str, scope_id: str, budgets: Budgets | None, label: str) -> list[_Limit]:
    if budgets is None:
        return []
    limits = []
    for period in (Period.DAY, Period.WEEK, Period.MONTH):
        tokens = getattr(budgets, f"tokens_per_{period.value}")
        if tokens is not None:
            limits.append(
                _Limit(
                    scope,
                    scope_id,
                    f"tokens_{period.value}",
                    "tokens",
                    tokens,
                    period,
                    f"{label} tokens per {period.value}",
                )
            )
        usd = getattr(budgets, f"usd_per_{period.value}")
        if usd is not None:
            limits.append(
                _Limit(
                    scope,
                    scope_id,
                    f"usd_{period.value}",
                    "usd_micros",
                    usd_to_micros(usd),
                    period,
                    f"{label} USD per {period.value}",
                )
            )
    return limits
