"""The adapter for Anthropic's Messages API (provider type ``anthropic``).

Follows:

- https://platform.claude.com/docs/en/api/messages (the request and the ``Message`` response)
- https://platform.claude.com/docs/en/build-with-claude/streaming (the event stream; ``usage``
  in ``message_delta`` is cumulative; ``error`` events after a 200)
- https://platform.claude.com/docs/en/api/errors (statuses, ``{"type": "error", "error":
  {"type", "message"}, "request_id"}``)
- https://platform.claude.com/docs/en/agents-and-tools/tool-use/implement-tool-use (``tools``,
  ``tool_choice``, ``tool_result`` blocks first in the user turn that answers the tool calls)
- https://platform.claude.com/docs/en/build-with-claude/vision (base64 and URL image sources)
- https://platform.claude.com/docs/en/build-with-claude/structured-outputs (``output_config``)
- anthropic-sdk-python ``src/anthropic/types``: ``StopReason``, ``Usage``, ``MessageDeltaUsage``,
  ``OutputConfigParam`` / ``JSONOutputFormatParam``

Request: see ``workers/adapters/_anthropic_request.py``.

Response::

    text blocks (joined)            message.content (None when there are only tool calls)
    tool_use blocks                 tool_calls (arguments = JSON text of input)
    stop_reason                     end_turn, stop_sequence, pause_turn → stop; max_tokens,
                                    model_context_window_exceeded → length; tool_use →
                                    tool_calls; refusal → ContentFiltered when nothing was
                                    produced, else finish_reason content_filter
    usage                           prompt = input + cache writes + cache reads (all billed as
                                    input); completion = output; cache numbers kept in
                                    usage.prompt_tokens_details

Status (or stream ``error`` event type) → error::

    429 rate_limit_error            RateLimited (retry_after from retry-after)
    401, 402, 403                   ProviderAuthentication (never repeats the provider's text)
    400, 404, 409, 413, 422         ProviderInvalidRequest
    408, 504 timeout_error          ProviderTimeout
    500 api_error, 529 overloaded   ProviderServerError (and any other 5xx or unknown status)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field

from broker.core.config import ProviderConfig
from broker.core.errors import (
    ContentFiltered,
    ProviderAuthentication,
    ProviderError,
    ProviderInvalidRequest,
    ProviderProtocolError,
    ProviderServerError,
    ProviderTimeout,
    RateLimited,
)
from schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Choice,
    ToolCall,
    ToolCallFunction,
    Usage,
)
from workers.adapters._anthropic_request import messages_body
from workers.adapters._errors import clean, parse_retry_after, safe_code
from workers.adapters._http import HTTPAdapter
from workers.adapters._wire import Chunks, dumps, json_object, now, validated
from workers.adapters.base import ProviderRequest
from workers.streaming import sse_events

__all__ = ["AnthropicAdapter"]

API_VERSION = "2023-06-01"

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
}
# The status each documented error type comes with, for error events inside a 200 stream.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_CONTENT_EVENTS = frozenset(
    {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"}
)
_AUTH_STATUSES = frozenset({401, 402, 403})
_INVALID_REQUEST_STATUSES = frozenset({400, 404, 409, 413, 422})
_TIMEOUT_STATUSES = frozenset({408, 504})


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Block(_Open):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None


class _Usage(_Open):
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cache_creation_input_tokens: int | None = Field(default=None, ge=0)
    cache_read_input_tokens: int | None = Field(default=None, ge=0)


class _Message(_Open):
    id: str
    model: str
    content: list[_Block]
    stop_reason: str | None = None
    usage: _Usage


class _StartedMessage(_Open):
    id: str
    model: str
    usage: dict[str, Any] = Field(default_factory=dict)


class _MessageStart(_Open):
    message: _StartedMessage


class _BlockStart(_Open):
    index: int
    content_block: _Block


class _Delta(_Open):
    type: str
    text: str | None = None
    partial_json: str | None = None


class _BlockDelta(_Open):
    index: int
    delta: _Delta


class _BlockStop(_Open):
    index: int


class _StopDelta(_Open):
    stop_reason: str | None = None


class _MessageDelta(_Open):
    delta: _StopDelta = Field(default_factory=_StopDelta)
    usage: dict[str, Any] | None = None


@dataclass
class _OpenBlock:
    """A content block being streamed: text, a tool call (its ordinal among them), or other."""

    kind: str
    ordinal: int = 0
    start_input: Any = None
    arguments_sent: bool = False


@dataclass
class _StreamState:
    chunks: Chunks | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    blocks: dict[int, _OpenBlock] = field(default_factory=dict)
    tool_calls: int = 0
    produced: bool = False
    stop_reason_seen: bool = False


class AnthropicAdapter(HTTPAdapter):
    """``POST {base_url}/messages``; ``base_url`` includes ``/v1`` (``https://api.anthropic.com/v1``)."""

    def __init__(self, provider: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(provider, http)
        self.url = str(provider.base_url).rstrip("/") + "/messages"

    def _url(self, request: ProviderRequest, *, stream: bool) -> str:
        return self.url

    def _headers(self) -> httpx.Headers:
        headers = httpx.Headers(self.provider.headers)
        headers["Content-Type"] = "application/json"
        if "anthropic-version" not in headers:
            headers["anthropic-version"] = API_VERSION
        key = self.provider.api_key()
        if key:
            headers["x-api-key"] = key
        return headers

    def _body(self, request: ProviderRequest, *, stream: bool) -> dict[str, Any]:
        spec = self.model_spec(request.model)
        return messages_body(request, spec, self.provider.id, stream=stream)

    # --- the response --------------------------------------------------------------------

    def _completion(self, data: dict[str, Any], request: ProviderRequest) -> ChatCompletion:
        pid = self.provider.id
        message = validated(_Message, data, pid, "response")
        texts: list[str] = []
        calls: list[ToolCall] = []
        for index, block in enumerate(message.content):
            if block.type == "text":
                if block.text is None:
                    raise _protocol(pid, f"response field content.{index}.text: missing")
                texts.append(block.text)
            elif block.type == "tool_use":
                if block.id is None or block.name is None or not isinstance(block.input, dict):
                    raise _protocol(
                        pid,
                        f"response field content.{index}: a tool_use block needs id, name "
                        "and an input object",
                    )
                function = ToolCallFunction(name=block.name, arguments=dumps(block.input))
                calls.append(ToolCall(id=block.id, function=function))
            # thinking, redacted_thinking and server tool blocks have no canonical place
        text = "".join(texts)
        produced = bool(text or calls)
        # As a stream folds: content is None only when there are tool calls and no text.
        reply = ChatMessage(
            role="assistant", content=text if text or not calls else None, tool_calls=calls or None
        )
        finish = self._finish(message.stop_reason, produced)
        return ChatCompletion(
            id=message.id,
            created=now(),
            model=message.model,
            choices=[Choice(index=0, message=reply, finish_reason=finish)],
            usage=_usage(message.usage),
        )

    def _finish(self, stop_reason: str | None, produced: bool) -> str | None:
        if stop_reason == "refusal":
            if not produced:
                pid = self.provider.id
                raise ContentFiltered(
                    f"provider {pid!r} withheld the completion (stop_reason refusal)",
                    provider=pid,
                )
            return "content_filter"
        if stop_reason is None:
            return None
        return _FINISH.get(stop_reason, stop_reason)

    async def _chunks(
        self, response: httpx.Response, request: ProviderRequest
    ) -> AsyncIterator[ChatCompletionChunk]:
        pid = self.provider.id
        state = _StreamState()
        async for event in sse_events(response):
            data = json_object(event.data, pid, "stream event data")
            kind = data.get("type", event.event)
            if kind == "message_stop":
                break
            if kind == "error":
                raise self._error(None, data.get("error"), None)
            for chunk in self._on_event(kind, data, state):
                yield chunk
        if state.chunks is None or not state.stop_reason_seen:
            raise ProviderServerError(f"provider {pid!r}: stream ended early", provider=pid)
        yield state.chunks.usage(_usage(validated(_Usage, state.usage, pid, "stream usage")))

    def _on_event(
        self, kind: object, data: dict[str, Any], state: _StreamState
    ) -> list[ChatCompletionChunk]:
        """The chunks one event produces (most produce one or none)."""
        pid = self.provider.id
        what = f"stream event {kind}"
        if kind == "message_start":
            started = validated(_MessageStart, data, pid, what).message
            state.chunks = Chunks(started.id, started.model, now())
            state.usage.update(started.usage)
            return [state.chunks.role()]
        if kind not in _CONTENT_EVENTS:
            return []  # ping, and event types added after this was written
        out = state.chunks
        if out is None:
            raise _protocol(pid, f"{what} came before message_start")
        if kind == "message_delta":
            return self._on_message_delta(validated(_MessageDelta, data, pid, what), out, state)
        if kind == "content_block_start":
            start = validated(_BlockStart, data, pid, what)
            return self._on_block_start(start, out, state)
        if kind == "content_block_delta":
            delta = validated(_BlockDelta, data, pid, what)
            block = state.blocks.get(delta.index)
            if block is None:
                raise _protocol(pid, f"{what} for block {delta.index}, which never started")
            return self._on_block_delta(delta.delta, block, out, state)
        stop = validated(_BlockStop, data, pid, what)
        block = state.blocks.get(stop.index)
        if block is not None and block.kind == "tool" and not block.arguments_sent:
            # A tool without arguments may stream no input_json_delta at all.
            start_input = block.start_input if isinstance(block.start_input, dict) else {}
            return [out.tool_call(block.ordinal, arguments=dumps(start_input))]
        return []

    def _on_block_start(
        self, start: _BlockStart, out: Chunks, state: _StreamState
    ) -> list[ChatCompletionChunk]:
        block = start.content_block
        if block.type == "text":
            state.blocks[start.index] = _OpenBlock("text")
            if block.text:
                state.produced = True
                return [out.text(block.text)]
            return []
        if block.type == "tool_use":
            if block.id is None or block.name is None:
                raise _protocol(
                    self.provider.id,
                    "stream event content_block_start field content_block: a tool_use block "
                    "needs id and name",
                )
            ordinal = state.tool_calls
            state.tool_calls += 1
            state.blocks[start.index] = _OpenBlock("tool", ordinal, block.input)
            state.produced = True
            return [out.tool_call(ordinal, id=block.id, name=block.name, arguments="")]
        state.blocks[start.index] = _OpenBlock("other")
        return []

    def _on_block_delta(
        self, delta: _Delta, block: _OpenBlock, out: Chunks, state: _StreamState
    ) -> list[ChatCompletionChunk]:
        pid = self.provider.id
        if delta.type == "text_delta" and block.kind == "text":
            if delta.text is None:
                raise _protocol(pid, "stream event content_block_delta field delta.text: missing")
            if not delta.text:
                return []
            state.produced = True
            return [out.text(delta.text)]
        if delta.type == "input_json_delta" and block.kind == "tool":
            if delta.partial_json is None:
                raise _protocol(
                    pid, "stream event content_block_delta field delta.partial_json: missing"
                )
            if not delta.partial_json:
                return []
            block.arguments_sent = True
            return [out.tool_call(block.ordinal, arguments=delta.partial_json)]
        return []  # thinking, signature and citation deltas have no canonical place

    def _on_message_delta(
        self, delta: _MessageDelta, out: Chunks, state: _StreamState
    ) -> list[ChatCompletionChunk]:
        if delta.usage:
            state.usage.update(delta.usage)  # cumulative counts: the latest wins
        if delta.delta.stop_reason is None:
            return []
        state.stop_reason_seen = True
        return [out.finish(self._finish(delta.delta.stop_reason, state.produced))]

    # --- errors --------------------------------------------------------------------------

    def _status_error(self, response: httpx.Response) -> ProviderError:
        try:
            data: object = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        retry_after = parse_retry_after(response.headers)
        return self._error(response.status_code, error, retry_after)

    def _error(self, status: int | None, error: object, retry_after: float | None) -> ProviderError:
        """The error for an HTTP status, or (``status`` None) for a stream's ``error`` event."""
        pid = self.provider.id
        key = self.provider.api_key()
        body = error if isinstance(error, dict) else {}
        kind = safe_code(body.get("type"), key)
        message = clean(body.get("message"), key)
        where = f"HTTP {status}" if status is not None else "error event"
        label = f"{where}, {kind}" if kind else where
        detail = f": {message}" if message else ""
        effective = status if status is not None else _TYPE_STATUS.get(kind or "", 500)
        if effective == 429:
            return RateLimited(
                f"provider {pid!r} rate limited the call ({label}){detail}",
                provider=pid,
                retry_after=retry_after,
            )
        if effective in _AUTH_STATUSES:
            return ProviderAuthentication(
                f"provider {pid!r} refused our credentials ({label})", provider=pid
            )
        if effective in _INVALID_REQUEST_STATUSES:
            return ProviderInvalidRequest(
                f"provider {pid!r} rejected the request ({label}){detail}", provider=pid
            )
        if effective in _TIMEOUT_STATUSES:
            return ProviderTimeout(f"provider {pid!r} timed out ({label}){detail}", provider=pid)
        if effective >= 500:
            return ProviderServerError(f"provider {pid!r} failed ({label}){detail}", provider=pid)
        return ProviderServerError(
            f"provider {pid!r} answered with unexpected status ({label}){detail}", provider=pid
        )


# --- response translation ----------------------------------------------------------------


def _usage(usage: _Usage) -> Usage:
    cache_write = usage.cache_creation_input_tokens or 0
    cache_read = usage.cache_read_input_tokens or 0
    prompt = usage.input_tokens + cache_write + cache_read
    fields: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
    }
    if usage.cache_creation_input_tokens is not None or usage.cache_read_input_tokens is not None:
        fields["prompt_tokens_details"] = {
            "cached_tokens": cache_read,
            "cache_creation_tokens": cache_write,
        }
    return Usage.model_validate(fields)


def _protocol(pid: str, problem: str) -> ProviderProtocolError:
    return ProviderProtocolError(f"provider {pid!r}: {problem}", provider=pid)
