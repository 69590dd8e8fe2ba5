"""Webhook deliveries in Postgres: what the dispatcher records and claims, and what the CLI and
the gateway list and replay (so it sits in the core, below all three).

A delivery is recorded once per ``webhook_id``, its body built then and kept byte for byte. A
dispatcher works on a delivery only under a lease: ``next_attempt_at`` pushed past the attempt's
longest time and a fresh ``lease_id``. A dispatcher that dies mid-attempt leaves the lease to
lapse and another takes the delivery (``claim``, ``FOR UPDATE SKIP LOCKED``). Every attempt is a
row whoever made it; only the lease holder moves the delivery's state.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Boolean, Select, and_, bindparam, delete, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.clock import utcnow
from broker.core.db import webhook_attempts, webhook_deliveries, webhook_endpoints
from schemas import WebhookRequest

__all__ = ["ANY_OWNER", "Attempt", "Due", "Next", "State", "WebhookStore"]

State = Literal["pending", "delivered", "dead"]
_d, _a, _e = webhook_deliveries, webhook_attempts, webhook_endpoints
_SHOWN = [c for c in _d.c if c.name not in ("body", "lease_id")]


class _Owner(enum.Enum):
    ANY = "any"


ANY_OWNER = _Owner.ANY
"""Every owner's deliveries (the operator's view); the gateway passes the caller's key id."""
Owner = str | None | Literal[_Owner.ANY]


@dataclass(frozen=True, slots=True)
class Due:
    """A delivery a dispatcher holds the lease of: what its next attempt needs."""

    webhook_id: str
    url: str
    type: str
    body: bytes
    owner: str | None
    attempts: int
    series_start: int
    lease_id: str
    disabled: str | None
    """Why its endpoint is disabled (it answered 410), if it is."""
    traceparent: str | None = None

    @property
    def tries(self) -> int:
        """Attempts made in the current series (since the last replay)."""
        return self.attempts - self.series_start


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST and how it went: a status, or no answer and an error."""

    attempted_at: datetime
    latency_ms: float
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Next:
    """A delivery's state after an attempt (or a refusal to make one)."""

    state: State
    at: datetime | None = None
    """The next attempt's time, when pending."""
    error: str | None = None
    """Why it ended without an answer of its own (refused, disabled)."""


def _due(row: Any) -> Due:
    return Due(
        webhook_id=row.webhook_id,
        url=row.url,
        type=row.type,
        body=row.body.encode(),
        owner=row.owner,
        attempts=row.attempts,
        series_start=row.series_start,
        lease_id=row.lease_id,
        disabled=row.disabled,
        traceparent=row.traceparent,
    )


def _disabled(url: Any = _d.c.url) -> Any:
    """Why the delivery's endpoint is disabled (NULL if it is not), as a column."""
    return (
        select(_e.c.disabled_reason)
        .where(_e.c.url == url, _e.c.disabled_at.is_not(None))
        .scalar_subquery()
        .label("disabled")
    )


def _plain(row: Any) -> dict[str, Any]:
    """A row as a dict of plain ``str`` keys (SQLAlchemy's are a ``str`` subclass that orjson,
    for one, refuses)."""
    return {str(k): v for k, v in row._mapping.items()}


def _of(query: Select[Any], owner: Owner) -> Select[Any]:
    return query if owner is ANY_OWNER else query.where(_d.c.owner.is_not_distinct_from(owner))


_RECORD = (
    pg_insert(_d)
    .on_conflict_do_nothing(index_elements=[_d.c.webhook_id])
    .returning(_disabled(bindparam("endpoint")))  # an INSERT's RETURNING does not correlate
)
_SETTLE = text(
    """
    WITH held AS (
        SELECT webhook_id, (lease_id = :lease_id AND state = 'pending') AS owned
        FROM webhook_deliveries WHERE webhook_id = :webhook_id
        FOR UPDATE
    ), moved AS (
        UPDATE webhook_deliveries AS d SET
            attempts = d.attempts + CASE WHEN :tried THEN 1 ELSE 0 END,
            last_status = CASE WHEN :tried THEN CAST(:status_code AS integer)
                ELSE d.last_status END,
            last_error = CASE WHEN held.owned THEN CAST(:end_error AS text)
                WHEN :tried THEN CAST(:error AS text) ELSE d.last_error END,
            state = CASE WHEN held.owned THEN CAST(:state AS varchar) ELSE d.state END,
            next_attempt_at = CASE WHEN held.owned THEN CAST(:next_at AS timestamptz)
                ELSE d.next_attempt_at END,
            delivered_at = CASE WHEN held.owned THEN CAST(:delivered_at AS timestamptz)
                ELSE d.delivered_at END,
            lease_id = CASE WHEN held.owned THEN NULL ELSE d.lease_id END
        FROM held WHERE d.webhook_id = held.webhook_id
        RETURNING d.attempts, held.owned
    ), tried AS (
        INSERT INTO webhook_attempts
            (webhook_id, number, attempted_at, status_code, latency_ms, error)
        SELECT :webhook_id, attempts, :attempted_at, :status_code, :latency_ms, :error
        FROM moved WHERE :tried
    )
    SELECT owned FROM moved
    """
).bindparams(bindparam("tried", type_=Boolean))
"""An attempt (if one was made: ``tried``) counted and written whoever made it, and the
delivery moved to its next state only by its lease holder; one round trip."""


class WebhookStore:
    """The ``webhook_*`` tables."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # A dispatcher's writes are single statements: no BEGIN and COMMIT around each.
        self._single = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def record(
        self, request: WebhookRequest, body: bytes, lease_until: datetime
    ) -> Due | None:
        """Record a delivery, leased to the caller for its first attempt; None if this
        ``webhook_id`` is already recorded (a twin's result, a redelivered message)."""
        url, lease_id = str(request.url), secrets.token_hex(8)
        row = {
            "webhook_id": request.webhook_id,
            "url": url,
            "type": request.type,
            "body": body.decode(),
            "owner": request.owner,
            "state": "pending",
            "next_attempt_at": lease_until,
            "lease_id": lease_id,
            "created_at": utcnow(),
            "endpoint": url,
            "traceparent": request.traceparent,
        }
        async with self._single.connect() as conn:
            added = (await conn.execute(_RECORD, row)).first()
        if added is None:
            return None
        return Due(
            webhook_id=request.webhook_id,
            url=url,
            type=request.type,
            body=body,
            owner=request.owner,
            attempts=0,
            series_start=0,
            lease_id=lease_id,
            disabled=added.disabled,
            traceparent=request.traceparent,
        )

    async def claim(self, limit: int, lease_until: datetime) -> list[Due]:
        """Lease up to ``limit`` deliveries that are due, skipping those another holds."""
        due = (
            select(_d.c.webhook_id)
            .where(_d.c.state == "pending", _d.c.next_attempt_at <= utcnow())
            .order_by(_d.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("due")
        )
        async with self._single.connect() as conn:  # one statement: its own transaction
            claimed = await conn.execute(
                update(_d)
                .where(_d.c.webhook_id == due.c.webhook_id)
                .values(next_attempt_at=lease_until, lease_id=secrets.token_hex(8))
                .returning(*_d.c, _disabled())
            )
            return [_due(row) for row in claimed.all()]

    async def settle(self, due: Due, attempt: Attempt | None, then: Next) -> bool:
        """Record ``attempt`` (if one was made) and, if ``due``'s lease still holds, move the
        delivery to ``then``; False when the lease was lost (a replay or a lapse). One
        statement."""
        tried = attempt or Attempt(utcnow(), 0.0)
        params = {
            "webhook_id": due.webhook_id,
            "lease_id": due.lease_id,
            "tried": attempt is not None,
            "attempted_at": tried.attempted_at,
            "status_code": tried.status_code,
            "latency_ms": tried.latency_ms,
            "error": tried.error,
            "state": then.state,
            "next_at": then.at,
            "delivered_at": utcnow() if then.state == "delivered" else None,
            "end_error": then.error if then.error is not None else tried.error,
        }
        async with self._single.connect() as conn:
            owned = (await conn.execute(_SETTLE, params)).scalar_one_or_none()
        return bool(owned)

    async def disable_endpoint(self, url: str, reason: str) -> None:
        """Every later delivery to ``url`` is dead at once, without a POST."""
        values = {"disabled_at": utcnow(), "disabled_reason": reason}
        async with self.engine.begin() as conn:
            await conn.execute(
                pg_insert(_e)
                .values(url=url, **values)
                .on_conflict_do_update(index_elements=[_e.c.url], set_=values)
            )

    async def enable_endpoint(self, url: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(_e).where(_e.c.url == url))

    async def attempts(self, webhook_id: str) -> list[dict[str, Any]]:
        """Every attempt of a delivery, in order."""
        query = (
            select(_a.c.number, _a.c.attempted_at, _a.c.status_code, _a.c.latency_ms, _a.c.error)
            .where(_a.c.webhook_id == webhook_id)
            .order_by(_a.c.number, _a.c.id)
        )
        async with self.engine.connect() as conn:
            return [_plain(r) for r in (await conn.execute(query)).all()]

    async def list(
        self,
        owner: Owner = ANY_OWNER,
        state: State | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Deliveries newest first (without their bodies); ``after``: the last id of the
        previous page."""
        query = _of(select(*_SHOWN), owner)
        if state is not None:
            query = query.where(_d.c.state == state)
        if after is not None:
            anchor = select(_d.c.created_at).where(_d.c.webhook_id == after).scalar_subquery()
            query = query.where(
                or_(
                    _d.c.created_at < anchor,
                    and_(_d.c.created_at == anchor, _d.c.webhook_id < after),
                )
            )
        query = query.order_by(_d.c.created_at.desc(), _d.c.webhook_id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [_plain(r) for r in (await conn.execute(query)).all()]

    async def get(self, webhook_id: str, owner: Owner = ANY_OWNER) -> dict[str, Any] | None:
        """One delivery (without its body) with its attempts; None if unknown or another's."""
        query = _of(select(*_SHOWN, _disabled()).where(_d.c.webhook_id == webhook_id), owner)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return {**_plain(row), "history": await self.attempts(webhook_id)}

    async def replay(self, webhook_id: str, owner: Owner = ANY_OWNER) -> bool:
        """Send a delivery again, whatever its state: pending and due now, a fresh retry series,
        its endpoint enabled again; the same ``webhook_id``. False if unknown or another's."""
        query = update(_d).where(_d.c.webhook_id == webhook_id)
        if owner is not ANY_OWNER:
            query = query.where(_d.c.owner.is_not_distinct_from(owner))
        async with self.engine.begin() as conn:
            replayed = await conn.execute(
                query.values(
                    state="pending",
                    next_attempt_at=utcnow(),
                    series_start=_d.c.attempts,
                    lease_id=None,
                    delivered_at=None,
                ).returning(_d.c.url)
            )
            url = replayed.scalar_one_or_none()
            if url is not None:
                await conn.execute(delete(_e).where(_e.c.url == url))
        return url is not None
