"""Read-backs from Postgres for operators and the demo: usage and cost per provider of a batch,
and the cost reports of ``switchyard usage`` (built by ``broker.core.usage_report``, which the
gateway shares)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.config import Config
from broker.core.db import jobs, usage
from broker.core.usage_report import SNAPSHOT, ReportQuery, UsageReport, build_report, daily_costs

__all__ = ["ProviderUsage", "ReportWithDays", "fetch_report", "usage_by_provider", "wait_for_jobs"]


@dataclass(frozen=True, slots=True)
class ProviderUsage:
    provider: str
    model: str
    jobs: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal


async def wait_for_jobs(engine: AsyncEngine, batch_id: str, expected: int, timeout_s: float) -> int:
    """Wait until the accountant has recorded ``expected`` jobs of the batch; return the count."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with engine.connect() as conn:
            count = await conn.scalar(
                select(func.count()).select_from(jobs).where(jobs.c.batch_id == batch_id)
            )
        if (count or 0) >= expected or time.monotonic() >= deadline:
            return int(count or 0)
        await asyncio.sleep(0.2)


async def usage_by_provider(
    engine: AsyncEngine, batch_id: str | None = None
) -> list[ProviderUsage]:
    query = select(
        usage.c.provider,
        usage.c.model,
        func.count(distinct(usage.c.job_id)),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0),
        func.coalesce(func.sum(usage.c.completion_tokens), 0),
        func.coalesce(func.sum(usage.c.cost_usd), 0),
    ).group_by(usage.c.provider, usage.c.model)
    if batch_id is not None:
        query = query.join(jobs, jobs.c.job_id == usage.c.job_id).where(jobs.c.batch_id == batch_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(usage.c.provider, usage.c.model))).all()
    return [
        ProviderUsage(
            provider=r[0],
            model=r[1],
            jobs=int(r[2]),
            prompt_tokens=int(r[3]),
            completion_tokens=int(r[4]),
            cost_usd=Decimal(r[5]),
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class ReportWithDays:
    """A report, and for its charts the cost per day of both periods (empty unless asked)."""

    report: UsageReport
    daily: list[tuple[date, Decimal]]
    previous_daily: list[tuple[date, Decimal]]


async def fetch_report(
    engine: AsyncEngine, query: ReportQuery, config: Config, *, daily: bool = False
) -> ReportWithDays:
    """Every key's report (an operator's view), in one snapshot of the ledger."""
    async with engine.connect() as conn:
        await conn.execution_options(**SNAPSHOT)
        report = await build_report(conn, query, config)
        if not daily:
            return ReportWithDays(report, [], [])
        return ReportWithDays(
            report,
            await daily_costs(conn, query.current),
            await daily_costs(conn, query.previous),
        )
