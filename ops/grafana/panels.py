"""The few panel shapes the dashboards use, over ``grafana_foundation_sdk``'s builders.

Every query reads the dashboard's ``$datasource`` (a Prometheus) and uses only variables that
``check.py`` can substitute: ``$__rate_interval`` and the dashboards' own ``query`` variables,
each multi-valued with an "All" of ``.*`` and matched with ``=~``.
"""

from __future__ import annotations

from collections.abc import Sequence

from grafana_foundation_sdk.builders import bargauge, common, prometheus, stat, statetimeline
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

__all__ = [
    "RATE",
    "Panel",
    "Row",
    "bar_gauge",
    "board",
    "quantiles",
    "stat_panel",
    "states",
    "timeseries",
]

RATE = "$__rate_interval"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAG = "switchyard"

Target = tuple[str, str]  # (PromQL, legend format)
Panel = Builder[dm.Panel]
Row = tuple[str, Sequence[Panel]]


def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref)


def _targets(
    panel: ts.Panel | stat.Panel | bargauge.Panel | statetimeline.Panel, targets: Sequence[Target]
) -> None:
    for index, (expr, legend) in enumerate(targets):
        panel.with_target(_query(expr, legend, chr(ord("A") + index)))


def timeseries(
    title: str,
    description: str,
    targets: Sequence[Target],
    unit: str,
    *,
    width: int = 12,
    stacked: bool = False,
) -> ts.Panel:
    """A time series panel, its legend a table with each series' mean and last value."""
    panel = (
        ts.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .fill_opacity(10)
        .legend(
            common.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "lastNotNull"])
        )
    )
    if stacked:
        panel.stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL))
    _targets(panel, targets)
    return panel


def _steps(steps: Sequence[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


def stat_panel(
    title: str,
    description: str,
    expr: str,
    unit: str,
    *,
    legend: str = "",
    width: int = 6,
    steps: Sequence[tuple[float | None, str]] = ((None, "green"),),
) -> stat.Panel:
    """A single figure (or one per series), coloured by ``steps`` (value, colour)."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(5)
        .thresholds(_steps(steps))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    _targets(panel, [(expr, legend)])
    return panel


def states(
    title: str,
    description: str,
    expr: str,
    legend: str,
    names: Sequence[tuple[str, str]],
    *,
    width: int = 12,
) -> statetimeline.Panel:
    """A state timeline of a gauge whose values 0, 1, 2... mean ``names`` (text, colour)."""
    mapping = dm.ValueMap(
        options={
            str(value): dm.ValueMappingResult(text=text, color=color, index=value)
            for value, (text, color) in enumerate(names)
        }
    )
    panel = (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(width)
        .height(8)
        .mappings([mapping])
        .thresholds(_steps([(None, names[0][1])]))
    )
    _targets(panel, [(expr, legend)])
    return panel


def bar_gauge(
    title: str,
    description: str,
    expr: str,
    legend: str,
    *,
    unit: str = "percentunit",
    width: int = 12,
    steps: Sequence[tuple[float | None, str]] = ((None, "green"),),
) -> bargauge.Panel:
    """One horizontal bar per series, at its last value, from 0 to 1 (a share)."""
    panel = (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .max(1)
        .span(width)
        .height(8)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
        .thresholds(_steps(steps))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    _targets(panel, [(expr, legend)])
    return panel


def quantiles(
    histogram: str, by: str, selector: str = "", qs: Sequence[float] = (0.5, 0.95, 0.99)
) -> list[Target]:
    """``histogram_quantile`` targets, one per quantile, of ``histogram`` summed ``by``."""
    group = f"{by}, le" if by else "le"
    rate = f"rate({histogram}_bucket{{{selector}}}[{RATE}])"
    legend_by = f"{{{{{by}}}}} " if by else ""
    return [
        (f"histogram_quantile({q}, sum by ({group}) ({rate}))", f"{legend_by}p{round(q * 100)}")
        for q in qs
    ]


def _label_variable(name: str, label: str, metric: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({metric}, {name})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(text=["All"], value=["$__all"], selected=True))
    )


def board(
    uid: str,
    title: str,
    description: str,
    rows: Sequence[Row],
    variables: Sequence[tuple[str, str, str]] = (),
) -> db.Dashboard:
    """A dashboard of ``rows`` (title, panels), with a ``$datasource`` variable, then one
    multi-valued variable per ``variables`` entry (name, label, metric it takes values from),
    and a link to the other Switchyard dashboards."""
    dashboard = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(
            db.DashboardLink("Switchyard")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for name, label, metric in variables:
        dashboard.with_variable(_label_variable(name, label, metric))
    panel_id = 1
    for row_title, panels in rows:
        dashboard.with_row(db.Row(row_title).id(panel_id))
        panel_id += 1
        for panel in panels:
            dashboard.with_panel(panel.id(panel_id))  # type: ignore[attr-defined]
            panel_id += 1
    return dashboard
