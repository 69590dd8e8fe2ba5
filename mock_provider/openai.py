"""OpenAI Chat Completions and Models routes, shaped as documented at
https://platform.openai.com/docs/api-reference/chat (and /docs/api-reference/models).

A chat call takes its targeted fault (``fail_next``) on arrival, sleeps the latency, then checks
in order: that fault, API key, body, model, random fault, and answers. Random faults only replace
answers a valid request would have got, so a client bug (a 400) never hides behind a 429.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mock_provider.answers import (
    count_tokens,
    expected_completion,
    expected_tool_call,
    prompt_tokens,
)
from mock_provider.control import FaultKind, MockState
from mock_provider.openai_request import ChatRequest, InvalidRequest, parse_chat_request
from mock_provider.settings import MockSettings

__all__ = ["MALFORMED_BODY", "TIMEOUT_S", "openai_error", "openai_routes"]

TIMEOUT_S = 3600.0  # "timeout" fault: far beyond any client timeout
MALFORMED_BODY = b'{"id": "chatcmpl-'  # "malformed" fault: a 200 whose body is cut short
_RPM_LIMIT = 60
_MODEL_CREATED = 1_700_000_000  # fixed so /v1/models is deterministic
_OWNER = "switchyard-mock"
_WORDS_PER_CHUNK = 3
_ARG_CHARS_PER_CHUNK = 16


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
        # retry-after is whole seconds and at least 1, so clients that only read it never spin.
        "retry-after": str(max(1, math.ceil(wait))),
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
    return Response(MALFORMED_BODY, 200, media_type="application/json")


def _authorized(request: Request, api_key: str | None) -> bool:
    if api_key is None:
        return True
    given = request.headers.get("authorization", "")
    return secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode())


async def _client_left_within(receive: Receive, seconds: float) -> bool:
    """Wait up to ``seconds``; True as soon as the client disconnects (so nothing hangs on)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
        return watcher in done
    finally:
        watcher.cancel()


@dataclass(frozen=True, slots=True)
class _Answer:
    content: str | None
    tool_call: dict[str, Any] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }


def _answer(req: ChatRequest) -> _Answer:
    prompt = prompt_tokens(req.messages)
    call = expected_tool_call(req.messages, req.tools, req.tool_choice)
    if call is not None:
        fn = call["function"]
        used = count_tokens(f"{fn['name']} {fn['arguments']}")
        return _Answer(None, call, "tool_calls", prompt, used)
    content, finish = expected_completion(
        req.messages, req.max_tokens, req.stop, response_format=req.response_format
    )
    return _Answer(content, None, finish, prompt, count_tokens(content))


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


def _completion(req: ChatRequest, seq: int, ans: _Answer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": ans.content, "refusal": None}
    if ans.tool_call is not None:
        message["tool_calls"] = [ans.tool_call]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": ans.finish_reason}
    return {**_envelope(req, seq, "chat.completion"), "choices": [choice], "usage": ans.usage()}


def _pieces(text: str, words: int = _WORDS_PER_CHUNK) -> list[str]:
    """Split into runs of a few words; joining them gives back ``text`` exactly."""
    tokens = re.findall(r"\S+\s*|\s+", text)
    return ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]


def _deltas(ans: _Answer) -> list[dict[str, Any]]:
    if ans.tool_call is None:
        text = ans.content or ""
        return [{"role": "assistant", "content": ""}] + [{"content": p} for p in _pieces(text)]
    fn = ans.tool_call["function"]
    head = {**ans.tool_call, "index": 0, "function": {"name": fn["name"], "arguments": ""}}
    args = fn["arguments"]
    step = _ARG_CHARS_PER_CHUNK
    tail = [
        {"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + step]}}]}
        for i in range(0, len(args), step)
    ]
    return [{"role": "assistant", "content": None, "tool_calls": [head]}, *tail]


async def _sse(req: ChatRequest, seq: int, ans: _Answer) -> AsyncIterator[bytes]:
    base = _envelope(req, seq, "chat.completion.chunk")
    if req.include_usage:
        base["usage"] = None  # documented: every chunk but the last carries "usage": null

    def event(data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    finals: list[tuple[dict[str, Any], str | None]] = [(d, None) for d in _deltas(ans)]
    finals.append(({}, ans.finish_reason))
    for delta, finish in finals:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        yield event({**base, "choices": [choice]})
    if req.include_usage:
        yield event({**base, "choices": [], "usage": ans.usage()})
    yield b"data: [DONE]\n\n"


class ChatCompletions:
    """``POST /v1/chat/completions`` as a raw ASGI app, so one ``try`` spans the whole call.

    A call counts as in flight from arrival until its last byte is sent: the latency sleep, and
    for a stream, until the stream ends.
    """

    def __init__(self, state: MockState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.state.call_started()
        status: int | None = None
        try:
            response = await self._respond(Request(scope, receive), receive)
            if response is not None:
                status = response.status_code
                await response(scope, receive, send)
        finally:
            self.state.call_finished(status)

    async def _respond(self, request: Request, receive: Receive) -> Response | None:
        state = self.state
        raw = await request.body()
        try:
            body: object = json.loads(raw)
        except ValueError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        model = model if isinstance(model, str) else None
        if model is not None:
            state.note_model(model)
        # Taken on arrival: "the next N calls" means the next N to arrive, whatever their latency.
        fault = state.take_fail_next()
        await asyncio.sleep(state.delay_s())
        settings = state.settings  # read after the sleep: a PUT may have changed it meanwhile
        if fault == "timeout":
            if await _client_left_within(receive, TIMEOUT_S):
                return None
        elif fault is not None:
            return _fault(fault, settings, model)
        if not _authorized(request, settings.api_key):
            return _auth_error()
        if body is None:
            return openai_error(
                400,
                "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON.",
                "invalid_request_error",
            )
        try:
            req = parse_chat_request(body)
        except InvalidRequest as exc:
            return openai_error(400, exc.message, "invalid_request_error", exc.param)
        if settings.models and req.model not in settings.models:
            return _model_not_found(req.model)
        drawn = state.draw_fault()
        if drawn is not None:
            return _fault(drawn, settings, req.model)
        seq = state.next_sequence()
        ans = _answer(req)
        if req.stream:
            return StreamingResponse(_sse(req, seq, ans), media_type="text/event-stream")
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
