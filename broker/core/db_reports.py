"""The daily rollup of ``usage`` that cost reports read (``usage_daily``, migration 0009), and
the one query over it. A trigger on ``usage`` keeps the rollup: every insert, update, delete or
truncate of the ledger is summed into it in its own transaction, so it never differs from it.

A report's span seldom falls on UTC midnights: its whole UTC days are read from the rollup and
its partial days at either edge from ``usage`` itself, so every figure equals the ledger's.
The rollup has no consumer: a report by consumer reads ``usage`` for the whole span (a rollup
by end user would be nearly as large as the ledger: ops/bench/README.md, "Cost reports").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    Integer,
    Numeric,
    Select,
    String,
    Table,
    UniqueConstraint,
    cast,
    func,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from broker.core.db import metadata, usage

__all__ = [
    "DIMENSIONS",
    "OneKey",
    "Span",
    "Totals",
    "totals_by",
    "usage_daily",
]

usage_daily = Table(
    "usage_daily",
    metadata,
    Column("day", Date, nullable=False, comment="The UTC day of occurred_at."),
    Column("provider", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("key_id", String(128)),
    Column("task_type", String(100)),
    Column(
        "writer",
        Integer,
        nullable=False,
        comment="The backend (pid) that wrote the row, 0 for the backfill.",
    ),
    Column("calls", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cost_usd", Numeric(24, 9), nullable=False),
    Column("unpriced_calls", BigInteger, nullable=False),
    UniqueConstraint(
        "day",
        "provider",
        "model",
        "key_id",
        "task_type",
        "writer",
        name="usage_daily_key",
        postgresql_nulls_not_distinct=True,
    ),
)
"""The ledger per UTC day, provider, model, key and task type (and writer: a backend adds only
to its own rows, so concurrent accountants never wait on one another here)."""

DIMENSIONS = ("provider", "model", "key", "consumer", "task_type")
"""What a report groups by (``day`` too, for a daily series)."""
_COLUMNS = {"key": "key_id"}
_SUMS = ("calls", "prompt_tokens", "completion_tokens", "cost_usd", "unpriced_calls")


@dataclass(frozen=True, slots=True)
class Totals:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal("0.000000000")  # the ledger's scale, in a CSV too
    unpriced_calls: int = 0
    """Calls with no price configured: their cost is not in ``cost_usd``."""

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cost_usd + other.cost_usd,
            self.unpriced_calls + other.unpriced_calls,
        )


@dataclass(frozen=True, slots=True)
class Span:
    """The moments ``start <= t < end`` (aware datetimes)."""

    start: datetime
    end: datetime

    def whole_days(self) -> tuple[date, date]:
        """The UTC days wholly inside, ``first <= day < last`` (none if ``first >= last``)."""
        start, end = self.start.astimezone(UTC), self.end.astimezone(UTC)
        first = start.date() if start.timetz() == time(tzinfo=UTC) else start.date() + _DAY
        return first, end.date()

    def edges(self) -> list[tuple[datetime, datetime]]:
        """What is not in its whole days: the partial days at either end (or all of it)."""
        first, last = self.whole_days()
        if first >= last:
            return [(self.start, self.end)] if self.start < self.end else []
        edges = [(self.start, _midnight(first)), (_midnight(last), self.end)]
        return [(a, b) for a, b in edges if a < b]


class OneKey(NamedTuple):
    """Only this key's rows (``None``: the rows of calls made without a key)."""

    key_id: str | None


_DAY = timedelta(days=1)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _dimension(table: Table, name: str) -> ColumnElement[Any]:
    if name == "day" and table is usage:
        return cast(func.timezone("UTC", usage.c.occurred_at), Date).label(name)
    return table.c[_COLUMNS.get(name, name)].label(name)


def _rollup_part(by: Sequence[str], days: tuple[date, date], only: OneKey | None) -> Select[Any]:
    table = usage_daily
    groups = [_dimension(table, d) for d in by]
    query = select(*groups, *(func.sum(table.c[s]).label(s) for s in _SUMS))
    query = query.where(table.c.day >= days[0], table.c.day < days[1])
    if only is not None:
        query = query.where(table.c.key_id.is_not_distinct_from(only.key_id))
    return query.group_by(*groups)


def _ledger_part(
    by: Sequence[str], start: datetime, end: datetime, only: OneKey | None
) -> Select[Any]:
    groups = [_dimension(usage, d) for d in by]
    query = select(
        *groups,
        func.count().label("calls"),
        func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
        func.sum(usage.c.completion_tokens).label("completion_tokens"),
        func.coalesce(func.sum(usage.c.cost_usd), 0).label("cost_usd"),
        func.count().filter(usage.c.cost_usd.is_(None)).label("unpriced_calls"),
    ).where(usage.c.occurred_at >= start, usage.c.occurred_at < end)
    if only is not None:
        query = query.where(usage.c.key_id.is_not_distinct_from(only.key_id))
    return query.group_by(*groups)


async def totals_by(
    conn: AsyncConnection,
    span: Span,
    by: Sequence[str],
    *,
    only: OneKey | None = None,
    rollup: bool = True,
) -> dict[tuple[Any, ...], Totals]:
    """The ledger's totals over ``span`` per group of ``by`` (names of ``DIMENSIONS`` or
    ``day``): the whole UTC days from ``usage_daily``, the partial days at either edge from
    ``usage``. By consumer, which the rollup does not have, and with ``rollup=False`` (what the
    rollup is checked and timed against), every row is read from ``usage``."""
    first, last = span.whole_days()
    parts: list[Select[Any]] = []
    if rollup and "consumer" not in by and first < last:
        parts.append(_rollup_part(by, (first, last), only))
        edges = span.edges()
    else:
        edges = [(span.start, span.end)] if span.start < span.end else []
    parts += [_ledger_part(by, start, end, only) for start, end in edges]
    if not parts:
        return {}
    both = union_all(*parts).subquery("parts")
    groups = [both.c[d] for d in by]
    query = select(*groups, *(func.sum(both.c[s]).label(s) for s in _SUMS)).group_by(*groups)
    found = {}
    width = len(by)
    for row in (await conn.execute(query)).all():
        calls, prompt, completion, cost, unpriced = row[width:]
        if calls:  # none at all, or a group whose rows were all deleted
            found[row[:width]] = Totals(
                int(calls), int(prompt), int(completion), Decimal(cost), int(unpriced)
            )
    return found
