"""calls: every provider call, recorded before its request leaves; usage keyed by call

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_id", sa.String(160), primary_key=True),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("public_model", sa.String(200), nullable=False),
        sa.Column("key_id", sa.String(128)),
        sa.Column("reservation_id", sa.String(200)),
        sa.Column("reserved_prompt_tokens", sa.Integer, nullable=False),
        sa.Column("reserved_completion_tokens", sa.Integer, nullable=False),
        sa.Column("reserved_cost_usd", sa.Numeric(18, 9)),
        sa.Column("free", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("price_version", sa.String(32)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "settle_by",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="Unsettled past this, the call is taken for lost with its worker.",
        ),
        sa.Column("settled_at", sa.DateTime(timezone=True)),
        sa.Column(
            "swept",
            sa.Boolean,
            nullable=False,
            server_default=sa.false(),
            comment="Settled by the sweeper at its reserved amount: its worker died.",
        ),
    )
    # The sweeper's scan: unsettled calls by when they are due.
    op.create_index(
        "ix_calls_unsettled",
        "calls",
        ["settle_by"],
        postgresql_where=sa.text("settled_at IS NULL"),
    )
    op.add_column("usage", sa.Column("call_id", sa.String(160)))
    op.execute("UPDATE usage SET call_id = job_id || ':' || attempt")
    op.alter_column("usage", "call_id", nullable=False)
    op.drop_constraint("usage_job_attempt_key", "usage", type_="unique")
    op.create_unique_constraint("usage_call_id_key", "usage", ["call_id"])
    op.create_index("ix_usage_job_id", "usage", ["job_id"])
    # What the quota rebuild reads: a window's usage by time.
    op.create_index("ix_usage_occurred_at", "usage", ["occurred_at"])
    op.create_index("ix_calls_started_at", "calls", ["started_at"])
    op.add_column(
        "usage",
        sa.Column(
            "free",
            sa.Boolean,
            nullable=False,
            server_default=sa.false(),
            comment="Served by the provider's free tier (counted against it).",
        ),
    )
    op.add_column(
        "usage",
        sa.Column(
            "swept",
            sa.Boolean,
            nullable=False,
            server_default=sa.false(),
            comment="Counted at the call's reservation: its worker died before settling it.",
        ),
    )


def downgrade() -> None:
    op.drop_column("usage", "free")
    op.drop_index("ix_calls_started_at", table_name="calls")
    op.drop_index("ix_usage_occurred_at", table_name="usage")
    op.drop_column("usage", "swept")
    op.drop_index("ix_usage_job_id", table_name="usage")
    op.drop_constraint("usage_call_id_key", "usage", type_="unique")
    # Two calls of one attempt number (a job run twice) collapse to one row again.
    op.execute(
        "DELETE FROM usage a USING usage b"
        " WHERE a.job_id = b.job_id AND a.attempt = b.attempt AND a.id > b.id"
    )
    op.create_unique_constraint("usage_job_attempt_key", "usage", ["job_id", "attempt"])
    op.drop_column("usage", "call_id")
    op.drop_index("ix_calls_unsettled", table_name="calls")
    op.drop_table("calls")
