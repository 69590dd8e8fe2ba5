"""Anthropic Messages route, shaped as documented at https://docs.anthropic.com/en/api/messages,
with streaming per https://docs.anthropic.com/en/docs/build-with-claude/streaming and errors per
https://docs.anthropic.com/en/api/errors.

Faults: rate_limit is a 429 ``rate_limit_error`` with ``retry-after`` and
``anthropic-ratelimit-requests-*`` headers; server_error is a 529 ``overloaded_error``; auth a 401
``authentication_error``; stream_error breaks a stream with an ``error`` event (a non-streamed
call gets the 529).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mock_provider.answers import Reply, reply
from mock_provider.anthropic_request import MessagesRequest, parse_messages_request
from mock_provider.control import FaultKind, MockState
from mock_provider.endpoint import ProviderEndpoint, retry_after
from mock_provider.settings import MockSettings
from mock_provider.streaming import arg_pieces, sse, stream_error_cut, text_pieces
from mock_provider.validation import InvalidRequest

__all__ = ["MALFORMED_BODY", "Messages", "anthropic_error", "anthropic_routes"]

MALFORMED_BODY = b'{"id": "msg_'  # "malformed" fault: a 200 whose body is cut short
_RPM_LIMIT = 60

_STOP_REASON = {
    "end": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_call": "tool_use",
    "refusal": "refusal",
}


def _request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def anthropic_error(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``, and a ``request-id``."""
    request_id = _request_id()
    body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}
    return JSONResponse(
        body, status_code=status, headers={**(headers or {}), "request-id": request_id}
    )


def _overloaded() -> JSONResponse:
    return anthropic_error(529, "overloaded_error", "Overloaded")


def _rate_limited(settings: MockSettings) -> JSONResponse:
    wait = settings.retry_after_s
    reset = datetime.now(UTC) + timedelta(seconds=wait)
    headers = {
        "retry-after": retry_after(wait),
        "anthropic-ratelimit-requests-limit": str(_RPM_LIMIT),
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset.isoformat(timespec="seconds").replace(
            "+00:00", "Z"
        ),
    }
    message = (
        f"This request would exceed the rate limit for your organization of {_RPM_LIMIT} "
        "requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. "
        "You can see the response headers for current usage. Please try again later."
    )
    return anthropic_error(429, "rate_limit_error", message, headers)


def _auth_error(message: str = "invalid x-api-key") -> JSONResponse:
    return anthropic_error(401, "authentication_error", message)


def _usage(ans: Reply, output_tokens: int | None = None) -> dict[str, int]:
    return {
        "input_tokens": ans.prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": ans.completion_tokens if output_tokens is None else output_tokens,
    }


def _answer(req: MessagesRequest) -> Reply:
    return reply(
        req.turns,
        max_tokens=req.max_tokens,
        stops=req.stops,
        json_format=req.json_format,
        tools=req.tools,
        choice=req.choice,
        allowed=req.allowed,
    )


def _message_id(req: MessagesRequest, seq: int) -> str:
    digest = hashlib.sha256(json.dumps([req.turns, seq]).encode()).hexdigest()
    return f"msg_{digest[:24]}"


def _blocks(ans: Reply) -> list[dict[str, Any]]:
    call = ans.tool_call
    if call is not None:
        return [
            {
                "type": "tool_use",
                "id": f"toolu_{call.key}",
                "name": call.name,
                "input": call.arguments,
            }
        ]
    return [{"type": "text", "text": ans.text}] if ans.text else []


def _message(req: MessagesRequest, seq: int, ans: Reply, *, final: bool = True) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": _message_id(req, seq),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": _blocks(ans) if final else [],
        "stop_reason": _STOP_REASON[ans.finish] if final else None,
        "stop_sequence": ans.stop_sequence if final else None,
        "usage": _usage(ans) if final else _usage(ans, min(1, ans.completion_tokens)),
    }
    if final and ans.finish == "refusal":
        message["stop_details"] = {"type": "refusal", "category": None, "explanation": None}
    return message


def _block_events(index: int, block: dict[str, Any], cut: bool) -> list[tuple[str, Any]]:
    """``content_block_start``, its deltas and ``content_block_stop`` (only a few when cut)."""
    if block["type"] == "tool_use":
        start = {**block, "input": {}}
        pieces = arg_pieces(json.dumps(block["input"], separators=(",", ":"), ensure_ascii=False))
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
    else:
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in text_pieces(block["text"])]
    events: list[tuple[str, Any]] = [
        (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        ),
        ("ping", {"type": "ping"}),
    ]
    sent = deltas[: stream_error_cut(len(deltas))] if cut else deltas
    events += [
        ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
        for d in sent
    ]
    if not cut:
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


async def _sse(
    req: MessagesRequest, seq: int, ans: Reply, stream_error: bool
) -> AsyncIterator[bytes]:
    start = {"type": "message_start", "message": _message(req, seq, ans, final=False)}
    yield sse(start, "message_start")
    blocks = _blocks(ans)
    if not blocks:
        yield sse({"type": "ping"}, "ping")
    for index, block in enumerate(blocks):
        for name, data in _block_events(index, block, stream_error):
            yield sse(data, name)
    if stream_error:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        yield sse(error, "error")
        return
    delta = {"stop_reason": _STOP_REASON[ans.finish], "stop_sequence": ans.stop_sequence}
    usage = {"output_tokens": ans.completion_tokens}
    yield sse({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


class Messages(ProviderEndpoint[MessagesRequest]):
    """``POST /v1/messages``."""

    def fault(self, kind: FaultKind, settings: MockSettings, model: str | None) -> Response:
        if kind == "rate_limit":
            return _rate_limited(settings)
        if kind == "server_error":
            return _overloaded()
        if kind == "auth":
            return _auth_error()
        return Response(MALFORMED_BODY, 200, media_type="application/json")  # malformed

    def denied(self, request: Request, settings: MockSettings) -> Response | None:
        if settings.api_key is None:
            return None
        given = request.headers.get("x-api-key")
        if given is None:
            return _auth_error("x-api-key header is required")
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            return _auth_error()
        return None

    def unparsable(self) -> Response:
        return anthropic_error(400, "invalid_request_error", "The request body is not valid JSON.")

    def parse(self, request: Request, body: object) -> MessagesRequest:
        if not request.headers.get("anthropic-version"):
            raise InvalidRequest("anthropic-version: header is required", "anthropic-version")
        return parse_messages_request(body)

    def invalid(self, exc: InvalidRequest) -> Response:
        return anthropic_error(400, "invalid_request_error", exc.message)

    def model_not_found(self, model: str) -> Response:
        return anthropic_error(404, "not_found_error", f"model: {model}")

    def answer(self, req: MessagesRequest, seq: int, *, stream_error: bool) -> Response:
        ans = _answer(req)
        headers = {"request-id": _request_id()}
        if req.stream:
            stream = _sse(req, seq, ans, stream_error)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        if stream_error:
            return _overloaded()
        return JSONResponse(_message(req, seq, ans), headers=headers)


def anthropic_routes(state: MockState) -> list[Route]:
    """``POST /v1/messages``."""
    return [Route("/v1/messages", Messages(state), methods=["POST"])]
