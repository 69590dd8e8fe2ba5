"""``switchyard models``: the table ``GET /v1/models`` gives, for a terminal."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from broker.cli.apps import fail, load, new_table, output
from broker.core.names import Names

if TYPE_CHECKING:
    from broker.core.config import Config
    from broker.core.settings import Settings

__all__ = ["models"]

_COLUMNS = ("model", "served by", "$/M in/out now", "context", "takes", "limits", "circuit")
_SHORT = {"streaming": "stream", "tools": "tools", "json_mode": "json", "vision": "vision"}


def models() -> None:
    """Every public model with its providers, prices now, capabilities, limits and circuits."""
    settings, config = load()
    try:
        listed = asyncio.run(_list(settings, config))
    except Exception as exc:
        raise fail(
            f"{type(exc).__name__}: {exc}", 1, hint="(SWITCHYARD_REDIS_URL reachable?)"
        ) from None
    table = new_table("models", *_COLUMNS, left=("model", "served by", "takes", "circuit"))
    for entry in listed["data"]:
        for served in entry["switchyard"]["providers"]:
            table.add_row(*_row(entry["id"], served))
    output.print(table)


def _row(model: str, served: dict[str, Any]) -> list[str]:
    takes = ",".join(_SHORT[name] for name, on in served["capabilities"].items() if on)
    limits = served["limits"]
    shown = [f"conc {limits['concurrency']}"]
    if limits["global_concurrency"]:
        shown.append(f"global {limits['global_concurrency']}")
    for name in ("rpm", "tpm"):
        value = limits[f"model_{name}"] or limits[f"provider_{name}"]
        if value:
            shown.append(f"{name} {value}")
    price = served["price_now_per_million"]
    return [
        model,
        f"{served['provider']}/{served['model']}",
        f"{price['input']}/{price['output']}",
        str(served["context_window"] or ""),
        takes,
        " ".join(shown),
        served["circuit"] or "",
    ]


async def _list(settings: Settings, config: Config) -> dict[str, Any]:
    from redis.asyncio import Redis

    from broker.gateway.models import models_list
    from broker.state.circuits import Circuits

    redis = Redis.from_url(settings.redis_url)
    try:
        return await models_list(config, Circuits(redis, Names(settings.namespace)))
    finally:
        await redis.aclose()
