"""The adapter for OpenAI's chat completions, and for every server that speaks its format.

Serves provider types ``openai``, ``openai_compatible`` and ``mock``. Follows:

- https://platform.openai.com/docs/api-reference/chat/create (the request; ``stream`` and
  ``stream_options.include_usage``)
- https://platform.openai.com/docs/api-reference/chat/object (the ``chat.completion`` response)
- https://platform.openai.com/docs/api-reference/chat-streaming (the ``chat.completion.chunk``
  stream: ``data:`` lines ending with ``data: [DONE]``; with ``include_usage`` a last chunk with
  empty ``choices`` carries ``usage``)
- https://platform.openai.com/docs/guides/error-codes (statuses and the error body
  ``{"error": {"message", "type", "param", "code"}}``)

``complete()`` never sends ``stream`` (a job's ``params.stream`` chooses the method, not the wire
flag); ``stream()`` always does. ``openai_compatible`` servers may report no usage: the result
then has ``usage=None`` and the worker estimates it. From ``openai`` and ``mock`` a missing usage
is a ProviderProtocolError.

Status → error::

    2xx                      parsed and validated as ``ChatCompletion`` (or, streaming, each
                             ``data:`` as ``ChatCompletionChunk``); not JSON, wrong shape or no
                             ``choices`` → ProviderProtocolError; every choice content-filtered
                             and empty → ContentFiltered; a stream that ends with neither
                             ``[DONE]`` nor a finish_reason → ProviderServerError
    429                      RateLimited (retry_after from ``retry-after-ms`` or ``retry-after``)
    401, 403                 ProviderAuthentication (never repeats the provider's text)
    400, 404, 409, 413, 422  ProviderInvalidRequest; error code ``content_filter`` or
                             ``content_policy_violation`` → ContentFiltered
    408                      ProviderTimeout
    anything else            ProviderServerError (5xx, and statuses the API does not document)
    transport failures       see ``workers/adapters/_errors.py``
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from broker.core.config import ProviderConfig, ProviderType
from broker.core.errors import (
    ContentFiltered,
    ProviderAuthentication,
    ProviderError,
    ProviderInvalidRequest,
    ProviderProtocolError,
    ProviderServerError,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
)
from schemas import ChatCompletion, ChatCompletionChunk, Choice
from workers.adapters._errors import clean, parse_retry_after, safe_code
from workers.adapters._http import HTTPAdapter
from workers.adapters._wire import json_object, validated
from workers.adapters.base import ProviderRequest
from workers.streaming import sse_events

__all__ = ["OpenAIAdapter", "parse_retry_after"]

_INVALID_REQUEST_STATUSES = frozenset({400, 404, 409, 413, 422})
_AUTH_STATUSES = frozenset({401, 403})
_CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})
_DONE = "[DONE]"


class OpenAIAdapter(HTTPAdapter):
    """``POST {base_url}/chat/completions``; ``base_url`` includes ``/v1``, as in OpenAI's SDK."""

    def __init__(self, provider: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(provider, http)
        self.url = str(provider.base_url).rstrip("/") + "/chat/completions"
        # Some OpenAI-compatible servers (older vLLM, llama.cpp builds) omit usage.
        self.usage_optional = provider.type is ProviderType.OPENAI_COMPATIBLE

    def _url(self, request: ProviderRequest, *, stream: bool) -> str:
        return self.url

    def _headers(self) -> httpx.Headers:
        # httpx.Headers is case-insensitive, so a configured "content-type" cannot duplicate ours.
        headers = httpx.Headers(self.provider.headers)
        headers["Content-Type"] = "application/json"
        key = self.provider.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, request: ProviderRequest, *, stream: bool) -> dict[str, Any]:
        params = request.params.model_dump(mode="json", exclude_none=True)
        params.pop("stream", None)
        options = params.pop("stream_options", None)
        # Pass-through params may not replace the call's own model and messages.
        params.pop("model", None)
        params.pop("messages", None)
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [m.model_dump(mode="json", exclude_none=True) for m in request.messages],
            **params,
        }
        if stream:
            extra = options if isinstance(options, dict) else {}
            body["stream"] = True
            body["stream_options"] = {**extra, "include_usage": True}
        return body

    def _completion(self, data: dict[str, Any], request: ProviderRequest) -> ChatCompletion:
        pid = self.provider.id
        completion = validated(ChatCompletion, data, pid, "response")
        if not completion.choices:
            raise ProviderProtocolError(f"provider {pid!r}: response has no choices", provider=pid)
        if all(_filtered_empty(choice) for choice in completion.choices):
            raise ContentFiltered(
                f"provider {pid!r} withheld the completion (finish_reason content_filter)",
                provider=pid,
            )
        if completion.usage is None and not self.usage_optional:
            raise ProviderProtocolError(f"provider {pid!r}: response has no usage", provider=pid)
        return completion

    async def _chunks(
        self, response: httpx.Response, request: ProviderRequest
    ) -> AsyncIterator[ChatCompletionChunk]:
        pid = self.provider.id
        done = False
        usage_seen = False
        finished: dict[int, str] = {}
        produced: set[int] = set()  # choices that streamed content or a tool call
        async for event in sse_events(response):
            if event.data.strip() == _DONE:
                done = True
                break
            data = json_object(event.data, pid, "stream event data")
            if "error" in data and "choices" not in data:
                raise self._stream_error(data["error"])
            chunk = validated(ChatCompletionChunk, data, pid, "stream chunk")
            usage_seen = usage_seen or chunk.usage is not None
            for choice in chunk.choices:
                if choice.delta.content or choice.delta.tool_calls or choice.delta.refusal:
                    produced.add(choice.index)
                if choice.finish_reason is not None:
                    finished[choice.index] = choice.finish_reason
            yield chunk
        if not done and not finished:
            raise ProviderServerError(f"provider {pid!r}: stream ended early", provider=pid)
        if finished and all(
            reason == "content_filter" and index not in produced
            for index, reason in finished.items()
        ):
            raise ContentFiltered(
                f"provider {pid!r} withheld the completion (finish_reason content_filter)",
                provider=pid,
            )
        if not usage_seen and not self.usage_optional:
            raise ProviderProtocolError(f"provider {pid!r}: stream has no usage", provider=pid)

    def _stream_error(self, error: object) -> ProviderError:
        """An error the provider sent as a ``data:`` event after answering 200."""
        pid = self.provider.id
        message, code = self._detail(error)
        label = f"code {code}" if code else "no code"
        detail = f": {message}" if message else ""
        if code in _CONTENT_FILTER_CODES:
            return ContentFiltered(
                f"provider {pid!r} filtered the stream ({label}){detail}", provider=pid
            )
        if code in ("rate_limit_exceeded", "rate_limit_error"):
            return RateLimited(
                f"provider {pid!r} rate limited the stream ({label}){detail}", provider=pid
            )
        return ProviderServerError(
            f"provider {pid!r} failed mid-stream ({label}){detail}", provider=pid
        )

    def _status_error(self, response: httpx.Response) -> ProviderError:
        pid = self.provider.id
        status = response.status_code
        try:
            data: object = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            data = None
        message, code = self._detail(data.get("error", data) if isinstance(data, dict) else None)
        label = f"HTTP {status}, code {code}" if code else f"HTTP {status}"
        detail = f": {message}" if message else ""
        if status == 429 and _INSUFFICIENT_QUOTA in (code, _error_type(data)):
            return QuotaExhausted(
                f"provider {pid!r} refused the call: the account's quota is used up"
                f" ({label}){detail}",
                provider=pid,
            )
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

    def _detail(self, error: object) -> tuple[str | None, str | None]:
        """The provider's error message (trimmed, key redacted) and code, when it has them."""
        if isinstance(error, str):
            error = {"message": error}
        if not isinstance(error, dict):
            return None, None
        key = self.provider.api_key()
        return clean(error.get("message"), key), safe_code(error.get("code"), key)


_INSUFFICIENT_QUOTA = "insufficient_quota"
"""OpenAI's 429 for an account out of credit or over its spend limit (the error-codes guide:
"You exceeded your current quota, please check your plan and billing details")."""


def _error_type(data: object) -> object:
    error = data.get("error") if isinstance(data, dict) else None
    return error.get("type") if isinstance(error, dict) else None


def _filtered_empty(choice: Choice) -> bool:
    return (
        choice.finish_reason == "content_filter"
        and not choice.message.content
        and not choice.message.tool_calls
    )
