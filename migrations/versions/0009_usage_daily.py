"""usage_daily: the ledger summed per UTC day, provider, model, key and task type, kept by a
trigger on usage, so that a month's cost report reads thousands of rows instead of millions

No rollup by consumer: with end users as consumers (OpenAI's ``user``) it is nearly as large
as the ledger, so no faster to read (measured in ops/bench/README.md, "Cost reports").

A row-level trigger, not a statement-level one with a transition table: the accountant inserts
with executemany, which Postgres runs as one statement per row, and run once per row the
statement-level trigger cost more (ops/bench/README.md, "Cost reports"). Each row also
carries its ``writer``, the Postgres backend that wrote it: a writer adds only to its own
rows, so concurrent accountants never wait on a rollup row until the other commits, nor
deadlock over two rows taken in opposite orders (their rows go in call order, not group order).
Reports sum over writers; the backfill is writer 0.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "usage_daily"
GRAIN = ("provider", "model", "key_id", "task_type")
_SUMMED = ("calls", "prompt_tokens", "completion_tokens", "cost_usd", "unpriced_calls")
_DAY = "(occurred_at AT TIME ZONE 'UTC')::date"


def _upsert(values: str) -> str:
    """INSERT into the rollup of ``values`` (a SELECT or VALUES), added to a row already there."""
    columns = ", ".join(("day", *GRAIN, "writer", *_SUMMED))
    added = ", ".join(f"{c} = r.{c} + excluded.{c}" for c in _SUMMED)
    return (
        f"INSERT INTO {TABLE} AS r ({columns}) {values}"
        f" ON CONFLICT ON CONSTRAINT {TABLE}_key DO UPDATE SET {added};"
    )


def _add_row(row: str, sign: str) -> str:
    """The trigger's statement: ``row`` (NEW or OLD) added to the rollup (``sign`` '-': taken
    away)."""
    grain = ", ".join(f"{row}.{c}" for c in GRAIN)
    day = f"({row}.occurred_at AT TIME ZONE 'UTC')::date"
    sums = (
        f"{sign}1, {sign}{row}.prompt_tokens, {sign}{row}.completion_tokens,"
        f" {sign}coalesce({row}.cost_usd, 0), {sign}({row}.cost_usd IS NULL)::int"
    )
    return _upsert(f"VALUES ({day}, {grain}, pg_backend_pid(), {sums})")


def _backfill() -> str:
    grain = ", ".join(GRAIN)
    sums = (
        "count(*), sum(prompt_tokens), sum(completion_tokens), coalesce(sum(cost_usd), 0),"
        " count(*) FILTER (WHERE cost_usd IS NULL)"
    )
    return _upsert(f"SELECT {_DAY}, {grain}, 0, {sums} FROM usage GROUP BY {_DAY}, {grain}")


ROLLUP_FUNCTION = """CREATE FUNCTION usage_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    {taken}
  END IF;
  IF TG_OP <> 'DELETE' THEN
    {added}
  END IF;
  RETURN NULL;
END $$"""


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("day", sa.Date, nullable=False, comment="The UTC day of occurred_at."),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("key_id", sa.String(128)),
        sa.Column("task_type", sa.String(100)),
        sa.Column(
            "writer",
            sa.Integer,
            nullable=False,
            comment="The backend (pid) that wrote the row, 0 for the backfill.",
        ),
        sa.Column("calls", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_usd", sa.Numeric(24, 9), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger, nullable=False),
        sa.UniqueConstraint(
            "day", *GRAIN, "writer", name=f"{TABLE}_key", postgresql_nulls_not_distinct=True
        ),
    )
    op.execute(ROLLUP_FUNCTION.format(taken=_add_row("OLD", "-"), added=_add_row("NEW", "")))
    op.execute(
        "CREATE FUNCTION usage_rollup_truncate() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN\n  TRUNCATE {TABLE};\n  RETURN NULL;\nEND $$"
    )
    # An update is the call's own usage replacing the sweeper's estimate (INSERT_USAGE's
    # ON CONFLICT DO UPDATE): its old figures are taken away, its new ones added.
    op.execute(
        "CREATE TRIGGER usage_rollup AFTER INSERT OR UPDATE OR DELETE ON usage"
        " FOR EACH ROW EXECUTE FUNCTION usage_rollup()"
    )
    op.execute(
        "CREATE TRIGGER usage_rollup_truncate AFTER TRUNCATE ON usage"
        " FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_truncate()"
    )
    # The trigger holds usage against writes until this commits: the backfill sees every row
    # written before, the trigger every row after.
    op.execute(_backfill())


def downgrade() -> None:
    op.execute("DROP TRIGGER usage_rollup_truncate ON usage")
    op.execute("DROP TRIGGER usage_rollup ON usage")
    op.execute("DROP FUNCTION usage_rollup_truncate()")
    op.execute("DROP FUNCTION usage_rollup()")
    op.drop_table(TABLE)
