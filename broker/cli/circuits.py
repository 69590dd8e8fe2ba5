"""``switchyard circuits``: each provider's circuit breaker as Redis holds it, and closing one by
hand once its provider is fixed."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.apps import fail, load, new_table, output
from broker.core.names import Names

if TYPE_CHECKING:
    from broker.core.config import Config
    from broker.core.settings import Settings
    from broker.state.circuits import CircuitView

__all__ = ["circuits"]


def circuits(
    close: Annotated[
        str | None, typer.Option(help="Close this provider's circuit now (after a fix).")
    ] = None,
) -> None:
    """Each provider's circuit breaker, read from Redis: its state, failed calls in a row, and
    how long it stays open."""
    settings, config = load()
    if close is not None and config.provider(close) is None:
        known = ", ".join(p.id for p in config.providers)
        raise fail(f"no provider {close!r} in the config; known: {known}")
    try:
        views = asyncio.run(_read(settings, config, close))
    except Exception as exc:
        raise fail(
            f"{type(exc).__name__}: {exc}", 1, hint="(SWITCHYARD_REDIS_URL reachable?)"
        ) from None
    table = new_table(
        "circuit breakers",
        *("provider", "state", "failed in a row", "opens after", "open for (s)"),
        left=("provider", "state"),
    )
    for provider, view in zip(config.providers, views, strict=True):
        table.add_row(
            provider.id,
            view.state(provider.circuit.failures).value,
            str(view.failures),
            str(provider.circuit.failures),
            f"{view.open_s_left():.1f}" if view.open_ms_left else "",
        )
    output.print(table)


async def _read(settings: Settings, config: Config, close: str | None) -> list[CircuitView]:
    """Every provider's circuit, after closing ``close``'s if given."""
    from redis.asyncio import Redis

    from broker.state.circuits import Circuits

    redis = Redis.from_url(settings.redis_url)
    try:
        breakers = Circuits(redis, Names(settings.namespace))
        if close is not None:
            await breakers.close(close)
        return [await breakers.read(p.id) for p in config.providers]
    finally:
        await redis.aclose()
