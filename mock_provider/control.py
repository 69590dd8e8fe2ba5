"""Runtime state shared by every provider module, and the ``/_mock/*`` control and stats routes.

Control lives under ``/_mock/`` so it never collides with a provider's own paths.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mock_provider.settings import MockSettings

__all__ = ["FAULT_KINDS", "FailNext", "FaultKind", "MockState", "control_routes"]

# rate_limit: a 429; server_error: the API's overload/internal error (OpenAI 500, Anthropic 529,
# Gemini 500); malformed: a 200 whose body is cut short; timeout: no answer until the client
# hangs up; auth: the API's bad-key error; stream_error: a stream breaks part way (Anthropic sends
# an "error" event; OpenAI and Gemini streams just stop), a non-streamed call gets Anthropic's 529
# or, on the other APIs, a malformed body.
FaultKind = Literal["rate_limit", "server_error", "malformed", "timeout", "auth", "stream_error"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


class FailNext(BaseModel):
    """Make the next ``count`` chat calls, of any API, fail as ``kind`` (``count`` 0 cancels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    count: int = Field(default=1, ge=0)


class ConfigError(ValueError):
    """A rejected ``PUT /_mock/config``; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class _Counters:
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


class MockState:
    """Settings, fault random streams, pending targeted faults and call counters of one app."""

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.fail_next: FailNext | None = None
        self._counters = _Counters()
        self._by_status: Counter[str] = Counter()
        self._by_model: Counter[str] = Counter()
        self._sequence = itertools.count(1)  # never reset: response ids stay unique across resets
        self._reseed()

    def _reseed(self) -> None:
        # Separate streams so turning jitter on does not change which calls fault.
        self._fault_rng = random.Random(self.settings.seed)
        self._latency_rng = random.Random(f"latency:{self.settings.seed}")

    # --- per call -------------------------------------------------------------------------------

    def call_started(self) -> None:
        c = self._counters
        c.calls += 1
        c.in_flight += 1
        c.max_in_flight = max(c.max_in_flight, c.in_flight)

    def call_finished(self, status: int | None) -> None:
        """``status`` None: the client went away before any response was sent."""
        self._counters.in_flight -= 1
        if status is not None:
            self._by_status[str(status)] += 1

    def next_sequence(self) -> int:
        return next(self._sequence)

    def note_model(self, model: str) -> None:
        self._by_model[model] += 1

    def delay_s(self) -> float:
        """Latency for this call: ``latency_ms`` plus uniform ``±jitter_ms``, never negative."""
        s = self.settings
        jitter = self._latency_rng.uniform(-s.jitter_ms, s.jitter_ms) if s.jitter_ms else 0.0
        return max(0.0, s.latency_ms + jitter) / 1000

    def take_fail_next(self) -> FaultKind | None:
        """Consume one pending targeted fault, if any."""
        pending = self.fail_next
        if pending is None or pending.count <= 0:
            return None
        left = pending.count - 1
        self.fail_next = FailNext(kind=pending.kind, count=left) if left else None
        return pending.kind

    def draw_fault(self) -> Literal["rate_limit", "server_error"] | None:
        """One uniform draw per call: [0, rate_limit_rate) is a 429, the next error_rate a 500."""
        s = self.settings
        u = self._fault_rng.random()
        if u < s.rate_limit_rate:
            return "rate_limit"
        if u < s.rate_limit_rate + s.error_rate:
            return "server_error"
        return None

    # --- control --------------------------------------------------------------------------------

    def config(self) -> dict[str, object]:
        data = self.settings.public()
        data["fail_next"] = self.fail_next.model_dump() if self.fail_next else None
        return data

    def configure(self, patch: Mapping[str, Any]) -> None:
        """Apply a partial settings patch and optional ``fail_next`` (null cancels) atomically."""
        fields = dict(patch)
        has_fail = "fail_next" in fields
        fail_raw = fields.pop("fail_next", None)
        unknown = sorted(set(fields) - set(MockSettings.model_fields))
        if unknown:
            raise ConfigError(f"Unknown setting {unknown[0]!r}.", unknown[0])
        try:
            settings = MockSettings.model_validate({**self.settings.model_dump(), **fields})
        except ValidationError as exc:
            raise _config_error(exc, None) from exc
        try:
            fail_next = FailNext.model_validate(fail_raw) if fail_raw is not None else None
        except ValidationError as exc:
            raise _config_error(exc, "fail_next") from exc
        self.settings = settings
        if "seed" in fields:
            self._reseed()
        if has_fail:
            self.fail_next = fail_next if fail_next and fail_next.count else None

    def stats(self) -> dict[str, object]:
        c = self._counters
        return {
            "calls": c.calls,
            "in_flight": c.in_flight,
            "max_in_flight": c.max_in_flight,
            "by_status": dict(self._by_status),
            "by_model": dict(self._by_model),
        }

    def reset(self) -> None:
        """Zero the counters; calls still running keep counting as in flight."""
        in_flight = self._counters.in_flight
        self._counters = _Counters(in_flight=in_flight, max_in_flight=in_flight)
        self._by_status.clear()
        self._by_model.clear()


def _config_error(exc: ValidationError, prefix: str | None) -> ConfigError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in (prefix, *err["loc"]) if p is not None) or None
    # Drop pydantic's "Value error, " prefix: the message is ours and reads better alone.
    message = str(err["msg"]).removeprefix("Value error, ")
    return ConfigError(f"Invalid {param or 'settings'}: {message}.", param)


def _bad_request(message: str, param: str | None) -> JSONResponse:
    body = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return JSONResponse({"error": body}, status_code=400)


def control_routes(state: MockState) -> list[Route]:
    """``/_mock/config`` (GET, PUT), ``/_mock/stats``, ``/_mock/reset`` and ``/healthz``."""

    async def get_config(request: Request) -> JSONResponse:
        return JSONResponse(state.config())

    async def put_config(request: Request) -> JSONResponse:
        try:
            patch = json.loads(await request.body())
        except ValueError:
            return _bad_request("The request body is not valid JSON.", None)
        if not isinstance(patch, dict):
            return _bad_request("The request body must be a JSON object of settings.", None)
        try:
            state.configure(patch)
        except ConfigError as exc:
            return _bad_request(exc.message, exc.param)
        return JSONResponse(state.config())

    async def get_stats(request: Request) -> JSONResponse:
        return JSONResponse(state.stats())

    async def post_reset(request: Request) -> JSONResponse:
        state.reset()
        return JSONResponse(state.stats())

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return [
        Route("/_mock/config", get_config, methods=["GET"]),
        Route("/_mock/config", put_config, methods=["PUT"]),
        Route("/_mock/stats", get_stats, methods=["GET"]),
        Route("/_mock/reset", post_reset, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
