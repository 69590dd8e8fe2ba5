"""The call every adapter makes: one JSON ``POST``, answered by one JSON body or by an event stream.

``HTTPAdapter`` owns that plumbing once (the headers, the guard that types every failure, reading
an error body before mapping its status, closing a stream however it ends) so that a provider
module holds only its translation: URL, key header, request body, response parsing, event parsing,
and how its error bodies read and which statuses it documents.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx
import orjson

from broker.core.config import ProviderConfig
from broker.core.errors import ProviderError, ProviderProtocolError
from schemas import ChatCompletion, ChatCompletionChunk
from workers.adapters._errors import Failure, Guard, Statuses, clean, safe_code, status_error
from workers.adapters._wire import json_object
from workers.adapters.base import ProviderAdapter, ProviderRequest
from workers.http import post

__all__ = ["HTTPAdapter"]


class HTTPAdapter(ProviderAdapter):
    """A ``ProviderAdapter`` over one JSON ``POST`` per call."""

    path: ClassVar[str] = ""
    """The endpoint, after ``base_url`` (which, as in the providers' SDKs, includes the version)."""
    statuses: ClassVar[Statuses] = Statuses()

    def __init__(self, provider: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(provider, http)
        self.base = str(provider.base_url).rstrip("/")

    def _url(self, request: ProviderRequest, *, stream: bool) -> str:
        return self.base + self.path

    @abstractmethod
    def _key_headers(self, key: str) -> dict[str, str]:
        """The headers that carry the API key."""

    @abstractmethod
    def _body(self, request: ProviderRequest, *, stream: bool) -> dict[str, Any]:
        """The provider's request body; a job it cannot express raises ProviderInvalidRequest."""

    @abstractmethod
    def _completion(self, data: dict[str, Any], request: ProviderRequest) -> ChatCompletion:
        """The ``chat.completion`` for a 2xx JSON body."""

    @abstractmethod
    def _chunks(
        self, response: httpx.Response, request: ProviderRequest
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Canonical chunks read from a 2xx event stream."""

    @abstractmethod
    def _failure(self, data: object, status: int | None) -> Failure:
        """What a parsed error body says (``data`` None when it is not JSON); ``status`` is None
        for an error event inside a 200 stream."""

    def _headers(self) -> httpx.Headers:
        # httpx.Headers is case-insensitive, so a configured "content-type" cannot duplicate ours.
        headers = httpx.Headers(self.provider.headers)
        headers["Content-Type"] = "application/json"
        key = self.provider.api_key()
        if key:
            for name, value in self._key_headers(key).items():
                headers[name] = value
        return headers

    @functools.cached_property
    def _sent_headers(self) -> httpx.Headers:
        """The calls' headers, built once: an adapter serves one provider entry (a new config
        version gets a new adapter)."""
        return self._headers()

    def _status_error(self, response: httpx.Response) -> ProviderError:
        """The error for a non-2xx response whose body has been read."""
        try:
            data: object = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            data = None
        return self._error(data, response.status_code, response.headers)

    def _said(self, error: dict[str, Any], name: str) -> tuple[str | None, str | None]:
        """An error object's ``name`` field (its code, type or status), kept when code-shaped,
        and its message, cleaned: both safe to repeat."""
        key = self.provider.api_key()
        return safe_code(error.get(name), key), clean(error.get("message"), key)

    def _error(
        self, data: object, status: int | None = None, headers: httpx.Headers | None = None
    ) -> ProviderError:
        """The error a parsed error body (or, ``status`` None, a stream's error event) means."""
        failure = self._failure(data, status)
        return status_error(self.provider.id, failure, self.statuses, headers)

    async def complete(self, request: ProviderRequest) -> ChatCompletion:
        pid = self.provider.id
        with Guard(pid):
            content = orjson.dumps(self._body(request, stream=False))
            response = await post(
                self.http, self._url(request, stream=False), content, self._sent_headers
            )
            if not 200 <= response.status_code < 300:
                raise self._status_error(response)
            what = f"response body (HTTP {response.status_code})"
            return self._completion(json_object(response.content, pid, what), request)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ChatCompletionChunk]:
        pid = self.provider.id
        with Guard(pid):
            content = orjson.dumps(self._body(request, stream=True))
            call = self.http.build_request(
                "POST", self._url(request, stream=True), content=content, headers=self._sent_headers
            )
            response = await self.http.send(call, stream=True)
            try:
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    raise self._status_error(response)
                content_type = response.headers.get("content-type", "")
                if "json" in content_type and "event-stream" not in content_type:
                    raise ProviderProtocolError(
                        f"provider {pid!r} answered a streaming call with {content_type}, "
                        "not an event stream",
                        provider=pid,
                    )
                async for chunk in self._chunks(response, request):
                    yield chunk
            finally:
                await response.aclose()
