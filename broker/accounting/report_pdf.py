"""A cost report as a PDF (``switchyard usage --pdf``): a title page with the totals and the
groups' table, a bar chart of cost by the first grouping, and the cost per day.

Drawn with matplotlib, an optional extra (``pip install 'switchyard[reports]'``): imported only
here, and only when a PDF is asked for.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from broker.accounting.reports import ReportWithDays
from broker.core.db_reports import Span
from broker.core.usage_report import ReportRow, UsageReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["INSTALL_HINT", "pdf_available", "write_pdf"]

INSTALL_HINT = "pip install 'switchyard[reports]'"
PAGE = (11.69, 8.27)  # A4 landscape, inches
TABLE_ROWS = 22
BARS = 15


def pdf_available() -> bool:
    """Whether matplotlib is installed (checked before the report is read)."""
    return importlib.util.find_spec("matplotlib") is not None


def write_pdf(path: Path, data: ReportWithDays, tz: ZoneInfo) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        for draw in (_title_page, _bar_page, _daily_page):
            figure = draw(data, tz)
            pdf.savefig(figure)
            plt.close(figure)


def _when(span: Span, tz: ZoneInfo) -> str:
    def show(moment: datetime) -> str:
        return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M")

    return f"{show(span.start)} to {show(span.end)} ({tz.key})"


def _usd(value: Decimal | None) -> str:
    return "" if value is None else f"{value:,.4f}"


def _change(row: ReportRow) -> str:
    if row.delta_pct is not None:
        return f"{row.delta_pct:+.1f}%"
    return "new" if row.current.cost_usd else ""


def _title_page(data: ReportWithDays, tz: ZoneInfo) -> Figure:
    import matplotlib.pyplot as plt

    report, query = data.report, data.report.query
    total, before = report.total, report.previous_total
    figure = plt.figure(figsize=PAGE)
    lines = [
        f"by {', '.join(query.by)}, {query.period or 'span'}: {_when(query.current, tz)}",
        f"previous: {_when(query.previous, tz)}",
        f"{total.calls:,} calls, {total.prompt_tokens:,} + {total.completion_tokens:,} tokens,"
        f" {_usd(total.cost_usd)} USD (previous {_usd(before.cost_usd)} USD)",
    ]
    if total.unpriced_calls:
        lines.append(f"{total.unpriced_calls:,} calls had no price: not in the costs")
    lines += [
        f"budget {use.scope} {use.scope_id}: {_usd(use.spent_usd)} of {_usd(use.budget_usd)} USD"
        f" ({use.used_pct}%)"
        for use in report.budgets
    ]
    figure.text(0.05, 0.94, "Switchyard cost report", fontsize=20, weight="bold")
    figure.text(0.05, 0.91, "\n".join(lines), fontsize=10, va="top", linespacing=1.6)
    _groups_table(figure, report, top=0.9 - 0.035 * len(lines))
    return figure


def _groups_table(figure: Figure, report: UsageReport, top: float) -> None:
    shown = report.rows[:TABLE_ROWS]
    if not shown:
        figure.text(0.05, top - 0.05, "no usage in this period", fontsize=12)
        return
    budgets = any(row.budget_usd is not None for row in shown)
    columns = [*report.query.by, "calls", "cost USD", "previous USD", "change"]
    columns += ["budget USD"] if budgets else []
    cells = [
        [
            *("-" if g is None else str(g)[:40] for g in row.group),
            f"{row.current.calls:,}",
            _usd(row.current.cost_usd),
            _usd(row.previous.cost_usd),
            _change(row),
            *([_usd(row.budget_usd)] if budgets else []),
        ]
        for row in shown
    ]
    axes = figure.add_axes((0.05, 0.04, 0.9, max(top - 0.08, 0.1)))
    axes.axis("off")
    table = axes.table(cellText=cells, colLabels=columns, loc="upper left", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    if len(report.rows) > TABLE_ROWS:
        figure.text(0.05, 0.015, f"and {len(report.rows) - TABLE_ROWS} more groups", fontsize=8)


def _by_first(rows: list[ReportRow]) -> list[tuple[str, float, float]]:
    """(name, cost, previous cost) per value of the first grouping, the dearest ``BARS``, the
    rest as one bar."""
    sums: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for row in rows:
        name = "-" if not row.group or row.group[0] is None else str(row.group[0])[:30]
        sums[name][0] += row.current.cost_usd
        sums[name][1] += row.previous.cost_usd
    ranked = sorted(sums.items(), key=lambda item: -item[1][0])
    bars = [(name, float(now), float(before)) for name, (now, before) in ranked[:BARS]]
    if len(ranked) > BARS:
        rest = ranked[BARS:]
        bars.append(
            (
                f"{len(rest)} others",
                float(sum(v[0] for _, v in rest)),
                float(sum(v[1] for _, v in rest)),
            )
        )
    return bars


def _bar_page(data: ReportWithDays, tz: ZoneInfo) -> Figure:
    import matplotlib.pyplot as plt

    query = data.report.query
    bars = _by_first(data.report.rows)[::-1]  # the dearest at the top
    figure, axes = plt.subplots(figsize=PAGE)
    places = list(range(len(bars)))
    axes.barh([p + 0.2 for p in places], [b[1] for b in bars], height=0.4, label="this period")
    axes.barh([p - 0.2 for p in places], [b[2] for b in bars], height=0.4, label="previous")
    axes.set_yticks(places, [b[0] for b in bars])
    axes.set_xlabel("cost USD")
    axes.set_title(f"cost by {query.by[0] if query.by else 'total'}")
    axes.legend()
    figure.tight_layout()
    return figure


def _daily_page(data: ReportWithDays, tz: ZoneInfo) -> Figure:
    import matplotlib.pyplot as plt

    query = data.report.query
    figure, axes = plt.subplots(figsize=PAGE)
    shift = query.current.start - query.previous.start
    _line(axes, data.daily, "this period", "-")
    shifted = [(day + shift, cost) for day, cost in data.previous_daily]
    _line(axes, shifted, "previous period, moved onto this one", "--")
    axes.set_ylabel("cost USD")
    axes.set_title("cost per day (UTC days; the first and last count their part in the period)")
    axes.legend()
    figure.autofmt_xdate()
    figure.tight_layout()
    return figure


def _line(axes: Any, points: list[tuple[date, Decimal]], label: str, style: str) -> None:
    if points:
        axes.plot(
            [day for day, _ in points],
            [float(cost) for _, cost in points],
            style,
            marker="o",
            label=label,
        )
