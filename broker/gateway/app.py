"""The gateway's HTTP routes (FastAPI, so ``/docs`` and ``/openapi.json`` come from the same
models that validate each request)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp

from broker.core.asyncapi import asyncapi_document
from broker.core.errors import SwitchyardError, Unavailable
from broker.core.names import HEADER_TRACEPARENT
from broker.core.tracing import continued, hop
from broker.core.webhook_urls import WebhookRefused
from broker.gateway.asgi import CHAT_PATH, BodyLimit, ChatFastPath
from broker.gateway.batches.api import router as batches_router
from broker.gateway.chat import ChatRequest, job_from_request, routing_from_headers, sse_events
from broker.gateway.context import gateway_of
from broker.gateway.errors import GatewayError, error_response, job_error_response
from broker.gateway.jobs import router as jobs_router
from broker.gateway.metered import Metered
from broker.gateway.models import model_entry, models_list
from broker.gateway.usage import router as usage_router
from broker.gateway.webhooks import router as webhooks_router
from broker.state.quota import REDIS_FAILURES
from broker.transport.rpc import RpcCall
from schemas import ErrorCode, JobChunk, JobResult, JobStatus

if TYPE_CHECKING:
    from broker.gateway.service import Gateway

__all__ = ["make_app"]

log = logging.getLogger(__name__)

JSON = "application/json"
router = APIRouter()


def make_app(gateway: Gateway) -> ASGIApp:
    """The gateway's ASGI app: FastAPI's, with the hot route taken straight
    (``asgi.ChatFastPath``)."""
    app = FastAPI(
        title="Switchyard",
        summary="An OpenAI-compatible front door to Switchyard's queue pipeline.",
        version="1",
    )
    app.state.gateway = gateway
    _errors(app)
    app.add_middleware(BodyLimit)
    app.include_router(router)
    app.include_router(jobs_router)
    app.include_router(batches_router)
    app.include_router(webhooks_router)
    app.include_router(usage_router)
    return Metered(ChatFastPath(app, chat_completions, error_for), frozenset({CHAT_PATH}))


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> Response:
    """RabbitMQ, Redis and Postgres answer (503 naming those that do not)."""
    checks = await gateway_of(request).readiness()
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type=JSON)


@router.get("/asyncapi.json", tags=["docs"])
async def asyncapi(request: Request) -> dict[str, Any]:
    """The AMQP interface (queues, messages, headers) as an AsyncAPI 3.0 document."""
    return asyncapi_document(gateway_of(request).names)


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request) -> dict[str, Any]:
    """Every public model the caller's key may use, with its providers, prices, limits and
    circuit states."""
    gateway = gateway_of(request)
    return await models_list(gateway.config, gateway.circuits, gateway.key_of(request))


@router.get("/v1/models/{model_id:path}", tags=["openai"])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    """One public model, as the list gives it."""
    gateway = gateway_of(request)
    key = gateway.key_of(request)
    if model_id not in gateway.public_models or (key is not None and not key.allows(model_id)):
        raise GatewayError(
            404,
            f"no model {model_id!r}; known: {', '.join(sorted(gateway.public_models))}",
            code=ErrorCode.MODEL_UNAVAILABLE.value,
            param="model",
        )
    return await model_entry(gateway.config, model_id, gateway.circuits)


@router.post("/v1/chat/completions", tags=["openai"], response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> Response:
    """OpenAI's Chat Completions, served through the queue pipeline; the caller's
    ``traceparent`` is continued (else one is made), and sent back with the answer."""
    with hop(CHAT_PATH, continued(request.headers.get(HEADER_TRACEPARENT))) as trace:
        assert trace is not None
        return await _chat(body, request, trace)


async def _chat(body: ChatRequest, request: Request, trace: str) -> Response:
    gateway = gateway_of(request)
    secret, _ = gateway.caller(request)
    job = job_from_request(body, routing_from_headers(request.headers), gateway.public_models)
    headers = {"x-switchyard-job-id": job.job_id, HEADER_TRACEPARENT: trace}
    call = await gateway.rpc.call(job, secret, headers={HEADER_TRACEPARENT: trace})
    log.debug("job %s sent", job.job_id)
    wait_s = gateway.wait_s(job)
    try:
        first = await _answer_or_gone(request, call, body.stream, wait_s)
    except TimeoutError:
        call.close()
        await gateway.cancel_untracked(job.job_id)  # if it has not started, it need not
        return error_response(
            504,
            f"no answer within {wait_s:g} s; the job may still run",
            ErrorCode.DEADLINE_EXCEEDED.value,
            headers=headers,
        )
    except BaseException:
        call.close()
        raise
    if first is None:  # the client went away: its job is not started if not yet
        call.close()
        await gateway.cancel_untracked(job.job_id)
        return Response(status_code=499)
    if isinstance(first, JobResult):
        call.close()
        return _result_response(first, headers, stream=body.stream)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(
        sse_events(call, first, include_usage, wait_s),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


async def _answer_or_gone(
    request: Request, call: RpcCall, stream: bool, wait_s: float
) -> JobChunk | JobResult | None:
    """The job's first reply (its result, or a stream's first chunk); None if the client
    disconnected first. ``TimeoutError`` after ``wait_s``."""
    reply = asyncio.ensure_future(call.next() if stream else call.result())
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {reply, gone}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
        if not reply.done():
            reply.cancel()
    if reply in done:
        return reply.result()
    if gone in done:
        return None
    raise TimeoutError


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _result_response(result: JobResult, headers: dict[str, str], *, stream: bool) -> Response:
    if result.provider:
        headers["x-switchyard-provider"] = result.provider
    if result.status is not JobStatus.SUCCEEDED or result.response is None:
        assert result.error is not None
        return job_error_response(result.error, headers)
    body = result.response.model_dump(mode="json", exclude_none=True)
    if stream:  # answered whole (no chunk came): one chunk with all of it, then the end
        return StreamingResponse(
            iter([b"data: " + orjson.dumps(_as_chunk(body)) + b"\n\n", b"data: [DONE]\n\n"]),
            media_type="text/event-stream",
            headers=headers,
        )
    return Response(orjson.dumps(body), media_type=JSON, headers=headers)


def _as_chunk(completion: dict[str, Any]) -> dict[str, Any]:
    choices = [
        {"index": c["index"], "delta": c["message"], "finish_reason": c.get("finish_reason")}
        for c in completion["choices"]
    ]
    return {**completion, "object": "chat.completion.chunk", "choices": choices}


def _errors(app: FastAPI) -> None:
    """Every refusal in OpenAI's error object (``error_for``)."""

    async def handled(_request: Request, exc: Exception) -> Response:
        return error_for(exc)

    for kind in (RequestValidationError, GatewayError, SwitchyardError, HTTPException, Exception):
        app.add_exception_handler(kind, handled)


def error_for(exc: Exception) -> Response:
    """The answer to a request refused by ``exc``."""
    if isinstance(exc, RequestValidationError | ValidationError):
        return invalid_body(list(exc.errors()))
    if isinstance(exc, WebhookRefused):
        return error_response(400, exc.message, exc.code.value, param=exc.field)
    if isinstance(exc, GatewayError):
        return error_response(
            exc.status, exc.message, exc.code, param=exc.param, retry_after=exc.retry_after
        )
    if isinstance(exc, SwitchyardError):
        return job_error_response(exc.to_job_error())
    if isinstance(exc, HTTPException):
        code = "not_found" if exc.status_code == 404 else ErrorCode.INVALID_MESSAGE.value
        return error_response(exc.status_code, str(exc.detail), code)
    if isinstance(exc, (*REDIS_FAILURES, DBAPIError, OSError)):
        away = Unavailable(
            f"a service the gateway needs is unreachable now ({type(exc).__name__})",
            retry_after=5.0,
        )
        return job_error_response(away.to_job_error())
    log.error("a request failed on a bug", exc_info=exc)
    return error_response(
        500, f"internal error ({type(exc).__name__})", ErrorCode.INTERNAL_ERROR.value
    )


def invalid_body(errors: list[Any]) -> Response:
    """400 naming the first thing wrong with the body (FastAPI's or pydantic's errors)."""
    error = errors[0]
    where = ".".join(str(p) for p in error["loc"] if p != "body") or "body"
    message = f"{where}: {error['msg']}"
    if error["type"] == "extra_forbidden":
        message = f"unknown field {where!r}: OpenAI's request has no such field"
    elif error["type"] == "json_invalid":
        message = "the body is not valid JSON"
    elif error["type"] == "value_error" and where == "body":  # bounds.check_json
        message = str(error["ctx"]["error"])
    return error_response(400, message, ErrorCode.INVALID_MESSAGE.value, param=where)
