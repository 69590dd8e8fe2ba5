"""Gemini generateContent and streamGenerateContent routes, shaped as documented at
https://ai.google.dev/api/generate-content, with Google's error envelope
(``{"error": {"code", "message", "status", "details"?}}``, see
https://ai.google.dev/gemini-api/docs/troubleshooting).

Faults: rate_limit is a 429 ``RESOURCE_EXHAUSTED`` whose ``details`` carry a
``google.rpc.RetryInfo`` ``retryDelay`` (Gemini sends no ``retry-after`` header); server_error a
500 ``INTERNAL``; auth the 400 ``API_KEY_INVALID``; stream_error cuts a stream short (no
``finishReason``, no usage) and gives a non-streamed call a malformed body.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mock_provider.answers import Reply, reply
from mock_provider.control import FaultKind, MockState
from mock_provider.endpoint import ProviderEndpoint
from mock_provider.gemini_request import GenerateRequest, parse_generate_request
from mock_provider.settings import MockSettings
from mock_provider.streaming import compact, sse, stream_error_cut, text_pieces
from mock_provider.validation import InvalidRequest

__all__ = ["MALFORMED_BODY", "GenerateContent", "gemini_error", "gemini_routes"]

MALFORMED_BODY = b'{\n  "candidates": [\n    {\n      "content": {'  # "malformed" fault
_SSE_END = b"\r\n\r\n"  # what Google's servers end each event with
_RPM_LIMIT = 15
_CATEGORIES = (
    "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_DANGEROUS_CONTENT",
    "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_SEXUALLY_EXPLICIT",
)
_FINISH = {
    "end": "STOP",
    "stop_sequence": "STOP",
    "length": "MAX_TOKENS",
    "tool_call": "STOP",
    "refusal": "SAFETY",
}
_INVALID_KEY = "API key not valid. Please pass a valid API key."


def gemini_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=code)


def _key_invalid() -> JSONResponse:
    return gemini_error(
        400,
        "INVALID_ARGUMENT",
        _INVALID_KEY,
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": _INVALID_KEY,
            },
        ],
    )


def _key_missing() -> JSONResponse:
    return gemini_error(
        403,
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without established identity). "
        "Please use API Key or other form of API consumer identity to call this API.",
    )


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON: ``"2s"``, ``"2.500s"``."""
    return f"{seconds:g}s" if float(seconds).is_integer() else f"{seconds:.3f}s"


def _rate_limited(settings: MockSettings, model: str | None) -> JSONResponse:
    return gemini_error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
        [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": "generativelanguage.googleapis.com/"
                        "generate_content_requests",
                        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                        "quotaDimensions": {"location": "global", "model": model or ""},
                        "quotaValue": str(_RPM_LIMIT),
                    }
                ],
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }
                ],
            },
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": _duration(settings.retry_after_s),
            },
        ],
    )


def _internal() -> JSONResponse:
    return gemini_error(
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    )


def _ratings(blocked: bool = False) -> list[dict[str, Any]]:
    ratings: list[dict[str, Any]] = [
        {"category": c, "probability": "NEGLIGIBLE"} for c in _CATEGORIES
    ]
    if blocked:
        ratings[1] = {"category": _CATEGORIES[1], "probability": "HIGH", "blocked": True}
    return ratings


def _usage(ans: Reply) -> dict[str, Any]:
    usage: dict[str, Any] = {"promptTokenCount": ans.prompt_tokens}
    if ans.completion_tokens:  # proto3 JSON leaves zero counts out
        usage["candidatesTokenCount"] = ans.completion_tokens
    usage["totalTokenCount"] = ans.prompt_tokens + ans.completion_tokens
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": ans.prompt_tokens}]
    return usage


def _answer(req: GenerateRequest) -> Reply:
    return reply(
        req.turns,
        max_tokens=req.max_tokens,
        stops=req.stops,
        json_format=req.json_format,
        tools=req.tools,
        choice=req.choice,
        allowed=req.allowed,
    )


def _candidate(parts: list[dict[str, Any]] | None, finish: str | None) -> dict[str, Any]:
    """A candidate: content unless ``parts`` is None (a safety stop), and when ``finish`` is
    given (a whole answer, or a stream's last chunk) its finishReason and safety ratings."""
    content = {} if parts is None else {"content": {"parts": parts, "role": "model"}}
    if finish is None:
        return {**content, "index": 0}
    ratings = _ratings(blocked=finish == "SAFETY")
    return {**content, "finishReason": finish, "index": 0, "safetyRatings": ratings}


def _parts(ans: Reply) -> list[dict[str, Any]] | None:
    if ans.finish == "refusal":
        return None
    if ans.tool_call is not None:
        return [{"functionCall": {"name": ans.tool_call.name, "args": ans.tool_call.arguments}}]
    return [{"text": ans.text}]


def _tail(req: GenerateRequest, seq: int) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([req.turns, seq]).encode()).hexdigest()
    return {"modelVersion": req.model, "responseId": digest[:22]}


def _response(req: GenerateRequest, seq: int, ans: Reply) -> dict[str, Any]:
    """The whole GenerateContentResponse."""
    if ans.blocked:
        feedback = {"blockReason": "SAFETY", "safetyRatings": _ratings(blocked=True)}
        return {"promptFeedback": feedback, "usageMetadata": _usage(ans), **_tail(req, seq)}
    candidate = _candidate(_parts(ans), _FINISH[ans.finish])
    return {"candidates": [candidate], "usageMetadata": _usage(ans), **_tail(req, seq)}


def _chunks(req: GenerateRequest, seq: int, ans: Reply, cut: bool) -> list[dict[str, Any]]:
    """The streamed responses: one per few words of text, the last with finishReason and usage;
    a function call or a safety stop comes whole. A cut stream stops after a few pieces."""
    tail = _tail(req, seq)
    text = ans.finish not in ("tool_call", "refusal")
    pieces = text_pieces(ans.text) if text else []
    if not pieces:
        return [] if cut else [_response(req, seq, ans)]
    if cut:
        sent = pieces[: stream_error_cut(len(pieces))]
        return [{"candidates": [_candidate([{"text": p}], None)], **tail} for p in sent]
    chunks = [{"candidates": [_candidate([{"text": p}], None)], **tail} for p in pieces[:-1]]
    last = _candidate([{"text": pieces[-1]}], _FINISH[ans.finish])
    return [*chunks, {"candidates": [last], "usageMetadata": _usage(ans), **tail}]


async def _sse(chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield sse(chunk, end=_SSE_END)


async def _json_array(chunks: list[dict[str, Any]], cut: bool) -> AsyncIterator[bytes]:
    """``alt=json`` (the default): one JSON array, streamed element by element."""
    for i, chunk in enumerate(chunks):
        yield (b"[" if i == 0 else b",\r\n") + compact(chunk)
    if not cut:
        yield b"]" if chunks else b"[]"


class GenerateContent(ProviderEndpoint[GenerateRequest]):
    """``POST /v1beta/models/{model}:generateContent`` (or ``:streamGenerateContent``)."""

    def __init__(self, state: MockState, *, stream: bool) -> None:
        super().__init__(state)
        self.stream = stream

    def model_of(self, request: Request, body: object) -> str | None:
        return str(request.path_params["model"])

    def fault(self, kind: FaultKind, settings: MockSettings, model: str | None) -> Response:
        if kind == "rate_limit":
            return _rate_limited(settings, model)
        if kind == "server_error":
            return _internal()
        if kind == "auth":
            return _key_invalid()
        return Response(MALFORMED_BODY, 200, media_type="application/json")  # malformed

    def denied(self, request: Request, settings: MockSettings) -> Response | None:
        if settings.api_key is None:
            return None
        given = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not given:
            return _key_missing()
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            return _key_invalid()
        return None

    def unparsable(self) -> Response:
        return gemini_error(
            400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unexpected token."
        )

    def parse(self, request: Request, body: object) -> GenerateRequest:
        model = str(request.path_params["model"])
        sse_framing = request.query_params.get("alt") == "sse"
        return parse_generate_request(model, body, sse=sse_framing)

    def invalid(self, exc: InvalidRequest) -> Response:
        violation = {"field": exc.param or "", "description": exc.message.strip()}
        detail = {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [violation],
        }
        return gemini_error(400, "INVALID_ARGUMENT", exc.message, [detail])

    def model_not_found(self, model: str) -> Response:
        return gemini_error(
            404,
            "NOT_FOUND",
            f"models/{model} is not found for API version v1beta, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their "
            "supported methods.",
        )

    def answer(self, req: GenerateRequest, seq: int, *, stream_error: bool) -> Response:
        ans = _answer(req)
        if not self.stream:
            if stream_error:
                return Response(MALFORMED_BODY, 200, media_type="application/json")
            return JSONResponse(_response(req, seq, ans))
        chunks = _chunks(req, seq, ans, cut=stream_error)
        if req.sse:
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        body = _json_array(chunks, cut=stream_error)
        return StreamingResponse(body, media_type="application/json")


def gemini_routes(state: MockState) -> list[Route]:
    """``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``."""
    return [
        Route(
            "/v1beta/models/{model}:generateContent",
            GenerateContent(state, stream=False),
            methods=["POST"],
        ),
        Route(
            "/v1beta/models/{model}:streamGenerateContent",
            GenerateContent(state, stream=True),
            methods=["POST"],
        ),
    ]
