"""The ``switchyard`` command: every process, the migrations, batch submission, the circuit
breakers, the models, the quota counters (rebuild), and config versions (history, rollback,
check).

The commands that run Switchyard's processes are here; each other area is a module of its own,
registered at the end in the order ``--help`` lists them.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.apps import MetricsPort, app, build, config_app, console, fail, load
from broker.cli.batch import submit
from broker.cli.batches import batches_app
from broker.cli.circuits import circuits
from broker.cli.jobs import jobs_app
from broker.cli.models import models
from broker.cli.quota import quota_app
from broker.cli.usage import usage
from broker.cli.versions import config_check, config_history, config_rollback
from broker.cli.webhooks import dispatcher as _webhooks
from broker.cli.webhooks import webhooks_app
from broker.core.config import Config
from broker.core.errors import SwitchyardError
from broker.core.names import Names
from broker.core.settings import Settings, get_settings
from broker.transport.runtime import Service, configure_logging, run_loop, run_services, tune_gc

if TYPE_CHECKING:
    from broker.transport.reload import Reloadable

__all__ = ["app"]


def _serve(
    settings: Settings,
    config: Config,
    services: list[Reloadable],
    *,
    records: bool = False,
    metrics_port: int | None = None,
) -> None:
    """Run the services with a config reloader (started last, stopped first), so every new config
    version reaches them; only processes on Postgres anyway (``records``) record the versions.
    One ``/metrics`` serves every service of the process."""
    from broker.core.metrics import serve_metrics
    from broker.core.tracing import configure_tracing
    from broker.transport.reload import ConfigReloader

    port = metrics_port or settings.metrics_port
    if port is not None:
        serve_metrics(port, settings.metrics_host)
    named = [str(getattr(service, "name", "")) for service in services]
    configure_tracing(
        f"switchyard-{named[0]}" if len(named) == 1 else "switchyard", settings.otlp_endpoint
    )

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
        raise fail(exc.message) from None


def _scheduler(settings: Settings, config: Config) -> Reloadable:
    from broker.scheduler.service import Scheduler
    from broker.transport.queue_levels import management_url, vhost_of

    api = settings.rabbitmq_api_url or management_url(settings.amqp_url)
    return build(
        lambda: Scheduler(
            settings.amqp_url,
            config,
            Names(settings.namespace),
            redis_url=settings.redis_url,
            database_url=settings.database_url,
            queues_at=(api, vhost_of(settings.amqp_url)),
        )
    )


def _accountant(settings: Settings, config: Config) -> Reloadable:
    from broker.accounting.accountant import Accountant

    return build(
        lambda: Accountant(
            settings.amqp_url,
            settings.database_url,
            config,
            Names(settings.namespace),
            redis_url=settings.redis_url,
        )
    )


@app.command()
def up(
    gateway_host: Annotated[str, typer.Option(help="The gateway's address.")] = "127.0.0.1",
    gateway_port: Annotated[
        int | None, typer.Option(help="The gateway's port; default SWITCHYARD_GATEWAY_PORT.")
    ] = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Run the gateway (with its batch runner), the scheduler, one worker pool per provider,
    the accountant and the webhook dispatcher in one process."""
    from workers.pools import WorkerPools

    settings, config = load()
    pools = build(
        lambda: WorkerPools(
            settings.amqp_url,
            config,
            Names(settings.namespace),
            redis_url=settings.redis_url,
            settle_margin_s=settings.call_settle_margin_s,
        )
    )
    services = [
        _scheduler(settings, config),
        _accountant(settings, config),
        pools,
        _gateway(settings, config, gateway_host, gateway_port or settings.gateway_port),
        _webhooks(settings, config),
    ]
    _serve(settings, config, services, records=True, metrics_port=metrics_port)


def _gateway(settings: Settings, config: Config, host: str, port: int) -> Reloadable:
    from broker.gateway.service import Gateway

    return build(
        lambda: Gateway(
            settings.amqp_url,
            config,
            Names(settings.namespace),
            host=host,
            port=port,
            redis_url=settings.redis_url,
            database_url=settings.database_url,
            retention=timedelta(days=settings.job_retention_days),
            file_retention=timedelta(days=settings.file_retention_days),
            batch_in_flight=settings.batch_in_flight,
            batch_lease=timedelta(seconds=settings.batch_lease_s),
        )
    )


@app.command()
def gateway(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="TCP port; default SWITCHYARD_GATEWAY_PORT, else 8080.")
    ] = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Serve the OpenAI-compatible HTTP API in front of the queue pipeline."""
    settings, config = load()
    service = _gateway(settings, config, host, port or settings.gateway_port)
    _serve(settings, config, [service], metrics_port=metrics_port)


@app.command()
def scheduler(metrics_port: MetricsPort = None) -> None:
    """Consume jobs, route them, hand them to provider queues."""
    settings, config = load()
    _serve(settings, config, [_scheduler(settings, config)], metrics_port=metrics_port)


@app.command()
def worker(
    provider: Annotated[str, typer.Option(help="Provider id from the config.")],
    metrics_port: MetricsPort = None,
) -> None:
    """Serve one provider's queue."""
    from workers.pool import WorkerPool

    settings, config = load()
    pool = build(
        lambda: WorkerPool(
            settings.amqp_url,
            config,
            Names(settings.namespace),
            provider,
            redis_url=settings.redis_url,
            settle_margin_s=settings.call_settle_margin_s,
        )
    )
    _serve(settings, config, [pool], metrics_port=metrics_port)


@app.command()
def accountant(metrics_port: MetricsPort = None) -> None:
    """Record usage and job outcomes in Postgres."""
    settings, config = load()
    service = _accountant(settings, config)
    _serve(settings, config, [service], records=True, metrics_port=metrics_port)


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

    tune_gc()  # it holds many slow calls at once, as a worker does
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
def asyncapi(
    out: Annotated[Path | None, typer.Option(help="Write it here (default: print it).")] = None,
) -> None:
    """The AMQP interface as an AsyncAPI 3.0 document (JSON), from the message models."""
    import orjson

    from broker.core.asyncapi import asyncapi_document

    settings = get_settings()
    text = orjson.dumps(asyncapi_document(Names(settings.namespace)), option=orjson.OPT_INDENT_2)
    if out is None:
        typer.echo(text.decode())
    else:
        out.write_bytes(text + b"\n")
        console.print(f"AsyncAPI document written to {out}")


@app.command()
def migrate(revision: str = "head") -> None:
    """Apply the database migrations (Alembic) to SWITCHYARD_DATABASE_URL."""
    from broker.core.migrate import upgrade

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    upgrade(settings.database_url, revision)
    console.print(f"database migrated to {revision}")


app.command()(submit)
app.command()(usage)
app.command()(circuits)
app.command()(models)
app.add_typer(quota_app, name="quota")
app.add_typer(jobs_app, name="jobs")
app.add_typer(batches_app, name="batches")
app.add_typer(webhooks_app, name="webhooks")
config_app.command("history")(config_history)
config_app.command("rollback")(config_rollback)
config_app.command("check")(config_check)
