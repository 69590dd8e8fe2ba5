"""The daily rollup against the real ledger: ``usage_daily``, kept by the trigger on ``usage``,
equals the ledger after the accountant's and the sweeper's own statements (updates and deletes
too); two writers crossing the same groups neither wait nor deadlock; reports by consumer (which
the rollup does not have) equal sums over ``usage``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.accounting.rows import INSERT_CALL, INSERT_USAGE
from broker.accounting.sweeper import CallSweeper
from broker.core.db import make_engine
from broker.core.db_reports import OneKey, Span, Totals, totals_by
from broker.core.names import Names
from tests.test_usage_reports import INSERT, PARIS, _ledger, _rows

COMPARE = """WITH ledger AS (
  SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, {grain}, count(*) AS calls,
    sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
    coalesce(sum(cost_usd), 0) AS cost_usd, count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced
  FROM usage GROUP BY 1, {grain}),
rollup AS (
  SELECT day, {grain}, sum(calls), sum(prompt_tokens), sum(completion_tokens), sum(cost_usd),
    sum(unpriced_calls)
  FROM {table} GROUP BY day, {grain} HAVING sum(calls) <> 0)
SELECT (SELECT count(*) FROM ledger),
  (SELECT count(*) FROM ((TABLE ledger EXCEPT TABLE rollup) UNION ALL
                         (TABLE rollup EXCEPT TABLE ledger)) AS differences)"""
GRAIN = "provider, model, key_id, task_type"


async def _rollup_matches(pg: asyncpg.Connection) -> None:
    groups, differences = await pg.fetchrow(COMPARE.format(table="usage_daily", grain=GRAIN))
    assert groups > 0 and differences == 0


def _usage_row(call_id: str, at: datetime, **fields: Any) -> dict[str, Any]:
    row = {
        "call_id": call_id,
        "job_id": call_id,
        "attempt": 1,
        "provider": "alpha",
        "model": "m",
        "public_model": "m",
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "estimated": False,
        "swept": False,
        "free": False,
        "cost_usd": Decimal("0.001"),
        "price_version": None,
        "key_id": None,
        "task_type": "chat",
        "consumer": "user-9",
        "occurred_at": at,
    }
    return {**row, **fields}


async def _sweep_calls(engine: AsyncEngine, prefix: str, at: datetime) -> list[str]:
    """Calls started and never settled, their settle_by past: the sweeper's to write."""
    ids = [f"{prefix}-lost-{i}" for i in range(3)]
    calls = [
        {
            "call_id": call_id,
            "job_id": call_id,
            "attempt": 1,
            "provider": "beta",
            "model": "m",
            "public_model": "m",
            "key_id": f"{prefix}-k",
            "reservation_id": None,
            "reserved_prompt_tokens": 300,
            "reserved_completion_tokens": 50,
            "reserved_cost_usd": Decimal("0.02"),
            "free": False,
            "price_version": None,
            "task_type": "coding",
            "consumer": None,
            "started_at": at,
            "settle_by": at + timedelta(minutes=5),
        }
        for call_id in ids
    ]
    async with engine.begin() as conn:
        await conn.execute(INSERT_CALL, calls)

    async def caught_up() -> bool:
        return True

    assert await CallSweeper(engine, None, caught_up).sweep() >= len(ids)
    return ids


async def test_the_rollup_follows_the_accountants_and_the_sweepers_writes(
    pg: asyncpg.Connection, names: Names, database_url: str
) -> None:
    prefix = f"{names.namespace}-rollup"
    start = datetime(2015, 1, 30, 22, tzinfo=UTC)
    rows = [
        _usage_row(
            f"{prefix}-{i:03}",
            start + timedelta(hours=5 * i),
            key_id=f"{prefix}-k{i % 3}",
            cost_usd=None if i % 7 == 0 else Decimal(i) / 1000,
            consumer=f"user-{i % 4}",
        )
        for i in range(60)
    ]
    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:  # the accountant's statement, one batch
            await conn.execute(INSERT_USAGE, rows)
        lost = await _sweep_calls(engine, prefix, start)
        await _rollup_matches(pg)
        # The call's own usage arrives late: it replaces the sweeper's estimate (an update).
        late = _usage_row(lost[0], start, provider="beta", key_id=f"{prefix}-k", cost_usd=None)
        async with engine.begin() as conn:
            await conn.execute(INSERT_USAGE, [late])
    finally:
        await engine.dispose()
    row = await pg.fetchrow("SELECT swept, cost_usd FROM usage WHERE call_id = $1", lost[0])
    assert row is not None and not row["swept"] and row["cost_usd"] is None
    await pg.execute(
        "DELETE FROM usage WHERE call_id = ANY($1::text[])", [lost[1], rows[5]["call_id"]]
    )
    await _rollup_matches(pg)


async def test_reports_by_consumer_equal_sums_over_the_ledger(
    pg: asyncpg.Connection, names: Names, database_url: str
) -> None:
    """By consumer (alone, with other dimensions, by day, for one key) over whole days with
    partial days at both ends, and over less than a day: the ledger's sums, group for group."""
    prefix = f"{names.namespace}-consumer"
    keys: list[str | None] = [f"{prefix}-k{i}" for i in range(3)] + [None]
    await pg.executemany(INSERT, _rows(prefix, keys, datetime(2017, 5, 1, tzinfo=UTC), 12, 700))
    long = Span(datetime(2017, 5, 2, 9, 15, tzinfo=UTC), datetime(2017, 5, 10, 17, tzinfo=PARIS))
    short = Span(datetime(2017, 5, 4, 3, tzinfo=UTC), datetime(2017, 5, 4, 21, tzinfo=UTC))
    day = "(occurred_at AT TIME ZONE 'UTC')::date"
    cases: list[tuple[Span, tuple[str, ...], str, OneKey | None]] = [
        (long, ("consumer",), "consumer", None),
        (long, ("key", "consumer", "task_type"), "key_id, consumer, task_type", None),
        (long, ("day", "consumer"), f"{day}, consumer", None),
        (long, ("consumer", "model"), "consumer, model", OneKey(keys[1])),
        (long, ("consumer",), "consumer", OneKey(None)),
        (short, ("provider", "consumer"), "provider, consumer", None),
    ]
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            for span, by, groups, only in cases:
                found = await totals_by(conn, span, by, only=only)
                if only is None:
                    ledger = await _ledger(pg, groups, span.start, span.end, prefix)
                else:  # the key's rows only
                    keyed = await _ledger(pg, f"key_id, {groups}", span.start, span.end, prefix)
                    ledger = {g[1:]: f for g, f in keyed.items() if g[0] == only.key_id}
                assert len(ledger) >= 4, by  # the stretch is this test's: every row is in it
                assert found == {
                    group: Totals(
                        f["calls"],
                        f["prompt_tokens"],
                        f["completion_tokens"],
                        f["cost_usd"],
                        f["unpriced_calls"],
                    )
                    for group, f in ledger.items()
                }, (by, only)
    finally:
        await engine.dispose()


async def test_two_writers_crossing_the_same_groups_neither_wait_nor_deadlock(
    database_url: str, names: Names, pg: asyncpg.Connection
) -> None:
    """Two transactions add to groups X and Y in opposite orders (as two accountants' batches in
    call order do): with one rollup row per group the second statement of each would wait for
    the other's commit, a deadlock."""
    prefix = f"{names.namespace}-cross"
    dsn = database_url.replace("+asyncpg", "")
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    at = datetime(2016, 3, 3, 12, tzinfo=UTC)

    def call(n: int, group: str) -> tuple[Any, ...]:
        key = f"{prefix}-{group}"
        return (f"{prefix}-{n}", "j", "alpha", "m", 10, 1, Decimal("0.5"), key, None, None, at)

    try:
        for conn in (first, second):
            await conn.execute("SET lock_timeout = '3s'")
        async with first.transaction(), second.transaction():
            await asyncio.wait_for(first.execute(INSERT, *call(1, "x")), 5)
            await asyncio.wait_for(second.execute(INSERT, *call(2, "y")), 5)
            await asyncio.wait_for(first.execute(INSERT, *call(3, "y")), 5)
            await asyncio.wait_for(second.execute(INSERT, *call(4, "x")), 5)
    finally:
        await first.close()
        await second.close()
    found = await pg.fetch(
        "SELECT key_id, count(*) AS writers, sum(calls) AS calls, sum(cost_usd) AS cost"
        " FROM usage_daily WHERE key_id LIKE $1 GROUP BY key_id ORDER BY key_id",
        f"{prefix}-%",
    )
    assert [tuple(r) for r in found] == [
        (f"{prefix}-x", 2, 2, Decimal("1.0")),
        (f"{prefix}-y", 2, 2, Decimal("1.0")),
    ]
