"""api_jobs: the gateway's async jobs and their results, kept for the retention period

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSON

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_jobs",
        sa.Column("job_id", sa.String(128), primary_key=True),
        sa.Column(
            "owner", sa.String(128), comment="The virtual key's id; NULL: no keys configured."
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        # json, not jsonb: jsonb refuses text holding \u0000, which a job's metadata may.
        sa.Column("result", JSON, comment="The JobResult, once the job ended."),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_api_jobs_expires_at", "api_jobs", ["expires_at"])
    op.create_index("ix_api_jobs_owner_created", "api_jobs", ["owner", "created_at"])


def downgrade() -> None:
    op.drop_table("api_jobs")
