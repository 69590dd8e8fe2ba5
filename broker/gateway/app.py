"""The gateway's HTTP routes (FastAPI, so ``/docs`` and ``/openapi.json`` come from the same
models that validate each request)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.core.errors import SwitchyardError
from broker.gateway.chat import ChatRequest, job_from_request, routing_from_headers, sse_events
from broker.gateway.context import gateway_of
from broker.gateway.errors import GatewayError, error_response, job_error_response
from broker.gateway.jobs import router as jobs_router
from broker.gateway.models import model_entry, models_list
from schemas import ErrorCode, JobResult, JobStatus

if TYPE_CHECKING:
    from broker.gateway.service import Gateway

__all__ = ["make_app"]

JSON = "application/json"
MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest request body taken (413 above it): room for a few base64 images."""
DRAIN_BYTES = 64 * 1024 * 1024
"""How much of a refused body is read (and dropped) so its client gets the 413."""


class BodyLimit:
    """Refuses a body over ``MAX_BODY_BYTES`` with 413 before it is read whole: by its
    Content-Length, or, sent in chunks, as soon as the count passes the limit."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read the rest first (up to a bound): a client still sending when the connection
        # closes never reads the answer.
        drained = 0
        while drained <= DRAIN_BYTES:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        response = error_response(
            413,
            f"the body is over {self.limit} bytes",
            ErrorCode.INVALID_MESSAGE.value,
            headers={"connection": "close"},
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


router = APIRouter()


def make_app(gateway: Gateway) -> FastAPI:
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
    return app


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


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request) -> dict[str, Any]:
    """Every public model, with its providers, prices, limits and circuit states."""
    gateway = gateway_of(request)
    return await models_list(gateway.config, gateway.circuits)


@router.get("/v1/models/{model_id:path}", tags=["openai"])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    """One public model, as the list gives it."""
    gateway = gateway_of(request)
    if model_id not in gateway.public_models:
        raise GatewayError(
            404,
            f"no model {model_id!r}; known: {', '.join(sorted(gateway.public_models))}",
            code=ErrorCode.MODEL_UNAVAILABLE.value,
            param="model",
        )
    return await model_entry(gateway.config, model_id, gateway.circuits)


@router.post("/v1/chat/completions", tags=["openai"], response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> Response:
    """OpenAI's Chat Completions, served through the queue pipeline."""
    gateway = gateway_of(request)
    secret, _ = gateway.caller(request)
    job = job_from_request(body, routing_from_headers(request.headers), gateway.public_models)
    headers = {"x-switchyard-job-id": job.job_id}
    call = await gateway.rpc.call(job, secret)
    wait_s = gateway.wait_s(job)
    try:
        async with asyncio.timeout(wait_s):
            first = await call.next() if body.stream else await call.result()
    except TimeoutError:
        call.close()
        return error_response(
            504,
            f"no answer within {wait_s:g} s; the job may still run",
            ErrorCode.DEADLINE_EXCEEDED.value,
            headers=headers,
        )
    except BaseException:
        call.close()
        raise
    if isinstance(first, JobResult):
        call.close()
        return _result_response(first, headers, stream=body.stream)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(
        sse_events(call, first, include_usage, wait_s),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


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
    """Every refusal in OpenAI's error object."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Response:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"] if p != "body") or "body"
        message = f"{where}: {error['msg']}"
        if error["type"] == "extra_forbidden":
            message = f"unknown field {where!r}: OpenAI's request has no such field"
        elif error["type"] == "json_invalid":
            message = "the body is not valid JSON"
        elif error["type"] == "value_error" and where == "body":  # bounds.check_json
            message = str(error["ctx"]["error"])
        return error_response(400, message, ErrorCode.INVALID_MESSAGE.value, param=where)

    @app.exception_handler(GatewayError)
    async def refused(_request: Request, exc: GatewayError) -> Response:
        return error_response(
            exc.status, exc.message, exc.code, param=exc.param, retry_after=exc.retry_after
        )

    @app.exception_handler(SwitchyardError)
    async def typed(_request: Request, exc: SwitchyardError) -> Response:
        return job_error_response(exc.to_job_error())

    @app.exception_handler(HTTPException)
    async def http(_request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else ErrorCode.INVALID_MESSAGE.value
        return error_response(exc.status_code, str(exc.detail), code)

    @app.exception_handler(Exception)
    async def bug(_request: Request, exc: Exception) -> Response:
        return error_response(
            500, f"internal error ({type(exc).__name__})", ErrorCode.INTERNAL_ERROR.value
        )
