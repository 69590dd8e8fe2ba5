"""Reading provider bodies and building canonical results: what every adapter's response side
repeats, and the errors it raises in the same words.

Every check here fails with a ``ProviderError`` whose message names the provider and the field,
never the response's text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from broker.core.errors import ContentFiltered, ProviderProtocolError, ProviderServerError
from schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Choice,
    ChunkChoice,
    ChunkDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    ToolCallFunctionDelta,
    Usage,
)

__all__ = [
    "Chunks",
    "Open",
    "completion",
    "dumps",
    "ended_early",
    "filtered_finish",
    "json_object",
    "now",
    "protocol_error",
    "tool_call",
    "validated",
    "withheld",
]

Model = TypeVar("Model", bound=BaseModel)


class Open(BaseModel):
    """A provider object: fields the adapter does not read are kept, never refused."""

    model_config = ConfigDict(extra="allow")


def now() -> int:
    """``created`` for completions built from formats that carry no timestamp."""
    return int(time.time())


def json_object(raw: bytes | str, pid: str, what: str) -> dict[str, Any]:
    """Parse ``raw`` as a JSON object; ``what`` names it in the error ("response body", ...)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise protocol_error(pid, f"{what} is not JSON ({len(raw)} bytes)") from None
    if not isinstance(data, dict):
        raise protocol_error(pid, f"{what} is a JSON {type(data).__name__}, not an object")
    return data


def validated(model: type[Model], data: dict[str, Any], pid: str, what: str) -> Model:
    """``model.model_validate(data)``; a wrong shape names the first fields that are wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # err["msg"] never holds the input; str(exc) would repeat the provider's text.
        problems = "; ".join(
            f"{what} field {_loc(err['loc'])}: {err['msg']}" for err in exc.errors()[:3]
        )
        raise protocol_error(pid, problems) from None


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def dumps(value: Any) -> str:
    """JSON text for tool call arguments: ``json.dumps`` spacing, UTF-8 left unescaped as the
    providers stream it."""
    return json.dumps(value, ensure_ascii=False)


def tool_call(id: str, name: str, arguments: Any) -> ToolCall:
    """A canonical tool call from a provider's structured arguments."""
    return ToolCall(id=id, function=ToolCallFunction(name=name, arguments=dumps(arguments)))


def completion(
    *,
    id: str,
    model: str,
    text: str,
    calls: list[ToolCall],
    finish: str | None,
    usage: Usage,
) -> ChatCompletion:
    """A one-choice ``chat.completion``, shaped as the same answer streamed folds."""
    # As a stream folds: content is None only when there are tool calls and no text.
    reply = ChatMessage(
        role="assistant", content=text if text or not calls else None, tool_calls=calls or None
    )
    return ChatCompletion(
        id=id,
        created=now(),
        model=model,
        choices=[Choice(index=0, message=reply, finish_reason=finish)],
        usage=usage,
    )


# --- the errors every adapter raises in the same words--------------------------------------


def protocol_error(pid: str, problem: str) -> ProviderProtocolError:
    return ProviderProtocolError(f"provider {pid!r}: {problem}", provider=pid)


def ended_early(pid: str) -> ProviderServerError:
    """A stream that stopped before its end marker: a dropped call, worth retrying."""
    return ProviderServerError(f"provider {pid!r}: stream ended early", provider=pid)


def withheld(pid: str, why: str) -> ContentFiltered:
    return ContentFiltered(f"provider {pid!r} withheld the completion ({why})", provider=pid)


def filtered_finish(pid: str, produced: bool, why: str) -> str:
    """The finish reason for a safety stop: ``content_filter`` after some output; with none,
    the completion was withheld, which is ContentFiltered."""
    if not produced:
        raise withheld(pid, why)
    return "content_filter"


@dataclass(frozen=True, slots=True)
class Chunks:
    """Builds the canonical chunks of one stream: one choice (index 0), one id, model and time."""

    id: str
    model: str
    created: int

    def _chunk(
        self, delta: ChunkDelta | None, finish: str | None = None, usage: Usage | None = None
    ) -> ChatCompletionChunk:
        choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def role(self) -> ChatCompletionChunk:
        return self._chunk(ChunkDelta(role="assistant", content=""))

    def text(self, text: str) -> ChatCompletionChunk:
        return self._chunk(ChunkDelta(content=text))

    def tool_call(
        self,
        index: int,
        *,
        id: str | None = None,
        name: str | None = None,
        arguments: str | None = None,
    ) -> ChatCompletionChunk:
        call = ToolCallDelta(
            index=index,
            id=id,
            type="function" if id is not None else None,
            function=ToolCallFunctionDelta(name=name, arguments=arguments),
        )
        return self._chunk(ChunkDelta(tool_calls=[call]))

    def finish(self, reason: str | None) -> ChatCompletionChunk:
        return self._chunk(ChunkDelta(), finish=reason)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        """The last chunk: no choices, the call's usage."""
        return self._chunk(None, usage=usage)
