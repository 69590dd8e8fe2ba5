"""The adapter for OpenAI's chat completions, and for every server that speaks its format.

Serves provider types ``openai``, ``openai_compatible`` and ``mock``. Follows:

- https://platform.openai.com/docs/api-reference/chat/create (the request)
- https://platform.openai.com/docs/api-reference/chat/object (the ``chat.completion`` response)
- https://platform.openai.com/docs/guides/error-codes (statuses and the error body
  ``{"error": {"message", "type", "param", "code"}}``)

Status → error::

    2xx                      parsed and validated as ``ChatCompletion``; not JSON, wrong shape,
                             no ``choices`` or no ``usage`` → ProviderProtocolError;
                             every choice content-filtered and empty → ContentFiltered
    429                      RateLimited (retry_after from ``retry-after-ms`` or ``retry-after``)
    401, 403                 ProviderAuthentication (never repeats the provider's text)
    400, 404, 409, 413, 422  ProviderInvalidRequest; error code ``content_filter`` or
                             ``content_policy_violation`` → ContentFiltered
    408                      ProviderTimeout
    anything else            ProviderServerError (5xx, and statuses the API does not document)
    httpx.TimeoutException   ProviderTimeout
    other httpx errors       ProviderServerError ("connection failed: <class name>")
"""

from __future__ import annotations

import email.utils
import math
import re
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from pydantic import ValidationError

from broker.config import ProviderConfig
from broker.errors import (
    ContentFiltered,
    ProviderAuthentication,
    ProviderError,
    ProviderInvalidRequest,
    ProviderProtocolError,
    ProviderServerError,
    ProviderTimeout,
    RateLimited,
)
from schemas import ChatCompletion, Choice
from workers.adapters.base import ProviderAdapter, ProviderRequest

__all__ = ["OpenAIAdapter", "parse_retry_after"]

_INVALID_REQUEST_STATUSES = frozenset({400, 404, 409, 413, 422})
_AUTH_STATUSES = frozenset({401, 403})
_CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})
_MAX_PROVIDER_MESSAGE = 500
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class OpenAIAdapter(ProviderAdapter):
    """``POST {base_url}/chat/completions``; ``base_url`` includes ``/v1``, as in OpenAI's SDK."""

    def __init__(self, provider: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(provider, http)
        self.url = str(provider.base_url).rstrip("/") + "/chat/completions"

    async def complete(self, request: ProviderRequest) -> ChatCompletion:
        try:
            return await self._complete(request)
        except ProviderError:
            raise
        except Exception as exc:
            # Name the class only: an exception's text may carry the response or a header.
            raise ProviderProtocolError(
                f"provider {self.provider.id!r}: unexpected {type(exc).__name__} "
                "while handling the call",
                provider=self.provider.id,
            ) from exc

    async def _complete(self, request: ProviderRequest) -> ChatCompletion:
        body = self._body(request)
        try:
            response = await self.http.post(self.url, content=body, headers=self._headers())
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(
                f"provider {self.provider.id!r} timed out ({type(exc).__name__})",
                provider=self.provider.id,
            ) from exc
        except httpx.DecodingError as exc:
            raise ProviderProtocolError(
                f"provider {self.provider.id!r}: response body could not be decoded "
                f"({type(exc).__name__})",
                provider=self.provider.id,
            ) from exc
        except httpx.RequestError as exc:
            raise ProviderServerError(
                f"provider {self.provider.id!r}: connection failed: {type(exc).__name__}",
                provider=self.provider.id,
            ) from exc
        if 200 <= response.status_code < 300:
            return self._completion(response)
        raise self._status_error(response)

    def _headers(self) -> httpx.Headers:
        # httpx.Headers is case-insensitive, so a configured "content-type" cannot duplicate ours.
        headers = httpx.Headers(self.provider.headers)
        headers["Content-Type"] = "application/json"
        key = self.provider.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, request: ProviderRequest) -> bytes:
        if request.params.stream:
            raise ProviderInvalidRequest(
                "streaming is not supported yet", provider=self.provider.id
            )
        params = request.params.model_dump(mode="json", exclude_none=True)
        params.pop("stream", None)
        # Pass-through params may not replace the call's own model and messages.
        params.pop("model", None)
        params.pop("messages", None)
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [m.model_dump(mode="json", exclude_none=True) for m in request.messages],
            **params,
        }
        return orjson.dumps(body)

    def _completion(self, response: httpx.Response) -> ChatCompletion:
        pid = self.provider.id
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ProviderProtocolError(
                f"provider {pid!r}: response body is not JSON "
                f"(HTTP {response.status_code}, {len(response.content)} bytes)",
                provider=pid,
            ) from None
        if not isinstance(data, dict):
            raise ProviderProtocolError(
                f"provider {pid!r}: response body is a JSON {type(data).__name__}, not an object",
                provider=pid,
            )
        try:
            completion = ChatCompletion.model_validate(data)
        except ValidationError as exc:
            # err["msg"] never holds the input; str(exc) would repeat the completion's text.
            problems = "; ".join(
                f"response field {_loc(err['loc'])}: {err['msg']}" for err in exc.errors()[:3]
            )
            raise ProviderProtocolError(f"provider {pid!r}: {problems}", provider=pid) from None
        if not completion.choices:
            raise ProviderProtocolError(f"provider {pid!r}: response has no choices", provider=pid)
        if all(_filtered_empty(choice) for choice in completion.choices):
            raise ContentFiltered(
                f"provider {pid!r} withheld the completion (finish_reason content_filter)",
                provider=pid,
            )
        if completion.usage is None:
            raise ProviderProtocolError(f"provider {pid!r}: response has no usage", provider=pid)
        return completion

    def _status_error(self, response: httpx.Response) -> ProviderError:
        pid = self.provider.id
        status = response.status_code
        message, code = self._error_detail(response.content)
        label = f"HTTP {status}, code {code}" if code else f"HTTP {status}"
        detail = f": {message}" if message else ""
        if status == 429:
            return RateLimited(
                f"provider {pid!r} rate limited the call ({label}){detail}",
                provider=pid,
                retry_after=parse_retry_after(response.headers),
            )
        if status in _AUTH_STATUSES:
            # The provider's message may echo part of the key; only a code-shaped code is kept.
            return ProviderAuthentication(
                f"provider {pid!r} refused our credentials ({label})", provider=pid
            )
        if status in _INVALID_REQUEST_STATUSES:
            if code in _CONTENT_FILTER_CODES:
                return ContentFiltered(
                    f"provider {pid!r} filtered the request ({label}){detail}", provider=pid
                )
            return ProviderInvalidRequest(
                f"provider {pid!r} rejected the request ({label}){detail}", provider=pid
            )
        if status == 408:
            return ProviderTimeout(f"provider {pid!r} timed out ({label}){detail}", provider=pid)
        if status >= 500:
            return ProviderServerError(f"provider {pid!r} failed ({label}){detail}", provider=pid)
        return ProviderServerError(
            f"provider {pid!r} answered with unexpected status ({label}){detail}", provider=pid
        )

    def _error_detail(self, content: bytes) -> tuple[str | None, str | None]:
        """The provider's error message (trimmed, key redacted) and code, when the body has them."""
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            return None, None
        error = data.get("error", data) if isinstance(data, dict) else None
        if isinstance(error, str):
            error = {"message": error}
        if not isinstance(error, dict):
            return None, None
        message = error.get("message")
        code = error.get("code")
        key = self.provider.api_key()
        message = _clean(message, key) if isinstance(message, str) else None
        code_text = code if isinstance(code, str) else None
        if code_text is not None and (
            not _IDENTIFIER.match(code_text) or (key and key in code_text)
        ):
            code_text = None
        return message or None, code_text


def parse_retry_after(headers: httpx.Headers, now: datetime | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI's, in ms) or ``retry-after`` (seconds or
    an HTTP-date, RFC 9110 §10.2.3); ``None`` when absent or malformed. A past date gives 0."""
    ms = _non_negative(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = _non_negative(raw)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _non_negative(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _filtered_empty(choice: Choice) -> bool:
    return (
        choice.finish_reason == "content_filter"
        and not choice.message.content
        and not choice.message.tool_calls
    )


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _clean(message: str, key: str | None) -> str:
    if key:
        message = message.replace(key, "[redacted]")
    message = " ".join(message.split())
    if len(message) > _MAX_PROVIDER_MESSAGE:
        message = message[: _MAX_PROVIDER_MESSAGE - 1] + "…"
    return message
