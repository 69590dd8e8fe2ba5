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
flag); ``stream()`` always does. The job's params pass through; a job that set no cap of its own
is sent the one the scheduler reserved for it, else the model's configured one: as
``max_completion_tokens`` to ``openai`` (the create reference: ``max_tokens`` is deprecated for it
and not compatible with o-series models), as ``max_tokens`` to ``openai_compatible`` and ``mock``
servers (vLLM, llama.cpp and Ollama read that name). ``openai_compatible`` servers may report no
usage: the result then has ``usage=None`` and the worker estimates it. From ``openai`` and
``mock`` a missing usage is a ProviderProtocolError.

Status → error, by the ladder in ``_errors.py``::

    2xx                      parsed and validated as ``ChatCompletion`` (or, streaming, each
                             ``data:`` as ``ChatCompletionChunk``); not JSON, wrong shape or no
                             ``choices`` → ProviderProtocolError; every choice content-filtered
                             and empty → ContentFiltered; a stream that ends with neither
                             ``[DONE]`` nor a finish_reason → ProviderServerError
    429                      RateLimited (retry_after from ``retry-after-ms`` or ``retry-after``);
                             code or type ``insufficient_quota`` → QuotaExhausted
    401, 403                 ProviderAuthentication (never repeats the provider's text)
    400, 404, 409, 413, 422  ProviderInvalidRequest; error code ``content_filter`` or
                             ``content_policy_violation`` → ContentFiltered
    408                      ProviderTimeout
    anything else            ProviderServerError (5xx, and statuses the API does not document)
    transport failures       see ``workers/adapters/_errors.py``

An ``{"error": ...}`` event inside a 200 stream has no status: its code implies one
(``_CODE_STATUS``) for the same ladder, so ``content_filter`` and ``content_policy_violation`` →
ContentFiltered, ``rate_limit_exceeded`` and ``rate_limit_error`` → RateLimited (no
retry_after), any other code (``insufficient_quota`` too) or none → ProviderServerError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from broker.core.config import ProviderConfig, ProviderType
from schemas import ChatCompletion, ChatCompletionChunk, Choice
from workers.adapters import _canonical as canonical
from workers.adapters import _wire as wire
from workers.adapters._errors import Failure, error_object, parse_retry_after
from workers.adapters._http import HTTPAdapter
from workers.adapters.base import ProviderRequest
from workers.streaming import sse_events

__all__ = ["OpenAIAdapter", "parse_retry_after"]

_CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})
# The status each error code comes with, for error events inside a 200 stream (others: 500).
_CODE_STATUS = {
    **dict.fromkeys(_CONTENT_FILTER_CODES, 400),
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
}
_DONE = "[DONE]"
_INSUFFICIENT_QUOTA = "insufficient_quota"
"""OpenAI's 429 for an account out of credit or over its spend limit (the error-codes guide:
"You exceeded your current quota, please check your plan and billing details")."""


class OpenAIAdapter(HTTPAdapter):
    """``POST {base_url}/chat/completions``; ``base_url`` includes ``/v1``, as in OpenAI's SDK."""

    path = "/chat/completions"

    def __init__(self, provider: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(provider, http)
        # Some OpenAI-compatible servers (older vLLM, llama.cpp builds) omit usage.
        self.usage_optional = provider.type is ProviderType.OPENAI_COMPATIBLE
        openai = provider.type is ProviderType.OPENAI
        self.cap_name = "max_completion_tokens" if openai else "max_tokens"

    def _key_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

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
        if request.params.own_max_tokens is None:
            cap = canonical.output_cap(request, self.model_spec(request.model))
            if cap is not None:
                body[self.cap_name] = cap
        if stream:
            extra = options if isinstance(options, dict) else {}
            body["stream"] = True
            body["stream_options"] = {**extra, "include_usage": True}
        return body

    def _completion(self, data: dict[str, Any], request: ProviderRequest) -> ChatCompletion:
        pid = self.provider.id
        completion = wire.validated(ChatCompletion, data, pid, "response")
        if not completion.choices:
            raise wire.protocol_error(pid, "response has no choices")
        if all(_filtered_empty(choice) for choice in completion.choices):
            raise wire.withheld(pid, "finish_reason content_filter")
        if completion.usage is None and not self.usage_optional:
            raise wire.protocol_error(pid, "response has no usage")
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
            data = wire.json_object(event.data, pid, "stream event data")
            if "error" in data and "choices" not in data:
                raise self._error(data)
            chunk = wire.validated(ChatCompletionChunk, data, pid, "stream chunk")
            usage_seen = usage_seen or chunk.usage is not None
            for choice in chunk.choices:
                if choice.delta.content or choice.delta.tool_calls or choice.delta.refusal:
                    produced.add(choice.index)
                if choice.finish_reason is not None:
                    finished[choice.index] = choice.finish_reason
            yield chunk
        if not done and not finished:
            raise wire.ended_early(pid)
        if finished and all(
            reason == "content_filter" and index not in produced
            for index, reason in finished.items()
        ):
            raise wire.withheld(pid, "finish_reason content_filter")
        if not usage_seen and not self.usage_optional:
            raise wire.protocol_error(pid, "stream has no usage")

    def _failure(self, data: object, status: int | None) -> Failure:
        code, message = self._detail(data.get("error", data) if isinstance(data, dict) else None)
        # An error event is read by its code alone; an error body's type also names a quota.
        kind = error_object(data).get("type") if status is not None else None
        return Failure(
            status,
            f"code {code}" if code else None,
            message,
            implied=_CODE_STATUS.get(code or "", 500),
            out_of_quota=_INSUFFICIENT_QUOTA in (code, kind),
            filtered=code in _CONTENT_FILTER_CODES,
        )

    def _detail(self, error: object) -> tuple[str | None, str | None]:
        """The error's code and message, when it has them; a bare string is the message."""
        if isinstance(error, str):
            error = {"message": error}
        if not isinstance(error, dict):
            return None, None
        return self._said(error, "code")


def _filtered_empty(choice: Choice) -> bool:
    return (
        choice.finish_reason == "content_filter"
        and not choice.message.content
        and not choice.message.tool_calls
    )
