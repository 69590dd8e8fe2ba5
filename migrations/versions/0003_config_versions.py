"""config_versions: every config version applied, for history and rollback

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "config_versions",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "digest", sa.String(64), nullable=False, comment="Config.version of the content."
        ),
        sa.Column(
            "content",
            sa.Text,
            nullable=False,
            comment="The file text as applied, byte for byte.",
        ),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column(
            "first_applied_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column(
            "last_applied_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.UniqueConstraint("digest", name="config_versions_digest_key"),
        sa.CheckConstraint(
            "source IN ('file', 'bus', 'rollback')", name="config_versions_source_check"
        ),
    )


def downgrade() -> None:
    op.drop_table("config_versions")
