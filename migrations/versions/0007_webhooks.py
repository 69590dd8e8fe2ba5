"""webhook_endpoints, webhook_deliveries, webhook_attempts: the webhook dispatcher's record

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _at(name: str, **kw: object) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), **kw)  # type: ignore[arg-type]


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("url", sa.Text, primary_key=True),
        _at("disabled_at"),
        sa.Column("disabled_reason", sa.Text),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("webhook_id", sa.String(128), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("owner", sa.String(128)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("series_start", sa.Integer, nullable=False, server_default="0"),
        _at("next_attempt_at"),
        sa.Column("lease_id", sa.String(16)),
        _at("created_at", nullable=False, server_default=sa.func.now()),
        _at("delivered_at"),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'dead')", name="webhook_deliveries_state_check"
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_owner_created", "webhook_deliveries", ["owner", "created_at"]
    )
    op.create_index("ix_webhook_deliveries_created", "webhook_deliveries", ["created_at"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "webhook_id",
            sa.String(128),
            sa.ForeignKey("webhook_deliveries.webhook_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("number", sa.Integer, nullable=False),
        _at("attempted_at", nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_webhook_attempts_webhook_id", "webhook_attempts", ["webhook_id"])


def downgrade() -> None:
    for table in ("webhook_attempts", "webhook_deliveries", "webhook_endpoints"):
        op.drop_table(table)
