"""Admission: which limits and budgets a job touches on a candidate, reserved all at once.

For a (key, candidate) pair the buckets are: the key's RPM/TPM and budgets, its consumer's
budgets, the provider's RPM/TPM, the model's RPM/TPM and, when the call goes to a free tier, the
free tier's limits. The reservation is the estimated prompt tokens plus the output cap, and the
estimated cost (nothing on a free tier). ``QuotaStore`` charges them all or none; the accountant
reconciles the reservation to what the call really used.

A job that sets no output cap gets one here when a token or USD limit applies: at most the
model's (``max_tokens``, else ``DEFAULT_OUTPUT_TOKENS``) and at most what a ``SHARES``-th of
each such limit's remainder pays for, but never below ``MIN_OUTPUT_TOKENS`` while that fits.
It is reserved and sent to the provider (``Route.output_cap``), so the answer cannot cost more
than was held; and a burst of such jobs divides a small budget instead of the first few holding
all of it for answers that use a fraction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction

from broker.core.config import Config, ProviderConfig
from broker.core.limits import KeyConfig
from broker.core.names import Names
from broker.core.pricing import Unit, usd_to_nanos
from broker.core.quota_plan import UNCAPPED, Limit, day_tokens, free_limits, limits_for
from broker.scheduler.candidates import UNKNOWN_STATE
from broker.scheduler.routing import Candidate, ProviderState
from broker.state.quota import REDIS_FAILURES, Bucket, QuotaStore, Reserved, Short

__all__ = ["MIN_OUTPUT_TOKENS", "SHARES", "Admission", "Held"]

MIN_OUTPUT_TOKENS = 16
"""The smallest cap worth a call (a sentence): a job without its own cap is refused, or waits,
only when a reservation this small does not fit."""
SHARES = 16
"""A job without its own cap holds at most 1/SHARES of what a limit has left, so a burst of them
divides a small budget among many (500 at once spend 93-99 % of $0.002; with 1,024 tokens each,
13 %) while a lone job on a fresh budget still gets a sixteenth of it."""
RESIZES = 3
"""How often a reservation is tried again with a smaller cap when another job took what was
read meanwhile (each try may find another limit short)."""


@dataclass(frozen=True, slots=True)
class Held:
    """A reservation made, and the candidate as reserved: its output cap may have been sized."""

    candidate: Candidate
    reserved: Reserved


class Admission:
    """The buckets of a (key, candidate) pair under one config version, and their reservation."""

    def __init__(self, config: Config, store: QuotaStore, names: Names) -> None:
        self.config = config
        self.store = store
        self.names = names

    # --- planning ----------------------------------------------------------------------------

    def _limits(self, key: KeyConfig | None, candidate: Candidate) -> list[Limit]:
        provider = candidate.provider
        free = candidate.free and provider.free_tier is not None
        return limits_for(self.config, key, provider, candidate.model, free=free)

    def buckets(self, key: KeyConfig | None, candidate: Candidate, now: datetime) -> list[Bucket]:
        return self._buckets(self._limits(key, candidate), _amounts(candidate), now)

    def _buckets(
        self, limits: Iterable[Limit], amounts: dict[Unit, int], now: datetime
    ) -> list[Bucket]:
        buckets = []
        for limit in limits:
            w = limit.window(now, self.config.zone)
            buckets.append(
                Bucket(
                    key=limit.key(self.names, w),
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
        """The quota part of a provider's routing state: tokens used today, free tier left;
        unknown (a healthy default) while Redis is away, whose absence admission then meets."""
        try:
            return await self._state(provider, est_tokens, now)
        except REDIS_FAILURES:
            return UNKNOWN_STATE

    async def _state(
        self, provider: ProviderConfig, est_tokens: int, now: datetime
    ) -> ProviderState:
        day = day_tokens(provider)
        used = await self.store.usage(day.key(self.names, day.window(now, self.config.zone)))
        free, resets = False, None
        if provider.free_tier is not None:
            # What a free call would charge: one request and the tokens, no money.
            probe: dict[Unit, int] = {"requests": 1, "tokens": est_tokens, "usd_nanos": 0}
            free = True
            for bucket in self._buckets(free_limits(provider), probe, now):
                if await self.store.usage(bucket.key) + bucket.amount > bucket.limit:
                    free = False
                    # A job larger than the limit never fits: no reset to wait for.
                    fits = bucket.amount <= bucket.limit and resets != float("inf")
                    resets = max(resets or 0.0, bucket.expires_at) if fits else float("inf")
        never = resets == float("inf")
        return ProviderState(
            day_tokens_used=used, free_remaining=free, free_resets_at=None if never else resets
        )

    async def reserve(
        self,
        reservation_id: str,
        key: KeyConfig | None,
        candidate: Candidate,
        now: datetime,
        hold_s: float,
    ) -> Held | Short:
        """Reserve the candidate's buckets; a job without its own cap is sized first, and sized
        down again (at most ``RESIZES`` times) when another job took what was read meanwhile."""
        limits = self._limits(key, candidate)
        if candidate.sizable:
            candidate = await self._sized(candidate, limits, now)
        resizes = 0
        while True:
            buckets = self._buckets(limits, _amounts(candidate), now)
            outcome = await self.store.reserve(reservation_id, buckets, hold_s)
            if isinstance(outcome, Reserved):
                return Held(candidate, outcome)
            smaller = _resized(candidate, outcome) if resizes < RESIZES else None
            if smaller is None:
                return outcome
            candidate, resizes = smaller, resizes + 1

    async def _sized(self, candidate: Candidate, limits: list[Limit], now: datetime) -> Candidate:
        """The candidate with the cap its token and USD limits allow now: a ``SHARES``-th of
        what each has left, within the model's cap, at least ``MIN_OUTPUT_TOKENS``. No such
        limit: unchanged (nothing to overshoot, so no cap is imposed on the answer)."""
        sized = [
            b
            for b in self._buckets(limits, _amounts(candidate), now)
            if b.limit < UNCAPPED and _sizes(candidate, b.unit)
        ]
        if not sized:
            return candidate
        used = await self.store.usages([b.key for b in sized])
        cap = candidate.est_output_tokens
        for bucket, current in zip(sized, used, strict=True):
            share = max(0, bucket.limit - current) // SHARES
            cap = min(cap, _output_within(candidate, bucket.unit, share))
        return candidate.with_output(max(cap, min(MIN_OUTPUT_TOKENS, candidate.est_output_tokens)))


def _amounts(candidate: Candidate) -> dict[Unit, int]:
    """What the candidate's reservation charges, per unit."""
    return {
        "requests": 1,
        "tokens": candidate.est_tokens,
        "usd_nanos": 0 if candidate.free else usd_to_nanos(candidate.est_cost_usd),
    }


def _sizes(candidate: Candidate, unit: Unit) -> bool:
    """Whether a limit in ``unit`` bounds the candidate's output: tokens always, money unless
    the call is free."""
    return unit == "tokens" or (unit == "usd_nanos" and not candidate.free)


def _resized(candidate: Candidate, short: Short) -> Candidate | None:
    """After ``short``: a sized candidate with a ``SHARES``-th of what that limit has left, at
    least ``MIN_OUTPUT_TOKENS``; None when it cannot shrink or even that does not fit."""
    if candidate.output_cap is None or not _sizes(candidate, short.unit):
        return None
    left = max(0, short.limit - short.current)
    floor = min(MIN_OUTPUT_TOKENS, candidate.output_cap)
    if _output_within(candidate, short.unit, left) < floor:
        return None
    cap = max(floor, _output_within(candidate, short.unit, left // SHARES))
    return candidate.with_output(cap) if cap < candidate.output_cap else None


def _output_within(candidate: Candidate, unit: Unit, room: int) -> int:
    """The most output tokens whose reservation in ``unit`` is at most ``room`` (negative: not
    even the prompt fits). Money: exact arithmetic on the price per token (discount applied);
    the reservation is then priced by the same function as the ledger, so it never under-holds,
    and a figure this rounds too high is only refused by the store."""
    if unit == "tokens":
        return room - candidate.est_prompt_tokens
    spec = candidate.provider.models[candidate.model]
    # Prices are USD per million tokens: a call costs (input * prompt + output * tokens)
    # * multiplier * 1,000 nano-dollars.
    per_token = Fraction(spec.output) * Fraction(candidate.multiplier)
    if per_token == 0:
        return candidate.est_output_tokens
    prompt = Fraction(spec.input) * Fraction(candidate.multiplier) * candidate.est_prompt_tokens
    return math.floor((Fraction(room, 1000) - prompt) / per_token)
