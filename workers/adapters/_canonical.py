"""Reading the canonical (OpenAI chat) request: the checks and conversions every format that is
not OpenAI's repeats when it builds its own request.

A job a format cannot express fails with ``ProviderInvalidRequest`` whose message names the
provider and the message by position, never the prompt's text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.core.config import ModelSpec
from broker.core.errors import ProviderInvalidRequest
from schemas import ChatMessage, CompletionParams
from workers.adapters._errors import safe_code
from workers.adapters.base import ProviderRequest

__all__ = [
    "DataURL",
    "JSONOutput",
    "arguments_object",
    "content_parts",
    "data_url",
    "forced_tool",
    "function_of",
    "json_output",
    "one_choice",
    "output_cap",
    "sampling",
    "split_system",
    "text_of",
]

Block = dict[str, Any]

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)$", re.S)
_TOOL_MODES = frozenset({"auto", "required", "none"})


# --- parameters ----------------------------------------------------------------------------


def output_cap(request: ProviderRequest, spec: ModelSpec | None) -> int | None:
    """The cap to send: the job's own, else the one the scheduler reserved for it, else the
    model's configured one."""
    own = request.params.own_max_tokens
    return own or request.output_cap or (spec.max_tokens if spec is not None else None)


_EVERY_ADAPTER = frozenset(
    {"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "tools"}
    | {"tool_choice", "response_format", "stream", "stream_options", "n"}
)
"""Parameters every translating adapter sends (or refuses, as ``n`` > 1)."""
_OPENAI_DEFAULTS: dict[str, object] = {
    "logprobs": False,
    "parallel_tool_calls": True,
    "frequency_penalty": 0,
    "presence_penalty": 0,
}
"""A parameter at OpenAI's default asks for nothing: it need not be translated."""


def refuse_untranslated(params: CompletionParams, translated: frozenset[str], pid: str) -> None:
    """Refuse the job's parameters this provider's format has no place for, by name: a
    parameter accepted and then dropped would be ignored without a word."""
    declared = type(params).model_fields
    asked = {n for n in params.model_fields_set if n in declared and getattr(params, n) is not None}
    asked |= {
        name
        for name, value in (params.model_extra or {}).items()
        if value is not None and _OPENAI_DEFAULTS.get(name, ...) != value
    }
    stray = sorted(asked - _EVERY_ADAPTER - translated)
    if stray:
        raise ProviderInvalidRequest(
            f"provider {pid!r} has no equivalent of {', '.join(stray)}: refused rather than "
            "dropped (send it to an OpenAI-compatible provider, or leave it out)",
            provider=pid,
        )


def one_choice(params: CompletionParams, pid: str, why: str) -> None:
    """Refuse ``n`` > 1, which only OpenAI's format can answer."""
    if (params.model_extra or {}).get("n") not in (None, 1):
        raise ProviderInvalidRequest(
            f"provider {pid!r}: n > 1 is not supported ({why})", provider=pid
        )


def sampling(params: CompletionParams, *, top_p: str, stop: str) -> dict[str, Any]:
    """``temperature``, ``top_p`` and ``stop`` (always a list) where the job sets them, under
    the provider's names for the last two."""
    out: dict[str, Any] = {}
    if params.temperature is not None:
        out["temperature"] = params.temperature
    if params.top_p is not None:
        out[top_p] = params.top_p
    stops = [params.stop] if isinstance(params.stop, str) else params.stop
    if stops:
        out[stop] = list(stops)
    return out


@dataclass(frozen=True, slots=True)
class JSONOutput:
    """A job's ask for JSON output: ``schema`` is None for ``json_object`` (any object)."""

    schema: dict[str, Any] | None


def json_output(response_format: dict[str, Any] | None, pid: str) -> JSONOutput | None:
    """What ``response_format`` asks for; ``None`` for free text."""
    if response_format is None or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return JSONOutput(None)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ProviderInvalidRequest(
                f"provider {pid!r}: response_format json_schema has no schema object",
                provider=pid,
            )
        return JSONOutput(schema)
    raise ProviderInvalidRequest(
        f"provider {pid!r}: response_format type {safe_code(kind, None)!r} is not supported",
        provider=pid,
    )


# --- tools ---------------------------------------------------------------------------------


def function_of(tool: dict[str, Any], index: int, pid: str) -> dict[str, Any]:
    """The function of a ``tools`` entry, which must be a function tool with a name."""
    function = tool.get("function")
    if (
        tool.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise ProviderInvalidRequest(
            f"provider {pid!r}: tool {index} is not a function tool with a name", provider=pid
        )
    return function


def forced_tool(choice: object, pid: str) -> tuple[str, str | None]:
    """A set ``tool_choice``: ``(mode, None)`` for auto, required and none, ``("function",
    name)`` for the one function it forces."""
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str):
        return "function", name
    raise ProviderInvalidRequest(
        f"provider {pid!r}: tool_choice must be auto, required, none or a function", provider=pid
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


# --- messages ------------------------------------------------------------------------------


def split_system(
    messages: list[ChatMessage], pid: str
) -> tuple[str, list[tuple[str, ChatMessage]]]:
    """The system and developer messages' text, joined by blank lines (the formats take it
    apart from the turns), and the other messages with the position their errors name."""
    system: list[str] = []
    turns: list[tuple[str, ChatMessage]] = []
    for number, message in enumerate(messages):
        where = f"message {number}"
        if message.role in ("system", "developer"):
            system.append(text_of(message, where, pid))
        else:
            turns.append((where, message))
    return "\n\n".join(system), turns


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


def content_parts(
    parts: list[dict[str, Any]],
    where: str,
    pid: str,
    *,
    text: Callable[[str], Block],
    image: Callable[[str], Block],
) -> list[Block]:
    """A user message's content parts in the provider's shapes (``text`` and ``image`` build
    them); a part that is neither text nor an image is refused."""
    blocks: list[Block] = []
    for part in parts:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append(text(part["text"]))
        elif kind == "image_url":
            blocks.append(image(_image_url(part, where, pid)))
        else:
            raise ProviderInvalidRequest(
                f"provider {pid!r}: {where} content part type {_type_name(part)} is not supported",
                provider=pid,
            )
    return blocks


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


def _image_url(part: dict[str, Any], where: str, pid: str) -> str:
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
