"""The ``switchyard`` command: every process, the migrations, batch submission, the circuit
breakers, and config versions (history, rollback, check)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from broker.core.config import Config, load_config, parse_config
from broker.core.errors import ConfigError, SwitchyardError
from broker.core.names import Names
from broker.core.settings import Settings, get_settings
from broker.transport.runtime import Service, configure_logging, run_loop, run_services, tune_gc

if TYPE_CHECKING:
    from broker.core.config_store import ConfigVersion
    from broker.transport.reload import Reloadable

app = typer.Typer(help="Switchyard: a queue-based broker for LLM calls.", no_args_is_help=True)
config_app = typer.Typer(
    help="Config versions: history, rollback, check (every process reloads on its own).",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")
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


S = TypeVar("S")


def _build(make: Callable[[], S]) -> S:
    """Construct a service; a config it cannot serve is a clear error, not a traceback."""
    try:
        return make()
    except SwitchyardError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from None


def _serve(
    settings: Settings, config: Config, services: list[Reloadable], *, records: bool = False
) -> None:
    """Run the services with a config reloader (started last, stopped first) that applies each
    new version of the file, or from ``<ns>.config``, to them. Processes that use Postgres
    (``records``) also record each version in ``config_versions``; the scheduler and workers
    stay off Postgres, as before, and the accountant records the versions they publish."""
    from broker.transport.reload import ConfigReloader

    reloader = ConfigReloader(
        settings.config,
        settings.amqp_url,
        Names(settings.namespace),
        config,
        database_url=settings.database_url if records else None,
    )
    running: list[Service] = []
    for service in services:
        assert isinstance(service, Service)
        reloader.subscribe(service.apply)
        running.append(service)
    tune_gc()
    try:
        run_loop(run_services([*running, reloader]), settings.event_loop)
    except SwitchyardError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from None


def _scheduler(settings: Settings, config: Config) -> Reloadable:
    from broker.scheduler.service import Scheduler

    return _build(
        lambda: Scheduler(
            settings.amqp_url, config, Names(settings.namespace), redis_url=settings.redis_url
        )
    )


def _accountant(settings: Settings, config: Config) -> Reloadable:
    from broker.accounting.accountant import Accountant

    return _build(
        lambda: Accountant(
            settings.amqp_url,
            settings.database_url,
            config,
            Names(settings.namespace),
            redis_url=settings.redis_url,
        )
    )


@app.command()
def up() -> None:
    """Run the scheduler, one worker pool per provider and the accountant in one process."""
    from workers.pool import WorkerPools

    settings, config = _load()
    pools = _build(
        lambda: WorkerPools(
            settings.amqp_url, config, Names(settings.namespace), redis_url=settings.redis_url
        )
    )
    services = [_scheduler(settings, config), _accountant(settings, config), pools]
    _serve(settings, config, services, records=True)


@app.command()
def scheduler() -> None:
    """Consume jobs, route them, hand them to provider queues."""
    settings, config = _load()
    _serve(settings, config, [_scheduler(settings, config)])


@app.command()
def worker(provider: Annotated[str, typer.Option(help="Provider id from the config.")]) -> None:
    """Serve one provider's queue."""
    from workers.pool import WorkerPool

    settings, config = _load()
    pool = _build(
        lambda: WorkerPool(
            settings.amqp_url,
            config,
            Names(settings.namespace),
            provider,
            redis_url=settings.redis_url,
        )
    )
    _serve(settings, config, [pool])


@app.command()
def accountant() -> None:
    """Record usage and job outcomes in Postgres."""
    settings, config = _load()
    _serve(settings, config, [_accountant(settings, config)], records=True)


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

    tune_gc()  # it holds hundreds of slow calls at once: the full collections a worker had
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
    from broker.core.migrate import upgrade

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
    from broker.client import SwitchyardClient
    from broker.client.batch import read_jobs, run_batch

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
    from broker.accounting.reports import usage_by_provider, wait_for_jobs
    from broker.core.db import make_engine

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


@app.command()
def circuits(
    close: Annotated[
        str | None, typer.Option(help="Close this provider's circuit now (after a fix).")
    ] = None,
) -> None:
    """Each provider's circuit breaker, read from Redis: its state, failed calls in a row, and
    how long it stays open."""
    from redis.asyncio import Redis

    from broker.state.circuits import Circuits, CircuitView

    settings, config = _load()
    if close is not None and config.provider(close) is None:
        known = ", ".join(p.id for p in config.providers)
        console.print(f"[red]no provider {close!r} in the config; known: {known}[/red]")
        raise typer.Exit(2)

    async def read() -> list[CircuitView]:
        redis = Redis.from_url(settings.redis_url)
        try:
            breakers = Circuits(redis, Names(settings.namespace))
            if close is not None:
                await breakers.close(close)
            return [await breakers.read(p.id) for p in config.providers]
        finally:
            await redis.aclose()

    try:
        views = asyncio.run(read())
    except Exception as exc:
        console.print(f"[red]{type(exc).__name__}: {exc}[/red]\n(SWITCHYARD_REDIS_URL reachable?)")
        raise typer.Exit(1) from None
    table = Table(title="circuit breakers")
    for column in ("provider", "state", "failed in a row", "opens after", "open for (s)"):
        table.add_column(column, justify="left" if column in ("provider", "state") else "right")
    for provider, view in zip(config.providers, views, strict=True):
        table.add_row(
            provider.id,
            view.state(provider.circuit.failures).value,
            str(view.failures),
            str(provider.circuit.failures),
            f"{view.open_s_left():.1f}" if view.open_ms_left else "",
        )
    output.print(table)


# ---------------------------------------------------------------------------------------------
# switchyard config ...


def _config_error(exc: SwitchyardError) -> typer.Exit:
    console.print(f"[red]{exc.message}[/red]")
    return typer.Exit(2)


def _unreachable(exc: Exception) -> typer.Exit:
    """Postgres or RabbitMQ failed under a config command: say which and why, briefly."""
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    console.print(
        f"[red]{type(cause).__name__}: {cause}[/red]\n(SWITCHYARD_DATABASE_URL migrated with"
        " `switchyard migrate`? SWITCHYARD_AMQP_URL reachable?)"
    )
    return typer.Exit(1)


@config_app.command("history")
def config_history(
    limit: Annotated[int, typer.Option(min=1, help="Show this many versions.")] = 20,
) -> None:
    """The config versions applied, the most recent first (from Postgres)."""
    from broker.core.config_store import history
    from broker.core.db import make_engine

    settings = get_settings()

    async def read() -> list[ConfigVersion]:
        engine = make_engine(settings.database_url)
        try:
            return await history(engine, limit)
        finally:
            await engine.dispose()

    try:
        versions = asyncio.run(read())
    except Exception as exc:
        raise _unreachable(exc) from None
    table = Table(title="config versions (most recently applied first)")
    for column in ("id", "digest", "source", "first applied", "last applied"):
        table.add_column(column, justify="right" if column == "id" else "left")
    for v in versions:
        table.add_row(
            str(v.id),
            v.digest,
            v.source,
            f"{v.first_applied_at:%Y-%m-%d %H:%M:%S %Z}",
            f"{v.last_applied_at:%Y-%m-%d %H:%M:%S %Z}",
        )
    output.print(table)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` next to ``path`` and rename it over: a reader sees the old or the new
    file, never half of one. Keeps the file's permission bits, and a symlink (its target is
    replaced)."""
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


@config_app.command("rollback")
def config_rollback(
    version: Annotated[str, typer.Argument(help="A version id, or a digest prefix.")],
) -> None:
    """Make an earlier version current: write it to the config file, record it, publish it."""
    from broker.core.config_store import get, record
    from broker.core.db import make_engine
    from broker.transport.reload import VersionMessage, announce

    settings = get_settings()
    configure_logging(settings.log_level)

    async def rollback() -> tuple[int, str]:
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

    try:
        row_id, digest = asyncio.run(rollback())
    except SwitchyardError as exc:
        raise _config_error(exc) from None
    except Exception as exc:
        raise _unreachable(exc) from None
    output.print(f"rolled back to config version {row_id} (digest {digest}); {settings.config}")


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(dir_okay=False, help="A config file to validate.")],
) -> None:
    """Validate a config file without applying it."""
    try:
        config = load_config(file)
    except SwitchyardError as exc:
        raise _config_error(exc) from None
    output.print(f"valid, digest {config.version}")


if __name__ == "__main__":
    app()
