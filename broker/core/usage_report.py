"""Cost reports: the ledger's totals per group (provider, model, key, consumer, task type) over a
period, beside the previous period of the same length and against the config's USD budgets.
The CLI (``switchyard usage``) and the gateway (``GET /v1/usage``) both build them here.

A period (``day``, ``week``, ``month``) is the calendar one now falls in, in the config's time
zone, exactly as the budgets count it: so far, against the same stretch of the previous one
(December 1st to 9th, 10:00, against November 1st to 9th, 10:00). An explicit ``since`` and
``until`` is compared with the same length just before it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncConnection

from broker.core.config import Config
from broker.core.db_reports import DIMENSIONS, OneKey, Span, Totals, totals_by
from broker.core.limits import Budgets
from broker.core.windows import window

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_BY",
    "PERIODS",
    "SNAPSHOT",
    "BudgetUse",
    "ReportQuery",
    "ReportRow",
    "UsageReport",
    "build_report",
    "daily_costs",
    "parse_by",
    "report_csv",
    "report_query",
]

PERIODS = ("day", "week", "month")
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
"""What an explicit span may reach (so no date arithmetic on it leaves Python's range)."""
_OUT_OF_RANGE = "since: the span, and as long a span before it, must lie in 1900 to 9000"
SNAPSHOT = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
"""A connection's execution options for a report: its queries all see one state of the ledger."""
DEFAULT_BY = ("provider", "model")
CSV_COLUMNS = (
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "unpriced_calls",
    "previous_calls",
    "previous_cost_usd",
    "delta_cost_usd",
    "delta_pct",
    "budget_usd",
    "budget_used_pct",
)


@dataclass(frozen=True, slots=True)
class ReportQuery:
    by: tuple[str, ...]
    period: str | None  # None: an explicit since/until
    current: Span
    previous: Span


def parse_by(values: Sequence[str]) -> tuple[str, ...]:
    """``["provider,model", "key"]`` as ``("provider", "model", "key")``; ``ValueError`` naming
    what is not a dimension. Nothing: ``DEFAULT_BY``."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = sorted({n for n in names if n not in DIMENSIONS})
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; by one of {', '.join(DIMENSIONS)}")
    return tuple(dict.fromkeys(names)) or DEFAULT_BY


def _moment(text: str, tz: ZoneInfo, field: str) -> datetime:
    """``2026-12-01`` (midnight in ``tz``) or an ISO date and time (``tz`` unless it says)."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=tz)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{field}: {text!r} is not a date (2026-12-01) or an ISO time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)


def report_query(
    by: Sequence[str],
    period: str | None,
    since: str | None,
    until: str | None,
    tz: ZoneInfo,
    now: datetime,
) -> ReportQuery:
    """What to report, from what the caller gave; ``ValueError`` saying what is wrong."""
    groups = parse_by(by)
    if since is not None:
        if period is not None:
            raise ValueError("period: give a period or since (and until), not both")
        return _explicit(groups, since, until, tz, now)
    if until is not None:
        raise ValueError("until: needs since")
    period = period or "month"
    if period not in PERIODS:
        raise ValueError(f"period: one of {', '.join(PERIODS)}, not {period!r}")
    current = window(period, now, tz)
    before = window(period, current.start - timedelta(microseconds=1), tz)
    elapsed = now - current.start
    previous = Span(before.start, min(before.start + elapsed, before.end))
    return ReportQuery(groups, period, Span(current.start, now), previous)


def _explicit(
    groups: tuple[str, ...], since: str, until: str | None, tz: ZoneInfo, now: datetime
) -> ReportQuery:
    """``since`` to ``until`` (or now), beside as long a span just before it."""
    try:
        start = _moment(since, tz, "since").astimezone(UTC)
        end = (_moment(until, tz, "until") if until is not None else now).astimezone(UTC)
        earlier = start - (end - start)
    except OverflowError:
        raise ValueError(_OUT_OF_RANGE) from None
    if end <= start:
        raise ValueError("until: must be after since")
    if earlier < EARLIEST or end > LATEST:
        raise ValueError(_OUT_OF_RANGE)
    return ReportQuery(groups, None, Span(start, end), Span(earlier, start))


@dataclass(frozen=True, slots=True)
class ReportRow:
    group: tuple[str | None, ...]
    current: Totals
    previous: Totals
    budget_usd: Decimal | None = None
    """The group's USD budget for the period, when the report is by key alone."""

    @property
    def delta_cost_usd(self) -> Decimal:
        return self.current.cost_usd - self.previous.cost_usd

    @property
    def delta_pct(self) -> float | None:
        if not self.previous.cost_usd:
            return None
        return round(float(self.delta_cost_usd / self.previous.cost_usd * 100), 1)

    @property
    def budget_used_pct(self) -> float | None:
        return _percent(self.current.cost_usd, self.budget_usd)


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """A USD budget for the report's period and what has been spent against it: a key's, or a
    consumer's of the config (a team: all of its keys together)."""

    scope: str  # "key" or "consumer"
    scope_id: str
    budget_usd: Decimal
    spent_usd: Decimal

    @property
    def used_pct(self) -> float | None:
        return _percent(self.spent_usd, self.budget_usd)


@dataclass(frozen=True, slots=True)
class UsageReport:
    query: ReportQuery
    rows: list[ReportRow]
    budgets: list[BudgetUse]

    @property
    def total(self) -> Totals:
        return sum((r.current for r in self.rows), Totals())

    @property
    def previous_total(self) -> Totals:
        return sum((r.previous for r in self.rows), Totals())


def _percent(part: Decimal, whole: Decimal | None) -> float | None:
    return round(float(part / whole * 100), 1) if whole else None


def _usd_budget(budgets: Budgets | None, period: str) -> Decimal | None:
    value: Decimal | None = getattr(budgets, f"usd_per_{period}") if budgets else None
    return value


async def build_report(
    conn: AsyncConnection, query: ReportQuery, config: Config, only: OneKey | None = None
) -> UsageReport:
    """The report; ``only``: one key's rows and budget (a caller of the gateway)."""
    current = await totals_by(conn, query.current, query.by, only=only)
    previous = await totals_by(conn, query.previous, query.by, only=only)
    key_budgets: dict[Any, Decimal | None] = {}
    if query.period is not None and query.by == ("key",):
        key_budgets = {(k.id,): _usd_budget(k.budgets, query.period) for k in config.keys}
    none = Totals()
    rows = [
        ReportRow(g, current.get(g, none), previous.get(g, none), key_budgets.get(g))
        for g in current.keys() | previous.keys()
    ]
    # Dearest first, ties by name: two stable sorts, cheaper than one on a composite key.
    rows.sort(key=lambda r: _sortable(r.group))
    rows.sort(key=lambda r: (r.current.cost_usd, r.previous.cost_usd), reverse=True)
    budgets = await _budgets(conn, query, config, only)
    return UsageReport(query, rows, budgets)


def _sortable(group: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple("" if g is None else str(g) for g in group)


async def _budgets(
    conn: AsyncConnection, query: ReportQuery, config: Config, only: OneKey | None
) -> list[BudgetUse]:
    """Every USD budget of the period (a key sees its own only) and the spend against it: the
    same calendar window the scheduler holds the budget to."""
    period = query.period
    if period is None:
        return []
    keys = {k.id: b for k in config.keys if (b := _usd_budget(k.budgets, period)) is not None}
    teams = {
        name: b
        for name, team in config.consumers.items()
        if (b := _usd_budget(team.budgets, period)) is not None
    }
    if only is not None:
        keys = {k: b for k, b in keys.items() if k == only.key_id}
        teams = {}
    if not keys and not teams:
        return []
    spent = await totals_by(conn, query.current, ["key"], only=only)
    by_key = {group[0]: totals.cost_usd for group, totals in spent.items()}
    uses = [BudgetUse("key", k, b, by_key.get(k, Decimal(0))) for k, b in sorted(keys.items())]
    for name, budget in sorted(teams.items()):
        members = [k.id for k in config.keys if k.consumer == name]
        total = sum((by_key.get(m, Decimal(0)) for m in members), Decimal(0))
        uses.append(BudgetUse("consumer", name, budget, total))
    return uses


async def daily_costs(
    conn: AsyncConnection, span: Span, only: OneKey | None = None
) -> list[tuple[date, Decimal]]:
    """Cost per UTC day over ``span`` (a day at an edge counts its part inside), for a chart."""
    days = await totals_by(conn, span, ["day"], only=only)
    return sorted((group[0], totals.cost_usd) for group, totals in days.items())


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return f"{value:f}"
    text = str(value)
    # A consumer or task type is the caller's text: a spreadsheet must not run it as a formula.
    return f"'{text}" if isinstance(value, str) and text[:1] in _FORMULA else text


_FORMULA = frozenset("=+-@\t\r")


def report_csv(report: UsageReport) -> str:
    """One line per group: the grouping columns, then ``CSV_COLUMNS``. No total line, so the
    columns sum to the ledger's totals."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*report.query.by, *CSV_COLUMNS])
    for row in report.rows:
        now, before = row.current, row.previous
        figures = (
            *(now.calls, now.prompt_tokens, now.completion_tokens, now.cost_usd),
            *(now.unpriced_calls, before.calls, before.cost_usd, row.delta_cost_usd),
            *(row.delta_pct, row.budget_usd, row.budget_used_pct),
        )
        writer.writerow([_cell(v) for v in (*row.group, *figures)])
    return out.getvalue()
