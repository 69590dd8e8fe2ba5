"""The caller's webhook deliveries: ``GET /v1/webhooks/deliveries`` (newest first, paged),
``GET /v1/webhooks/deliveries/{id}`` with every attempt, and ``POST .../{id}/replay``, which
sends one again with the same ``webhook-id`` (its endpoint enabled again if a 410 disabled it).

Read from the dispatcher's tables (``broker.core.webhook_store``); a delivery of another key, or
none, is a 404 alike. Bodies are not shown: the receiver has them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from broker.core.webhook_store import WebhookStore
from broker.gateway.context import gateway_of
from broker.gateway.errors import GatewayError

if TYPE_CHECKING:
    from broker.gateway.service import Gateway

__all__ = ["delivery_body", "router"]

JSON = "application/json"
_ID = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
"""What a webhook id may be (Postgres text holds no NUL): anything else names no delivery."""

router = APIRouter(tags=["webhooks"])


def _seconds(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def delivery_body(row: dict[str, Any]) -> dict[str, Any]:
    """A delivery as the API shows it (times in Unix seconds, as OpenAI's objects have them)."""
    body = {
        "id": row["webhook_id"],
        "object": "switchyard.webhook_delivery",
        "url": row["url"],
        "type": row["type"],
        "state": row["state"],
        "attempt_count": row["attempts"],
        "created_at": _seconds(row["created_at"]),
        "delivered_at": _seconds(row["delivered_at"]),
        "next_attempt_at": _seconds(row["next_attempt_at"]) if row["state"] == "pending" else None,
        "last_status": row["last_status"],
        "last_error": row["last_error"],
    }
    if "history" in row:
        body["endpoint_disabled"] = row["disabled"]
        body["attempts"] = [
            {**attempt, "attempted_at": _seconds(attempt["attempted_at"])}
            for attempt in row["history"]
        ]
    return body


def _store(gateway: Gateway) -> WebhookStore:
    return WebhookStore(gateway.engine)


def _caller_store(request: Request) -> tuple[WebhookStore, str | None]:
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    return _store(gateway), owner


def _not_found(webhook_id: str) -> GatewayError:
    return GatewayError(404, f"no webhook delivery {webhook_id!r}", code="not_found", param="id")


@router.get("/v1/webhooks/deliveries", response_model=None)
async def list_deliveries(
    request: Request,
    state: Literal["pending", "delivered", "dead"] | None = None,
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = None,
) -> Response:
    """The caller's webhook deliveries, newest first (``after``: the last id of the previous
    page)."""
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    if after is not None and not _ID.fullmatch(after):
        raise GatewayError(400, "after: not a webhook delivery id", param="after")
    rows = await _store(gateway).list(owner, state, limit + 1, after)
    data = [delivery_body(r) for r in rows[:limit]]
    return _json({"object": "list", "data": data, "has_more": len(rows) > limit})


@router.get("/v1/webhooks/deliveries/{webhook_id}", response_model=None)
async def get_delivery(webhook_id: str, request: Request) -> Response:
    """One delivery with every attempt: when, the status (or none), the latency, the error."""
    store, owner = _caller_store(request)
    row = await store.get(webhook_id, owner) if _ID.fullmatch(webhook_id) else None
    if row is None:
        raise _not_found(webhook_id)
    return _json(delivery_body(row))


@router.post("/v1/webhooks/deliveries/{webhook_id}/replay", status_code=202, response_model=None)
async def replay_delivery(webhook_id: str, request: Request) -> Response:
    """Send the delivery again (a fresh retry series, the same ``webhook-id``); a dispatcher
    takes it within a second."""
    store, owner = _caller_store(request)
    if not _ID.fullmatch(webhook_id) or not await store.replay(webhook_id, owner):
        raise _not_found(webhook_id)
    row = await store.get(webhook_id, owner)
    if row is None:  # dropped between the two statements
        raise _not_found(webhook_id)
    return _json(delivery_body(row), 202)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)
