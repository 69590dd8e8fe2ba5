"""Postgres tables (SQLAlchemy Core) and the engine. Alembic owns the schema (``migrations/``);
these definitions must match the latest revision."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Select,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    false,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSON
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement

__all__ = [
    "api_jobs",
    "batch_lines",
    "batches",
    "calls",
    "config_versions",
    "file_chunks",
    "files",
    "jobs",
    "keyset_page",
    "make_engine",
    "metadata",
    "usage",
    "webhook_attempts",
    "webhook_deliveries",
    "webhook_endpoints",
]

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
    Column("task_type", String(100), comment="The job's task type, if it named one."),
    Column(
        "consumer",
        String(256),
        comment="The end user the caller named (OpenAI's ``user`` parameter), if any.",
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
    Column("task_type", String(100), comment="The job's task type, if it named one."),
    Column(
        "consumer",
        String(256),
        comment="The end user the caller named (OpenAI's ``user`` parameter), if any.",
    ),
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


files = Table(
    "files",
    metadata,
    Column("file_id", String(64), primary_key=True),
    Column("owner", String(128)),  # the virtual key's id; NULL: no keys configured
    Column("purpose", String(32), nullable=False),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False, server_default="0"),
    Column("batch_id", String(64)),  # an output or error file: read from batch_lines
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), index=True),
    Index("ix_files_owner_created", "owner", "created_at"),
)
"""Files as OpenAI's Files API has them: an uploaded file's bytes are in ``file_chunks``; a
batch's output and error files are views of its ``batch_lines``."""

file_chunks = Table(
    "file_chunks",
    metadata,
    Column("file_id", String(64), ForeignKey("files.file_id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("file_id", "seq"),
)
"""An uploaded file in pieces of up to 1 MiB, so it is written and read without holding it."""

batches = Table(
    "batches",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("owner", String(128)),
    Column("status", String(16), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(8), nullable=False),
    Column("metadata", JSON),
    Column("webhook", Text),  # where the batch's end is POSTed (signed), if anywhere
    # The virtual key its lines are sent with (the scheduler checks it as any job's), until the
    # batch ends: RabbitMQ keeps it the same way on a persistent job's message.
    Column("key_secret", Text),
    Column("errors", JSON),  # the input's invalid lines: code, message, line
    Column("total", Integer, nullable=False, server_default="0"),
    Column("completed", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    # Every line up to this number has been published as a job.
    Column("enqueued", Integer, nullable=False, server_default="0"),
    # Rounds of sending its lines: a line's job id carries the round it was sent in.
    Column("send_round", Integer, nullable=False, server_default="0"),
    Column("prompt_tokens", BigInteger, nullable=False, server_default="0"),
    Column("completion_tokens", BigInteger, nullable=False, server_default="0"),
    Column("cost_usd", Numeric(18, 9), nullable=False, server_default="0"),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("runner", String(128)),  # the batch runner holding the batch, until lease_until
    Column("lease_until", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    *(
        Column(f"{moment}_at", DateTime(timezone=True))
        for moment in (
            "in_progress",
            "finalizing",
            "completed",
            "failed",
            "expired",
            "cancelling",
            "cancelled",
        )
    ),
    Index("ix_batches_owner_created", "owner", "created_at"),
    Index("ix_batches_status", "status"),
)
"""Stored batches (OpenAI's Batch API), run by ``broker.gateway.batches``."""

batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", String(64), nullable=False),
    Column("line", Integer, nullable=False),
    Column("custom_id", Text, nullable=False),
    Column("status", String(16)),  # NULL until the line's answer is in
    Column("in_error", Boolean, nullable=False, server_default=false()),
    Column("output", Text),  # the output (or error) file's line for it, JSON
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    Column("cost_usd", Numeric(18, 9), nullable=False, server_default="0"),
    PrimaryKeyConstraint("batch_id", "line"),
    UniqueConstraint("batch_id", "custom_id", name="batch_lines_custom_id_key"),
    # The lines not answered yet, which the runner counts every half second.
    Index("ix_batch_lines_pending", "batch_id", "line", postgresql_where=text("status IS NULL")),
)
"""One row per valid input line, written while the input is validated; answered once."""

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("url", Text, primary_key=True),
    Column("disabled_at", DateTime(timezone=True)),
    Column("disabled_reason", Text),
)
"""Webhook URLs the dispatcher knows something of: one that answered 410 is disabled (its later
deliveries are dead at once, no POST) until a replay to it enables it again."""

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("webhook_id", String(128), primary_key=True),
    Column("url", Text, nullable=False),
    Column("type", String(64), nullable=False),
    Column("body", Text, nullable=False),  # the bytes signed and sent, on every retry
    Column("owner", String(128)),  # the virtual key's id; NULL: no keys configured
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("series_start", Integer, nullable=False, server_default="0"),  # attempts at replay
    Column("next_attempt_at", DateTime(timezone=True)),  # due, or leased until; NULL once ended
    Column("lease_id", String(16)),  # the attempt in hand, whose outcome moves the state
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("traceparent", String(55)),  # W3C trace context, sent with every attempt
    CheckConstraint(
        "state IN ('pending', 'delivered', 'dead')", name="webhook_deliveries_state_check"
    ),
    Index(
        "ix_webhook_deliveries_due",
        "next_attempt_at",
        postgresql_where=text("state = 'pending'"),
    ),
    Index("ix_webhook_deliveries_owner_created", "owner", "created_at"),
    Index("ix_webhook_deliveries_created", "created_at"),
)
"""One row per webhook event (``WebhookRequest``), recorded once per ``webhook_id``."""

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column(
        "webhook_id",
        String(128),
        ForeignKey("webhook_deliveries.webhook_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("number", Integer, nullable=False),  # from 1, across replays
    Column("attempted_at", DateTime(timezone=True), nullable=False),
    Column("status_code", Integer),  # NULL: no answer (timeout, connection failed)
    Column("latency_ms", Float, nullable=False),
    Column("error", Text),
)
"""Every POST a dispatcher made, answered or not."""


def keyset_page(
    query: Select[Any],
    created: ColumnElement[Any],
    key: ColumnElement[Any],
    after: str | None,
    limit: int,
    *,
    newest_first: bool = True,
) -> Select[Any]:
    """``query`` in (``created``, ``key``) order, from just past the row whose key is ``after``
    (the last of the previous page): a page that stays right while rows are added."""
    if after is not None:
        anchor = select(created).where(key == after).scalar_subquery()
        if newest_first:
            query = query.where(or_(created < anchor, and_(created == anchor, key < after)))
        else:
            query = query.where(or_(created > anchor, and_(created == anchor, key > after)))
    keys = (created.desc(), key.desc()) if newest_first else (created, key)
    return query.order_by(*keys).limit(limit)


def make_engine(database_url: str) -> AsyncEngine:
    # No statement's parameters in an error's text: they hold virtual keys and prompts.
    return create_async_engine(
        database_url, pool_size=5, max_overflow=5, pool_pre_ping=True, hide_parameters=True
    )


# The daily rollup of usage is defined beside its reports; imported here so that this
# metadata (Alembic's, the migration test's) holds it whichever module is imported first.
import broker.core.db_reports  # noqa: E402, F401
