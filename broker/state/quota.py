"""All-or-nothing quota reservations in Redis, made before any provider is called.

A job's limits are a list of buckets (one counter per scope, metric and window). ``reserve``
charges every bucket or none, in one Lua script, so any number of scheduler processes can never
overshoot a limit; the accountant later ``reconcile``s the reservation to what the call really
used. A reservation whose holder died is returned by ``expire_holds``; if the job turns out to have
run after all, its late ``reconcile`` still charges what it used.

Redis layout (``ns`` = ``Names.namespace``)::

    ns:quota:<scope>:<scope_id>:<metric>:<window_id>  counter (int); expires at window end + margin
    ns:quota:<...>:<window_id>:alert:<pct>             threshold marker; expires with its counter
    ns:reservation:<id>                                hash: state, buckets (JSON), hold_until, ...
    ns:quota-holds                                     sorted set: reservation id -> hold_until

Reservation states: ``held`` -> ``reconciled`` | ``released`` | ``expired``; an expired one may
still become ``reconciled`` (late charge). Finished reservations stay as tombstones for
``tombstone_s`` so a redelivered job or a second reconcile changes nothing. Clocks: unless a
caller passes ``now``, the scripts read Redis's own clock, so holds do not depend on which host
looks. Money is integer micro-USD so Lua's arithmetic stays exact. One Redis, not Cluster: the
reconcile and sweep scripts touch the keys named in the reservation record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from enum import StrEnum
from typing import Any, Literal, get_args

from redis.asyncio import Redis

from broker.core.names import Names

__all__ = [
    "Bucket",
    "QuotaStore",
    "ReservationState",
    "Reserved",
    "Settled",
    "Short",
    "ThresholdCrossed",
    "Unit",
    "bucket_key",
    "micros_to_usd",
    "usd_to_micros",
]

Unit = Literal["requests", "tokens", "usd_micros"]
UNITS: frozenset[str] = frozenset(get_args(Unit))
_MICROS = Decimal(1_000_000)


def usd_to_micros(usd: Decimal, rounding: str = ROUND_CEILING) -> int:
    """Whole micro-dollars; rounds up by default, so a reservation never under-holds."""
    return int((usd * _MICROS).to_integral_value(rounding=rounding))


def micros_to_usd(micros: int) -> Decimal:
    return Decimal(micros) / _MICROS


def bucket_key(names: Names, scope: str, scope_id: str, metric: str, window_id: str) -> str:
    """The counter of one limit in one window, e.g. ``(names, "key", "team-a", "rpm", w.id)``."""
    return names.redis_key("quota", scope, scope_id, metric, window_id)


class ReservationState(StrEnum):
    HELD = "held"
    RECONCILED = "reconciled"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Bucket:
    """Charge ``amount`` to the counter ``key`` unless it would pass ``limit``.

    ``expires_at`` is the Unix time the window ends; ``label`` names the limit for people
    ("key team-a requests/minute").
    """

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


@dataclass(frozen=True, slots=True)
class Short:
    """Nothing was charged: ``bucket_label`` has ``current`` of ``limit`` used, too much for
    ``amount`` until its window ends in ``retry_after_s``."""

    bucket_label: str
    limit: int
    current: int
    retry_after_s: float
    bucket_key: str
    amount: int

    @property
    def never_fits(self) -> bool:
        """The amount exceeds the limit itself: waiting for the next window will not help."""
        return self.amount > self.limit


@dataclass(frozen=True, slots=True)
class Settled:
    """What ``reconcile`` found (``None``: unknown id, nothing done) and what it crossed."""

    previous: ReservationState | None
    crossed: tuple[ThresholdCrossed, ...] = ()


# Shared Lua: number formatting (tostring would give "1e+15" or 14 digits), the clock, and
# threshold markers.
_PRELUDE = """
local function int(n) return string.format('%d', n) end
local function num(x) return string.format('%.6f', x) end
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function cross(out, thresholds, key, label, used, limit, exp_ms)
  if limit <= 0 then return end
  for _, pct in ipairs(thresholds) do
    if used * 100 >= limit * pct
      and redis.call('SET', key .. ':alert:' .. pct, '1', 'NX', 'PXAT', int(exp_ms)) then
      table.insert(out, {key, label, pct, used, limit})
    end
  end
end
"""

# KEYS: record, holds, counters...  ARGV: id, now, hold_s, tombstone_s, thresholds, buckets.
# -> {'replayed', state, hold_until} | {'short', index, current, now}
#  | {'held', hold_until, crossed}
_RESERVE = (
    _PRELUDE
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state then return {'replayed', state, redis.call('HGET', KEYS[1], 'hold_until')} end
local now = clock(ARGV[2])
local buckets = cjson.decode(ARGV[6])
for i, b in ipairs(buckets) do
  local current = tonumber(redis.call('GET', KEYS[i + 2]) or '0')
  if current + b.amount > b.limit then return {'short', i, int(current), num(now)} end
end
local thresholds = cjson.decode(ARGV[5])
local out = {}
for i, b in ipairs(buckets) do
  local used = redis.call('INCRBY', KEYS[i + 2], int(b.amount))
  redis.call('PEXPIREAT', KEYS[i + 2], int(b.exp_ms))
  cross(out, thresholds, KEYS[i + 2], b.label, used, b.limit, b.exp_ms)
end
local hold_until = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'held', 'buckets', ARGV[6],
  'hold_until', num(hold_until), 'created', num(now))
redis.call('PEXPIREAT', KEYS[1], int((hold_until + tonumber(ARGV[4])) * 1000))
redis.call('ZADD', KEYS[2], hold_until, ARGV[1])
return {'held', num(hold_until), out}
"""
)

# KEYS: record, holds.  ARGV: id, actual (JSON unit -> int), final state, tombstone_s, now,
# thresholds.  A unit the actuals do not name keeps its reserved amount. Only live counters move.
# -> {previous state or '', crossed}
_RECONCILE = (
    _PRELUDE
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'', {}} end
if state ~= 'held' and state ~= 'expired' then return {state, {}} end
local actual = cjson.decode(ARGV[2])
local thresholds = cjson.decode(ARGV[6])
local out = {}
for _, b in ipairs(cjson.decode(redis.call('HGET', KEYS[1], 'buckets'))) do
  local spent = actual[b.unit]
  if spent == nil then spent = b.amount end
  local delta = spent
  if state == 'held' then delta = spent - b.amount end
  if delta ~= 0 and redis.call('EXISTS', b.key) == 1 then
    local used = redis.call('INCRBY', b.key, int(delta))
    if used < 0 then
      redis.call('SET', b.key, '0', 'KEEPTTL')
      used = 0
    end
    if delta > 0 then cross(out, thresholds, b.key, b.label, used, b.limit, b.exp_ms) end
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'actual', ARGV[2],
  'settled', num(clock(ARGV[5])))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {state, out}
"""
)

# KEYS: holds.  ARGV: now, batch size, record key prefix, tombstone_s.
# Each due hold is popped by exactly one caller (the script is atomic). -> {popped, refunded}
_EXPIRE = (
    _PRELUDE
    + """
local now = clock(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', num(now), 'LIMIT', 0, ARGV[2])
local refunded = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local record = ARGV[3] .. id
  if redis.call('HGET', record, 'state') == 'held' then
    for _, b in ipairs(cjson.decode(redis.call('HGET', record, 'buckets'))) do
      if b.amount > 0 and redis.call('EXISTS', b.key) == 1 then
        if redis.call('DECRBY', b.key, int(b.amount)) < 0 then
          redis.call('SET', b.key, '0', 'KEEPTTL')
        end
      end
    end
    redis.call('HSET', record, 'state', 'expired', 'expired_at', num(now))
    redis.call('EXPIRE', record, ARGV[4])
    refunded = refunded + 1
  end
end
return {#ids, refunded}
"""
)

# KEYS: record, holds.  ARGV: id, now, hold_s, tombstone_s.  -> hold_until or false
_EXTEND = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'held' then return false end
local hold_until = clock(ARGV[2]) + tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], 'XX', hold_until, ARGV[1])
redis.call('HSET', KEYS[1], 'hold_until', num(hold_until))
redis.call('PEXPIREAT', KEYS[1], int((hold_until + tonumber(ARGV[4])) * 1000))
return num(hold_until)
"""
)

# KEYS: counters.  ARGV: thresholds, buckets.  -> crossed
_CROSSED = (
    _PRELUDE
    + """
local thresholds = cjson.decode(ARGV[1])
local out = {}
for i, b in ipairs(cjson.decode(ARGV[2])) do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  cross(out, thresholds, KEYS[i], b.label, used, b.limit, b.exp_ms)
end
return out
"""
)


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
        self._holds = names.redis_key("quota-holds")
        self._reserve = redis.register_script(_RESERVE)
        self._reconcile = redis.register_script(_RECONCILE)
        self._expire = redis.register_script(_EXPIRE)
        self._extend = redis.register_script(_EXTEND)
        self._crossed = redis.register_script(_CROSSED)

    def use_thresholds(self, thresholds: Sequence[int]) -> None:
        """Report crossings of these percents of a limit from now on (a config's alerts)."""
        if not all(0 < t <= 100 for t in thresholds):
            raise ValueError("thresholds are percents, 1..100")
        self._thresholds = json.dumps(sorted(thresholds))

    def _record(self, reservation_id: str) -> str:
        return self._names.redis_key("reservation", reservation_id)

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
        reply = await self._reserve(
            keys=[self._record(reservation_id), self._holds, *(b.key for b in buckets)],
            args=[
                reservation_id,
                _clock(now),
                repr(float(hold_s)),
                self._tombstone_s,
                self._thresholds,
                self._encode(buckets),
            ],
        )
        kind = _text(reply[0])
        if kind == "short":
            bucket = buckets[int(reply[1]) - 1]
            return Short(
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
        )

    async def reconcile(
        self, reservation_id: str, actual: Mapping[Unit, int], *, now: float | None = None
    ) -> Settled:
        """Replace the reserved amounts by ``actual`` (a unit not named keeps its reservation).

        After expiry the actuals are charged afresh; a second reconcile, or an unknown id,
        changes nothing. Counters whose window has ended are never recreated.
        """
        return await self._settle(reservation_id, actual, ReservationState.RECONCILED, now)

    async def release(self, reservation_id: str, *, now: float | None = None) -> Settled:
        """Give everything back: the job was rejected or cancelled before any call."""
        zero: dict[Unit, int] = {"requests": 0, "tokens": 0, "usd_micros": 0}
        return await self._settle(reservation_id, zero, ReservationState.RELEASED, now)

    async def _settle(
        self,
        reservation_id: str,
        actual: Mapping[Unit, int],
        final: ReservationState,
        now: float | None,
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
            ],
        )
        previous = _text(reply[0])
        return Settled(ReservationState(previous) if previous else None, _crossings(reply[1]))

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

    async def usage(self, bucket_key: str) -> int:
        """The counter's value now (0 once its window has gone)."""
        value = await self._redis.get(bucket_key)
        return int(value) if value is not None else 0

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
