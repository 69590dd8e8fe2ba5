"""The gateway's HTTP metrics, outermost in its ASGI stack: each request counted by its route's
template (``/v1/jobs/{job_id}``, never the path itself, so ids make no series), method and
status, and timed to its last byte (a stream's too)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.core.metrics import HTTP_DURATION, HTTP_REQUESTS

__all__ = ["Metered"]

_UNMATCHED = "other"


class Metered:
    def __init__(self, app: ASGIApp, fixed: frozenset[str]) -> None:
        """``fixed``: paths answered below FastAPI's router (``ChatFastPath``), taken as is."""
        self.app = app
        self.fixed = fixed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # the app raised before it answered

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = self._route(scope)
            HTTP_REQUESTS.labels(route, scope["method"], str(status)).inc()
            HTTP_DURATION.labels(route).observe(time.perf_counter() - started)

    def _route(self, scope: Scope) -> str:
        path = scope["path"]
        if path in self.fixed:
            return str(path)
        route = scope.get("route")  # set by FastAPI's router on the request's scope
        template = getattr(route, "path", None)
        return template if isinstance(template, str) else _UNMATCHED
