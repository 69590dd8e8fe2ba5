"""What a call costs: the one price function, used by the worker when a call ends (its result and
its usage events carry the figure; the accountant records it as it came)."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import Literal
from zoneinfo import ZoneInfo

from broker.core.config import ModelSpec
from schemas import UsageEvent

__all__ = ["Unit", "call_cost", "cost_usd", "nanos_to_usd", "price_usage", "usd_to_nanos"]

Unit = Literal["requests", "tokens", "usd_nanos"]
"""What a quota counter counts. Money is integer nano-dollars, the ledger's own precision
(``numeric(18, 9)``), so Redis's arithmetic stays exact and a counter equals its rows."""
_NANOS = Decimal(1_000_000_000)


def usd_to_nanos(usd: Decimal, rounding: str = ROUND_CEILING) -> int:
    """Whole nano-dollars: exact for a priced call (the ledger's precision); an estimate with
    more digits rounds up by default, so a reservation never under-holds."""
    return int((usd * _NANOS).to_integral_value(rounding=rounding))


def nanos_to_usd(nanos: int) -> Decimal:
    return Decimal(nanos) / _NANOS


_PER_MILLION = Decimal(1_000_000)
_QUANTUM = Decimal("0.000000001")  # numeric(18, 9) in Postgres


def cost_usd(
    price: ModelSpec, prompt_tokens: int, completion_tokens: int, multiplier: Decimal = Decimal(1)
) -> Decimal:
    """List price times the tokens, times the discount ``multiplier`` in force (1: none)."""
    raw = (price.input * prompt_tokens + price.output * completion_tokens) / _PER_MILLION
    return (raw * multiplier).quantize(_QUANTUM)


def call_cost(
    price: ModelSpec | None,
    zone: ZoneInfo,
    at: datetime,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    free: bool = False,
) -> Decimal | None:
    """A call's cost at ``at``: nothing on a free tier, the discount window in force applied;
    None without a price."""
    if free:
        return Decimal(0)
    if price is None:
        return None
    return cost_usd(price, prompt_tokens, completion_tokens, price.multiplier_at(at, zone))


def price_usage(event: UsageEvent, price: ModelSpec | None, zone: ZoneInfo, version: str) -> None:
    """Put the call's cost (``call_cost`` at ``occurred_at``) and the pricing config's digest on
    its usage event: done once per call, by whoever first knows the price."""
    event.cost_usd = call_cost(
        price,
        zone,
        event.occurred_at,
        event.prompt_tokens,
        event.completion_tokens,
        free=event.free,
    )
    event.price_version = version
