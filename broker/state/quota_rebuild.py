"""Quota counters rebuilt from the ledger when Redis has lost them (it keeps nothing on disk
here): without this, a restarted Redis would let a budget already spent be spent again.

Redis holds a quota epoch (``Names.quota_epoch``) only while its counters are whole; a reserve
that finds none is refused (``QuotaStateLost``) until a rebuild has run. The rebuild reads every
live window of every limit the config sets (``broker.core.quota_plan``) from Postgres: settled
calls' usage (``usage``) plus the calls still in flight at their reserved amounts (``calls``),
and requests as the reservations those calls were made under. It raises each counter to that
value (never lowers one: a counter above the ledger holds reservations the ledger cannot see)
and writes a new epoch, all in one script. Several schedulers may rebuild at once: each writes
the same values. Reservations held for jobs still queued when Redis was lost are not in the
ledger; those jobs are charged when they settle only if their reservation still exists, so they
are the rebuild's blind spot (docs/architecture.md, §4).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.names import Names
from broker.core.pricing import usd_to_nanos
from broker.core.quota_plan import Limit, all_limits
from broker.state import quota_scripts

__all__ = ["QuotaRebuilder", "Rebuilt"]

log = logging.getLogger(__name__)

# Per group of calls since a window's start: settled usage, unsettled calls at their
# reservation, and the reservations (requests) calls were made under.
_SINCE = text(
    """
SELECT key_id, provider, model, free,
  sum(tokens) AS tokens, sum(usd) AS usd, sum(requests) AS requests
FROM (
  SELECT key_id, provider, model, free, total_tokens AS tokens, cost_usd AS usd, 0 AS requests
  FROM usage WHERE occurred_at >= :start
  UNION ALL
  SELECT key_id, provider, model, free,
    CASE WHEN settled_at IS NULL
      THEN reserved_prompt_tokens + reserved_completion_tokens ELSE 0 END,
    CASE WHEN settled_at IS NULL THEN reserved_cost_usd ELSE 0 END,
    0
  FROM calls WHERE started_at >= :start
  UNION ALL
  SELECT key_id, provider, model, free, 0, 0,
    count(DISTINCT coalesce(reservation_id, call_id))
  FROM calls WHERE started_at >= :start GROUP BY key_id, provider, model, free
) AS spent
GROUP BY key_id, provider, model, free
"""
)


@dataclass(frozen=True, slots=True)
class _Spent:
    key_id: str | None
    provider: str
    model: str
    free: bool
    tokens: int
    usd: Decimal
    requests: int


@dataclass(frozen=True, slots=True)
class Rebuilt:
    epoch: str
    counters: int
    """How many counters the ledger gave a value above zero."""


class QuotaRebuilder:
    """Rebuilds on demand (``ensure``, once at a time per process) under the config in use."""

    def __init__(
        self, engine: AsyncEngine, redis: Redis, names: Names, config: Config, margin_s: float = 60
    ) -> None:
        self.engine = engine
        self.names = names
        self.config = config
        self.margin_s = margin_s
        self._script = redis.register_script(quota_scripts.REBUILD)
        self._running: asyncio.Task[Rebuilt] | None = None

    async def ensure(self) -> Rebuilt:
        """Rebuild, or wait for the rebuild this process already runs."""
        if self._running is None:
            self._running = asyncio.create_task(self.rebuild())
            self._running.add_done_callback(lambda _: setattr(self, "_running", None))
        return await asyncio.shield(self._running)

    async def rebuild(self, now: datetime | None = None) -> Rebuilt:
        now = now or utcnow()
        limits = all_limits(self.config)
        windows = {id(limit): limit.window(now, self.config.zone) for limit in limits}
        starts = sorted({w.start for w in windows.values()})
        spent: dict[datetime, list[_Spent]] = {}
        async with self.engine.connect() as conn:
            for start in starts:
                rows = (await conn.execute(_SINCE, {"start": start})).all()
                spent[start] = [_spent(row) for row in rows]
        keys, values = [], []
        for limit in limits:
            w = windows[id(limit)]
            value = _fold(limit, spent[w.start], self.config)
            if value > 0:
                keys.append(limit.key(self.names, w))
                values.append(
                    {"value": value, "exp_ms": int((w.expires_at + self.margin_s) * 1000)}
                )
        epoch = await self._script(
            keys=[self.names.quota_epoch, *keys],
            args=[secrets.token_hex(8), json.dumps(values)],
        )
        rebuilt = Rebuilt(epoch.decode() if isinstance(epoch, bytes) else str(epoch), len(keys))
        log.warning(
            "quota counters rebuilt from the ledger: %d counters, epoch %s",
            rebuilt.counters,
            rebuilt.epoch,
        )
        return rebuilt


def _spent(row: Any) -> _Spent:
    return _Spent(
        row.key_id,
        row.provider,
        row.model,
        bool(row.free),
        int(row.tokens or 0),
        Decimal(row.usd or 0),
        int(row.requests or 0),
    )


def _fold(limit: Limit, rows: list[_Spent], config: Config) -> int:
    """What the ledger says ``limit``'s counter holds, from the calls since its window began."""
    matched = [row for row in rows if _counts_toward(limit, row, config)]
    if limit.unit == "requests":
        return sum(row.requests for row in matched)
    if limit.unit == "tokens":
        return sum(row.tokens for row in matched)
    return usd_to_nanos(sum((row.usd for row in matched), Decimal(0)))


def _counts_toward(limit: Limit, row: _Spent, config: Config) -> bool:
    scope, scope_id = limit.scope, limit.scope_id
    if scope == "key":
        return row.key_id == scope_id
    if scope == "consumer":
        key = config.key(row.key_id) if row.key_id else None
        return key is not None and key.consumer == scope_id
    if scope == "provider":
        return row.provider == scope_id
    if scope == "model":
        return f"{row.provider}/{row.model}" == scope_id
    if scope == "free":
        return row.provider == scope_id and row.free
    raise ValueError(f"unknown quota scope {scope!r}")
