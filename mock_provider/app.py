"""Assemble the mock provider app and serve it with uvicorn."""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from mock_provider.anthropic import anthropic_error, anthropic_routes
from mock_provider.control import MockState, control_routes
from mock_provider.gemini import gemini_error, gemini_routes
from mock_provider.openai import openai_error, openai_routes
from mock_provider.settings import MockSettings

__all__ = ["create_app", "run"]


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and wrong methods answer in the error envelope of the API the path belongs
    # to, so a client's error parsing is exercised rather than tripping on Starlette's plain text.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    path = request.url.path
    what = "Not found" if status == 404 else "Method not allowed"
    if path.startswith("/v1beta/"):
        code = "NOT_FOUND" if status == 404 else "INVALID_ARGUMENT"
        return gemini_error(status, code, f"{what}: {request.method} {path}")
    if path.startswith("/v1/messages"):
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return anthropic_error(status, kind, f"{what}: {request.method} {path}")
    return openai_error(status, f"Invalid URL ({request.method} {path})", "invalid_request_error")


def create_app(settings: MockSettings) -> Starlette:
    """A fresh app with its own state; ``app.state.mock`` is the ``MockState``.

    Routes: OpenAI ``POST /v1/chat/completions`` (and ``GET /v1/models``), Anthropic
    ``POST /v1/messages``, Gemini ``POST /v1beta/models/{model}:generateContent`` and
    ``:streamGenerateContent``, and the ``/_mock/*`` control routes.
    """
    state = MockState(settings)
    app = Starlette(
        routes=[
            *openai_routes(state),
            *anthropic_routes(state),
            *gemini_routes(state),
            *control_routes(state),
        ],
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.state.mock = state
    return app


def run(host: str, port: int, settings: MockSettings) -> None:
    """Serve until interrupted (blocking)."""
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
