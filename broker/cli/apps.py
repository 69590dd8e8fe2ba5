"""The Typer apps every ``switchyard`` command registers on, the consoles they print to, and the
one way a command fails: a message in red and an exit code, never a traceback."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from broker.core.config import Config, load_config
from broker.core.errors import SwitchyardError
from broker.core.settings import Settings, get_settings
from broker.transport.runtime import configure_logging

__all__ = [
    "MetricsPort",
    "app",
    "build",
    "config_app",
    "console",
    "fail",
    "load",
    "new_table",
    "output",
]

app = typer.Typer(help="Switchyard: a queue-based broker for LLM calls.", no_args_is_help=True)
config_app = typer.Typer(
    help="Config versions: history, rollback, check (every process reloads on its own).",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")
console = Console(stderr=True)
output = Console(width=None if Console().is_terminal else 120)  # tables: no wrap in logs

S = TypeVar("S")

MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=1,
        max=65535,
        help="Serve /metrics for Prometheus here; default SWITCHYARD_METRICS_PORT, else none.",
    ),
]


def fail(message: str, code: int = 2, *, hint: str = "") -> typer.Exit:
    """Print ``message`` in red (then ``hint`` plain); the exit for the caller to raise."""
    console.print(f"[red]{message}[/red]" + (f"\n{hint}" if hint else ""))
    return typer.Exit(code)


def load() -> tuple[Settings, Config]:
    """The settings, with logging set up, and the config file they name."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        return settings, load_config(settings.config)
    except SwitchyardError as exc:
        raise fail(exc.message) from None


def build(make: Callable[[], S]) -> S:
    """Construct a service; a config it cannot serve is a clear error, not a traceback."""
    try:
        return make()
    except SwitchyardError as exc:
        raise fail(exc.message) from None


def new_table(title: str, *columns: str, left: Collection[str] = ()) -> Table:
    """A table with these columns: text ``left``-aligned, the rest (numbers) right-aligned."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    return table
