"""``switchyard config ...``: the config versions Postgres recorded, a rollback to one of them,
and a check of a file before it is applied (every process reloads on its own)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.apps import fail, new_table, output
from broker.core.config import load_config, parse_config
from broker.core.errors import ConfigError, SwitchyardError
from broker.core.names import Names
from broker.core.settings import Settings, get_settings
from broker.transport.runtime import configure_logging

if TYPE_CHECKING:
    from broker.core.config_store import ConfigVersion

__all__ = ["config_check", "config_history", "config_rollback"]


def config_history(
    limit: Annotated[int, typer.Option(min=1, help="Show this many versions.")] = 20,
) -> None:
    """The config versions applied, the most recent first (from Postgres)."""
    settings = get_settings()
    try:
        versions = asyncio.run(_history(settings, limit))
    except Exception as exc:
        raise _unreachable(exc) from None
    table = new_table(
        "config versions (most recently applied first)",
        *("id", "digest", "source", "first applied", "last applied"),
        left=("digest", "source", "first applied", "last applied"),
    )
    for v in versions:
        table.add_row(
            str(v.id),
            v.digest,
            v.source,
            f"{v.first_applied_at:%Y-%m-%d %H:%M:%S %Z}",
            f"{v.last_applied_at:%Y-%m-%d %H:%M:%S %Z}",
        )
    output.print(table)


def config_rollback(
    version: Annotated[str, typer.Argument(help="A version id, or a digest prefix.")],
) -> None:
    """Make an earlier version current: write it to the config file, record it, publish it."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        row_id, digest = asyncio.run(_rollback(settings, version))
    except SwitchyardError as exc:
        raise fail(exc.message) from None
    except Exception as exc:
        raise _unreachable(exc) from None
    output.print(f"rolled back to config version {row_id} (digest {digest}); {settings.config}")


def config_check(
    file: Annotated[Path, typer.Argument(dir_okay=False, help="A config file to validate.")],
) -> None:
    """Validate a config file without applying it."""
    try:
        config = load_config(file)
    except SwitchyardError as exc:
        raise fail(exc.message) from None
    output.print(f"valid, digest {config.version}")


async def _history(settings: Settings, limit: int) -> list[ConfigVersion]:
    from broker.core.config_store import history
    from broker.core.db import make_engine

    engine = make_engine(settings.database_url)
    try:
        return await history(engine, limit)
    finally:
        await engine.dispose()


async def _rollback(settings: Settings, version: str) -> tuple[int, str]:
    """Write version ``version`` to the config file, record it, then announce it to every
    process; its id and digest."""
    from broker.core.config_store import get, record
    from broker.core.db import make_engine
    from broker.transport.reload import VersionMessage, announce

    engine = make_engine(settings.database_url)
    try:
        row = await get(engine, int(version) if version.isdigit() else version)
        config = parse_config(row.content, f"config version {row.id} ({row.digest})")
        # The file first: it is what every process reads, and what a restarted one loads.
        try:
            _write_atomically(settings.config, row.content)
        except OSError as exc:
            raise ConfigError(f"{settings.config}: cannot write: {exc.strerror}") from None
        await record(engine, row.content, config, "rollback")
    finally:
        await engine.dispose()
    names = Names(settings.namespace)
    await announce(
        settings.amqp_url, names, VersionMessage(config.version, row.content, "rollback")
    )
    return row.id, config.version


def _unreachable(exc: Exception) -> typer.Exit:
    """Postgres or RabbitMQ failed under a config command: say which and why, briefly."""
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    return fail(
        f"{type(cause).__name__}: {cause}",
        1,
        hint="(SWITCHYARD_DATABASE_URL migrated with `switchyard migrate`?"
        " SWITCHYARD_AMQP_URL reachable?)",
    )


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` next to ``path`` and rename it over, so a reader sees the old file or the
    new, never half of one; keeps the file's mode, and a symlink (its target is replaced)."""
    path = path.resolve()
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode())
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
