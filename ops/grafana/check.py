"""Check that every query of Switchyard's dashboards returns data from a real Prometheus.

Each panel target's ``expr`` (and each ``label_values`` variable query) is run as an instant
query after its template variables are substituted: Grafana's own (``$__rate_interval`` and the
like, see ``BUILTINS``), and the dashboard's variables (an "All" of a multi-valued variable, so
``.*``, matched with ``=~``). A query that fails, returns no series, or keeps a variable the
checker could not substitute is reported.

    python -m ops.grafana.check --prometheus http://127.0.0.1:9090 [--var NAME=VALUE] [FILE...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["BUILTINS", "Problem", "Query", "check_dashboards", "dashboard_queries", "main"]

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
"""Grafana's global variables, as a test that scraped for a minute or more can answer them."""

# $name, ${name}, ${name:format}, [[name]]
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$")


@dataclass(frozen=True, slots=True)
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str  # as substituted


@dataclass(frozen=True, slots=True)
class Problem:
    query: Query
    reason: str

    def __str__(self) -> str:
        q = self.query
        return f"{q.dashboard} / {q.panel} [{q.ref}]: {self.reason}\n    {q.expr}"


def variable_values(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """A value for each of the dashboard's variables that selects everything it may select."""
    values: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        name, kind = variable["name"], variable.get("type")
        if kind == "datasource":
            continue  # in a panel's datasource, never in a query
        if variable.get("includeAll"):
            values[name] = variable.get("allValue") or ".*"
        elif kind == "constant":
            values[name] = str(variable.get("query", ""))
        elif variable.get("options"):
            values[name] = str(variable["options"][0]["value"])
    return values


def substitute(expr: str, values: Mapping[str, str]) -> tuple[str, list[str]]:
    """``expr`` with each known variable replaced, and the names of those left unknown."""
    unknown: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name in values:
            return values[name]
        unknown.append(name)
        return match.group(0)

    return _VARIABLE.sub(replace, expr), unknown


def _panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its panels


def dashboard_queries(
    dashboard: Mapping[str, Any], overrides: Mapping[str, str] | None = None
) -> tuple[list[Query], list[Problem]]:
    """Every query of ``dashboard`` (panel targets, then ``label_values`` variables), with its
    variables substituted, and a problem for each that keeps a variable it cannot substitute."""
    values = {**BUILTINS, **variable_values(dashboard), **(overrides or {})}
    title = str(dashboard.get("title", "?"))
    raw: list[tuple[str, str, str]] = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr") and not target.get("hide"):
                raw.append((str(panel.get("title", "?")), target.get("refId", "?"), target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        found = _LABEL_VALUES.match(query or "") if variable.get("type") == "query" else None
        if found:
            metric, label = found.groups()
            raw.append((f"${variable['name']}", "variable", f"group by ({label}) ({metric})"))
    queries, problems = [], []
    for where, ref, expr in raw:
        text, unknown = substitute(expr, values)
        query = Query(title, where, ref, text)
        if unknown:
            problems.append(Problem(query, f"unknown variables: {', '.join(sorted(unknown))}"))
        else:
            queries.append(query)
    return queries, problems


def _run(client: httpx.Client, query: Query) -> Problem | None:
    try:
        response = client.get("/api/v1/query", params={"query": query.expr})
        body = response.json()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Problem(query, f"query failed: {exc!r}")
    if body.get("status") != "success":
        return Problem(query, f"{body.get('errorType', 'error')}: {body.get('error', body)}")
    data = body["data"]
    if data["resultType"] in ("vector", "matrix") and not data["result"]:
        return Problem(query, "no series")
    return None


def check_dashboards(
    prometheus_url: str,
    paths: Sequence[Path] | None = None,
    *,
    overrides: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> list[Problem]:
    """Run every query of the dashboards at ``paths`` (default: all of ``dashboards/``) against
    the Prometheus at ``prometheus_url``; the problems found, none when each returned data."""
    files = list(paths) if paths is not None else sorted(DASHBOARDS_DIR.glob("*.json"))
    if not files:
        raise ValueError("no dashboards to check")
    problems: list[Problem] = []
    with httpx.Client(base_url=prometheus_url.rstrip("/"), timeout=timeout_s) as client:
        for path in files:
            queries, unresolved = dashboard_queries(json.loads(path.read_text()), overrides)
            problems.extend(unresolved)
            problems.extend(p for p in (_run(client, q) for q in queries) if p is not None)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable's value (e.g. __rate_interval=30s, provider=openai); repeatable",
    )
    parser.add_argument("dashboards", nargs="*", type=Path, help="default: ops/grafana/dashboards")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.var)
    problems = check_dashboards(args.prometheus, args.dashboards or None, overrides=overrides)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(problems)} queries without data" if problems else "every query returned data")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
