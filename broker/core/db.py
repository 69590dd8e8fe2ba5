"""Postgres tables (SQLAlchemy Core) and the engine. Alembic owns the schema (``migrations/``);
these definitions must match the latest revision."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSON
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["api_jobs", "calls", "config_versions", "jobs", "make_engine", "metadata", "usage"]

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("priority", SmallInteger, nullable=False, server_default="0"),
    Column("public_model", String(200)),
    Column("provider", String(100)),
    Column("model", String(200)),
    Column("error_code", String(64)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    Column("queued_ms", Float),
    Column("scheduled_ms", Float),
    Column("provider_ms", Float),
    Column("total_ms", Float),
    Column("batch_id", String(128), index=True),
    Column("key_id", String(128)),
    Column("submitted_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

usage = Table(
    "usage",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("job_id", String(128), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("provider", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("public_model", String(200), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("total_tokens", Integer, nullable=False),
    Column(
        "estimated",
        Boolean,
        nullable=False,
        server_default=false(),
        comment="The provider reported no usage; Switchyard counted the tokens.",
    ),
    Column("cost_usd", Numeric(18, 9), comment="NULL when no price was configured"),
    Column("price_version", String(32)),
    Column("key_id", String(128)),
    Column("occurred_at", DateTime(timezone=True), nullable=False, index=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("call_id", String(160), nullable=False),
    Column(
        "swept",
        Boolean,
        nullable=False,
        server_default=false(),
        comment="Counted at the call's reservation: its worker died before settling it.",
    ),
    Column(
        "free",
        Boolean,
        nullable=False,
        server_default=false(),
        comment="Served by the provider's free tier (counted against it).",
    ),
    UniqueConstraint("call_id", name="usage_call_id_key"),
)

calls = Table(
    "calls",
    metadata,
    Column("call_id", String(160), primary_key=True),
    Column("job_id", String(128), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("provider", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("public_model", String(200), nullable=False),
    Column("key_id", String(128)),
    Column("reservation_id", String(200)),
    Column("reserved_prompt_tokens", Integer, nullable=False),
    Column("reserved_completion_tokens", Integer, nullable=False),
    Column("reserved_cost_usd", Numeric(18, 9)),
    Column("free", Boolean, nullable=False, server_default=false()),
    Column("price_version", String(32)),
    Column("started_at", DateTime(timezone=True), nullable=False, index=True),
    Column(
        "settle_by",
        DateTime(timezone=True),
        nullable=False,
        comment="Unsettled past this, the call is taken for lost with its worker.",
    ),
    Column("settled_at", DateTime(timezone=True)),
    Column(
        "swept",
        Boolean,
        nullable=False,
        server_default=false(),
        comment="Settled by the sweeper at its reserved amount: its worker died.",
    ),
    Index("ix_calls_unsettled", "settle_by", postgresql_where=text("settled_at IS NULL")),
)

config_versions = Table(
    "config_versions",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("digest", String(64), nullable=False, comment="Config.version of the content."),
    Column("content", Text, nullable=False, comment="The file text as applied, byte for byte."),
    Column("source", String(16), nullable=False),
    Column("first_applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("digest", name="config_versions_digest_key"),
    CheckConstraint("source IN ('file', 'bus', 'rollback')", name="config_versions_source_check"),
)


api_jobs = Table(
    "api_jobs",
    metadata,
    Column("job_id", String(128), primary_key=True),
    Column("owner", String(128), comment="The virtual key's id; NULL: no keys configured."),
    Column("status", String(16), nullable=False),
    Column("model", String(200), nullable=False),
    # json, not jsonb: jsonb refuses text holding \u0000, which a job's metadata may.
    Column("result", JSON, comment="The JobResult, once the job ended."),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    Index("ix_api_jobs_owner_created", "owner", "created_at"),
)
"""Jobs sent through the gateway's async jobs API (``POST /v1/jobs``), kept until
``expires_at`` (the retention setting)."""


def make_engine(database_url: str) -> AsyncEngine:
    return create_async_engine(database_url, pool_size=5, max_overflow=5, pool_pre_ping=True)
