"""The async jobs API: ``POST /v1/jobs`` answers at once (the job's id, position, ETA and
estimated cost), ``GET /v1/jobs/{id}`` says where it stands and then gives its result,
``DELETE`` cancels it while it is queued, ``GET /v1/jobs`` lists the caller's jobs.

An async job is published persistent (so it is tracked: ``broker.state.job_states``) with its
result going to the durable queue ``<ns>.results.gateway``; whichever gateway replica takes a
result writes it to Postgres (``api_jobs``), where it is kept for the retention period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import Field, HttpUrl
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import Response

from broker.core.clock import utcnow
from broker.core.codec import encode
from broker.core.db import api_jobs, keyset_page
from broker.core.errors import Unavailable
from broker.core.names import HEADER_KEY, HEADER_TRACEPARENT
from broker.core.priority import queue_priority
from broker.core.tracing import continued, trace_id_of
from broker.core.webhook_urls import check_webhook
from broker.gateway.chat import ChatRequest, job_from_request, routing_from_headers
from broker.gateway.context import gateway_of
from broker.gateway.errors import GatewayError
from broker.state.job_states import JobStanding
from broker.transport.amqp import BROKER_FAILURES
from schemas import CompletionJob, ErrorCode, JobResult, ReplyTo

if TYPE_CHECKING:
    from broker.gateway.service import Gateway

__all__ = ["JobRequest", "JobsStore", "router"]

log = logging.getLogger(__name__)

LOCATE_WAIT_S = 2.0
"""How long ``POST /v1/jobs`` waits for the scheduler to place the job before answering
without a position."""
_LOCATE_POLL_S = 0.005
ENDED = frozenset({"succeeded", "failed", "rejected", "expired", "cancelled"})
JSON = "application/json"
_JOB_ID = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
"""What a job id may be (Postgres text holds no NUL): anything else names no job."""


class JobRequest(ChatRequest):
    """A chat completion request run as an async job; its result is also POSTed, signed, to
    ``webhook`` if given (checked now: a secret to sign with, an address it may reach)."""

    webhook: HttpUrl | None = None
    defer: bool = Field(
        default=False,
        description="May wait for a cheaper hour (a discount window, a free tier's reset) that "
        "opens early enough to finish before its deadline, which it then needs.",
    )


class JobsStore:
    """The ``api_jobs`` rows."""

    def __init__(self, engine: AsyncEngine, retention: timedelta) -> None:
        self.engine = engine
        self.retention = retention

    async def add(self, job: CompletionJob, owner: str | None, model: str) -> None:
        now = utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(api_jobs).values(
                    job_id=job.job_id,
                    owner=owner,
                    status="queued",
                    model=model,
                    created_at=now,
                    expires_at=now + self.retention,
                )
            )

    async def finish(self, result: JobResult) -> bool:
        """Store a job's result; False if the job is not one of ours (or has expired)."""
        async with self.engine.begin() as conn:
            done = await conn.execute(
                update(api_jobs)
                .where(api_jobs.c.job_id == result.job_id)
                .values(
                    status=result.status.value,
                    result=result.model_dump(mode="json"),
                    finished_at=utcnow(),
                )
            )
        return bool(done.rowcount)

    async def forget(self, job_id: str) -> None:
        """Drop a job that was never queued."""
        async with self.engine.begin() as conn:
            await conn.execute(delete(api_jobs).where(api_jobs.c.job_id == job_id))

    async def cancelled(self, job_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(api_jobs)
                .where(api_jobs.c.job_id == job_id, api_jobs.c.finished_at.is_(None))
                .values(status="cancelled")
            )

    async def get(self, job_id: str, owner: str | None) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(api_jobs).where(
                        api_jobs.c.job_id == job_id, api_jobs.c.owner.is_not_distinct_from(owner)
                    )
                )
            ).first()
        return dict(row._mapping) if row is not None else None

    async def list(
        self, owner: str | None, status: str | None, limit: int, after: str | None
    ) -> list[dict[str, Any]]:
        """The owner's jobs, newest first; ``after``: the last id of the previous page."""
        query = select(api_jobs).where(api_jobs.c.owner.is_not_distinct_from(owner))
        if status is not None:
            query = query.where(api_jobs.c.status == status)
        query = keyset_page(query, api_jobs.c.created_at, api_jobs.c.job_id, after, limit)
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in (await conn.execute(query)).all()]

    async def purge(self) -> int:
        """Drop the jobs past their retention; returns how many."""
        async with self.engine.begin() as conn:
            gone = await conn.execute(delete(api_jobs).where(api_jobs.c.expires_at < utcnow()))
        return int(gone.rowcount)


def job_body(row: dict[str, Any], standing: JobStanding | None = None) -> dict[str, Any]:
    """A job as the API shows it: where it stands while it runs, its result once it ended."""
    created: datetime = row["created_at"]
    status = row["status"]
    body: dict[str, Any] = {
        "id": row["job_id"],
        "object": "switchyard.job",
        "status": status,
        "model": row["model"],
        "created_at": int(created.timestamp()),
    }
    if standing is not None and status not in ENDED:
        # "done": its result is on its way to Postgres.
        body["status"] = {"cancelled": "cancelled", "running": "running", "done": "running"}.get(
            standing.state, "queued"
        )
        body.update(
            provider=standing.provider,
            position=standing.position,
            eta_s=standing.eta_s,
            estimated_cost_usd=standing.est_cost_usd,
        )
    if row.get("result") is not None:
        body["result"] = row["result"]
    return body


router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202, response_model=None)
async def create_job(body: JobRequest, request: Request) -> Response:
    """Queue a chat completion; answered at once with its position, ETA and estimated cost."""
    gateway = gateway_of(request)
    secret, owner = gateway.caller(request)  # before anything is looked up for the caller
    if body.webhook is not None:
        await check_webhook(str(body.webhook), gateway.config.webhooks, field="webhook")
    if body.stream:
        raise GatewayError(400, "an async job does not stream", param="stream")
    job = job_from_request(body, routing_from_headers(request.headers), gateway.public_models)
    if body.defer and job.deadline is None:
        raise GatewayError(400, "defer: needs a deadline", param="defer")
    job = job.model_copy(
        update={
            "job_id": f"job-{job.job_id.removeprefix('chatcmpl-')}",
            "reply": ReplyTo(webhook=body.webhook),
            "defer": body.defer,
        }
    )
    store = gateway.jobs_store
    await store.add(job, owner, body.model)
    headers = _first_hop(request, secret)
    try:
        await gateway.publisher.publish(
            gateway.names.jobs,
            encode(job),
            message_id=job.job_id,
            correlation_id=job.job_id,
            reply_to=gateway.results_queue,
            priority=queue_priority(job),
            headers=headers,
        )
    except BROKER_FAILURES as exc:
        await store.forget(job.job_id)
        raise Unavailable(
            f"RabbitMQ did not take the job ({type(exc).__name__}); it was not queued",
            retry_after=5.0,
        ) from exc
    trace = {"trace_id": trace_id_of(headers[HEADER_TRACEPARENT])}
    log.debug("job %s queued", job.job_id, extra=trace)
    # Queued now: whatever fails from here, the answer is 202 (a 5xx would be retried, and the
    # job run twice), without its position if Redis or Postgres could not say it.
    try:
        standing = await _located(gateway, job.job_id)
        row = await store.get(job.job_id, owner)
    except Exception:
        log.warning("job %s queued; its standing could not be read", job.job_id, exc_info=True)
        standing, row = None, None
    if row is None:
        row = {
            "job_id": job.job_id,
            "status": "queued",
            "model": body.model,
            "created_at": utcnow(),
        }
    return _json(job_body(row, standing), 202)


@router.get("/v1/jobs/{job_id}", response_model=None)
async def get_job(job_id: str, request: Request) -> Response:
    """Where the job stands (position and ETA while queued), then its result."""
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    row = await _owned(gateway, job_id, owner)
    standing = None if row["status"] in ENDED else await gateway.job_states.standing(job_id)
    return _json(job_body(row, standing))


@router.delete("/v1/jobs/{job_id}", response_model=None)
async def cancel_job(job_id: str, request: Request) -> Response:
    """Cancel a job not yet sent to its provider (409 once its call started)."""
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    row = await _owned(gateway, job_id, owner)
    if row["status"] not in ENDED:
        outcome = await gateway.job_states.cancel(job_id, owner)
        if outcome in ("running", "done"):
            raise GatewayError(
                409,
                f"job {job_id} was already sent to its provider; it cannot be cancelled",
                code="job_running",
            )
        await gateway.jobs_store.cancelled(job_id)
        row = await _owned(gateway, job_id, owner)
    elif row["status"] != "cancelled":
        raise GatewayError(409, f"job {job_id} has ended ({row['status']})", code="job_ended")
    return _json(job_body(row))


@router.get("/v1/jobs", response_model=None)
async def list_jobs(
    request: Request,
    status: Literal["queued", "succeeded", "failed", "rejected", "expired", "cancelled"]
    | None = None,
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = None,
) -> Response:
    """The caller's jobs, newest first (``after``: the last id of the previous page)."""
    gateway = gateway_of(request)
    _, owner = gateway.caller(request)
    if after is not None and not _JOB_ID.fullmatch(after):
        raise GatewayError(400, "after: not a job id", param="after")
    rows = await gateway.jobs_store.list(owner, status, limit + 1, after)
    data = [job_body(r) for r in rows[:limit]]
    return _json({"object": "list", "data": data, "has_more": len(rows) > limit})


async def _owned(gateway: Gateway, job_id: str, owner: str | None) -> dict[str, Any]:
    row = await gateway.jobs_store.get(job_id, owner) if _JOB_ID.fullmatch(job_id) else None
    if row is None:
        raise GatewayError(
            404, f"no job {job_id!r}", code=ErrorCode.INVALID_MESSAGE.value, param="job_id"
        )
    return row


async def _located(gateway: Gateway, job_id: str) -> JobStanding | None:
    """The job's standing once the scheduler placed it (or it ended), within
    ``LOCATE_WAIT_S``; the last seen if not."""
    standing = None
    ended = gateway.ended.setdefault(job_id, asyncio.Event())
    deadline = asyncio.get_running_loop().time() + LOCATE_WAIT_S
    try:
        while asyncio.get_running_loop().time() < deadline and not ended.is_set():
            standing = await gateway.job_states.standing(job_id)
            if standing.state != "scheduling":
                return standing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), _LOCATE_POLL_S)
        return standing
    finally:
        gateway.ended.pop(job_id, None)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)


def _first_hop(request: Request, secret: str | None) -> dict[str, str]:
    """The job's headers: the caller's trace continued (else a new one), its key if any."""
    headers = {HEADER_TRACEPARENT: continued(request.headers.get(HEADER_TRACEPARENT))}
    if secret:
        headers[HEADER_KEY] = secret
    return headers
