"""Deterministic answers and token counts: pure functions of the request, no I/O, no clock.

Other test suites import these to compute exactly what the mock will answer, so every rule here
is part of the mock's contract: the same messages always give the same text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

__all__ = [
    "VOCABULARY",
    "answer_digest",
    "answer_text",
    "count_tokens",
    "expected_completion",
    "expected_tool_call",
    "json_content",
    "message_text",
    "prompt_tokens",
    "truncate_tokens",
]

Message = Mapping[str, Any] | BaseModel

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


def _as_dict(message: Message) -> dict[str, Any]:
    # None-valued keys are dropped so {"name": null} and an absent name hash alike: clients differ
    # in whether they serialise unset fields.
    raw = message.model_dump(mode="json") if isinstance(message, BaseModel) else dict(message)
    return {k: v for k, v in raw.items() if v is not None}


def answer_digest(messages: Sequence[Message]) -> str:
    """sha256 hex of the messages' canonical JSON (sorted keys, compact, None values dropped)."""
    canonical = json.dumps(
        [_as_dict(m) for m in messages], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def answer_text(messages: Sequence[Message]) -> str:
    """``"Mock answer <8 hex>: "``, 3-40 vocabulary words picked by the digest, a period."""
    digest = answer_digest(messages)
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


def message_text(message: Message) -> str:
    """The countable text of one message: string content, text parts, and tool-call payloads."""
    msg = _as_dict(message)
    content = msg.get("content")
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        parts.extend(p["text"] for p in content if isinstance(p, dict) and "text" in p)
    for call in msg.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        parts.extend(str(function.get(key, "")) for key in ("name", "arguments"))
    return " ".join(parts)


def prompt_tokens(messages: Sequence[Message]) -> int:
    """OpenAI's chat accounting: per message 3 + content tokens (+1 with a name), +3 priming."""
    total = 3
    for message in messages:
        total += 3 + count_tokens(message_text(message))
        if _as_dict(message).get("name"):
            total += 1
    return total


def _mock_value(schema: Any, filler: str) -> Any:
    """A value that satisfies a simple JSON schema; strings become ``filler``."""
    if not isinstance(schema, Mapping):
        return filler
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):  # e.g. ["string", "null"]: use the first concrete type
        kind = next((k for k in kind if k != "null"), "null")
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


def json_content(text: str, response_format: Mapping[str, Any] | None) -> str | None:
    """The JSON-mode content for ``text``, or None when ``response_format`` is not a JSON mode.

    ``json_object`` gives ``{"answer": text}``; ``json_schema`` fills the schema's properties
    (string fields get ``text``), falling back to ``{"answer": text}`` when it has none.
    """
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    value: Any = {"answer": text}
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        if isinstance(schema, Mapping) and schema.get("properties"):
            value = _mock_value(schema, text)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def expected_completion(
    messages: Sequence[Message],
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    *,
    response_format: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """The ``(content, finish_reason)`` the mock returns for a text (not tool-call) answer.

    The stop cut applies first (finish "stop"); then, as a model would run out of budget before
    reaching a later stop, a ``max_tokens`` shorter than what is left cuts it (finish "length").
    In JSON mode the cuts apply to the JSON text, so a "length" answer is not valid JSON, as with
    the real API.
    """
    text = answer_text(messages)
    content = json_content(text, response_format) or text
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    found = [content.find(s) for s in stops if s and s in content]
    if found:
        content = content[: min(found)]
    if max_tokens is not None and count_tokens(content) > max_tokens:
        return truncate_tokens(content, max_tokens), "length"
    return content, "stop"


def expected_tool_call(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The tool call the mock makes, or None when it answers with text.

    It calls a tool when tools are given, ``tool_choice`` is not "none" and the last message is the
    user's (after a ``tool`` result it answers in text, so agent loops end). The tool is the one
    named by ``tool_choice``, else the first; arguments fill its parameter schema.
    """
    if not tools or tool_choice == "none" or not messages:
        return None
    if _as_dict(messages[-1]).get("role") != "user":
        return None
    functions = [t.get("function") or {} for t in tools]
    function = functions[0]
    if isinstance(tool_choice, Mapping):
        wanted = (tool_choice.get("function") or {}).get("name")
        function = next((f for f in functions if f.get("name") == wanted), function)
    digest = answer_digest(messages)
    arguments = _mock_value(function.get("parameters") or {"type": "object"}, f"mock-{digest[:8]}")
    if not isinstance(arguments, dict):
        arguments = {}
    call_hex = hashlib.sha256(f"{digest}:call".encode()).hexdigest()[:24]
    return {
        "id": f"call_{call_hex}",
        "type": "function",
        "function": {
            "name": function.get("name", ""),
            "arguments": json.dumps(arguments, separators=(",", ":"), ensure_ascii=False),
        },
    }
