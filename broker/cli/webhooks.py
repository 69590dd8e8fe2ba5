"""``switchyard webhooks``: the webhook dispatcher as a process (no subcommand), ``list`` of the
deliveries Postgres holds, and ``replay ID`` to send one again with the same ``webhook-id``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import typer

from broker.cli.apps import MetricsPort, build, fail, load, new_table, output
from broker.core.names import Names
from broker.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from broker.core.config import Config
    from broker.core.webhook_store import WebhookStore
    from broker.transport.reload import Reloadable

__all__ = ["dispatcher", "webhooks_app"]

T = TypeVar("T")

webhooks_app = typer.Typer(
    help="The webhook dispatcher (no subcommand: run it), its deliveries, and replays.",
    invoke_without_command=True,
)


def dispatcher(settings: Settings, config: Config) -> Reloadable:
    """The dispatcher service, for ``switchyard webhooks`` and ``switchyard up``."""
    from broker.webhooks.dispatcher import WebhookDispatcher

    return build(
        lambda: WebhookDispatcher(
            settings.amqp_url,
            config,
            Names(settings.namespace),
            database_url=settings.database_url,
        )
    )


@webhooks_app.callback()
def serve(context: typer.Context, metrics_port: MetricsPort = None) -> None:
    """Consume webhook events and POST them, signed, retried, every attempt recorded."""
    if context.invoked_subcommand is not None:
        return
    from broker.cli import _serve  # the package's, once it has loaded (it imports this module)

    settings, config = load()
    service = dispatcher(settings, config)
    _serve(settings, config, [service], records=True, metrics_port=metrics_port)


def _shown(url: str) -> str:
    """A URL without its query (it may hold a token)."""
    parts = urlsplit(url)
    return parts._replace(query="?" if parts.query else "", fragment="").geturl()


def _when(moment: datetime | None) -> str:
    return "" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"


@webhooks_app.command("list")
def list_deliveries(
    state: Annotated[
        Literal["pending", "delivered", "dead"] | None,
        typer.Option(help="Only deliveries in this state."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show this many, newest first.")] = 20,
) -> None:
    """Webhook deliveries, newest first: state, attempts, last status, next attempt."""
    rows: list[dict[str, Any]] = _run(lambda store: store.list(state=state, limit=limit))
    table = new_table(
        "webhook deliveries (newest first)",
        *("id", "url", "type", "state", "attempts", "last status", "next attempt"),
        left=("id", "url", "type", "state", "next attempt"),
    )
    ids, urls = table.columns[0], table.columns[1]
    ids.no_wrap, ids.min_width = True, max((len(r["webhook_id"]) for r in rows), default=2)
    urls.overflow = "fold"  # the id whole (to replay it), the URL over lines if need be
    for row in rows:
        pending = row["state"] == "pending"
        table.add_row(
            row["webhook_id"],
            _shown(row["url"]),
            row["type"],
            row["state"],
            str(row["attempts"]),
            "" if row["last_status"] is None else str(row["last_status"]),
            _when(row["next_attempt_at"]) if pending else "",
        )
    output.print(table)


@webhooks_app.command("replay")
def replay(webhook_id: Annotated[str, typer.Argument(help="The delivery's id.")]) -> None:
    """Send a delivery again, whatever its state, with the same webhook-id (a fresh retry
    series; its endpoint enabled again if a 410 disabled it)."""
    if not _run(lambda store: store.replay(webhook_id)):
        raise fail(f"no webhook delivery {webhook_id!r}", 1)
    output.print(f"webhook {webhook_id} replayed: a dispatcher sends it within a second")


def _run(action: Callable[[WebhookStore], Awaitable[T]]) -> T:
    settings = get_settings()

    async def run() -> T:
        from broker.core.db import make_engine
        from broker.core.webhook_store import WebhookStore

        engine = make_engine(settings.database_url)
        try:
            return await action(WebhookStore(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except Exception as exc:
        raise fail(
            f"{type(exc).__name__}: {exc}", 1, hint="(SWITCHYARD_DATABASE_URL reachable?)"
        ) from None
