"""The gateway's ASGI pieces below FastAPI: the body size limit, and the hot route taken
straight. ``POST /v1/chat/completions`` is answered by ``ChatFastPath`` without FastAPI's
middleware chain, routing and dependency solving, and with the body parsed by orjson (which
refuses lone surrogates as invalid UTF-8); the FastAPI route stays for ``/openapi.json`` and
``/docs`` and runs the same function. Measured in ``ops/bench`` (``gateway``): docs §9."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.gateway.chat import ChatRequest
from broker.gateway.errors import GatewayError, error_response
from schemas import ErrorCode

__all__ = [
    "CHAT_PATH",
    "DRAIN_BYTES",
    "MAX_BODY_BYTES",
    "MAX_FILE_BYTES",
    "BodyLimit",
    "ChatFastPath",
]

CHAT_PATH = "/v1/chat/completions"
MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest request body taken (413 above it): room for a few base64 images."""
MAX_FILE_BYTES = 200 * 1024 * 1024
"""The largest upload (``POST /v1/files``): OpenAI's limit for a batch's input. Its parts are
spooled to disk as they come (python-multipart), then written to Postgres a piece at a time."""
FILES_PATH = "/v1/files"
DRAIN_BYTES = 64 * 1024 * 1024
"""How much of a refused body is read (and dropped) so its client gets the 413."""


class BodyLimit:
    """Refuses a body over ``MAX_BODY_BYTES`` (an upload: ``MAX_FILE_BYTES``) with 413 before
    it is read whole: by its Content-Length, or, sent in chunks, as soon as the count passes the
    limit."""

    def __init__(
        self, app: ASGIApp, limit: int = MAX_BODY_BYTES, file_limit: int = MAX_FILE_BYTES
    ) -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.file_limit if scope["path"] == FILES_PATH else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
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
            f"the body is over {limit} bytes",
            ErrorCode.INVALID_MESSAGE.value,
            headers={"connection": "close"},
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class ChatFastPath:
    """``POST /v1/chat/completions`` straight to ``handle``; everything else to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        handle: Callable[[ChatRequest, Request], Awaitable[Response]],
        refuse: Callable[[Exception], Response],
        limit: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.handle = handle
        self.refuse = refuse
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != CHAT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            raw = await _body(receive, self.limit)
        except _TooLarge:
            await BodyLimit._refuse(scope, receive, send, self.limit)
            return
        scope["app"] = self.app  # as FastAPI would: the route finds its gateway there
        request = Request(scope, receive)
        try:
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise GatewayError(400, "the body is not valid JSON", param="body") from None
            response = await self.handle(ChatRequest.model_validate(data), request)
        except Exception as exc:
            response = self.refuse(exc)
        await response(scope, receive, send)


async def _body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise _TooLarge
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)
