"""Cost of tokens at configured prices; one function used by the worker and the accountant."""

from __future__ import annotations

from decimal import Decimal

from broker.core.config import ModelSpec

__all__ = ["cost_usd"]

_PER_MILLION = Decimal(1_000_000)
_QUANTUM = Decimal("0.000000001")  # numeric(18, 9) in Postgres


def cost_usd(
    price: ModelSpec, prompt_tokens: int, completion_tokens: int, multiplier: Decimal = Decimal(1)
) -> Decimal:
    """List price times the tokens, times the discount ``multiplier`` in force (1: none)."""
    raw = (price.input * prompt_tokens + price.output * completion_tokens) / _PER_MILLION
    return (raw * multiplier).quantize(_QUANTUM)
