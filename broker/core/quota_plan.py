"""Which quota limits a config sets, each a counter per window: the one list both the
scheduler's admission (the limits a job touches) and the rebuild from the ledger (every limit)
read, so a counter's name, unit and window are decided in one place.

Scopes: ``key`` (rpm, tpm, budgets), ``consumer`` (budgets), ``provider`` (rpm, tpm, and an
uncapped ``tokens_day`` that routing rules read), ``model`` (``<provider>/<model>`` rpm, tpm),
``free`` (a free tier's requests and tokens per minute, day and month, in its reset zone).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from broker.core.config import Config, ProviderConfig
from broker.core.limits import Budgets, FreeTier, KeyConfig
from broker.core.names import Names
from broker.core.pricing import Unit, usd_to_nanos
from broker.core.windows import Period, Window, window

__all__ = ["UNCAPPED", "Limit", "all_limits", "day_tokens", "free_limits", "limits_for"]

UNCAPPED = 2**62
"""The limit of a counter kept for rules to read (a provider's tokens per day), never reached."""


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit: ``limit`` of ``unit`` per ``period`` for ``scope`` ``scope_id``."""

    scope: str
    scope_id: str
    metric: str
    unit: Unit
    limit: int
    period: Period
    label: str
    zone: ZoneInfo | None = None
    reset_hour: int = 0

    def window(self, now: datetime, default_zone: ZoneInfo) -> Window:
        return window(self.period, now, self.zone or default_zone, self.reset_hour)

    def key(self, names: Names, w: Window) -> str:
        """The counter's Redis key in window ``w``."""
        return names.quota_bucket(self.scope, self.scope_id, self.metric, w.id)


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


def key_limits(config: Config, key: KeyConfig) -> list[Limit]:
    """A key's rates and budgets, and its consumer's budgets."""
    limits = _rate("key", key.id, key.rpm, key.tpm, f"key {key.id}")
    limits += _budgets("key", key.id, key.budgets, f"key {key.id}")
    consumer = config.consumers.get(key.consumer) if key.consumer else None
    if consumer is not None and key.consumer is not None:
        limits += _budgets("consumer", key.consumer, consumer.budgets, f"consumer {key.consumer}")
    return limits


def limits_for(
    config: Config, key: KeyConfig | None, provider: ProviderConfig, model: str, *, free: bool
) -> list[Limit]:
    """The limits a call by ``key`` to ``provider``'s ``model`` counts against, in the order a
    reservation charges them (the first short one is the one reported); ``free``: the call goes
    to the provider's free tier."""
    limits = key_limits(config, key) if key is not None else []
    limits += _provider_rate(provider) + _model_rate(provider, model)
    limits.append(day_tokens(provider))
    if free:
        limits += free_limits(provider)
    return limits


def _provider_rate(provider: ProviderConfig) -> list[Limit]:
    return _rate("provider", provider.id, provider.rpm, provider.tpm, provider.id)


def day_tokens(provider: ProviderConfig) -> Limit:
    """A provider's tokens per day, counted for rules under a limit nothing reaches."""
    return Limit("provider", provider.id, "tokens_day", "tokens", UNCAPPED, Period.DAY, "")


def _model_rate(provider: ProviderConfig, model: str) -> list[Limit]:
    spec = provider.models[model]
    label = f"{provider.id}/{model}"
    return _rate("model", label, spec.rpm, spec.tpm, label)


def free_limits(provider: ProviderConfig) -> list[Limit]:
    """A free tier's request and token limits per minute, day and month, in its reset zone."""
    tier = provider.free_tier
    if tier is None:
        return []
    periods = (Period.MINUTE, Period.DAY, Period.MONTH)
    return _per_period(
        "free",
        provider.id,
        tier,
        f"free tier of {provider.id}:",
        [(p, k) for k in (_REQUESTS, _TOKENS) for p in periods],
        ZoneInfo(tier.reset.timezone),
        tier.reset.hour,
    )


def all_limits(config: Config) -> list[Limit]:
    """Every limit the config sets, each once (a consumer's budgets are shared by its keys)."""
    seen: dict[tuple[str, str, str], Limit] = {}
    limits = [limit for key in config.keys for limit in key_limits(config, key)]
    for provider in config.providers:
        limits += [*_provider_rate(provider), day_tokens(provider), *free_limits(provider)]
        for model in provider.models:
            limits += _model_rate(provider, model)
    for limit in limits:
        seen.setdefault((limit.scope, limit.scope_id, limit.metric), limit)
    return list(seen.values())


def _rate(scope: str, scope_id: str, rpm: int | None, tpm: int | None, label: str) -> list[Limit]:
    """Per-minute request and token limits (``rpm``, ``tpm``), where set."""
    rates = (("rpm", _REQUESTS, rpm), ("tpm", _TOKENS, tpm))
    return [
        Limit(
            scope, scope_id, metric, kind.unit, value, Period.MINUTE, f"{label} {kind.words}/minute"
        )
        for metric, kind, value in rates
        if value
    ]


def _budgets(scope: str, scope_id: str, budgets: Budgets | None, label: str) -> list[Limit]:
    """Token and USD budgets per day, week and month, where set."""
    if budgets is None:
        return []
    periods = (Period.DAY, Period.WEEK, Period.MONTH)
    return _per_period(
        scope, scope_id, budgets, label, [(p, k) for p in periods for k in (_TOKENS, _USD)]
    )


def _per_period(
    scope: str,
    scope_id: str,
    settings: Budgets | FreeTier,
    label: str,
    wanted: Iterable[tuple[Period, _Kind]],
    zone: ZoneInfo | None = None,
    reset_hour: int = 0,
) -> list[Limit]:
    """The limits ``settings`` sets among ``wanted``, in that order (the reservation's order)."""
    limits = []
    for period, kind in wanted:
        value = getattr(settings, f"{kind.prefix}_per_{period.value}")
        if value is not None:
            amount = usd_to_nanos(value) if kind is _USD else value
            limits.append(
                Limit(
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
