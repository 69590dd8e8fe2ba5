"""``switchyard usage``: cost reports from the ledger, by provider, model, key, consumer or task
type over a period, beside the previous one and against the USD budgets; a table on the
terminal, CSV (``--csv``) or a PDF with charts (``--pdf``). ``--batch`` keeps the old view:
one batch's usage per provider and model."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from sqlalchemy.exc import DBAPIError

from broker.cli.apps import console, fail, load, new_table, output
from broker.cli.batch import print_batch_report
from broker.core.clock import utcnow
from broker.core.settings import get_settings

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from broker.accounting.reports import ReportWithDays
    from broker.core.config import Config
    from broker.core.db_reports import Span
    from broker.core.settings import Settings
    from broker.core.usage_report import ReportQuery, ReportRow, UsageReport

__all__ = ["usage"]


By = Annotated[
    list[str] | None,
    typer.Option(
        help="Group by provider, model, key, consumer, task_type: a comma list or repeated."
        " Default: provider,model."
    ),
]
Period = Annotated[
    str | None,
    typer.Option(
        help="day, week or month, in the config's timezone: this one so far, against the same"
        " stretch of the previous one; with it, the USD budgets of that period. Default: month."
    ),
]
Since = Annotated[
    str | None, typer.Option(help="Start (2026-12-01, or an ISO time), instead of a period.")
]
Until = Annotated[str | None, typer.Option(help="End, with --since. Default: now.")]
Csv = Annotated[
    str | None, typer.Option("--csv", metavar="FILE", help="Write CSV to FILE (- for stdout).")
]
Pdf = Annotated[Path | None, typer.Option(dir_okay=False, help="Write a PDF report with charts.")]
Batch = Annotated[
    str | None, typer.Option(help="Only this batch id: its usage per provider and model (alone).")
]


def usage(
    by: By = None,
    period: Period = None,
    since: Since = None,
    until: Until = None,
    csv: Csv = None,
    pdf: Pdf = None,
    batch: Batch = None,
) -> None:
    """Usage and cost from the ledger per group, beside the previous period, with the budgets."""
    if batch is not None:
        if any(v is not None for v in (by, period, since, until, csv, pdf)):
            raise fail("--batch takes no other option")
        asyncio.run(print_batch_report(get_settings(), batch, 0))
        return
    from broker.accounting.report_pdf import INSTALL_HINT, pdf_available
    from broker.core.usage_report import report_query

    if pdf is not None and not pdf_available():
        raise fail("--pdf draws with matplotlib, which is not installed", hint=INSTALL_HINT)
    settings, config = load()
    try:
        query = report_query(by or [], period, since, until, config.zone, utcnow())
    except ValueError as exc:
        raise fail(str(exc)) from None
    data = _fetch_or_fail(settings, config, query, daily=pdf is not None)
    try:
        if csv is not None:
            _write_csv(csv, data.report)
        if csv != "-":
            _print(data.report, config.zone)
        if pdf is not None:
            from broker.accounting.report_pdf import write_pdf

            write_pdf(pdf, data, config.zone)
            console.print(f"PDF report written to {pdf}")
    except OSError as exc:
        raise fail(f"the report could not be written: {exc}", 1) from None


def _fetch_or_fail(
    settings: Settings, config: Config, query: ReportQuery, *, daily: bool
) -> ReportWithDays:
    try:
        return asyncio.run(_fetch(settings, config, query, daily=daily))
    except (DBAPIError, OSError) as exc:
        raise fail(
            f"the ledger could not be read ({type(exc).__name__})",
            1,
            hint="(SWITCHYARD_DATABASE_URL reachable, and migrated: switchyard migrate?)",
        ) from None


async def _fetch(
    settings: Settings, config: Config, query: ReportQuery, *, daily: bool
) -> ReportWithDays:
    from broker.accounting.reports import fetch_report
    from broker.core.db import make_engine

    engine = make_engine(settings.database_url)
    try:
        return await fetch_report(engine, query, config, daily=daily)
    finally:
        await engine.dispose()


def _write_csv(target: str, report: UsageReport) -> None:
    from broker.core.usage_report import report_csv

    text = report_csv(report)
    if target == "-":
        sys.stdout.write(text)
        return
    Path(target).write_text(text)
    console.print(f"CSV written to {target} ({len(report.rows)} groups)")


def _when(span: Span, tz: ZoneInfo) -> str:
    start, end = span.start.astimezone(tz), span.end.astimezone(tz)
    return f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M}"


def _change(row: ReportRow) -> str:
    if row.delta_pct is not None:
        return f"{row.delta_pct:+.1f}%"
    return "new" if row.current.cost_usd else ""


def _print(report: UsageReport, tz: ZoneInfo) -> None:
    query = report.query
    with_budget = any(r.budget_usd is not None for r in report.rows)
    table = new_table(
        f"usage by {', '.join(query.by)}: {_when(query.current, tz)} {tz.key}"
        f" (previous: {_when(query.previous, tz)})",
        *query.by,
        *("calls", "prompt tokens", "completion tokens", "cost USD", "previous USD", "change"),
        *(("budget USD", "used") if with_budget else ()),
        left=query.by,
    )
    for row in report.rows:
        budget = (
            ("" if row.budget_usd is None else f"{row.budget_usd:.2f}", _used(row.budget_used_pct))
            if with_budget
            else ()
        )
        table.add_row(
            *("-" if g is None else str(g) for g in row.group),
            *_figures(row),
            *budget,
        )
    total, before = report.total, report.previous_total
    table.add_section()
    table.add_row(
        "total",
        *([""] * (len(query.by) - 1)),
        *(f"{total.calls}", f"{total.prompt_tokens}", f"{total.completion_tokens}"),
        *(f"{total.cost_usd:.6f}", f"{before.cost_usd:.6f}"),
        *([""] * (3 if with_budget else 1)),
    )
    output.print(table)
    if total.unpriced_calls:
        console.print(f"{total.unpriced_calls} calls had no price configured: not in the costs")
    _print_budgets(report)


def _figures(row: ReportRow) -> tuple[str, ...]:
    now = row.current
    return (
        str(now.calls),
        str(now.prompt_tokens),
        str(now.completion_tokens),
        f"{now.cost_usd:.6f}",
        f"{row.previous.cost_usd:.6f}",
        _change(row),
    )


def _used(percent: float | None) -> str:
    return "" if percent is None else f"{percent:.1f}%"


def _print_budgets(report: UsageReport) -> None:
    if not report.budgets:
        return
    table = new_table(
        f"USD budgets per {report.query.period}",
        *("scope", "id", "budget USD", "spent USD", "used"),
        left=("scope", "id"),
    )
    for use in report.budgets:
        table.add_row(
            use.scope,
            use.scope_id,
            f"{use.budget_usd:.2f}",
            f"{use.spent_usd:.6f}",
            _used(use.used_pct),
        )
    output.print(table)
