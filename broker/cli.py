"""The ``switchyard`` command: every process, the migrations and batch submission."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from broker.config import Config, load_config
from broker.errors import SwitchyardError
from broker.names import Names
from broker.runtime import Service, configure_logging, run_loop, run_services
from broker.settings import Settings, get_settings

app = typer.Typer(help="Switchyard: a queue-based broker for LLM calls.", no_args_is_help=True)
console = Console(stderr=True)
output = Console(width=None if Console().is_terminal else 120)  # tables: no wrap in logs
log = logging.getLogger("switchyard")


def _load() -> tuple[Settings, Config]:
    settings = get_settings()
    configure_logging(settings.log_level)
    try:
        return settings, load_config(settings.config)
    except SwitchyardError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from None


def _serve(services: list[Service]) -> None:
    try:
        run_loop(run_services(services), get_settings().event_loop)
    except SwitchyardError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from None


def _scheduler(settings: Settings, config: Config) -> Service:
    from broker.scheduler import Scheduler

    return Scheduler(
        settings.amqp_url, config, Names(settings.namespace), redis_url=settings.redis_url
    )


def _accountant(settings: Settings, config: Config) -> Service:
    from broker.accountant import Accountant

    return Accountant(
        settings.amqp_url,
        settings.database_url,
        config,
        Names(settings.namespace),
        redis_url=settings.redis_url,
    )


def _worker(settings: Settings, config: Config, provider_id: str) -> Service:
    from workers.pool import WorkerPool

    try:
        return WorkerPool(
            settings.amqp_url,
            config,
            Names(settings.namespace),
            provider_id,
            redis_url=settings.redis_url,
        )
    except SwitchyardError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from None


@app.command()
def up() -> None:
    """Run the scheduler, one worker pool per provider and the accountant in one process."""
    settings, config = _load()
    services = [_scheduler(settings, config), _accountant(settings, config)]
    services += [_worker(settings, config, p.id) for p in config.providers]
    _serve(services)


@app.command()
def scheduler() -> None:
    """Consume jobs, route them, hand them to provider queues."""
    settings, config = _load()
    _serve([_scheduler(settings, config)])


@app.command()
def worker(provider: Annotated[str, typer.Option(help="Provider id from the config.")]) -> None:
    """Serve one provider's queue."""
    settings, config = _load()
    _serve([_worker(settings, config, provider)])


@app.command()
def accountant() -> None:
    """Record usage and job outcomes in Postgres."""
    settings, config = _load()
    _serve([_accountant(settings, config)])


@app.command("mock-provider")
def mock_provider(
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1.")] = 8900,
    host: str = "127.0.0.1",
    latency_ms: float = 0.0,
    jitter_ms: float = 0.0,
    error_rate: float = 0.0,
    rate_limit_rate: float = 0.0,
    retry_after_s: float = 1.0,
    seed: int = 0,
) -> None:
    """Serve the mock provider (OpenAI wire format); its knobs change at run time: /_mock/config."""
    from mock_provider import MockSettings, run

    run(
        host,
        port,
        MockSettings(
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            error_rate=error_rate,
            rate_limit_rate=rate_limit_rate,
            retry_after_s=retry_after_s,
            seed=seed,
        ),
    )


@app.command()
def migrate(revision: str = "head") -> None:
    """Apply the database migrations (Alembic) to SWITCHYARD_DATABASE_URL."""
    from broker.migrate import upgrade

    settings = get_settings()
    configure_logging(settings.log_level)
    upgrade(settings.database_url, revision)
    console.print(f"database migrated to {revision}")


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Jobs, one per line.")],
    out: Annotated[
        Path | None, typer.Option(help="Results JSONL; default FILE.results.jsonl")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for all results.")] = 600.0,
    report: Annotated[bool, typer.Option(help="Print usage and cost read back from Postgres.")] = (
        False
    ),
) -> None:
    """Submit a JSONL batch, show progress, write the results and print a summary."""
    settings, _ = _load()
    out = out or file.with_suffix(".results.jsonl")
    batch_id = str(uuid.uuid4())
    sys.exit(asyncio.run(_submit(settings, file, out, batch_id, timeout, report)))


async def _submit(
    settings: Settings, file: Path, out: Path, batch_id: str, timeout_s: float, report: bool
) -> int:
    from broker.batch import read_jobs, run_batch
    from broker.client import SwitchyardClient

    try:
        jobs = read_jobs(file, batch_id)
    except SwitchyardError as exc:
        console.print(f"[red]{exc.message}[/red]")
        return 2
    client = await SwitchyardClient.connect(settings.amqp_url, namespace=settings.namespace)
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("jobs", total=len(jobs))
            summary = await run_batch(
                client,
                jobs,
                out,
                batch_id=batch_id,
                timeout_s=timeout_s,
                on_result=lambda _: progress.advance(task),
            )
    finally:
        await client.close()
    table = Table(title=f"batch {batch_id}")
    for column in ("submitted", "received", *sorted(summary.by_status), "tokens", "cost USD"):
        table.add_column(column, justify="right")
    table.add_row(
        str(summary.submitted),
        str(summary.received),
        *(str(summary.by_status[s]) for s in sorted(summary.by_status)),
        f"{summary.prompt_tokens} + {summary.completion_tokens}",
        f"{summary.cost_usd:.6f}",
    )
    output.print(table)
    console.print(f"results written to {out}")
    if report:
        await _print_report(settings, batch_id, summary.received)
    return 0 if summary.received == summary.submitted else 1


async def _print_report(settings: Settings, batch_id: str | None, expected: int) -> None:
    from broker.db import make_engine
    from broker.reports import usage_by_provider, wait_for_jobs

    engine = make_engine(settings.database_url)
    try:
        if batch_id is not None:
            recorded = await wait_for_jobs(engine, batch_id, expected, timeout_s=30)
            console.print(f"{recorded} of {expected} jobs recorded in Postgres")
        rows = await usage_by_provider(engine, batch_id)
    finally:
        await engine.dispose()
    table = Table(title="usage and cost by provider (from Postgres)")
    for column in ("provider", "model", "jobs", "prompt tokens", "completion tokens", "cost USD"):
        table.add_column(column, justify="left" if column in ("provider", "model") else "right")
    for r in rows:
        table.add_row(
            r.provider,
            r.model,
            str(r.jobs),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            f"{r.cost_usd:.6f}",
        )
    output.print(table)


@app.command()
def usage(batch: Annotated[str | None, typer.Option(help="Only this batch id.")] = None) -> None:
    """Print usage and cost per provider and model, read from Postgres."""
    settings = get_settings()
    asyncio.run(_print_report(settings, batch, 0))


if __name__ == "__main__":
    app()
