"""usage.task_type and usage.consumer (and on calls, for the sweeper's rows): what cost reports
group by besides provider, model and key

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("usage", "calls"):
        op.add_column(
            table,
            sa.Column("task_type", sa.String(100), comment="The job's task type, if it named one."),
        )
        op.add_column(
            table,
            sa.Column(
                "consumer",
                sa.String(256),
                comment="The end user the caller named (OpenAI's ``user`` parameter), if any.",
            ),
        )


def downgrade() -> None:
    for table in ("usage", "calls"):
        op.drop_column(table, "consumer")
        op.drop_column(table, "task_type")
