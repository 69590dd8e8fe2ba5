"""The call lifecycle every provider endpoint shares, whatever API it speaks.

A call takes its targeted fault (``fail_next``) on arrival, sleeps the latency, then checks in
order: that fault, API key, body, model, random fault, and answers. Random faults only replace
answers a valid request would have got, so a client bug (a 400) never hides behind a 429.
A ``stream_error`` fault is handed to the answer, which breaks its stream part way.
"""

from __future__ import annotations

import asyncio
import json
import math
from abc import ABC, abstractmethod
from typing import Generic, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mock_provider.control import FaultKind, MockState
from mock_provider.settings import MockSettings
from mock_provider.validation import InvalidRequest

__all__ = ["TIMEOUT_S", "ProviderEndpoint", "client_left_within", "retry_after"]

TIMEOUT_S = 3600.0  # "timeout" fault: far beyond any client timeout


class _HasModel(Protocol):
    @property
    def model(self) -> str: ...


R = TypeVar("R", bound=_HasModel)


def retry_after(seconds: float) -> str:
    """A ``retry-after`` value: whole seconds and at least 1, so naive clients never spin."""
    return str(max(1, math.ceil(seconds)))


async def client_left_within(receive: Receive, seconds: float) -> bool:
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


class ProviderEndpoint(ABC, Generic[R]):
    """One API's chat endpoint as a raw ASGI app, so one ``try`` spans the whole call.

    A call counts as in flight from arrival until its last byte is sent: the latency sleep, and
    for a stream, until the stream ends. Subclasses supply the API's wording of each outcome.
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
        model = self.model_of(request, body)
        if model is not None:
            state.note_model(model)
        # Taken on arrival: "the next N calls" means the next N to arrive, whatever their latency.
        fault = state.take_fail_next()
        await asyncio.sleep(state.delay_s())
        settings = state.settings  # read after the sleep: a PUT may have changed it meanwhile
        if fault == "timeout":
            if await client_left_within(receive, TIMEOUT_S):
                return None
        elif fault is not None and fault != "stream_error":
            return self.fault(fault, settings, model)
        denied = self.denied(request, settings)
        if denied is not None:
            return denied
        if body is None:
            return self.unparsable()
        try:
            req = self.parse(request, body)
        except InvalidRequest as exc:
            return self.invalid(exc)
        if settings.models and req.model not in settings.models:
            return self.model_not_found(req.model)
        drawn = state.draw_fault()
        if drawn is not None:
            return self.fault(drawn, settings, req.model)
        return self.answer(req, state.next_sequence(), stream_error=fault == "stream_error")

    def model_of(self, request: Request, body: object) -> str | None:
        """The model a call names, for ``by_model`` (read before any validation)."""
        model = body.get("model") if isinstance(body, dict) else None
        return model if isinstance(model, str) else None

    @abstractmethod
    def fault(self, kind: FaultKind, settings: MockSettings, model: str | None) -> Response:
        """The response to an injected fault (any kind but "timeout" and "stream_error")."""

    @abstractmethod
    def denied(self, request: Request, settings: MockSettings) -> Response | None:
        """The auth error when the request's API key is missing or wrong, else None."""

    @abstractmethod
    def unparsable(self) -> Response:
        """The 400 for a body that is not JSON."""

    @abstractmethod
    def parse(self, request: Request, body: object) -> R:
        """The validated request; raises ``InvalidRequest``."""

    @abstractmethod
    def invalid(self, exc: InvalidRequest) -> Response:
        """The 400 for an invalid request."""

    @abstractmethod
    def model_not_found(self, model: str) -> Response:
        """The 404 for a model outside ``settings.models``."""

    @abstractmethod
    def answer(self, req: R, seq: int, *, stream_error: bool) -> Response:
        """The answer to a valid request; ``seq`` is the call's number (for unique ids)."""
