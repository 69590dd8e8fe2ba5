"""``GET /v1/usage``: the caller's cost report (``broker.core.usage_report``) as JSON or CSV,
the same figures ``switchyard usage`` prints.

A key sees only its own key's rows and budget; a view over every key needs an admin role, which
a later issue brings. Costs are decimal strings, exact to the nano-dollar as the ledger keeps
them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.responses import Response

from broker.core.clock import utcnow
from broker.core.db_reports import OneKey, Span, Totals
from broker.core.usage_report import (
    SNAPSHOT,
    ReportRow,
    UsageReport,
    build_report,
    report_csv,
    report_query,
)
from broker.gateway.context import gateway_of
from broker.gateway.errors import GatewayError

__all__ = ["report_body", "router"]

PARAMETERS = frozenset({"by", "period", "since", "until", "format"})
"""Every query parameter the route reads: any other is refused, never ignored."""

REPORT_TIMEOUT_S = 10
"""The longest a report's statement may run for an HTTP caller."""

router = APIRouter(tags=["usage"])


@router.get("/v1/usage", response_model=None)
async def usage_report(
    request: Request,
    by: Annotated[
        list[str] | None,
        Query(
            description="provider, model, key, consumer, task_type: repeated or a comma list; "
            "default provider,model."
        ),
    ] = None,
    period: Annotated[
        Literal["day", "week", "month"] | None,
        Query(
            description="The calendar period now falls in (the config's time zone), against "
            "the same stretch of the previous one; default month."
        ),
    ] = None,
    since: Annotated[str | None, Query(description="2026-12-01, or an ISO time.")] = None,
    until: Annotated[str | None, Query(description="Default: now.")] = None,
    output: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
) -> Response:
    """The caller's usage and cost per group over a period, with the previous period beside
    each group and the caller's USD budget for the period against what it spent. A key sees
    only its own key's rows for now: a view over every key comes with the admin roles."""
    unknown = sorted(set(request.query_params) - PARAMETERS)
    if unknown:
        raise GatewayError(
            400,
            f"unknown query parameter(s): {', '.join(unknown)}"
            f" (known: {', '.join(sorted(PARAMETERS))})",
            param=unknown[0],
        )
    gateway = gateway_of(request)
    _, key_id = gateway.caller(request)
    try:
        query = report_query(by or [], period, since, until, gateway.config.zone, utcnow())
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        raise GatewayError(400, str(exc), param=field if field in PARAMETERS else "by") from None
    try:
        async with gateway.engine.connect() as conn:
            await conn.execution_options(**SNAPSHOT)
            # Bounded: a key may ask for years by consumer, which reads the ledger itself.
            await conn.execute(text(f"SET LOCAL statement_timeout = {REPORT_TIMEOUT_S * 1000}"))
            report = await build_report(conn, query, gateway.config, OneKey(key_id))
    except DBAPIError as exc:
        if "statement timeout" not in str(exc.orig):
            raise
        raise GatewayError(
            503,
            f"the report took longer than {REPORT_TIMEOUT_S} s; ask for a shorter span or"
            " fewer groups (by consumer reads every call of the span)",
        ) from None
    if output == "csv":
        return Response(report_csv(report), media_type="text/csv; charset=utf-8")
    return Response(orjson.dumps(report_body(report)), media_type="application/json")


def _span(span: Span) -> dict[str, str]:
    return {"start": span.start.isoformat(), "end": span.end.isoformat()}


def _totals(totals: Totals) -> dict[str, Any]:
    return {
        "calls": totals.calls,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "cost_usd": f"{totals.cost_usd:f}",
        "unpriced_calls": totals.unpriced_calls,
    }


def _group(report: UsageReport, row: ReportRow) -> dict[str, Any]:
    return {
        "group": dict(zip(report.query.by, row.group, strict=True)),
        **_totals(row.current),
        "previous": _totals(row.previous),
        "delta_cost_usd": f"{row.delta_cost_usd:f}",
        "delta_pct": row.delta_pct,
        "budget_usd": None if row.budget_usd is None else f"{row.budget_usd:f}",
        "budget_used_pct": row.budget_used_pct,
    }


def report_body(report: UsageReport) -> dict[str, Any]:
    query = report.query
    return {
        "object": "switchyard.usage_report",
        "by": list(query.by),
        "period": query.period,
        **_span(query.current),
        "previous_period": _span(query.previous),
        "groups": [_group(report, row) for row in report.rows],
        "total": {**_totals(report.total), "previous": _totals(report.previous_total)},
        "budgets": [
            {
                "scope": use.scope,
                "id": use.scope_id,
                "budget_usd": f"{use.budget_usd:f}",
                "spent_usd": f"{use.spent_usd:f}",
                "used_pct": use.used_pct,
            }
            for use in report.budgets
        ],
    }
