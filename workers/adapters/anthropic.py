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

Status (or stream ``error`` event type) → error, by the ladder in ``_errors.py``::

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
from pydantic import Field

from schemas import ChatCompletion, ChatCompletionChunk, ToolCall, Usage
from workers.adapters import _wire as wire
from workers.adapters._anthropic_request import messages_body
from workers.adapters._errors import Failure, Statuses, error_object
from workers.adapters._http import HTTPAdapter
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


class _Block(wire.Open):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None


class _Usage(wire.Open):
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cache_creation_input_tokens: int | None = Field(default=None, ge=0)
    cache_read_input_tokens: int | None = Field(default=None, ge=0)


class _Message(wire.Open):
    id: str
    model: str
    content: list[_Block]
    stop_reason: str | None = None
    usage: _Usage


class _StartedMessage(wire.Open):
    id: str
    model: str
    usage: dict[str, Any] = Field(default_factory=dict)


class _MessageStart(wire.Open):
    message: _StartedMessage


class _BlockStart(wire.Open):
    index: int
    content_block: _Block


class _Delta(wire.Open):
    type: str
    text: str | None = None
    partial_json: str | None = None


class _BlockDelta(wire.Open):
    index: int
    delta: _Delta


class _BlockStop(wire.Open):
    index: int


class _StopDelta(wire.Open):
    stop_reason: str | None = None


class _MessageDelta(wire.Open):
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
    chunks: wire.Chunks | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    blocks: dict[int, _OpenBlock] = field(default_factory=dict)
    tool_calls: int = 0
    produced: bool = False
    stop_reason_seen: bool = False


class AnthropicAdapter(HTTPAdapter):
    """``POST {base_url}/messages``; ``base_url`` includes ``/v1`` (``https://api.anthropic.com/v1``)."""

    path = "/messages"
    statuses = Statuses(auth=frozenset({401, 402, 403}), timeout=frozenset({408, 504}))

    def _key_headers(self, key: str) -> dict[str, str]:
        return {"x-api-key": key}

    def _headers(self) -> httpx.Headers:
        headers = super()._headers()
        headers.setdefault("anthropic-version", API_VERSION)  # a configured version wins
        return headers

    def _body(self, request: ProviderRequest, *, stream: bool) -> dict[str, Any]:
        spec = self.model_spec(request.model)
        return messages_body(request, spec, self.provider.id, stream=stream)

    def _failure(self, data: object, status: int | None) -> Failure:
        kind, message = self._said(error_object(data), "type")
        return Failure(status, kind, message, implied=_TYPE_STATUS.get(kind or "", 500))

    # --- the response --------------------------------------------------------------------

    def _completion(self, data: dict[str, Any], request: ProviderRequest) -> ChatCompletion:
        pid = self.provider.id
        message = wire.validated(_Message, data, pid, "response")
        texts: list[str] = []
        calls: list[ToolCall] = []
        for index, block in enumerate(message.content):
            if block.type == "text":
                if block.text is None:
                    raise wire.protocol_error(pid, f"response field content.{index}.text: missing")
                texts.append(block.text)
            elif block.type == "tool_use":
                if block.id is None or block.name is None or not isinstance(block.input, dict):
                    raise wire.protocol_error(
                        pid,
                        f"response field content.{index}: a tool_use block needs id, name "
                        "and an input object",
                    )
                calls.append(wire.tool_call(block.id, block.name, block.input))
            # thinking, redacted_thinking and server tool blocks have no canonical place
        text = "".join(texts)
        return wire.completion(
            id=message.id,
            model=message.model,
            text=text,
            calls=calls,
            finish=self._finish(message.stop_reason, bool(text or calls)),
            usage=_usage(message.usage),
        )

    def _finish(self, stop_reason: str | None, produced: bool) -> str | None:
        if stop_reason == "refusal":
            return wire.filtered_finish(self.provider.id, produced, "stop_reason refusal")
        if stop_reason is None:
            return None
        return _FINISH.get(stop_reason, stop_reason)

    async def _chunks(
        self, response: httpx.Response, request: ProviderRequest
    ) -> AsyncIterator[ChatCompletionChunk]:
        pid = self.provider.id
        state = _StreamState()
        async for event in sse_events(response):
            data = wire.json_object(event.data, pid, "stream event data")
            kind = data.get("type", event.event)
            if kind == "message_stop":
                break
            if kind == "error":
                raise self._error(data)
            for chunk in self._on_event(kind, data, state):
                yield chunk
        if state.chunks is None or not state.stop_reason_seen:
            raise wire.ended_early(pid)
        yield state.chunks.usage(_usage(wire.validated(_Usage, state.usage, pid, "stream usage")))

    def _on_event(
        self, kind: object, data: dict[str, Any], state: _StreamState
    ) -> list[ChatCompletionChunk]:
        """The chunks one event produces (most produce one or none)."""
        pid = self.provider.id
        what = f"stream event {kind}"
        if kind == "message_start":
            started = wire.validated(_MessageStart, data, pid, what).message
            state.chunks = wire.Chunks(started.id, started.model, wire.now())
            state.usage.update(started.usage)
            return [state.chunks.role()]
        if kind not in _CONTENT_EVENTS:
            return []  # ping, and event types added after this was written
        out = state.chunks
        if out is None:
            raise wire.protocol_error(pid, f"{what} came before message_start")
        if kind == "message_delta":
            return self._on_message_delta(
                wire.validated(_MessageDelta, data, pid, what), out, state
            )
        if kind == "content_block_start":
            start = wire.validated(_BlockStart, data, pid, what)
            return self._on_block_start(start, out, state)
        if kind == "content_block_delta":
            delta = wire.validated(_BlockDelta, data, pid, what)
            block = state.blocks.get(delta.index)
            if block is None:
                raise wire.protocol_error(
                    pid, f"{what} for block {delta.index}, which never started"
                )
            return self._on_block_delta(delta.delta, block, out, state)
        stop = wire.validated(_BlockStop, data, pid, what)
        block = state.blocks.get(stop.index)
        if block is not None and block.kind == "tool" and not block.arguments_sent:
            # A tool without arguments may stream no input_json_delta at all.
            start_input = block.start_input if isinstance(block.start_input, dict) else {}
            return [out.tool_call(block.ordinal, arguments=wire.dumps(start_input))]
        return []

    def _on_block_start(
        self, start: _BlockStart, out: wire.Chunks, state: _StreamState
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
                raise wire.protocol_error(
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
        self, delta: _Delta, block: _OpenBlock, out: wire.Chunks, state: _StreamState
    ) -> list[ChatCompletionChunk]:
        if delta.type == "text_delta" and block.kind == "text":
            text = self._required(delta.text, "text")
            if text:
                state.produced = True
                return [out.text(text)]
        elif delta.type == "input_json_delta" and block.kind == "tool":
            partial = self._required(delta.partial_json, "partial_json")
            if partial:
                block.arguments_sent = True
                return [out.tool_call(block.ordinal, arguments=partial)]
        return []  # empty, or thinking, signature and citation deltas, which have no place

    def _required(self, value: str | None, name: str) -> str:
        if value is None:
            problem = f"stream event content_block_delta field delta.{name}: missing"
            raise wire.protocol_error(self.provider.id, problem)
        return value

    def _on_message_delta(
        self, delta: _MessageDelta, out: wire.Chunks, state: _StreamState
    ) -> list[ChatCompletionChunk]:
        if delta.usage:
            state.usage.update(delta.usage)  # cumulative counts: the latest wins
        if delta.delta.stop_reason is None:
            return []
        state.stop_reason_seen = True
        return [out.finish(self._finish(delta.delta.stop_reason, state.produced))]


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
