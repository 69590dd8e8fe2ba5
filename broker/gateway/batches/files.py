"""Files as OpenAI's Files API has them, in Postgres: an upload is written in pieces of 1 MiB as
it arrives and read back the same way, so no file is ever held whole; a batch's output and error
files are read from its answered lines."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.clock import utcnow
from broker.core.db import batch_lines, batches, file_chunks, files, keyset_page

__all__ = ["CHUNK_BYTES", "UPLOAD_PURPOSES", "FilesStore", "file_object", "split_lines"]

CHUNK_BYTES = 1 << 20
UPLOAD_PURPOSES = frozenset({"batch"})
"""What a file may be uploaded for: batches are the only use served (a batch's output and error
files have purpose ``batch_output``, as OpenAI's)."""


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def batch_file_id(batch_id: str, *, in_error: bool) -> str:
    """A batch's output or error file: one id each, whichever runner writes it."""
    return f"file-{batch_id}-{'error' if in_error else 'output'}"


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """A file as OpenAI's API shows it."""
    expires = row.get("expires_at")
    return {
        "id": row["file_id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": int(row["created_at"].timestamp()),
        "expires_at": int(expires.timestamp()) if expires is not None else None,
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


async def split_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """``(number, line)`` from 1, across the pieces' edges; blank lines are counted, not
    yielded."""
    number = 0
    rest = b""
    async for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            number += 1
            if part.strip():
                yield number, part
    if rest.strip():
        yield number + 1, rest


class FilesStore:
    def __init__(self, engine: AsyncEngine, retention: timedelta) -> None:
        self.engine = engine
        self.retention = retention

    async def save(
        self,
        owner: str | None,
        filename: str,
        purpose: str,
        read: Callable[[int], Awaitable[bytes]],
    ) -> dict[str, Any]:
        """Write an upload as it is read (``read(n)`` gives up to n bytes, b"" at its end),
        in one transaction: a file is there whole or not at all."""
        file_id, size, seq = new_file_id(), 0, 0
        now = utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(files).values(
                    file_id=file_id,
                    owner=owner,
                    purpose=purpose,
                    filename=filename,
                    created_at=now,
                    expires_at=now + self.retention,
                )
            )
            while data := await read(CHUNK_BYTES):
                await conn.execute(insert(file_chunks).values(file_id=file_id, seq=seq, data=data))
                seq += 1
                size += len(data)
            await conn.execute(update(files).where(files.c.file_id == file_id).values(bytes=size))
        row = await self.get(file_id, owner)
        assert row is not None
        return row

    async def get(self, file_id: str, owner: str | None) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(files).where(
                        files.c.file_id == file_id, files.c.owner.is_not_distinct_from(owner)
                    )
                )
            ).first()
        return dict(row._mapping) if row is not None else None

    async def chunks(self, file_id: str) -> AsyncIterator[bytes]:
        """An uploaded file's bytes, a piece at a time (one query each: nothing held open)."""
        seq = 0
        while True:
            async with self.engine.connect() as conn:
                data = (
                    await conn.execute(
                        select(file_chunks.c.data).where(
                            file_chunks.c.file_id == file_id, file_chunks.c.seq == seq
                        )
                    )
                ).scalar()
            if data is None:
                return
            yield bytes(data)
            seq += 1

    async def content(self, row: dict[str, Any]) -> AsyncIterator[bytes]:
        """Any file's bytes: an upload's pieces, or a batch's answered lines (output or error)
        in line order, a page at a time."""
        if row["batch_id"] is None:
            async for data in self.chunks(row["file_id"]):
                yield data
            return
        in_error = row["file_id"] == batch_file_id(row["batch_id"], in_error=True)
        after = 0
        while True:
            async with self.engine.connect() as conn:
                page = (
                    await conn.execute(
                        select(batch_lines.c.line, batch_lines.c.output)
                        .where(
                            batch_lines.c.batch_id == row["batch_id"],
                            batch_lines.c.in_error == in_error,
                            batch_lines.c.output.is_not(None),
                            batch_lines.c.line > after,
                        )
                        .order_by(batch_lines.c.line)
                        .limit(1000)
                    )
                ).all()
            if not page:
                return
            after = page[-1].line
            yield b"".join(r.output.encode() + b"\n" for r in page)

    async def add_batch_file(self, batch_id: str, owner: str | None, in_error: bool) -> str | None:
        """Record a batch's output (or error) file; None when it has no such lines."""
        async with self.engine.begin() as conn:
            size = (
                await conn.execute(
                    select(func.sum(func.octet_length(batch_lines.c.output) + 1)).where(
                        batch_lines.c.batch_id == batch_id,
                        batch_lines.c.in_error == in_error,
                        batch_lines.c.output.is_not(None),
                    )
                )
            ).scalar()
            if not size:
                return None
            file_id, now = batch_file_id(batch_id, in_error=in_error), utcnow()
            await conn.execute(
                pg_insert(files)
                .on_conflict_do_nothing()  # written already by a runner that died before the end
                .values(
                    file_id=file_id,
                    owner=owner,
                    purpose="batch_output",
                    filename=f"{batch_id}_{'error' if in_error else 'output'}.jsonl",
                    bytes=int(size),
                    batch_id=batch_id,
                    created_at=now,
                    expires_at=now + self.retention,
                )
            )
        return file_id

    async def page(
        self,
        owner: str | None,
        purpose: str | None,
        limit: int,
        after: str | None,
        *,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        """The owner's files by creation time; ``after``: the last id of the previous page."""
        query = select(files).where(files.c.owner.is_not_distinct_from(owner))
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        query = keyset_page(
            query, files.c.created_at, files.c.file_id, after, limit, newest_first=newest_first
        )
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in (await conn.execute(query)).all()]

    async def purge(self) -> int:
        """Drop the files past their retention (with their pieces); returns how many."""
        async with self.engine.begin() as conn:
            in_use = select(batches.c.input_file_id).where(
                batches.c.status.in_(("validating", "in_progress", "finalizing", "cancelling"))
            )
            gone = await conn.execute(
                delete(files).where(files.c.expires_at < utcnow(), files.c.file_id.not_in(in_use))
            )
        return int(gone.rowcount)

    async def delete(self, file_id: str, owner: str | None) -> bool:
        async with self.engine.begin() as conn:
            gone = await conn.execute(
                delete(files).where(
                    files.c.file_id == file_id, files.c.owner.is_not_distinct_from(owner)
                )
            )
        return bool(gone.rowcount)
