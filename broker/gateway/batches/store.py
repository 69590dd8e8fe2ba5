"""A stored batch's rows: the batch (``batches``) and one row per input line (``batch_lines``),
answered once. Counts are read from the lines while the batch runs and kept on the batch when it
ends, so answering a line touches its own row only (no hot row under 20,000 answers)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.clock import utcnow
from broker.core.db import batch_lines, batches, keyset_page
from broker.gateway.batches.lines import Answer

__all__ = ["ACTIVE", "ENDED", "BatchStore", "new_batch_id"]

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
"""States a runner works on."""
ENDED = frozenset({"failed", "completed", "expired", "cancelled"})
ANY_OWNER = "*"
"""An operator's view (the CLI): every owner's batches."""

_ANSWER = text(
    """
UPDATE batch_lines AS b
SET status = v.status, in_error = v.in_error, output = v.output,
    prompt_tokens = v.prompt_tokens, completion_tokens = v.completion_tokens, cost_usd = v.cost
FROM unnest(CAST(:batch_ids AS text[]), CAST(:lines AS int[]), CAST(:statuses AS text[]),
            CAST(:in_errors AS boolean[]), CAST(:outputs AS text[]), CAST(:prompts AS int[]),
            CAST(:completions AS int[]), CAST(:costs AS numeric[]))
     AS v(batch_id, line, status, in_error, output, prompt_tokens, completion_tokens, cost)
WHERE b.batch_id = v.batch_id AND b.line = v.line AND b.status IS NULL
"""
)
_CLOSE = text(
    """
UPDATE batch_lines
SET status = :status, in_error = true,
    output = json_build_object(
        'id', 'batch_req_' || left(encode(sha256(convert_to(batch_id || '-' || line, 'UTF8')),
                                          'hex'), 24),
        'custom_id', custom_id, 'response', NULL,
        'error', json_build_object('code', CAST(:code AS text), 'message', CAST(:message AS text))
    )::text
WHERE batch_id = :batch_id AND status IS NULL AND line > :after
"""
)
"""Answers every line not answered yet (past ``after``) with a batch-level error: the same text
``lines.unanswered_line`` gives."""


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def _owned(owner: str | None) -> Any:
    return True if owner == ANY_OWNER else batches.c.owner.is_not_distinct_from(owner)


class BatchStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, **values: Any) -> dict[str, Any]:
        batch_id = new_batch_id()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(batches).values(batch_id=batch_id, status="validating", **values)
            )
        row = await self.get(batch_id, ANY_OWNER)
        assert row is not None
        return row

    async def get(self, batch_id: str, owner: str | None) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(batches).where(batches.c.batch_id == batch_id, _owned(owner))
                )
            ).first()
        return dict(row._mapping) if row is not None else None

    async def page(self, owner: str | None, limit: int, after: str | None) -> list[dict[str, Any]]:
        """The owner's batches, newest first; ``after``: the last id of the previous page."""
        query = select(batches).where(_owned(owner))
        query = keyset_page(query, batches.c.created_at, batches.c.batch_id, after, limit)
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in (await conn.execute(query)).all()]

    async def uses_file(self, file_id: str) -> str | None:
        """A batch not ended yet whose input is ``file_id``, if any."""
        async with self.engine.connect() as conn:
            found = await conn.execute(
                select(batches.c.batch_id)
                .where(batches.c.input_file_id == file_id, batches.c.status.in_(ACTIVE))
                .limit(1)
            )
            return found.scalar()

    async def request_cancel(self, batch_id: str) -> None:
        """Mark a batch ``cancelling`` (its runner stops sending lines and cancels those
        queued); nothing if it has ended or is being cancelled already."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches)
                .where(
                    batches.c.batch_id == batch_id,
                    batches.c.status.in_(("validating", "in_progress")),
                )
                .values(status="cancelling", cancelling_at=utcnow())
            )

    async def counts(self, batch_id: str) -> tuple[int, int]:
        """(completed, failed) among the answered lines."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        func.count().filter(batch_lines.c.in_error.is_(False)),
                        func.count().filter(batch_lines.c.in_error.is_(True)),
                    ).where(batch_lines.c.batch_id == batch_id, batch_lines.c.status.is_not(None))
                )
            ).one()
        return int(row[0]), int(row[1])

    async def pending(self, batch_id: str, through: int | None = None) -> int:
        """How many lines (up to ``through``: those sent) are not answered yet."""
        query = select(func.count()).where(
            batch_lines.c.batch_id == batch_id, batch_lines.c.status.is_(None)
        )
        if through is not None:
            query = query.where(batch_lines.c.line <= through)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    # --- the runner's side ---------------------------------------------------------------

    async def claim(self, runner: str, lease: timedelta, limit: int) -> list[str]:
        """Batches needing work whose lease lapsed (their runner died, or none took them)."""
        now = utcnow()
        async with self.engine.begin() as conn:
            ids = (
                (
                    await conn.execute(
                        select(batches.c.batch_id)
                        .where(
                            batches.c.status.in_(ACTIVE),
                            or_(batches.c.lease_until.is_(None), batches.c.lease_until < now),
                        )
                        .order_by(batches.c.created_at)
                        .limit(limit)
                        .with_for_update(skip_locked=True)
                    )
                )
                .scalars()
                .all()
            )
            if ids:
                await conn.execute(
                    update(batches)
                    .where(batches.c.batch_id.in_(ids))
                    .values(runner=runner, lease_until=now + lease)
                )
        return list(ids)

    async def renew(self, runner: str, ids: Sequence[str], lease: timedelta) -> set[str]:
        """Extend this runner's leases; returns the ids it still holds."""
        async with self.engine.begin() as conn:
            held = await conn.execute(
                update(batches)
                .where(batches.c.batch_id.in_(ids), batches.c.runner == runner)
                .values(lease_until=utcnow() + lease)
                .returning(batches.c.batch_id)
            )
            return set(held.scalars().all())

    async def release(self, runner: str, batch_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches)
                .where(batches.c.batch_id == batch_id, batches.c.runner == runner)
                .values(runner=None, lease_until=None)
            )

    async def update(self, batch_id: str, *, only_if: str | None = None, **values: Any) -> bool:
        """Set columns (a new ``status`` stamps its ``<status>_at``); with ``only_if``, only
        from that status. True if the row changed."""
        status = values.get("status")
        if status is not None and f"{status}_at" in batches.c:
            values.setdefault(f"{status}_at", utcnow())
        query = update(batches).where(batches.c.batch_id == batch_id)
        if only_if is not None:
            query = query.where(batches.c.status == only_if)
        async with self.engine.begin() as conn:
            done = await conn.execute(query.values(**values))
        return bool(done.rowcount)

    async def next_round(self, batch_id: str) -> int:
        """Count a new round of sending the batch's lines (a runner starts or takes over)."""
        async with self.engine.begin() as conn:
            done = await conn.execute(
                update(batches)
                .where(batches.c.batch_id == batch_id)
                .values(send_round=batches.c.send_round + 1)
                .returning(batches.c.send_round)
            )
            return int(done.scalar_one())

    async def analyze(self) -> None:
        """Refresh the planner's statistics of ``batch_lines`` after a batch's lines are in: the
        answers' statements were planned as scans of every unanswered line of every batch
        (11 ms a group instead of 0.15 ms, measured) while the statistics lagged them."""
        async with self.engine.begin() as conn:
            await conn.execute(text("ANALYZE batch_lines"))

    async def restart_lines(self, batch_id: str) -> None:
        """Drop the lines a validation that did not finish wrote (its runner died)."""
        async with self.engine.begin() as conn:
            await conn.execute(delete(batch_lines).where(batch_lines.c.batch_id == batch_id))

    async def add_lines(self, batch_id: str, lines: Sequence[tuple[int, str]]) -> set[int]:
        """Write valid lines; returns the numbers of those whose custom_id was taken."""
        if not lines:
            return set()
        async with self.engine.begin() as conn:
            added = await conn.execute(
                pg_insert(batch_lines)
                .values([{"batch_id": batch_id, "line": n, "custom_id": c} for n, c in lines])
                .on_conflict_do_nothing()
                .returning(batch_lines.c.line)
            )
            kept = set(added.scalars().all())
        return {n for n, _ in lines} - kept

    async def custom_ids(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        ids = list({b for b, _ in keys})
        numbers = [n for _, n in keys]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(batch_lines.c.batch_id, batch_lines.c.line, batch_lines.c.custom_id).where(
                    batch_lines.c.batch_id.in_(ids), batch_lines.c.line.in_(numbers)
                )
            )
            return {(r.batch_id, r.line): r.custom_id for r in rows}

    async def answer(self, answers: Sequence[tuple[str, Answer]]) -> None:
        """Record answers in one statement; a line answered already keeps its first."""
        if not answers:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                _ANSWER,
                {
                    "batch_ids": [b for b, _ in answers],
                    "lines": [a.line for _, a in answers],
                    "statuses": [a.status for _, a in answers],
                    "in_errors": [a.in_error for _, a in answers],
                    "outputs": [a.output for _, a in answers],
                    "prompts": [a.prompt_tokens for _, a in answers],
                    "completions": [a.completion_tokens for _, a in answers],
                    "costs": [a.cost_usd for _, a in answers],
                },
            )

    async def close_unanswered(
        self, batch_id: str, code: str, message: str, after: int = 0
    ) -> None:
        """Answer every line past ``after`` still unanswered with a batch-level error."""
        async with self.engine.begin() as conn:
            await conn.execute(
                _CLOSE,
                {
                    "batch_id": batch_id,
                    "status": code.removeprefix("batch_"),
                    "code": code,
                    "message": message,
                    "after": after,
                },
            )

    async def answered_after(self, batch_id: str, line: int) -> set[int]:
        """Lines past ``line`` answered already: sent by a runner that died before recording
        them sent (at most its last group)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(batch_lines.c.line).where(
                    batch_lines.c.batch_id == batch_id,
                    batch_lines.c.line > line,
                    batch_lines.c.status.is_not(None),
                )
            )
            return set(rows.scalars().all())

    async def unanswered(self, batch_id: str, through: int) -> list[int]:
        """Lines up to ``through`` (published) still unanswered."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(batch_lines.c.line).where(
                    batch_lines.c.batch_id == batch_id,
                    batch_lines.c.line <= through,
                    batch_lines.c.status.is_(None),
                )
            )
            return list(rows.scalars().all())

    async def totals(self, batch_id: str) -> dict[str, Any]:
        """The ended batch's counts and usage, from its lines."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        func.count().filter(batch_lines.c.in_error.is_(False)),
                        func.count().filter(batch_lines.c.in_error.is_(True)),
                        func.count(),
                        func.coalesce(func.sum(batch_lines.c.prompt_tokens), 0),
                        func.coalesce(func.sum(batch_lines.c.completion_tokens), 0),
                        func.coalesce(func.sum(batch_lines.c.cost_usd), 0),
                    ).where(batch_lines.c.batch_id == batch_id)
                )
            ).one()
        return {
            "completed": int(row[0]),
            "failed": int(row[1]),
            "total": int(row[2]),
            "prompt_tokens": int(row[3]),
            "completion_tokens": int(row[4]),
            "cost_usd": row[5],
        }
