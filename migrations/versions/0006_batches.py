"""files, file_chunks, batches, batch_lines: stored batches in the OpenAI Batch API's shape

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSON

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MOMENTS = (
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)


def _at(name: str, **kw: object) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), **kw)  # type: ignore[arg-type]


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("file_id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128)),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("batch_id", sa.String(64)),
        _at("created_at", nullable=False, server_default=sa.func.now()),
        _at("expires_at"),
    )
    op.create_index("ix_files_expires_at", "files", ["expires_at"])
    op.create_index("ix_files_owner_created", "files", ["owner", "created_at"])
    op.create_table(
        "file_chunks",
        sa.Column(
            "file_id",
            sa.String(64),
            sa.ForeignKey("files.file_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("file_id", "seq"),
    )
    op.create_table(
        "batches",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(8), nullable=False),
        sa.Column("metadata", JSON),
        sa.Column("webhook", sa.Text),
        sa.Column("key_secret", sa.Text),
        sa.Column("errors", JSON),
        *(
            sa.Column(name, sa.Integer, nullable=False, server_default="0")
            for name in ("total", "completed", "failed", "enqueued", "send_round")
        ),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cost_usd", sa.Numeric(18, 9), nullable=False, server_default="0"),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("runner", sa.String(128)),
        _at("lease_until"),
        _at("created_at", nullable=False, server_default=sa.func.now()),
        _at("expires_at", nullable=False),
        *(_at(f"{moment}_at") for moment in _MOMENTS),
    )
    op.create_index("ix_batches_owner_created", "batches", ["owner", "created_at"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("custom_id", sa.Text, nullable=False),
        sa.Column("status", sa.String(16)),
        sa.Column("in_error", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("output", sa.Text),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cost_usd", sa.Numeric(18, 9), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("batch_id", "line"),
        sa.UniqueConstraint("batch_id", "custom_id", name="batch_lines_custom_id_key"),
    )
    op.create_index(
        "ix_batch_lines_pending",
        "batch_lines",
        ["batch_id", "line"],
        postgresql_where=sa.text("status IS NULL"),
    )


def downgrade() -> None:
    for table in ("batch_lines", "batches", "file_chunks", "files"):
        op.drop_table(table)
