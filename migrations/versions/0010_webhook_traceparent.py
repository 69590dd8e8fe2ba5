"""webhook_deliveries.traceparent: the W3C trace context a delivery's POSTs carry

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("webhook_deliveries", sa.Column("traceparent", sa.String(55)))


def downgrade() -> None:
    op.drop_column("webhook_deliveries", "traceparent")
