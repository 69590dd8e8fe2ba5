"""OpenAI's Files and Batch APIs over the stored batches: ``/v1/files`` (upload, list, get,
content, delete) and ``/v1/batches`` (create, get, list, cancel), so ``openai.files`` and
``openai.batches`` work unchanged. The runner (``runner.py``) does the work; these routes only
read and write rows."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import APIRouter, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, HttpUrl
from starlette.responses import Response, StreamingResponse

from broker.core.clock import utcnow
from broker.core.webhook_urls import check_webhook
from broker.gateway.batches.files import UPLOAD_PURPOSES, file_object
from broker.gateway.batches.lines import ENDPOINTS
from broker.gateway.context import gateway_of
from broker.gateway.errors import GatewayError

if TYPE_CHECKING:
    from broker.gateway.service import Gateway

__all__ = ["BatchCreate", "batch_object", "router"]

JSON = "application/json"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a file or batch id may be: anything else names none."""
_MOMENTS = (
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)
MAX_WINDOW_H = 168


class BatchCreate(BaseModel):
    """OpenAI's batch request; ``completion_window`` may name other hours (1 to 168) too."""

    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str
    completion_window: str = Field(pattern=r"^[1-9][0-9]{0,2}h$")
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: Any = Field(
        default=None, description="Not supported: refused when given (no field is ignored)."
    )
    webhook: HttpUrl | None = Field(
        default=None,
        description="Switchyard's own: the batch's end (batch.completed, .failed, .expired, "
        ".cancelled, with the batch object) is POSTed here, signed (Standard Webhooks).",
    )


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def batch_object(row: dict[str, Any], counts: tuple[int, int] | None = None) -> dict[str, Any]:
    """A batch as OpenAI's API shows it; ``counts`` (completed, failed) while it runs, else
    the counts kept when it ended. ``usage.cost_usd`` is Switchyard's own."""
    completed, failed = counts if counts is not None else (row["completed"], row["failed"])
    body: dict[str, Any] = {
        "id": row["batch_id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": row["errors"],
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": _ts(row["created_at"]),
        "expires_at": _ts(row["expires_at"]),
        **{f"{m}_at": _ts(row[f"{m}_at"]) for m in _MOMENTS},
        "request_counts": {"total": row["total"], "completed": completed, "failed": failed},
        "metadata": row["metadata"],
    }
    if counts is None:
        prompt, output = row["prompt_tokens"], row["completion_tokens"]
        body["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
            "cost_usd": str(row["cost_usd"]),
        }
    return body


router = APIRouter(tags=["batches"])


@router.post("/v1/files", response_model=None)
async def upload_file(
    request: Request, file: UploadFile, purpose: str = Form(min_length=1)
) -> Response:
    """Upload a batch's input (JSONL), written to Postgres as it is read."""
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    fields = {name.split("[", 1)[0] for name in await request.form()}
    if extra := sorted(fields - {"file", "purpose"}):
        raise GatewayError(400, f"{', '.join(extra)}: not supported", param=extra[0])
    if purpose not in UPLOAD_PURPOSES:
        raise GatewayError(
            400, f"purpose: only {', '.join(sorted(UPLOAD_PURPOSES))} is served", param="purpose"
        )
    row = await gateway.files.save(owner, file.filename or "upload.jsonl", purpose, file.read)
    return _json(file_object(row))


@router.get("/v1/files", response_model=None)
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(default=20, ge=1, le=10_000),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    """The caller's files by creation time (``order``), paged by ``after``."""
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    checked = _checked(after, "after")
    rows = await gateway.files.page(
        owner, purpose, limit + 1, checked, newest_first=order == "desc"
    )
    return _list([file_object(r) for r in rows[:limit]], len(rows) > limit)


@router.get("/v1/files/{file_id}", response_model=None)
async def get_file(file_id: str, request: Request) -> Response:
    return _json(file_object(await _file(gateway_of(request), request, file_id)))


@router.get("/v1/files/{file_id}/content", response_model=None)
async def file_content(file_id: str, request: Request) -> Response:
    """The file's bytes, streamed a piece at a time."""
    gateway = gateway_of(request)
    row = await _file(gateway, request, file_id)
    return StreamingResponse(
        gateway.files.content(row),
        media_type="application/octet-stream",
        headers={"content-length": str(row["bytes"])},
    )


@router.delete("/v1/files/{file_id}", response_model=None)
async def delete_file(file_id: str, request: Request) -> Response:
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    row = await _file(gateway, request, file_id)
    if (batch_id := await gateway.batches.uses_file(row["file_id"])) is not None:
        raise GatewayError(
            409, f"batch {batch_id} runs on this file; cancel it first", code="file_in_use"
        )
    await gateway.files.delete(row["file_id"], owner)
    return _json({"id": row["file_id"], "object": "file", "deleted": True})


@router.post("/v1/batches", response_model=None)
async def create_batch(body: BatchCreate, request: Request) -> Response:
    """Create a batch of the input file's lines; the runner validates and runs it."""
    gateway = gateway_of(request)
    secret, owner = gateway.caller(request)
    if body.output_expires_after is not None:
        raise GatewayError(
            400, "output_expires_after is not supported", param="output_expires_after"
        )
    if body.endpoint not in ENDPOINTS:
        raise GatewayError(
            400, f"endpoint: only {', '.join(sorted(ENDPOINTS))} is served", param="endpoint"
        )
    hours = int(body.completion_window.removesuffix("h"))
    if hours > MAX_WINDOW_H:
        raise GatewayError(
            400, f"completion_window: at most {MAX_WINDOW_H}h", param="completion_window"
        )
    if body.webhook is not None:
        await check_webhook(str(body.webhook), gateway.config.webhooks, field="webhook")
    source = await _file(gateway, request, body.input_file_id, param="input_file_id")
    if source["purpose"] != "batch":
        raise GatewayError(
            400, "input_file_id: not a file uploaded for a batch", param="input_file_id"
        )
    row = await gateway.batches.create(
        owner=owner,
        key_secret=secret,
        endpoint=body.endpoint,
        input_file_id=source["file_id"],
        completion_window=body.completion_window,
        metadata=body.metadata,
        webhook=str(body.webhook) if body.webhook is not None else None,
        expires_at=utcnow() + timedelta(hours=hours),
    )
    return _json(batch_object(row, (0, 0)))


@router.get("/v1/batches/{batch_id}", response_model=None)
async def get_batch(batch_id: str, request: Request) -> Response:
    gateway = gateway_of(request)
    return _json(await _shown(gateway, await _batch(gateway, request, batch_id)))


@router.post("/v1/batches/{batch_id}/cancel", response_model=None)
async def cancel_batch(batch_id: str, request: Request) -> Response:
    """Stop sending the batch's lines and cancel those queued; it ends ``cancelled``."""
    gateway = gateway_of(request)
    row = await _batch(gateway, request, batch_id)
    if row["status"] in ("failed", "completed", "expired"):
        raise GatewayError(409, f"batch {batch_id} has ended ({row['status']})", code="batch_ended")
    await gateway.batches.request_cancel(row["batch_id"])
    return _json(await _shown(gateway, await _batch(gateway, request, batch_id)))


@router.get("/v1/batches", response_model=None)
async def list_batches(
    request: Request,
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = None,
) -> Response:
    """The caller's batches, newest first (``after``: the last id of the previous page)."""
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    rows = await gateway.batches.page(owner, limit + 1, _checked(after, "after"))
    shown = [await _shown(gateway, r) for r in rows[:limit]]
    return _list(shown, len(rows) > limit)


async def _shown(gateway: Gateway, row: dict[str, Any]) -> dict[str, Any]:
    running = row["status"] in ("in_progress", "finalizing", "cancelling")
    counts = await gateway.batches.counts(row["batch_id"]) if running else None
    if row["status"] == "validating":
        counts = (0, 0)
    return batch_object(row, counts)


def _checked(value: str | None, param: str) -> str | None:
    if value is not None and not _ID.fullmatch(value):
        raise GatewayError(400, f"{param}: not an id", param=param)
    return value


async def _file(
    gateway: Gateway, request: Request, file_id: str, param: str = "file_id"
) -> dict[str, Any]:
    _, owner = gateway.caller(request)
    row = await gateway.files.get(file_id, owner) if _ID.fullmatch(file_id) else None
    if row is None:
        raise GatewayError(404, f"no file {file_id!r}", code="not_found", param=param)
    return row


async def _batch(gateway: Gateway, request: Request, batch_id: str) -> dict[str, Any]:
    _, owner = gateway.caller(request)
    row = await gateway.batches.get(batch_id, owner) if _ID.fullmatch(batch_id) else None
    if row is None:
        raise GatewayError(404, f"no batch {batch_id!r}", code="not_found", param="batch_id")
    return row


def _list(data: list[dict[str, Any]], has_more: bool) -> Response:
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)
