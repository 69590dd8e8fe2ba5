"""``POST /v1/chat/completions``: OpenAI's request in, a ``CompletionJob`` out; the job's result
and chunks back in OpenAI's response and SSE shapes.

The request names every field OpenAI's Chat Completions API documents (passed to the provider
as the job's params) and Switchyard's routing fields; any other field is refused, by name.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.core.clock import utcnow
from broker.core.errors import SwitchyardError, status_of
from broker.gateway.bounds import check_json
from broker.gateway.errors import GatewayError, openai_error
from broker.transport.rpc import RpcCall
from schemas import MAX_OUTPUT_TOKENS, ChatMessage, CompletionJob, JobChunk, JobResult, JobStatus

__all__ = [
    "AUTO_MODEL",
    "ChatRequest",
    "job_from_request",
    "routing_from_headers",
    "sse_events",
    "usage_chunk",
]

AUTO_MODEL = "auto"
"""``model: "auto"`` routes by ``task_type`` (or the config's default model), unless the config
has a public model of that name."""

HEADER_PREFIX = "x-switchyard-"
ROUTING_FIELDS = ("task_type", "priority", "deadline", "on_quota", "metadata", "idempotency_key")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's Chat Completions request, and Switchyard's routing fields (also accepted as
    ``x-switchyard-<field>`` headers, ``-`` for ``_``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        check_json(data)
        return data

    @model_validator(mode="after")
    def _streamed_options(self) -> ChatRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream: true")
        return self

    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's parameters, passed to the provider as the job's params.
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int | None = Field(default=None, ge=1, le=128)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    verbosity: str | None = None
    # Switchyard's routing fields.
    task_type: str | None = None
    priority: int | None = Field(default=None, ge=0, le=9)
    deadline: AwareDatetime | None = None
    on_quota: Literal["wait", "reject"] | None = None
    metadata: dict[str, Any] | None = None
    idempotency_key: str | None = Field(default=None, max_length=256)


_NOT_PARAMS = frozenset({"model", "messages", "stream", "stream_options", *ROUTING_FIELDS})


def routing_from_headers(headers: Mapping[str, str]) -> dict[str, Any]:
    """The routing fields given as ``x-switchyard-*`` headers (``metadata`` as JSON)."""
    found: dict[str, Any] = {}
    for name in ROUTING_FIELDS:
        value = headers.get(HEADER_PREFIX + name.replace("_", "-"))
        if value is None:
            continue
        if name == "metadata":
            try:
                found[name] = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise GatewayError(
                    400, f"the {HEADER_PREFIX}metadata header is not JSON", param="metadata"
                ) from None
        else:
            found[name] = value
    return found


def job_from_request(
    request: ChatRequest, from_headers: Mapping[str, Any], public_models: set[str]
) -> CompletionJob:
    """The job for ``request``; a routing field in the body wins over its header."""
    routing = {name: getattr(request, name) for name in ROUTING_FIELDS}
    for name, value in from_headers.items():
        if routing[name] is None:
            routing[name] = value
    # A subclass's own fields (an async job's webhook, defer) are Switchyard's, not the model's.
    own = type(request).model_fields.keys() - ChatRequest.model_fields.keys()
    params = request.model_dump(exclude_none=True, exclude=set(_NOT_PARAMS) | own)
    params["stream"] = request.stream
    model: str | None = request.model
    if model == AUTO_MODEL and AUTO_MODEL not in public_models:
        model = None
    try:
        return CompletionJob.model_validate(
            {
                "job_id": f"chatcmpl-{uuid.uuid4().hex}",
                "model": model,
                "task_type": routing["task_type"],
                "messages": request.messages,
                "params": params,
                "priority": routing["priority"] if routing["priority"] is not None else 0,
                "deadline": routing["deadline"],
                "on_quota": routing["on_quota"] or "reject",
                "metadata": routing["metadata"] or {},
                "idempotency_key": routing["idempotency_key"],
                "submitted_at": utcnow(),
            }
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise GatewayError(400, f"{where}: {error['msg']}", param=where) from None


def usage_chunk(result: JobResult, chunk_id: str, created: int) -> dict[str, Any]:
    """The last chunk of a stream asked ``include_usage``: no choices, the job's usage."""
    usage = result.usage.model_dump(mode="json") if result.usage is not None else None
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": result.model or "",
        "choices": [],
        "usage": usage,
    }


def _event(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def sse_events(
    call: RpcCall, first: JobChunk, include_usage: bool, timeout_s: float
) -> AsyncIterator[bytes]:
    """The stream's SSE events from the job's chunks, its usage, then ``[DONE]``. A job whose
    provider call was retried after chunks went out cannot take them back: the stream ends
    with an error event, which the SDKs raise."""
    attempt = first.attempt
    chunk_id, created = first.chunk.id, first.chunk.created or int(time.time())
    reply: JobChunk | JobResult = first
    try:
        while True:
            if isinstance(reply, JobResult):
                break
            if reply.attempt != attempt:
                yield _event(
                    openai_error(
                        502,
                        "the provider's stream broke and the call was retried; the answer"
                        " already sent cannot be taken back",
                        "server_error",
                    )
                )
                return
            if reply.chunk.choices or reply.chunk.usage is None:  # usage goes last, once
                yield _event(reply.chunk.model_dump(mode="json", exclude_none=True))
            try:
                async with asyncio.timeout(timeout_s):
                    reply = await call.next()
            except (TimeoutError, SwitchyardError, ValueError) as exc:
                # Lost mid-stream (no answer in time, the broker connection gone): say so.
                code = exc.code.value if isinstance(exc, SwitchyardError) else "timeout"
                yield _event(openai_error(504, f"the stream ended early: {exc}", code))
                return
        if reply.status is not JobStatus.SUCCEEDED:
            assert reply.error is not None
            error = reply.error
            yield _event(openai_error(status_of(error), error.message, error.code.value))
            return
        if include_usage:
            yield _event(usage_chunk(reply, chunk_id, created))
        yield b"data: [DONE]\n\n"
    finally:
        call.close()
