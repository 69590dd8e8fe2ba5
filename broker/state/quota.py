"""All-or-nothing quota reservations in Redis, made before any provider is called.

A job's limits are a list of buckets (one counter per scope, metric and window). ``reserve``
charges every bucket or none, in one Lua script (``broker.state.quota_scripts``), so any number of
scheduler processes can never overshoot a limit; the accountant later ``reconcile``s the
reservation to what the call really used. A reservation whose holder died is returned by
``expire_holds``; if the job turns out to have run after all, its late ``reconcile`` still charges
what it used. Finished reservations stay as tombstones for ``tombstone_s`` so a redelivered job or
a second reconcile changes nothing. Keys: ``Names.quota_bucket``, ``reservation``, ``quota_holds``
and ``quota_epoch``; money in nano-dollars (``broker.core.pricing.Unit``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, get_args

import redis.exceptions
from redis.asyncio import Redis

from broker.core.names import Names
from broker.core.pricing import Unit, nanos_to_usd
from broker.state import quota_scripts

__all__ = [
    "REDIS_FAILURES",
    "REDIS_REFUSES_US",
    "Bucket",
    "QuotaStateLost",
    "QuotaStore",
    "ReservationState",
    "Reserved",
    "Settled",
    "Short",
    "ThresholdCrossed",
]


class QuotaStateLost(Exception):
    """Redis has no quota epoch: it lost its counters (it keeps nothing on disk here) or never
    had them, and they could not be rebuilt now. Nothing is charged until they are."""


REDIS_FAILURES: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    QuotaStateLost,
)
"""Redis away (refused, dropped, timed out, loading) or without its quota state: what may wait.
Not ``REDIS_REFUSES_US``: wrong credentials are a configuration to fix, not an outage."""
REDIS_REFUSES_US: tuple[type[BaseException], ...] = (
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthorizationError,
)

UNITS: frozenset[str] = frozenset(get_args(Unit))


@dataclass(frozen=True, slots=True)
class Bucket:
    """Charge ``amount`` to the counter ``key`` unless it would pass ``limit``; ``expires_at``
    is the Unix time its window ends, ``label`` names the limit for people."""

    key: str
    unit: Unit
    amount: int
    limit: int
    expires_at: float
    label: str

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown quota unit {self.unit!r}")
        if self.amount < 0 or self.limit < 0:
            raise ValueError(f"{self.label}: amount and limit must not be negative")


@dataclass(frozen=True, slots=True)
class ThresholdCrossed:
    """A bucket's usage reached ``threshold`` percent of its limit (reported once per window)."""

    label: str
    threshold: int
    used: int
    limit: int
    key: str


@dataclass(frozen=True, slots=True)
class Reserved:
    """The reservation holds its amounts. ``replayed``: it existed already and nothing was charged
    now (``state`` then says what became of it)."""

    reservation_id: str
    state: ReservationState
    hold_until: float
    replayed: bool = False
    crossed: tuple[ThresholdCrossed, ...] = ()
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Short:
    """Nothing was charged: ``bucket_label`` has ``current`` of ``limit`` used, too much for
    ``amount`` until its window ends in ``retry_after_s``."""

    unit: Unit
    bucket_label: str
    limit: int
    current: int
    retry_after_s: float
    bucket_key: str
    amount: int

    def describe(self) -> str:
        """``<label> has <current> of <limit> used``, money in dollars."""
        if self.unit == "usd_nanos":
            used, limit = f"${nanos_to_usd(self.current):f}", f"${nanos_to_usd(self.limit):f}"
        else:
            used, limit = str(self.current), str(self.limit)
        return f"{self.bucket_label} has {used} of {limit} used"

    @property
    def never_fits(self) -> bool:
        """The amount exceeds the limit itself: waiting for the next window will not help."""
        return self.amount > self.limit


@dataclass(frozen=True, slots=True)
class Settled:
    """What ``reconcile`` found (``None``: unknown id, nothing done) and what it crossed."""

    previous: ReservationState | None
    crossed: tuple[ThresholdCrossed, ...] = ()


class ReservationState(StrEnum):
    """``held``, then ``reconciled``, ``released`` or ``expired``; an expired reservation may
    still become ``reconciled`` (a late charge for a job that ran after all)."""

    HELD = "held"
    RECONCILED = "reconciled"
    RELEASED = "released"
    EXPIRED = "expired"


class QuotaStore:
    """Reservations against quota buckets in one Redis, safe across any number of processes."""

    def __init__(
        self,
        redis: Redis,
        names: Names,
        *,
        margin_s: float = 60.0,
        tombstone_s: int = 86_400,
        thresholds: Sequence[int] = (80, 95),
        sweep_batch: int = 100,
        on_lost: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        if tombstone_s < 1 or sweep_batch < 1:
            raise ValueError("tombstone_s and sweep_batch must be positive")
        self._redis = redis
        self._names = names
        self._margin_s = margin_s
        self._tombstone_s = tombstone_s
        self._thresholds = ""
        self.use_thresholds(thresholds)
        self._sweep_batch = sweep_batch
        # Called when Redis has no quota epoch (the counters are lost): it rebuilds them.
        self.on_lost = on_lost
        self._holds = names.quota_holds
        self._reserve = redis.register_script(quota_scripts.RESERVE)
        self._reconcile = redis.register_script(quota_scripts.RECONCILE)
        self._expire = redis.register_script(quota_scripts.EXPIRE)
        self._extend = redis.register_script(quota_scripts.EXTEND)
        self._crossed = redis.register_script(quota_scripts.CROSSED)
        self._charge = redis.register_script(quota_scripts.CHARGE)

    def use_thresholds(self, thresholds: Sequence[int]) -> None:
        """Report crossings of these percents of a limit from now on (a config's alerts)."""
        if not all(0 < t <= 100 for t in thresholds):
            raise ValueError("thresholds are percents, 1..100")
        self._thresholds = json.dumps(sorted(thresholds))

    def _record(self, reservation_id: str) -> str:
        return self._names.reservation(reservation_id)

    def _encode(self, buckets: Sequence[Bucket]) -> str:
        keys = [b.key for b in buckets]
        if len(set(keys)) != len(keys):
            raise ValueError("a reservation names the same bucket twice")
        return json.dumps(
            [
                {
                    "key": b.key,
                    "unit": b.unit,
                    "amount": b.amount,
                    "limit": b.limit,
                    "label": b.label,
                    "exp_ms": int((b.expires_at + self._margin_s) * 1000),
                }
                for b in buckets
            ]
        )

    async def reserve(
        self,
        reservation_id: str,
        buckets: Sequence[Bucket],
        hold_s: float,
        *,
        now: float | None = None,
    ) -> Reserved | Short:
        """Charge every bucket, or none and say which one is short. Idempotent per id."""
        if hold_s <= 0:
            raise ValueError("hold_s must be positive")
        keys = [
            self._record(reservation_id),
            self._holds,
            self._names.quota_epoch,
            *(b.key for b in buckets),
        ]
        args: list[str | int] = [
            reservation_id,
            _clock(now),
            repr(float(hold_s)),
            self._tombstone_s,
            self._thresholds,
            self._encode(buckets),
        ]
        reply = await self._reserve(keys=keys, args=args)
        if _text(reply[0]) == "lost" and self.on_lost is not None:
            try:
                await self.on_lost()
            except Exception as exc:  # the ledger is away too: the job waits as for Redis
                raise QuotaStateLost(f"the counters could not be rebuilt ({exc!r})") from exc
            reply = await self._reserve(keys=keys, args=args)
        kind = _text(reply[0])
        if kind == "lost":
            raise QuotaStateLost("Redis holds no quota epoch: the counters must be rebuilt")
        if kind == "short":
            bucket = buckets[int(reply[1]) - 1]
            return Short(
                unit=bucket.unit,
                bucket_label=bucket.label,
                limit=bucket.limit,
                current=int(reply[2]),
                retry_after_s=max(0.0, bucket.expires_at - float(_text(reply[3]))),
                bucket_key=bucket.key,
                amount=bucket.amount,
            )
        if kind == "replayed":
            return Reserved(
                reservation_id,
                ReservationState(_text(reply[1])),
                float(_text(reply[2])),
                replayed=True,
            )
        return Reserved(
            reservation_id,
            ReservationState.HELD,
            float(_text(reply[1])),
            crossed=_crossings(reply[2]),
            epoch=_text(reply[3]),
        )

    async def reconcile(
        self,
        reservation_id: str,
        actual: Mapping[Unit, int],
        *,
        calls: Sequence[str] = (),
        now: float | None = None,
    ) -> Settled:
        """Replace the reserved amounts by ``actual``, the spend of ``calls`` (a unit not named
        keeps its reservation); after expiry they are charged afresh, and a second reconcile
        changes nothing (a twin's other calls are for ``charge``)."""
        return await self._settle(reservation_id, actual, ReservationState.RECONCILED, now, calls)

    async def release(self, reservation_id: str, *, now: float | None = None) -> Settled:
        """Give everything back: the job was rejected or cancelled before any call."""
        zero: dict[Unit, int] = {"requests": 0, "tokens": 0, "usd_nanos": 0}
        return await self._settle(reservation_id, zero, ReservationState.RELEASED, now, ())

    async def _settle(
        self,
        reservation_id: str,
        actual: Mapping[Unit, int],
        final: ReservationState,
        now: float | None,
        calls: Sequence[str],
    ) -> Settled:
        for unit, amount in actual.items():
            if unit not in UNITS or amount < 0:
                raise ValueError(f"bad actual usage {unit}={amount}")
        reply = await self._reconcile(
            keys=[self._record(reservation_id), self._holds],
            args=[
                reservation_id,
                json.dumps(dict(actual)),
                final.value,
                self._tombstone_s,
                _clock(now),
                self._thresholds,
                json.dumps(list(calls)),
            ],
        )
        previous = _text(reply[0])
        return Settled(ReservationState(previous) if previous else None, _crossings(reply[1]))

    async def charge(self, reservation_id: str, call_id: str, amounts: Mapping[Unit, int]) -> bool:
        """Add a call its reservation's settlement does not cover (a swept or a twin's call) to
        the live counters, once per call; False: unknown reservation, or charged already."""
        for unit, amount in amounts.items():
            if unit not in UNITS or amount < 0:
                raise ValueError(f"bad charge {unit}={amount}")
        reply = await self._charge(
            keys=[self._record(reservation_id)], args=[call_id, json.dumps(dict(amounts))]
        )
        return bool(reply)

    async def charge_buckets(self, buckets: Sequence[Bucket]) -> None:
        """Add each bucket's amount to its counter, no limit checked (a job run unmetered)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for b in buckets:
                pipe.incrby(b.key, b.amount)
                pipe.pexpireat(b.key, int((b.expires_at + self._margin_s) * 1000))
            await pipe.execute()

    async def extend(
        self, reservation_id: str, hold_s: float, *, now: float | None = None
    ) -> float | None:
        """Keep a held reservation from expiring for ``hold_s`` more; None if no longer held."""
        if hold_s <= 0:
            raise ValueError("hold_s must be positive")
        reply = await self._extend(
            keys=[self._record(reservation_id), self._holds],
            args=[reservation_id, _clock(now), repr(float(hold_s)), self._tombstone_s],
        )
        return float(_text(reply)) if reply else None

    async def expire_holds(self, now: float | None = None) -> int:
        """Refund every reservation whose hold has passed; returns how many were refunded."""
        refunded = 0
        while True:
            popped, count = await self._expire(
                keys=[self._holds],
                args=[_clock(now), self._sweep_batch, self._record(""), self._tombstone_s],
            )
            refunded += int(count)
            if int(popped) < self._sweep_batch:
                return refunded

    async def crossed(self, buckets: Sequence[Bucket]) -> tuple[ThresholdCrossed, ...]:
        """Thresholds the buckets' current usage has reached that nobody has reported yet."""
        reply = await self._crossed(
            keys=[b.key for b in buckets], args=[self._thresholds, self._encode(buckets)]
        )
        return _crossings(reply)

    async def usages(self, bucket_keys: Sequence[str]) -> list[int]:
        """Several counters' values now, in one round trip."""
        values = await self._redis.mget(bucket_keys)
        return [int(v) if v is not None else 0 for v in values]

    async def epoch(self) -> str | None:
        """The quota epoch: a new one each time the counters are rebuilt; None: lost."""
        value = await self._redis.get(self._names.quota_epoch)
        return _text(value) if value is not None else None

    async def usage(self, bucket_key: str) -> int:
        """The counter's value now (0 once its window has gone)."""
        return (await self.usages([bucket_key]))[0]

    async def state(self, reservation_id: str) -> ReservationState | None:
        """What became of a reservation; None if unknown (or its tombstone has expired)."""
        value = await self._redis.hget(self._record(reservation_id), "state")
        return ReservationState(_text(value)) if value is not None else None


def _clock(now: float | None) -> str:
    return "" if now is None else repr(float(now))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _crossings(rows: Any) -> tuple[ThresholdCrossed, ...]:
    return tuple(
        ThresholdCrossed(
            label=_text(label), threshold=int(pct), used=int(used), limit=int(limit), key=_text(key)
        )
        for key, label, pct, used, limit in rows
    )
