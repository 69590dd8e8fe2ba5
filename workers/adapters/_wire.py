"""Reading provider bodies and canonical messages: the small conversions every adapter repeats.

Every check here fails with a ``ProviderError`` whose message names the provider and the field
(a response field, or the request message by position), never the prompt's or the response's text.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from broker.core.errors import ProviderInvalidRequest, ProviderProtocolError
from schemas import (
    ChatCompletionChunk,
    ChatMessage,
    ChunkChoice,
    ChunkDelta,
    CompletionParams,
    ToolCallDelta,
    ToolCallFunctionDelta,
    Usage,
)

__all__ = [
    "Chunks",
    "DataURL",
    "arguments_object",
    "data_url",
    "dumps",
    "image_url",
    "json_object",
    "max_tokens",
    "now",
    "stop_list",
    "text_of",
    "unsupported_part",
    "validated",
]

Model = TypeVar("Model", bound=BaseModel)

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)$", re.S)


def now() -> int:
    """``created`` for completions built from formats that carry no timestamp."""
    return int(time.time())


def json_object(raw: bytes | str, pid: str, what: str) -> dict[str, Any]:
    """Parse ``raw`` as a JSON object; ``what`` names it in the error ("response body", ...)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProviderProtocolError(
            f"provider {pid!r}: {what} is not JSON ({len(raw)} bytes)", provider=pid
        ) from None
    if not isinstance(data, dict):
        raise ProviderProtocolError(
            f"provider {pid!r}: {what} is a JSON {type(data).__name__}, not an object",
            provider=pid,
        )
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
        raise ProviderProtocolError(f"provider {pid!r}: {problems}", provider=pid) from None


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def max_tokens(params: CompletionParams) -> int | None:
    """The job's output cap: ``max_tokens``, else the newer ``max_completion_tokens``."""
    if params.max_tokens is not None:
        return params.max_tokens
    extra = (params.model_extra or {}).get("max_completion_tokens")
    return extra if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0 else None


def stop_list(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else list(stop)


def text_of(message: ChatMessage, where: str, pid: str) -> str:
    """A message's text: its string content, or its text parts joined by newlines."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for index, part in enumerate(content):
        text = part.get("text") if part.get("type") == "text" else part.get("refusal")
        if part.get("type") not in ("text", "refusal") or not isinstance(text, str):
            raise ProviderInvalidRequest(
                f"provider {pid!r}: {where} content part {index} "
                f"(type {_type_name(part)}) is not text",
                provider=pid,
            )
        texts.append(text)
    return "\n".join(texts)


def _type_name(part: dict[str, Any]) -> str:
    kind = part.get("type")
    return repr(kind) if isinstance(kind, str) and len(kind) <= 40 else "unknown"


@dataclass(frozen=True, slots=True)
class DataURL:
    mime: str
    data: str


def data_url(url: str) -> DataURL | None:
    """``data:<mime>;base64,<data>`` split into its parts; ``None`` for any other URL."""
    match = _DATA_URL.match(url)
    return DataURL(mime=match["mime"], data=match["data"]) if match else None


def image_url(part: dict[str, Any], where: str, pid: str) -> str:
    """The URL of an ``image_url`` content part."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise ProviderInvalidRequest(
            f"provider {pid!r}: {where} image_url part has no url", provider=pid
        )
    if url.startswith("data:") and data_url(url) is None:
        raise ProviderInvalidRequest(
            f"provider {pid!r}: {where} image data URL is not base64 data:<mime>;base64,<data>",
            provider=pid,
        )
    if not url.startswith(("data:", "http://", "https://")):
        raise ProviderInvalidRequest(
            f"provider {pid!r}: {where} image URL must be https, http or a data URL",
            provider=pid,
        )
    return url


def unsupported_part(part: dict[str, Any], where: str, pid: str) -> ProviderInvalidRequest:
    return ProviderInvalidRequest(
        f"provider {pid!r}: {where} content part type {_type_name(part)} is not supported",
        provider=pid,
    )


def arguments_object(arguments: str, where: str, pid: str) -> dict[str, Any]:
    """A tool call's JSON-encoded arguments as the object providers that take structured
    arguments want; an empty string counts as ``{}``."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ProviderInvalidRequest(
            f"provider {pid!r}: {where} tool call arguments are not a JSON object", provider=pid
        )
    return value


def dumps(value: Any) -> str:
    """JSON text for tool call arguments: ``json.dumps`` spacing, UTF-8 left unescaped as the
    providers stream it."""
    return json.dumps(value, ensure_ascii=False)


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
