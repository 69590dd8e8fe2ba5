"""The call sweeper: a call recorded as started whose worker died is never settled by it. Past
its ``settle_by`` the sweeper settles it at its reserved amount, flagged ``estimated`` and
``swept``, so every call a provider may have billed is in ``usage`` once; and it adds that
amount to the quota counters of the call's reservation (``QuotaStore.charge``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.accounting.observed import Observed
from broker.core.pricing import usd_to_nanos
from broker.state.quota import REDIS_FAILURES, QuotaStore

__all__ = ["SWEEP_EVERY_S", "CallSweeper", "Swept"]

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 5.0
SWEEP_BATCH = 500

# One statement: the due calls are marked settled and their usage rows written together, so a
# crash leaves both or neither. SKIP LOCKED: several accountants sweep without waiting on each
# other, and a call is swept by one of them.
_SWEEP = text(
    """
WITH due AS (
  UPDATE calls SET settled_at = now(), swept = true
  WHERE call_id IN (
    SELECT call_id FROM calls
    WHERE settled_at IS NULL AND settle_by < now()
    ORDER BY settle_by LIMIT :batch FOR UPDATE SKIP LOCKED)
  RETURNING *
)
INSERT INTO usage (call_id, job_id, attempt, provider, model, public_model, prompt_tokens,
  completion_tokens, total_tokens, estimated, swept, free, cost_usd, price_version, key_id,
  task_type, consumer, occurred_at)
SELECT call_id, job_id, attempt, provider, model, public_model, reserved_prompt_tokens,
  reserved_completion_tokens, reserved_prompt_tokens + reserved_completion_tokens, true, true,
  free, reserved_cost_usd, price_version, key_id, task_type, consumer, started_at
FROM due
ON CONFLICT (call_id) DO NOTHING
RETURNING call_id, total_tokens, cost_usd, provider, model, key_id, task_type, prompt_tokens,
  completion_tokens,
  (SELECT reservation_id FROM due WHERE due.call_id = usage.call_id) AS reservation_id
"""
)


@dataclass(frozen=True, slots=True)
class Swept:
    """A call settled at its reservation, whose reservation's counters it must be added to."""

    call_id: str
    reservation_id: str
    tokens: int
    cost_usd: Decimal | None


class CallSweeper:
    """Sweeps due calls every ``SWEEP_EVERY_S``, but only while ``caught_up`` says no accounting
    event waits to be written: after a Postgres outage the settles of calls past their
    ``settle_by`` are still queued, and sweeping first would charge live calls twice. Charges
    Redis refused are kept and tried again at the next sweep (lost only if this process dies)."""

    def __init__(
        self,
        engine: AsyncEngine,
        quota: QuotaStore | None,
        caught_up: Callable[[], Awaitable[bool]],
        observed: Observed | None = None,
    ) -> None:
        self.engine = engine
        self.quota = quota
        self.caught_up = caught_up
        self.observed = observed
        self._uncharged: list[Swept] = []

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                if not await self.caught_up():
                    continue
                await self.sweep()
            except Exception:
                log.warning("the call sweep failed; it runs again", exc_info=True)

    async def sweep(self) -> int:
        """Settle every due call; returns how many."""
        total = 0
        while True:
            async with self.engine.begin() as conn:
                rows = (await conn.execute(_SWEEP, {"batch": SWEEP_BATCH})).all()
            swept = [
                Swept(r.call_id, r.reservation_id, r.total_tokens, r.cost_usd)
                for r in rows
                if r.reservation_id is not None
            ]
            if self.observed is not None:
                for r in rows:
                    call = (r.provider, r.model, r.key_id, r.task_type)
                    self.observed.usage(call, r.prompt_tokens, r.completion_tokens, r.cost_usd)
            if rows:
                log.warning(
                    "%d calls were never settled by their workers: counted at their reservations",
                    len(rows),
                )
            self._uncharged += swept
            total += len(rows)
            if len(rows) < SWEEP_BATCH:
                break
        await self._charge()
        return total

    async def _charge(self) -> None:
        if self.quota is None:
            self._uncharged.clear()
            return
        while self._uncharged:
            call = self._uncharged[0]
            nanos = usd_to_nanos(call.cost_usd) if call.cost_usd is not None else 0
            try:
                await self.quota.charge(
                    call.reservation_id, call.call_id, {"tokens": call.tokens, "usd_nanos": nanos}
                )
            except REDIS_FAILURES:
                log.warning(
                    "Redis is away: %d swept calls wait to be charged", len(self._uncharged)
                )
                return
            self._uncharged.pop(0)
