"""Assemble the mock provider app and serve it with uvicorn."""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from mock_provider.control import MockState, control_routes
from mock_provider.openai import openai_error, openai_routes
from mock_provider.settings import MockSettings

__all__ = ["create_app", "run"]


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and wrong methods answer in OpenAI's error envelope, as the real API does,
    # so a client's error parsing is exercised rather than tripping on Starlette's plain text.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"Invalid URL ({request.method} {request.url.path})"
    return openai_error(status, message, "invalid_request_error")


def create_app(settings: MockSettings) -> Starlette:
    """A fresh app with its own state; ``app.state.mock`` is the ``MockState``."""
    state = MockState(settings)
    app = Starlette(
        routes=[*openai_routes(state), *control_routes(state)],
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.state.mock = state
    return app


def run(host: str, port: int, settings: MockSettings) -> None:
    """Serve until interrupted (blocking)."""
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
