"""What every streaming adapter shares: reading Server-Sent Events, and folding canonical chunks
back into one ``chat.completion`` (so a streamed job's final result equals a non-streamed one)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from broker.core.errors import ProviderProtocolError
from schemas import ChatCompletion, ChatCompletionChunk, ChatMessage, Choice, ToolCall, Usage

__all__ = ["ChunkAccumulator", "SSEEvent", "sse_events"]


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str | None
    data: str


async def sse_events(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """Parse a ``text/event-stream`` body as the HTML spec says: ``event:`` and ``data:`` fields,
    multi-line data joined with newlines, a blank line ends an event, ``:`` lines are comments."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield SSEEvent(event, "\n".join(data))
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield SSEEvent(event, "\n".join(data))


@dataclass
class _ChoiceState:
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish_reason: str | None = None


class ChunkAccumulator:
    """Folds a stream's chunks into the ``chat.completion`` the same call would have returned."""

    def __init__(self, provider_id: str) -> None:
        self.provider_id = provider_id
        self.id: str | None = None
        self.model: str | None = None
        self.created = 0
        self.usage: Usage | None = None
        self.chunks = 0
        self.first_at: float | None = None  # perf_counter() at the first chunk
        self._choices: dict[int, _ChoiceState] = {}

    def add(self, chunk: ChatCompletionChunk) -> None:
        if not self.chunks:
            self.first_at = time.perf_counter()
        self.chunks += 1
        self.id = self.id or chunk.id
        self.model = self.model or chunk.model
        self.created = self.created or chunk.created
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            state = self._choices.setdefault(choice.index, _ChoiceState())
            delta = choice.delta
            if delta.content:
                state.content.append(delta.content)
            if delta.refusal:
                state.refusal.append(delta.refusal)
            for call in delta.tool_calls or []:
                held = state.tool_calls.setdefault(call.index, {"id": "", "name": "", "args": ""})
                held["id"] = call.id or held["id"]
                if call.function is not None:
                    held["name"] += call.function.name or ""
                    held["args"] += call.function.arguments or ""
            if choice.finish_reason is not None:
                state.finish_reason = choice.finish_reason

    def result(self) -> ChatCompletion:
        if self.id is None or self.model is None or not self._choices:
            raise ProviderProtocolError(
                f"provider {self.provider_id!r}: the stream ended without any choice",
                provider=self.provider_id,
            )
        choices = []
        for index, state in sorted(self._choices.items()):
            tool_calls = [
                ToolCall.model_validate(
                    {
                        "id": held["id"],
                        "type": "function",
                        "function": {"name": held["name"], "arguments": held["args"]},
                    }
                )
                for _, held in sorted(state.tool_calls.items())
            ]
            message = ChatMessage(
                role="assistant",
                content="".join(state.content) if state.content or not tool_calls else None,
                tool_calls=tool_calls or None,
            )
            if state.refusal:
                message.refusal = "".join(state.refusal)  # type: ignore[attr-defined]
            choices.append(Choice(index=index, message=message, finish_reason=state.finish_reason))
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage
        )
