"""usage.estimated: tokens Switchyard counted because the provider reported none

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "usage",
        sa.Column(
            "estimated",
            sa.Boolean,
            nullable=False,
            server_default=sa.false(),
            comment="The provider reported no usage; Switchyard counted the tokens.",
        ),
    )


def downgrade() -> None:
    op.drop_column("usage", "estimated")
