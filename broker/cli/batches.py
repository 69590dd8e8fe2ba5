"""``switchyard batches list|show|cancel|download``: the stored batches (an operator's view:
every key's), read from Postgres; and ``submit``'s path for a file in OpenAI's batch line format,
which stores the batch for the gateways' batch runners and follows it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from broker.cli.apps import console, fail, load, new_table, output
from broker.core.auth import authenticate
from broker.core.clock import utcnow
from broker.core.names import HEADER_KEY
from broker.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from broker.gateway.batches.files import FilesStore
    from broker.gateway.batches.store import BatchStore

__all__ = ["batches_app", "is_openai_batch", "submit_stored"]

batches_app = typer.Typer(
    help="Stored batches (OpenAI's Batch API): list, show, cancel, download.",
    no_args_is_help=True,
)
ENDED = ("failed", "completed", "expired", "cancelled")


def is_openai_batch(path: Path) -> bool:
    """Whether the file's first line is OpenAI's batch line (custom_id, method, url, body)."""
    with path.open("rb") as source:
        for raw in source:
            if raw.strip():
                try:
                    first = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return False
                return isinstance(first, dict) and {"custom_id", "body"} <= first.keys()
    return False


@asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[tuple[BatchStore, FilesStore]]:
    from broker.core.db import make_engine
    from broker.gateway.batches.files import FilesStore
    from broker.gateway.batches.store import BatchStore

    engine = make_engine(settings.database_url)
    try:
        retention = timedelta(days=settings.file_retention_days)
        yield BatchStore(engine), FilesStore(engine, retention)
    finally:
        await engine.dispose()


@batches_app.command("list")
def list_batches(limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20) -> None:
    """Every key's batches, newest first."""

    async def run() -> None:
        async with _stores(get_settings()) as (store, _):
            rows = await store.page("*", limit, None)
            table = new_table(
                "batches",
                *("id", "owner", "status", "created", "total", "completed", "failed"),
                left=("id", "owner", "status", "created"),
            )
            table.columns[0].min_width = len("batch_") + 24  # an id is shown whole
            for row in rows:
                done, failed = (
                    (row["completed"], row["failed"])
                    if row["status"] in ENDED
                    else await store.counts(row["batch_id"])
                )
                table.add_row(
                    row["batch_id"],
                    row["owner"] or "-",
                    row["status"],
                    f"{row['created_at']:%Y-%m-%d %H:%M:%S}",
                    str(row["total"]),
                    str(done),
                    str(failed),
                )
            output.print(table)

    asyncio.run(run())


@batches_app.command("show")
def show(batch_id: str) -> None:
    """One batch as the API shows it (JSON)."""
    from broker.gateway.batches.api import batch_object

    async def run() -> dict[str, Any] | None:
        async with _stores(get_settings()) as (store, _):
            row = await store.get(batch_id, "*")
            if row is None:
                return None
            counts = None if row["status"] in ENDED else await store.counts(batch_id)
            return batch_object(row, counts)

    shown = asyncio.run(run())
    if shown is None:
        raise fail(f"no batch {batch_id!r}")
    typer.echo(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())


@batches_app.command("cancel")
def cancel(batch_id: str) -> None:
    """Stop sending a batch's lines and cancel those queued."""

    async def run() -> str | None:
        async with _stores(get_settings()) as (store, _):
            await store.request_cancel(batch_id)
            row = await store.get(batch_id, "*")
            return row["status"] if row is not None else None

    status = asyncio.run(run())
    if status is None:
        raise fail(f"no batch {batch_id!r}")
    console.print(f"batch {batch_id}: {status}")


@batches_app.command("download")
def download(
    batch_id: str,
    out: Annotated[Path, typer.Option(help="Directory to write the files to.")] = Path("."),
) -> None:
    """Write an ended batch's output and error files (``<id>_output.jsonl``, ``_error``)."""

    async def run() -> list[Path] | None:
        async with _stores(get_settings()) as (store, files):
            row = await store.get(batch_id, "*")
            if row is None or row["status"] not in ENDED:
                return None
            base = out / row["batch_id"]
            return await _download(files, row, f"{base}_output.jsonl", f"{base}_error.jsonl")

    written = asyncio.run(run())
    if written is None:
        raise fail(
            f"no ended batch {batch_id!r}", hint="switchyard batches show ID says where it is"
        )
    for path in written:
        console.print(f"written {path}")


async def _download(
    files: FilesStore, row: dict[str, Any], output_path: str, error_path: str
) -> list[Path]:
    written = []
    for kind, where in (("output", output_path), ("error", error_path)):
        file_id = row[f"{kind}_file_id"]
        found = await files.get(file_id, row["owner"]) if file_id else None
        if found is None:
            continue
        path = Path(where)
        with path.open("wb") as sink:  # noqa: ASYNC230 (a command; nothing else runs)
            async for data in files.content(found):
                sink.write(data)
        written.append(path)
    return written


def submit_stored(file: Path, out: Path, timeout_s: float, key: str | None) -> int:
    """Store ``file`` as a batch, follow it to its end (Ctrl-C leaves it running), write its
    output to ``out`` and its error lines beside it (``.errors.jsonl``); the exit code says
    whether it completed."""
    settings, config = load()
    owner = authenticate({HEADER_KEY: key} if key else None, config)
    owner_id = owner.id if owner else None
    return asyncio.run(_submit(settings, file, out, timeout_s, key, owner_id))


async def _submit(
    settings: Settings,
    file: Path,
    out: Path,
    timeout_s: float,
    key: str | None,
    owner: str | None,
) -> int:
    async with _stores(settings) as (store, files):
        with file.open("rb") as source:

            async def read(size: int) -> bytes:
                return source.read(size)

            uploaded = await files.save(owner, file.name, "batch", read)
        row = await store.create(
            owner=owner,
            key_secret=key,
            endpoint="/v1/chat/completions",
            input_file_id=uploaded["file_id"],
            completion_window="24h",
            metadata={"source": file.name[:200]},
            expires_at=utcnow() + timedelta(hours=24),
        )
        batch_id = row["batch_id"]
        console.print(f"batch {batch_id} stored; a gateway's batch runner runs it")
        row = await _follow(store, batch_id, timeout_s)
        if row["status"] not in ENDED:
            return fail(
                f"batch {batch_id} is still {row['status']} after {timeout_s:g} s",
                hint="is a gateway (switchyard gateway, or up) running? It goes on meanwhile:"
                f" switchyard batches show {batch_id}",
                code=1,
            ).exit_code
        errors_path = out.with_name(out.name.removesuffix(".results.jsonl") + ".errors.jsonl")
        for path in await _download(files, row, str(out), str(errors_path)):
            console.print(f"written {path}")
    errors = (row["errors"] or {}).get("data") or []
    for error in errors[:20]:
        console.print(f"line {error['line']}: {error['code']}: {error['message']}")
    console.print(
        f"batch {batch_id} {row['status']}: {row['completed']} completed, {row['failed']} failed"
    )
    return 0 if row["status"] == "completed" else 1


async def _follow(store: BatchStore, batch_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("validating", total=None)
        while True:
            row = await store.get(batch_id, "*")
            assert row is not None
            if row["status"] in ENDED or asyncio.get_running_loop().time() > deadline:
                return row
            completed, failed = await store.counts(batch_id)
            total = row["total"] or None
            progress.update(
                task, description=row["status"], total=total, completed=completed + failed
            )
            await asyncio.sleep(0.5)
