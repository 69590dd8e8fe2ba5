"""``switchyard jobs show ID`` and ``switchyard jobs cancel ID``: where a tracked job stands
(its position and ETA while queued), and cancelling it before its call, as an operator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from broker.cli.apps import fail, load, new_table, output
from broker.core.names import Names

if TYPE_CHECKING:
    from broker.core.settings import Settings
    from broker.state.job_states import JobStates

T = TypeVar("T")

__all__ = ["jobs_app"]

jobs_app = typer.Typer(help="Tracked jobs: where one stands, and cancelling it.")


@jobs_app.command("show")
def show(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """The job's state; while queued, its provider, position and ETA."""
    settings, _ = load()
    standing = _run(settings, lambda states: states.standing(job_id))
    table = new_table(f"job {job_id}", "field", "value", left=("field", "value"))
    for field, value in (
        ("state", standing.state),
        ("provider", standing.provider),
        ("model", standing.model),
        ("priority", standing.priority),
        ("position", standing.position),
        ("eta (s)", standing.eta_s),
        ("estimated cost (USD)", standing.est_cost_usd),
        ("owner (key id)", standing.owner),
    ):
        if value is not None:
            table.add_row(field, str(value))
    output.print(table)


@jobs_app.command("cancel")
def cancel(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Cancel the job if its call has not started (exit 1 if it has)."""
    settings, _ = load()
    outcome = _run(settings, lambda states: states.cancel(job_id, "*"))
    if outcome != "cancelled":
        raise fail(f"job {job_id} is {outcome}: too late to cancel", 1)
    output.print(f"job {job_id} cancelled: if it comes, it will not be called")


def _run(settings: Settings, action: Callable[[JobStates], Awaitable[T]]) -> T:
    async def run() -> T:
        from redis.asyncio import Redis

        from broker.state.job_states import JobStates

        redis = Redis.from_url(settings.redis_url)
        try:
            return await action(JobStates(redis, Names(settings.namespace)))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except Exception as exc:
        raise fail(
            f"{type(exc).__name__}: {exc}", 1, hint="(SWITCHYARD_REDIS_URL reachable?)"
        ) from None
