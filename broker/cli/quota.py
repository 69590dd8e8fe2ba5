"""``switchyard quota rebuild``: raise Redis's quota counters to what the ledger says, and give
Redis a quota epoch if it has none (what a scheduler does on its own when it finds the counters
lost; by hand after restoring Redis, or to check)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import typer

from broker.cli.apps import fail, load, output

if TYPE_CHECKING:
    from broker.core.config import Config
    from broker.core.settings import Settings
    from broker.state.quota_rebuild import Rebuilt

__all__ = ["quota_app"]

quota_app = typer.Typer(help="Quota counters in Redis.", no_args_is_help=True)


@quota_app.command()
def rebuild() -> None:
    """Raise every live quota counter to its value in the ledger (settled usage plus calls in
    flight at their reservation); a counter already higher is left as it is."""
    settings, config = load()
    try:
        rebuilt = asyncio.run(_rebuild(settings, config))
    except Exception as exc:
        raise fail(
            f"{type(exc).__name__}: {exc}",
            1,
            hint="(SWITCHYARD_REDIS_URL and SWITCHYARD_DATABASE_URL reachable?)",
        ) from None
    output.print(
        f"quota counters rebuilt from the ledger: {rebuilt.counters} with spend, epoch"
        f" {rebuilt.epoch}"
    )


async def _rebuild(settings: Settings, config: Config) -> Rebuilt:
    from redis.asyncio import Redis

    from broker.core.db import make_engine
    from broker.core.names import Names
    from broker.state.quota_rebuild import QuotaRebuilder

    engine = make_engine(settings.database_url)
    redis = Redis.from_url(settings.redis_url)
    try:
        rebuilder = QuotaRebuilder(engine, redis, Names(settings.namespace), config)
        return await rebuilder.rebuild()
    finally:
        await redis.aclose()
        await engine.dispose()
