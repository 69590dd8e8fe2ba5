"""Config versions in Postgres (``config_versions``): every version applied, once per digest,
with the text as it was applied, so ``switchyard config rollback`` can reproduce it exactly.

``source`` says how the first process to record a version learned of it: ``file`` (it saw the
file change), ``bus`` (it heard it on ``<ns>.config``, from a process without a database or a
tool), or ``rollback`` (an operator rolled back to it; a later re-apply does not rename it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Row, case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.config import Config
from broker.core.db import config_versions
from broker.core.errors import ConfigError

__all__ = ["ConfigVersion", "Source", "get", "history", "record"]

Source = Literal["file", "bus", "rollback"]

MIN_DIGEST_PREFIX = 4


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    """One row of ``config_versions``."""

    id: int
    digest: str
    content: str
    source: str
    first_applied_at: datetime
    last_applied_at: datetime


_insert = insert(config_versions)
_UPSERT = _insert.on_conflict_do_update(
    constraint="config_versions_digest_key",
    set_={
        "last_applied_at": func.now(),
        "source": case(
            (_insert.excluded.source == "rollback", "rollback"), else_=config_versions.c.source
        ),
    },
).returning(config_versions.c.id)


async def record(engine: AsyncEngine, config_text: str, config: Config, source: Source) -> int:
    """Record that ``config`` (parsed from ``config_text``) was applied; returns its id.

    Upsert by digest: a version applied again keeps its id, its first text and first time, and
    gets a new ``last_applied_at``; so several processes recording one change is harmless.
    """
    async with engine.begin() as conn:
        row_id = await conn.scalar(
            _UPSERT, {"digest": config.version, "content": config_text, "source": source}
        )
    assert row_id is not None
    return int(row_id)


def _version(row: Row[Any]) -> ConfigVersion:
    return ConfigVersion(**row._mapping)


async def history(engine: AsyncEngine, limit: int = 20) -> list[ConfigVersion]:
    """The versions, the most recently applied first."""
    query = (
        select(config_versions)
        .order_by(config_versions.c.last_applied_at.desc(), config_versions.c.id.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [_version(row) for row in await conn.execute(query)]


async def get(engine: AsyncEngine, version: int | str) -> ConfigVersion:
    """The version with this id, or whose digest starts with this prefix (4 characters or more).

    Raises ``ConfigError`` when none matches or a prefix matches several.
    """
    async with engine.connect() as conn:
        if isinstance(version, int):
            row = (
                await conn.execute(select(config_versions).where(config_versions.c.id == version))
            ).first()
            if row is None:
                raise ConfigError(f"no config version with id {version}")
            return _version(row)
        if len(version) < MIN_DIGEST_PREFIX:
            raise ConfigError(
                f"digest prefix {version!r} is too short: give {MIN_DIGEST_PREFIX} characters"
                " or more, or an id"
            )
        rows = (
            await conn.execute(
                select(config_versions)
                .where(config_versions.c.digest.startswith(version.lower(), autoescape=True))
                .order_by(config_versions.c.id)
                .limit(10)
            )
        ).all()
    if not rows:
        raise ConfigError(f"no config version whose digest starts with {version!r}")
    if len(rows) > 1:
        ids = ", ".join(f"{r.id} ({r.digest})" for r in rows)
        raise ConfigError(f"digest prefix {version!r} matches several versions: {ids}")
    return _version(rows[0])
