"""``switchyard submit``: a JSONL batch through the broker, and the usage and cost Postgres
recorded for it (``switchyard usage --batch`` prints that too)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from broker.cli.apps import console, fail, load, new_table, output
from broker.cli.batches import is_openai_batch, submit_stored
from broker.core.errors import SwitchyardError
from broker.core.settings import Settings

if TYPE_CHECKING:
    from broker.client.batch import BatchSummary

__all__ = ["print_batch_report", "submit"]


def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Jobs, one per line.")],
    out: Annotated[
        Path | None, typer.Option(help="Results JSONL; default FILE.results.jsonl")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for all results.")] = 600.0,
    report: Annotated[bool, typer.Option(help="Print usage and cost read back from Postgres.")] = (
        False
    ),
    key: Annotated[
        str | None, typer.Option(envvar="SWITCHYARD_KEY", help="The virtual key to send with.")
    ] = None,
) -> None:
    """Submit a JSONL batch, show progress, write the results and print a summary. A file in
    OpenAI's batch line format (custom_id, method, url, body) is stored as a batch instead, run
    by the gateways' batch runners (it goes on if this command stops)."""
    out = out or file.with_suffix(".results.jsonl")
    if is_openai_batch(file):
        sys.exit(submit_stored(file, out, timeout, key))
    settings, _ = load()
    batch_id = str(uuid.uuid4())
    sys.exit(asyncio.run(_submit(settings, file, out, batch_id, timeout, report, key)))


async def _submit(
    settings: Settings,
    file: Path,
    out: Path,
    batch_id: str,
    timeout_s: float,
    report: bool,
    key: str | None,
) -> int:
    from broker.client import SwitchyardClient
    from broker.client.batch import read_jobs, run_batch

    try:
        jobs = read_jobs(file, batch_id)
    except SwitchyardError as exc:
        return fail(exc.message).exit_code
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
                api_key=key,
                on_result=lambda _: progress.advance(task),
            )
    finally:
        await client.close()
    _print_summary(batch_id, summary)
    console.print(f"results written to {out}")
    if report:
        await print_batch_report(settings, batch_id, summary.received)
    return 0 if summary.received == summary.submitted else 1


def _print_summary(batch_id: str, summary: BatchSummary) -> None:
    statuses = sorted(summary.by_status)
    table = new_table(f"batch {batch_id}", "submitted", "received", *statuses, "tokens", "cost USD")
    table.add_row(
        str(summary.submitted),
        str(summary.received),
        *(str(summary.by_status[s]) for s in statuses),
        f"{summary.prompt_tokens} + {summary.completion_tokens}",
        f"{summary.cost_usd:.6f}",
    )
    output.print(table)


async def print_batch_report(settings: Settings, batch_id: str | None, expected: int) -> None:
    """A batch's usage and cost per provider and model, once ``expected`` of its jobs are
    recorded (or 30 s passed)."""
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
    table = new_table(
        "usage and cost by provider (from Postgres)",
        *("provider", "model", "jobs", "prompt tokens", "completion tokens", "cost USD"),
        left=("provider", "model"),
    )
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
