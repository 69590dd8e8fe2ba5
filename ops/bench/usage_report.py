"""The ``usage_report`` scenario: a month's cost report by key over 2,000,000 generated usage rows
(60 days, 200 keys), through the daily rollup, beside the same report read from ``usage``
alone, in the same run; a month by consumer (read from ``usage``: no rollup has consumers);
and what the rollup trigger adds to the accountant's insert.

    python ops/bench/usage_report.py [--rows 2000000] [--runs 5] [--trigger-rounds 20] [--smoke]

A database of its own, migrated, then:

- **generate**: ``--rows`` rows in one ``INSERT ... SELECT generate_series`` per 250,000, spread
  evenly over the 60 days from 2026-09-01 (UTC). Each key has a home provider, model and task
  type and strays from them now and then; a third of the calls name no consumer, the rest one
  of 101 end users per key (20,200 in all); one call in 97 is unpriced. The trigger is off
  while they go in, and ``usage_daily`` is filled in one pass afterwards, split over 3 writers
  as if three accountant connections had written it (what the trigger gives, faster);
- **report**: ``--runs`` times each, alternating, October 1st (Paris) to October 31st 15:00 UTC
  (partial days at both ends) beside the 30.7 days before it, by key: through the rollup
  (``build_report``: both periods, from the whole days' rollup rows plus the edges' ledger
  rows) and directly over ``usage`` (the same two queries with ``rollup=False``). Both give the
  same figures (checked). By consumer, the report as ``build_report`` runs it, which reads
  ``usage`` for the whole span (``usage_daily`` has no consumer), timed alone;
- **trigger**: the accountant's own statement (``INSERT_USAGE``, 500 rows, executemany) with
  the trigger and without, alternating, on the full table.

From ``run.py``: ``usage_report.scenario(bench)``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import Run

from broker.accounting.rows import INSERT_USAGE
from broker.core.config import parse_config
from broker.core.db import make_engine
from broker.core.db_reports import totals_by
from broker.core.migrate import upgrade
from broker.core.settings import Settings
from broker.core.usage_report import SNAPSHOT, ReportQuery, build_report, report_query

if TYPE_CHECKING:
    from run import Bench
    from sqlalchemy.ext.asyncio import AsyncEngine

START = datetime(2026, 9, 1, tzinfo=UTC)
DAYS = 60
KEYS = 200
CHUNK = 250_000
WRITERS = 3
TRIGGER_BATCH = 500
CONFIG = parse_config(
    "timezone: Europe/Paris\n"
    "providers: [{id: openai, type: openai, base_url: 'http://127.0.0.1:9/v1',"
    " models: {small: {input: 1, output: 1}}}]\n"
)

GENERATE = """
INSERT INTO usage (call_id, job_id, attempt, provider, model, public_model, prompt_tokens,
  completion_tokens, total_tokens, cost_usd, key_id, task_type, consumer, occurred_at)
SELECT 'gen-' || g, 'gen-' || g, 1,
  (ARRAY['openai', 'anthropic', 'gemini'])[1 + (k + (g % 7 = 0)::int) % 3],
  (ARRAY['small', 'large'])[1 + (k / 3 + (g % 5 = 0)::int) % 2], 'm', pt, ct, pt + ct,
  CASE WHEN g % 97 = 0 THEN NULL ELSE round((pt * 0.15 + ct * 0.6) / 1e6, 9) END,
  'key-' || lpad(k::text, 3, '0'),
  CASE WHEN k % 5 = 0 THEN NULL
    ELSE (ARRAY['chat', 'coding', 'summarize', 'extract'])[1 + (k + (g % 11 = 0)::int) % 4] END,
  CASE WHEN g % 3 = 0 THEN NULL ELSE 'user-' || k || '-' || (g % 101) END,
  $3::timestamptz + (g::float8 / $4) * interval '{days} days'
FROM (SELECT g, g % {keys} AS k, 50 + (g * 7919) % 3000 AS pt, 10 + (g * 104729) % 800 AS ct
      FROM generate_series($1::bigint, $2::bigint) g) AS s
"""

FILL = """
INSERT INTO {table} (day, {grain}, writer, calls, prompt_tokens, completion_tokens, cost_usd,
  unpriced_calls)
SELECT (occurred_at AT TIME ZONE 'UTC')::date, {grain}, id % {writers}, count(*),
  sum(prompt_tokens), sum(completion_tokens), coalesce(sum(cost_usd), 0),
  count(*) FILTER (WHERE cost_usd IS NULL)
FROM usage GROUP BY 1, {grain}, id % {writers}
"""
GRAIN = "provider, model, key_id, task_type"


async def generate(dsn: str, rows: int) -> dict[str, Any]:
    """The rows, then the rollup; returns how long each took and how many rows each holds."""
    conn = await asyncpg.connect(dsn)
    try:
        began = time.perf_counter()
        await conn.execute("ALTER TABLE usage DISABLE TRIGGER usage_rollup")
        for low in range(0, rows, CHUNK):
            high = min(low + CHUNK, rows) - 1
            await conn.execute(GENERATE.format(days=DAYS, keys=KEYS), low, high, START, rows)
        await conn.execute("ALTER TABLE usage ENABLE TRIGGER usage_rollup")
        generated = time.perf_counter() - began
        began = time.perf_counter()
        await conn.execute(FILL.format(table="usage_daily", grain=GRAIN, writers=WRITERS))
        await conn.execute("VACUUM ANALYZE usage")
        await conn.execute("VACUUM ANALYZE usage_daily")
        filled = time.perf_counter() - began
        counts = {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("usage", "usage_daily")
        }
    finally:
        await conn.close()
    return {"generate_s": round(generated, 1), "rollup_s": round(filled, 1), "rows": counts}


def month(by: str) -> ReportQuery:
    return report_query(
        [by], None, "2026-10-01", "2026-10-31T15:00:00+00:00", ZoneInfo("Europe/Paris"), START
    )


async def _timed_report(engine: AsyncEngine, query: ReportQuery, rollup: bool) -> tuple[float, Any]:
    """One report's time in ms, and its figures (both periods)."""
    async with engine.connect() as conn:
        await conn.execution_options(**SNAPSHOT)
        began = time.perf_counter()
        if rollup:
            report = await build_report(conn, query, CONFIG)
            figures = {r.group: (r.current, r.previous) for r in report.rows}
        else:
            now = await totals_by(conn, query.current, query.by, rollup=False)
            before = await totals_by(conn, query.previous, query.by, rollup=False)
            figures = {g: (now.get(g), before.get(g)) for g in now.keys() | before.keys()}
        elapsed = (time.perf_counter() - began) * 1000
    return elapsed, figures


async def direct_report(engine: AsyncEngine, by: str, runs: int, rows: int) -> Run:
    """A report that reads ``usage`` for its whole span whatever ``rollup`` says (by consumer):
    ``build_report`` as the CLI and the gateway run it, checked against ``rollup=False``."""
    query = month(by)
    run = Run(f"usage report: a month by {by}, read from usage (no rollup)")
    for i in range(runs + 1):  # the first is a warm-up
        elapsed, figures = await _timed_report(engine, query, True)
        if i:
            run.jobs += 1
            run.seconds += elapsed / 1000
            run.latencies_ms.append(elapsed)
    _, direct = await _timed_report(engine, query, False)
    same = _normalised(figures) == _normalised(direct)
    run.extra.update(
        median_ms=round(statistics.median(run.latencies_ms), 1),
        groups=len(figures),
        same_figures=same,
        usage_rows=rows,
    )
    if not same:
        run.errors = 1
    return run


def _normalised(figures: dict[Any, Any]) -> dict[Any, Any]:
    """Figures with a group missing from one period as zeros, as the report has them."""
    from broker.core.db_reports import Totals

    return {g: tuple(t or Totals() for t in pair) for g, pair in figures.items()}


async def reports(engine: AsyncEngine, by: str, runs: int, rows: int) -> list[Run]:
    query = month(by)
    sides = {True: Run(f"usage report: a month by {by}, rollup"), False: Run("")}
    sides[False].name = f"usage report: a month by {by}, directly over usage"
    answers = {}
    for i in range(runs + 1):  # the first of each is a warm-up
        for rollup in (True, False) if i % 2 else (False, True):
            elapsed, answers[rollup] = await _timed_report(engine, query, rollup)
            if i:
                sides[rollup].jobs += 1
                sides[rollup].seconds += elapsed / 1000
                sides[rollup].latencies_ms.append(elapsed)
    same = _normalised(answers[True]) == _normalised(answers[False])
    medians = {side: statistics.median(run.latencies_ms) for side, run in sides.items()}
    sides[True].extra.update(
        median_ms=round(medians[True], 1),
        vs_direct=round(medians[False] / medians[True], 1),
        groups=len(answers[True]),
        same_figures=same,
        usage_rows=rows,
    )
    sides[False].extra.update(median_ms=round(medians[False], 1))
    if not same:
        sides[True].errors = 1
    return [sides[True], sides[False]]


def _batch(n: int) -> list[dict[str, Any]]:
    at = START + timedelta(days=DAYS - 1)
    return sorted(
        (
            {
                "call_id": str(uuid.uuid4()),
                "job_id": f"bench-{i}",
                "attempt": 1,
                "provider": "openai",
                "model": "small",
                "public_model": "m",
                "prompt_tokens": 400,
                "completion_tokens": 80,
                "total_tokens": 480,
                "estimated": False,
                "swept": False,
                "free": False,
                "cost_usd": Decimal("0.000108"),
                "price_version": "v1",
                "key_id": f"key-{i % KEYS:03}",
                "task_type": "chat",
                "consumer": f"user-{i % KEYS}-{i % 101}",
                "occurred_at": at + timedelta(seconds=i),
            }
            for i in range(n)
        ),
        key=lambda row: str(row["call_id"]),
    )


async def trigger_cost(engine: AsyncEngine, rounds: int) -> list[Run]:
    """The accountant's 500-row insert with the rollup trigger and without, alternating."""
    sides = {True: Run("accountant insert of 500 rows: with the rollup trigger"), False: Run("")}
    sides[False].name = "accountant insert of 500 rows: without it"
    for i in range(rounds + 1):
        for on in (True, False) if i % 2 else (False, True):
            async with engine.begin() as conn:
                action = "ENABLE" if on else "DISABLE"
                await conn.exec_driver_sql(f"ALTER TABLE usage {action} TRIGGER usage_rollup")
            rows = _batch(TRIGGER_BATCH)
            began = time.perf_counter()
            async with engine.begin() as conn:
                await conn.execute(INSERT_USAGE, rows)
            elapsed = time.perf_counter() - began
            if i:
                sides[on].jobs += TRIGGER_BATCH
                sides[on].seconds += elapsed
                sides[on].latencies_ms.append(elapsed * 1000)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE usage ENABLE TRIGGER usage_rollup")
    medians = {on: statistics.median(run.latencies_ms) for on, run in sides.items()}
    added_us = (medians[True] - medians[False]) * 1000 / TRIGGER_BATCH
    sides[True].extra.update(median_ms=round(medians[True], 1), added_us_per_row=round(added_us, 1))
    sides[False].extra.update(median_ms=round(medians[False], 1))
    return [sides[True], sides[False]]


async def measure(database_url: str, rows: int, runs: int, trigger_rounds: int) -> list[Run]:
    made = await generate(database_url.replace("+asyncpg", ""), rows)
    print(f"   generated: {made}", flush=True)
    engine = make_engine(database_url)
    try:
        found = await reports(engine, "key", runs, rows)
        found.append(await direct_report(engine, "consumer", runs, rows))
        found += await trigger_cost(engine, trigger_rounds)
    finally:
        await engine.dispose()
    for run in found:
        run.extra.update(made if run.name.endswith(", rollup") else {})
    return found


async def standalone(
    rows: int, runs: int, trigger_rounds: int, admin_dsn: str, base: str
) -> list[Run]:
    """A fresh database of its own, dropped at the end."""
    name = f"switchyard_bench_usage_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    database_url = f"{base}/{name}"
    try:
        await asyncio.to_thread(upgrade, database_url)
        return await measure(database_url, rows, runs, trigger_rounds)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def scenario(bench: Bench) -> list[Run]:
    s = bench.sizes
    base = bench.database_url.rsplit("/", 1)[0]
    return await standalone(
        s.usage_rows, s.usage_runs, s.usage_trigger_rounds, bench.admin_dsn, base
    )


def append_lines(results: dict[str, Any], out: Path) -> None:
    """bench.md's lines of this scenario: medians and sizes, which its table's notes leave out."""
    rows = [
        r for r in results["runs"] if r["name"].startswith(("usage report", "accountant insert"))
    ]
    if not rows:
        return
    lines = ["", "### usage_report: medians", ""]
    lines += [f"- {r['name']}: {r['extra']}" for r in rows]
    with (out / "bench.md").open("a") as md:
        md.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trigger-rounds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="20,000 rows: does it work")
    args = parser.parse_args()
    rows, runs, rounds = (
        (20_000, 2, 3) if args.smoke else (args.rows, args.runs, args.trigger_rounds)
    )
    settings = Settings()
    admin_dsn = settings.database_url.replace("+asyncpg", "")
    base = settings.database_url.rsplit("/", 1)[0]
    found = asyncio.run(standalone(rows, runs, rounds, admin_dsn, base))
    print("| scenario | runs | median ms | notes |")
    print("| --- | --- | --- | --- |")
    for run in found:
        print(f"| {run.name} | {len(run.latencies_ms)} | {run.percentile(50):.1f} | {run.extra} |")
    if any(run.errors or not run.jobs for run in found):
        sys.exit(1)


if __name__ == "__main__":
    main()
