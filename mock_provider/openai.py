"""OpenAI Chat Completions and Models routes, shaped as documented at
https://platform.openai.com/docs/api-reference/chat (and /docs/api-reference/models).

The call lifecycle (faults, latency, auth, validation order) is ``mock_provider.endpoint``'s.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mock_provider.answers import Reply, openai_finish, openai_reply
from mock_provider.control import FaultKind, MockState
from mock_provider.endpoint import TIMEOUT_S, ProviderEndpoint, retry_after
from mock_provider.openai_request import ChatRequest, parse_chat_request
from mock_provider.settings import MockSettings
from mock_provider.streaming import arg_pieces, sse, stream_error_cut, text_pieces
from mock_provider.validation import InvalidRequest

__all__ = ["MALFORMED_BODY", "TIMEOUT_S", "ChatCompletions", "openai_error", "openai_routes"]

MALFORMED_BODY = b'{"id": "chatcmpl-'  # "malformed" fault: a 200 whose body is cut short
_RPM_LIMIT = 60
_MODEL_CREATED = 1_700_000_000  # fixed so /v1/models is deterministic
_OWNER = "switchyard-mock"


def openai_error(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"message": message, "type": type_, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _auth_error() -> JSONResponse:
    # Never echo the key: the real API shows a masked prefix; the mock shows nothing.
    return openai_error(
        401,
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        code="invalid_api_key",
    )


def _model_not_found(model: str) -> JSONResponse:
    return openai_error(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        code="model_not_found",
    )


def _duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``"250ms"``, ``"1s"``, ``"1m30s"``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def _rate_limited(settings: MockSettings, model: str | None) -> JSONResponse:
    wait = settings.retry_after_s
    headers = {
        "retry-after": retry_after(wait),
        "retry-after-ms": str(round(wait * 1000)),
        "x-ratelimit-limit-requests": str(_RPM_LIMIT),
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": _duration(wait),
    }
    message = (
        f"Rate limit reached for requests per min (RPM) on {model or 'this model'} in "
        f"organization org-{_OWNER}: Limit {_RPM_LIMIT}, Used {_RPM_LIMIT}, Requested 1. Please "
        f"try again in {_duration(wait)}. Visit https://platform.openai.com/account/rate-limits "
        "to learn more."
    )
    return openai_error(429, message, "requests", code="rate_limit_exceeded", headers=headers)


def _server_error() -> JSONResponse:
    return openai_error(
        500,
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
    )


def _fault(kind: FaultKind, settings: MockSettings, model: str | None) -> Response:
    if kind == "rate_limit":
        return _rate_limited(settings, model)
    if kind == "server_error":
        return _server_error()
    if kind == "auth":
        return _auth_error()
    return Response(MALFORMED_BODY, 200, media_type="application/json")  # malformed


def _authorized(request: Request, api_key: str | None) -> bool:
    if api_key is None:
        return True
    given = request.headers.get("authorization", "")
    return secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def _answer(req: ChatRequest) -> Reply:
    return openai_reply(
        req.messages,
        max_tokens=req.max_tokens,
        stop=req.stop,
        response_format=req.response_format,
        tools=req.tools,
        tool_choice=req.tool_choice,
    )


def _usage(ans: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": ans.prompt_tokens,
        "completion_tokens": ans.completion_tokens,
        "total_tokens": ans.prompt_tokens + ans.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _tool_call(ans: Reply) -> dict[str, Any] | None:
    call = ans.tool_call
    if call is None:
        return None
    function = {"name": call.name, "arguments": call.arguments_json}
    return {"id": f"call_{call.key}", "type": "function", "function": function}


def _envelope(req: ChatRequest, seq: int, obj: str) -> dict[str, Any]:
    """Fields shared by the completion and every chunk of one call."""
    digest = hashlib.sha256(json.dumps([req.messages, seq], sort_keys=True).encode()).hexdigest()
    return {
        # Unique per call (the call number is hashed in), yet reproducible for a given run.
        "id": f"chatcmpl-{digest[:29]}",
        "object": obj,
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": "fp_" + hashlib.sha256(req.model.encode()).hexdigest()[:10],
    }


def _completion(req: ChatRequest, seq: int, ans: Reply) -> dict[str, Any]:
    # A tool call or a content filter stop has null content, as documented.
    content = ans.text if ans.finish not in ("tool_call", "refusal") else None
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    call = _tool_call(ans)
    if call is not None:
        message["tool_calls"] = [call]
    finish = openai_finish(ans.finish)
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {**_envelope(req, seq, "chat.completion"), "choices": [choice], "usage": _usage(ans)}


def _deltas(ans: Reply) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first delta, and the content deltas after it."""
    call = _tool_call(ans)
    if call is None:
        head: dict[str, Any] = {"role": "assistant", "content": ""}
        return head, [{"content": p} for p in text_pieces(ans.text)]
    first = {**call, "index": 0, "function": {"name": call["function"]["name"], "arguments": ""}}
    tail = [
        {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
        for piece in arg_pieces(call["function"]["arguments"])
    ]
    return {"role": "assistant", "content": None, "tool_calls": [first]}, tail


async def _sse(req: ChatRequest, seq: int, ans: Reply, stream_error: bool) -> AsyncIterator[bytes]:
    base = _envelope(req, seq, "chat.completion.chunk")
    if req.include_usage:
        base["usage"] = None  # documented: every chunk but the last carries "usage": null

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    head, tail = _deltas(ans)
    yield chunk(head)
    if stream_error:
        # The connection breaks: no finish_reason, no usage, no [DONE].
        for delta in tail[: stream_error_cut(len(tail))]:
            yield chunk(delta)
        return
    for delta in tail:
        yield chunk(delta)
    yield chunk({}, openai_finish(ans.finish))
    if req.include_usage:
        yield sse({**base, "choices": [], "usage": _usage(ans)})
    yield b"data: [DONE]\n\n"


class ChatCompletions(ProviderEndpoint[ChatRequest]):
    """``POST /v1/chat/completions``."""

    def fault(self, kind: FaultKind, settings: MockSettings, model: str | None) -> Response:
        return _fault(kind, settings, model)

    def denied(self, request: Request, settings: MockSettings) -> Response | None:
        return None if _authorized(request, settings.api_key) else _auth_error()

    def unparsable(self) -> Response:
        return openai_error(
            400,
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON.",
            "invalid_request_error",
        )

    def parse(self, request: Request, body: object) -> ChatRequest:
        return parse_chat_request(body)

    def invalid(self, exc: InvalidRequest) -> Response:
        return openai_error(400, exc.message, "invalid_request_error", exc.param)

    def model_not_found(self, model: str) -> Response:
        return _model_not_found(model)

    def answer(self, req: ChatRequest, seq: int, *, stream_error: bool) -> Response:
        ans = _answer(req)
        if req.stream:
            stream = _sse(req, seq, ans, stream_error)
            return StreamingResponse(stream, media_type="text/event-stream")
        if stream_error:
            return Response(MALFORMED_BODY, 200, media_type="application/json")
        return JSONResponse(_completion(req, seq, ans))


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": _MODEL_CREATED, "owned_by": _OWNER}


def openai_routes(state: MockState) -> list[Route]:
    """``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /v1/models/{model}``."""

    async def list_models(request: Request) -> Response:
        if not _authorized(request, state.settings.api_key):
            return _auth_error()
        data = [_model_object(m) for m in state.settings.models]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        settings = state.settings
        if not _authorized(request, settings.api_key):
            return _auth_error()
        model = str(request.path_params["model"])
        if settings.models and model not in settings.models:
            return _model_not_found(model)
        return JSONResponse(_model_object(model))

    return [
        Route("/v1/chat/completions", ChatCompletions(state), methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]
