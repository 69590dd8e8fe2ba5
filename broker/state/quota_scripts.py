"""The quota store's Lua scripts: each runs atomically in Redis, so a reservation charges every
bucket or none, and each due hold is refunded by exactly one caller, whatever the number of
processes.

Unless a caller passes ``now``, the scripts read Redis's own clock, so holds do not depend on
which host looks. One Redis, not Cluster: the reconcile and sweep scripts touch the keys named in
the reservation record.
"""

from __future__ import annotations

from broker.core.names import QUOTA_ALERT_INFIX

__all__ = ["CHARGE", "CROSSED", "EXPIRE", "EXTEND", "REBUILD", "RECONCILE", "RESERVE"]

# Shared: number formatting (tostring would give "1e+15" or 14 digits), the clock, and threshold
# markers (set once per window, expiring with their counter).
_PRELUDE = (
    f"local ALERT_INFIX = '{QUOTA_ALERT_INFIX}'"
    + """
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
      and redis.call('SET', key .. ALERT_INFIX .. pct, '1', 'NX', 'PXAT', int(exp_ms)) then
      table.insert(out, {key, label, pct, used, limit})
    end
  end
end
"""
)

# KEYS: record, holds, epoch, counters...  ARGV: id, now, hold_s, tombstone_s, thresholds,
# buckets.  No epoch: Redis lost the quota state (or never had it), and nothing is charged until
# the counters are rebuilt from the ledger (``broker.state.quota_rebuild``).
# -> {'lost'} | {'replayed', state, hold_until} | {'short', index, current, now}
#  | {'held', hold_until, crossed, epoch}
RESERVE = (
    _PRELUDE
    + """
local epoch = redis.call('GET', KEYS[3])
if not epoch then return {'lost'} end
local state = redis.call('HGET', KEYS[1], 'state')
if state then return {'replayed', state, redis.call('HGET', KEYS[1], 'hold_until')} end
local now = clock(ARGV[2])
local buckets = cjson.decode(ARGV[6])
for i, b in ipairs(buckets) do
  local current = tonumber(redis.call('GET', KEYS[i + 3]) or '0')
  if current + b.amount > b.limit then return {'short', i, int(current), num(now)} end
end
local thresholds = cjson.decode(ARGV[5])
local out = {}
for i, b in ipairs(buckets) do
  local used = redis.call('INCRBY', KEYS[i + 3], int(b.amount))
  redis.call('PEXPIREAT', KEYS[i + 3], int(b.exp_ms))
  cross(out, thresholds, KEYS[i + 3], b.label, used, b.limit, b.exp_ms)
end
local hold_until = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'held', 'buckets', ARGV[6],
  'hold_until', num(hold_until), 'created', num(now))
redis.call('PEXPIREAT', KEYS[1], int((hold_until + tonumber(ARGV[4])) * 1000))
redis.call('ZADD', KEYS[2], hold_until, ARGV[1])
return {'held', num(hold_until), out, epoch}
"""
)

# KEYS: record, holds.  ARGV: id, actual (JSON unit -> int), final state, tombstone_s, now,
# thresholds, calls (JSON list of the call ids the actuals cover: CHARGE passes them over).  A
# unit the actuals do not name keeps its reserved amount. Only live counters move.
# -> {previous state or '', crossed}
RECONCILE = (
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
for _, call in ipairs(cjson.decode(ARGV[7])) do
  redis.call('HSET', KEYS[1], 'charged:' .. call, '1')
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {state, out}
"""
)

# KEYS: record.  ARGV: call id, amounts (JSON unit -> int).  Adds a call made under the
# reservation beyond what it settles (one whose worker died) to its live counters, once per call.
# -> 1 charged, 0 not (unknown reservation, or this call was charged before)
CHARGE = (
    _PRELUDE
    + """
local buckets = redis.call('HGET', KEYS[1], 'buckets')
if not buckets then return 0 end
if redis.call('HSETNX', KEYS[1], 'charged:' .. ARGV[1], '1') == 0 then return 0 end
local amounts = cjson.decode(ARGV[2])
for _, b in ipairs(cjson.decode(buckets)) do
  local extra = amounts[b.unit]
  if extra and extra > 0 and redis.call('EXISTS', b.key) == 1 then
    redis.call('INCRBY', b.key, int(extra))
  end
end
return 1
"""
)

# KEYS: epoch, counters...  ARGV: new epoch, values (JSON list of {value, exp_ms}, one per
# counter).  A counter only ever rises to its ledger value (one that holds more holds live
# reservations the ledger cannot see); the epoch is written if missing.  -> the epoch
REBUILD = (
    _PRELUDE
    + """
for i, c in ipairs(cjson.decode(ARGV[2])) do
  local current = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  if c.value > current then
    redis.call('SET', KEYS[i + 1], int(c.value), 'PXAT', int(c.exp_ms))
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""
)

# KEYS: holds.  ARGV: now, batch size, record key prefix, tombstone_s.
# Each due hold is popped by exactly one caller (the script is atomic). -> {popped, refunded}
EXPIRE = (
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
EXTEND = (
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
CROSSED = (
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
