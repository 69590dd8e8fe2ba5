"""Deterministic answers and token counts: pure functions of the request, no I/O, no clock.

Other test suites import these to compute exactly what the mock will answer, so every rule here
is part of the mock's contract: the same conversation always gives the same text, whichever API
(OpenAI, Anthropic, Gemini) carried it. Everything is computed over the normalised turns of
``mock_provider.normalize``; the OpenAI-format helpers (``answer_text``, ``prompt_tokens``,
``expected_completion``, ``expected_tool_call``) normalise their ``messages`` first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mock_provider.normalize import (
    Message,
    Turn,
    normalize_anthropic,
    normalize_gemini,
    normalize_openai,
)

__all__ = [
    "BLOCKED_MARKER",
    "SAFETY_MARKER",
    "VOCABULARY",
    "JsonFormat",
    "Reply",
    "ToolCall",
    "ToolSpec",
    "answer_digest",
    "answer_text",
    "count_tokens",
    "expected_completion",
    "expected_tool_call",
    "json_answer",
    "json_content",
    "normalize_anthropic",
    "normalize_gemini",
    "normalize_openai",
    "openai_finish",
    "openai_reply",
    "prompt_tokens",
    "reply",
    "truncate_tokens",
    "turns_answer_text",
    "turns_digest",
    "turns_prompt_tokens",
]

# In the last user turn: the provider refuses (OpenAI content_filter, Anthropic refusal, Gemini
# finishReason SAFETY); BLOCKED blocks the prompt itself (Gemini promptFeedback; a refusal on the
# other two APIs, which have no separate prompt block).
SAFETY_MARKER = "[[mock:safety]]"
BLOCKED_MARKER = "[[mock:blocked]]"

VOCABULARY: tuple[str, ...] = (
    "amber", "anchor", "arrow", "atlas", "basin", "beacon", "birch", "bridge",
    "cable", "canyon", "cedar", "circuit", "cobalt", "comet", "copper", "delta",
    "dune", "ember", "engine", "falcon", "fern", "fjord", "galaxy", "garnet",
    "glacier", "harbor", "hazel", "helix", "island", "ivory", "jasper", "kernel",
    "lantern", "lattice", "lumen", "maple", "marble", "meadow", "meteor", "nickel",
    "nimbus", "oasis", "orbit", "pebble", "prism", "quartz", "quiver", "raven",
    "reef", "ridge", "saddle", "signal", "spruce", "summit", "tundra", "vector",
    "velvet", "willow", "wharf", "yonder", "zenith", "zephyr", "switch", "yard",
)  # fmt: skip

# Roughly how tokenizers split English: runs of word characters, and each punctuation mark alone.
_TOKEN = re.compile(r"\w+|[^\w\s]")

# "object": {"answer": text}; a mapping: a JSON schema to fill; None: plain text.
JsonFormat = Literal["object"] | Mapping[str, Any] | None


# --- text and tokens ----------------------------------------------------------------------------


def turns_digest(turns: Sequence[Turn]) -> str:
    """sha256 hex of the turns' compact JSON (``[[role, text], ...]``)."""
    canonical = json.dumps([list(t) for t in turns], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def turns_answer_text(turns: Sequence[Turn]) -> str:
    """``"Mock answer <8 hex>: "``, 3-40 vocabulary words picked by the digest, a period."""
    digest = turns_digest(turns)
    n_words = 3 + int(digest[8:12], 16) % 38
    picks = hashlib.shake_256(digest.encode()).digest(n_words)
    words = " ".join(VOCABULARY[b % len(VOCABULARY)] for b in picks)
    return f"Mock answer {digest[:8]}: {words}."


def count_tokens(text: str) -> int:
    """Number of ``\\w+|[^\\w\\s]`` pieces: close enough to a BPE count for accounting tests."""
    return len(_TOKEN.findall(text))


def truncate_tokens(text: str, max_tokens: int) -> str:
    """The prefix of ``text`` holding its first ``max_tokens`` tokens (original spacing kept)."""
    pieces = list(_TOKEN.finditer(text))
    if len(pieces) <= max_tokens:
        return text
    return text[: pieces[max_tokens - 1].end()] if max_tokens > 0 else ""


def turns_prompt_tokens(turns: Sequence[Turn]) -> int:
    """Per turn 3 + its text's tokens, and 3 more that prime the reply."""
    return 3 + sum(3 + count_tokens(text) for _, text in turns)


def answer_digest(messages: Sequence[Message]) -> str:
    """``turns_digest`` of OpenAI-format messages."""
    return turns_digest(normalize_openai(messages))


def answer_text(messages: Sequence[Message]) -> str:
    """``turns_answer_text`` of OpenAI-format messages."""
    return turns_answer_text(normalize_openai(messages))


def prompt_tokens(messages: Sequence[Message]) -> int:
    """``turns_prompt_tokens`` of OpenAI-format messages."""
    return turns_prompt_tokens(normalize_openai(messages))


# --- JSON modes ---------------------------------------------------------------------------------


def _mock_value(schema: Any, filler: str) -> Any:
    """A value satisfying a simple JSON (or Gemini OpenAPI) schema; strings become ``filler``."""
    if not isinstance(schema, Mapping):
        return filler
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):  # e.g. ["string", "null"]: use the first concrete type
        kind = next((k for k in kind if str(k).lower() != "null"), "null")
    kind = kind.lower() if isinstance(kind, str) else kind  # Gemini writes "OBJECT", "STRING"
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {name: _mock_value(sub, filler) for name, sub in props.items()}
    values: dict[str, Any] = {
        "integer": count_tokens(filler),
        "number": count_tokens(filler) / 2,
        "boolean": True,
        "array": [],
        "null": None,
    }
    return values.get(str(kind), filler)


def json_answer(text: str, json_format: JsonFormat) -> str:
    """The JSON-mode text for ``text``: ``{"answer": text}``, or a schema's properties filled in
    (string fields get ``text``) when ``json_format`` is a schema that has properties."""
    value: Any = {"answer": text}
    if isinstance(json_format, Mapping) and json_format.get("properties"):
        value = _mock_value(json_format, text)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _openai_json_format(response_format: Mapping[str, Any] | None) -> JsonFormat:
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return "object"
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, Mapping) else {}
    return None


def json_content(text: str, response_format: Mapping[str, Any] | None) -> str | None:
    """The JSON-mode content for an OpenAI ``response_format``, or None when it is not JSON."""
    json_format = _openai_json_format(response_format)
    return None if json_format is None else json_answer(text, json_format)


# --- the reply ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A declared function: its name and parameter schema, whatever the API's spelling."""

    name: str
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The call the mock makes; ``key`` is the same hex on every API (ids are prefixed by it)."""

    key: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, separators=(",", ":"), ensure_ascii=False)


Finish = Literal["end", "stop_sequence", "length", "tool_call", "refusal"]


@dataclass(frozen=True, slots=True)
class Reply:
    """What the mock answers, before any API's wording.

    ``finish``: ``end`` (natural end), ``stop_sequence`` (cut before ``stop_sequence``), ``length``
    (cut by the token budget), ``tool_call``, or ``refusal`` (a safety marker; ``blocked`` when the
    prompt itself is blocked).
    """

    text: str
    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    tool_call: ToolCall | None = None
    stop_sequence: str | None = None
    blocked: bool = False


def _last_user_text(turns: Sequence[Turn]) -> str:
    return next((text for role, text in reversed(turns) if role == "user"), "")


def _pick_tool(
    turns: Sequence[Turn],
    tools: Sequence[ToolSpec],
    choice: Literal["auto", "required", "none"],
    allowed: Sequence[str],
) -> ToolCall | None:
    if not tools or choice == "none" or not turns or turns[-1][0] != "user":
        return None
    tool = next((t for t in tools if t.name in allowed), tools[0])
    digest = turns_digest(turns)
    arguments = _mock_value(tool.parameters or {"type": "object"}, f"mock-{digest[:8]}")
    key = hashlib.sha256(f"{digest}:call".encode()).hexdigest()[:24]
    return ToolCall(key, tool.name, arguments if isinstance(arguments, dict) else {})


def reply(
    turns: Sequence[Turn],
    *,
    max_tokens: int | None = None,
    stops: Sequence[str] = (),
    json_format: JsonFormat = None,
    tools: Sequence[ToolSpec] = (),
    choice: Literal["auto", "required", "none"] = "auto",
    allowed: Sequence[str] = (),
) -> Reply:
    """The mock's reply to ``turns``; the same on every API for the same conversation.

    In order: a safety marker in the last user turn refuses. Tools (unless ``choice`` is "none")
    give a call when the last turn is the user's (after a tool result it answers in text, so agent
    loops end): to the first tool named in ``allowed``, else the first tool, with arguments filling
    its parameter schema. Otherwise the answer text (as JSON in a JSON mode) is cut before the
    earliest stop sequence, then, as a model runs out of budget before reaching a later stop, by a
    ``max_tokens`` shorter than what is left. A cut JSON answer is not valid JSON, as with the
    real APIs.
    """
    prompt = turns_prompt_tokens(turns)
    last_user = _last_user_text(turns)
    if SAFETY_MARKER in last_user or BLOCKED_MARKER in last_user:
        blocked = BLOCKED_MARKER in last_user
        return Reply("", "refusal", prompt, 0, blocked=blocked)
    call = _pick_tool(turns, tools, choice, allowed)
    if call is not None:
        used = count_tokens(f"{call.name} {call.arguments_json}")
        return Reply("", "tool_call", prompt, used, tool_call=call)
    text = turns_answer_text(turns)
    content = text if json_format is None else json_answer(text, json_format)
    finish: Finish = "end"
    matched: str | None = None
    found = sorted((content.find(s), i) for i, s in enumerate(stops) if s and s in content)
    if found:
        at, index = found[0]
        content, finish, matched = content[:at], "stop_sequence", stops[index]
    if max_tokens is not None and count_tokens(content) > max_tokens:
        content, finish, matched = truncate_tokens(content, max_tokens), "length", None
    return Reply(content, finish, prompt, count_tokens(content), stop_sequence=matched)


# --- OpenAI-format helpers ----------------------------------------------------------------------


def _openai_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[ToolSpec]:
    functions = [t.get("function") or {} for t in tools or []]
    return [ToolSpec(str(f.get("name", "")), f.get("parameters")) for f in functions]


def _openai_choice(
    tool_choice: str | Mapping[str, Any] | None,
) -> tuple[Literal["auto", "required", "none"], list[str]]:
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name")
        return "required", [name] if isinstance(name, str) else []
    if tool_choice in ("none", "required"):
        return tool_choice, []  # type: ignore[return-value]
    return "auto", []


def openai_reply(
    messages: Sequence[Message],
    *,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    response_format: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
) -> Reply:
    """``reply`` for a Chat Completions request's fields."""
    choice, allowed = _openai_choice(tool_choice)
    return reply(
        normalize_openai(messages),
        max_tokens=max_tokens,
        stops=[stop] if isinstance(stop, str) else list(stop or []),
        json_format=_openai_json_format(response_format),
        tools=_openai_tools(tools),
        choice=choice,
        allowed=allowed,
    )


_OPENAI_FINISH = {
    "end": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_call": "tool_calls",
    "refusal": "content_filter",
}


def openai_finish(finish: Finish) -> str:
    return _OPENAI_FINISH[finish]


def expected_completion(
    messages: Sequence[Message],
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    *,
    response_format: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """The ``(content, finish_reason)`` the Chat Completions endpoint returns for a text answer.

    finish_reason is "stop" (natural end or a stop sequence), "length" (``max_tokens`` cut), or
    "content_filter" with content "" (the API sends null) for a safety marker.
    """
    r = openai_reply(messages, max_tokens=max_tokens, stop=stop, response_format=response_format)
    return r.text, openai_finish(r.finish)


def expected_tool_call(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The Chat Completions tool call the mock makes, or None when it answers otherwise."""
    r = openai_reply(messages, tools=tools, tool_choice=tool_choice)
    if r.tool_call is None:
        return None
    call = r.tool_call
    return {
        "id": f"call_{call.key}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
