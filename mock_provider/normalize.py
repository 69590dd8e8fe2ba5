"""One format-independent view of a conversation, so every API gets the same deterministic answer.

A conversation becomes a list of ``(role, text)`` turns, role one of ``system``, ``user``,
``assistant``, ``tool``:

- all system text (OpenAI ``system``/``developer`` messages, Anthropic's top-level ``system``,
  Gemini's ``systemInstruction``) is one ``system`` turn placed first, its pieces (messages, text
  parts, blocks) joined with ``"\\n\\n"``;
- a user or assistant message's text pieces are joined with ``"\\n"``; every image or other media
  part counts as the text ``[image]``; empty text pieces are dropped;
- each tool call an assistant turn makes appends ``call:<name>(<canonical JSON of arguments>)``
  (after the turn's text, joined with ``"\\n"``);
- each tool result is its own ``tool`` turn, its text canonicalised: text that parses as JSON
  becomes canonical JSON; a Gemini ``functionResponse.response`` that is exactly
  ``{"content": <string>}`` counts as that string, any other object as its canonical JSON;
- turns are never merged (other than the system rule), so OpenAI's one ``tool`` message per
  result and Anthropic's several ``tool_result`` blocks in one user message normalise alike.

Canonical JSON is ``json.dumps(obj, sort_keys=True, separators=(",", ":"))``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

__all__ = [
    "IMAGE_TEXT",
    "Turn",
    "canonical_json",
    "canonical_result",
    "field",
    "normalize_anthropic",
    "normalize_gemini",
    "normalize_openai",
]

Turn = tuple[str, str]
Message = Mapping[str, Any] | BaseModel

IMAGE_TEXT = "[image]"
_OPENAI_MEDIA = ("image_url", "input_image", "image", "input_audio", "file")
_ANTHROPIC_MEDIA = ("image", "document")
_GEMINI_MEDIA = ("inlineData", "fileData")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical_result(text: str) -> str:
    """A tool result's text: canonical JSON when it parses as JSON, else unchanged."""
    try:
        return canonical_json(json.loads(text))
    except ValueError:
        return text


def _call_text(name: object, arguments: object) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return f"call:{name}({arguments})"
    return f"call:{name}({canonical_json(arguments)})"


def _as_dict(message: Message) -> dict[str, Any]:
    # None-valued keys are dropped: clients differ in whether they serialise unset fields.
    raw = message.model_dump(mode="json") if isinstance(message, BaseModel) else dict(message)
    return {k: v for k, v in raw.items() if v is not None}


def _joined(pieces: Sequence[str], sep: str = "\n") -> str:
    return sep.join(p for p in pieces if p)


# --- OpenAI Chat Completions ------------------------------------------------------------------


def _openai_pieces(content: object) -> list[str]:
    if isinstance(content, str):
        return [content]
    pieces: list[str] = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind in (None, "text") and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in _OPENAI_MEDIA:
            pieces.append(IMAGE_TEXT)
    return pieces


def normalize_openai(messages: Sequence[Message]) -> list[Turn]:
    """Turns of a Chat Completions ``messages`` list (dicts or pydantic models)."""
    system: list[str] = []
    turns: list[Turn] = []
    for message in messages:
        msg = _as_dict(message)
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            system.extend(_openai_pieces(content))
        elif role == "assistant":
            pieces = _openai_pieces(content)
            for call in msg.get("tool_calls") or []:
                fn = (call.get("function") or {}) if isinstance(call, Mapping) else {}
                pieces.append(_call_text(fn.get("name", ""), fn.get("arguments", "{}")))
            legacy = msg.get("function_call")
            if isinstance(legacy, Mapping):
                pieces.append(_call_text(legacy.get("name", ""), legacy.get("arguments", "{}")))
            turns.append(("assistant", _joined(pieces)))
        elif role in ("tool", "function"):
            turns.append(("tool", canonical_result(_joined(_openai_pieces(content)))))
        else:
            turns.append(("user", _joined(_openai_pieces(content))))
    if _joined(system):
        turns.insert(0, ("system", _joined(system, "\n\n")))
    return turns


# --- Anthropic Messages -----------------------------------------------------------------------


def _anthropic_pieces(blocks: object) -> list[str]:
    if isinstance(blocks, str):
        return [blocks]
    pieces: list[str] = []
    for block in blocks if isinstance(blocks, list) else []:
        if not isinstance(block, Mapping):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            pieces.append(block["text"])
        elif block.get("type") in _ANTHROPIC_MEDIA:
            pieces.append(IMAGE_TEXT)
    return pieces


def _user_turns(parts: Sequence[Any], result_of: Any, piece_of: Any) -> list[Turn]:
    """A user message's turns in order: a ``tool`` turn per result, text runs between them."""
    turns: list[Turn] = []
    pending: list[str] = []
    saw_result = False
    for part in parts:
        result = result_of(part)
        if result is not None:
            if _joined(pending):
                turns.append(("user", _joined(pending)))
            pending = []
            saw_result = True
            turns.append(("tool", result))
        else:
            pending.extend(piece_of(part))
    if _joined(pending) or not saw_result:
        turns.append(("user", _joined(pending)))
    return turns


def _anthropic_result(block: Any) -> str | None:
    if not isinstance(block, Mapping) or block.get("type") != "tool_result":
        return None
    return canonical_result(_joined(_anthropic_pieces(block.get("content") or "")))


def normalize_anthropic(system: object, messages: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """Turns of a Messages request's ``system`` (string or text blocks) and ``messages``."""
    turns: list[Turn] = []
    system_text = _joined(_anthropic_pieces(system), "\n\n") if system else ""
    if system_text:
        turns.append(("system", system_text))
    for message in messages:
        content = message.get("content")
        if message.get("role") == "assistant":
            pieces = _anthropic_pieces(content)
            if isinstance(content, list):
                pieces += [
                    _call_text(b.get("name", ""), b.get("input", {}))
                    for b in content
                    if isinstance(b, Mapping) and b.get("type") == "tool_use"
                ]
            turns.append(("assistant", _joined(pieces)))
        elif isinstance(content, list):
            turns.extend(_user_turns(content, _anthropic_result, lambda b: _anthropic_pieces([b])))
        else:
            turns.append(("user", _joined(_anthropic_pieces(content))))
    return turns


# --- Gemini generateContent -------------------------------------------------------------------


def field(obj: Mapping[str, Any], camel: str) -> Any:
    """``obj[camel]``, or its snake_case spelling: Google's JSON parser accepts both."""
    if camel in obj:
        return obj[camel]
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return obj.get(snake)


def _gemini_pieces(part: Any) -> list[str]:
    if not isinstance(part, Mapping) or part.get("thought") is True:
        return []
    if isinstance(part.get("text"), str):
        return [part["text"]]
    if any(field(part, m) is not None for m in _GEMINI_MEDIA):
        return [IMAGE_TEXT]
    return []


def _gemini_result(part: Any) -> str | None:
    response = field(part, "functionResponse") if isinstance(part, Mapping) else None
    if not isinstance(response, Mapping):
        return None
    value = response.get("response")
    value = {} if value is None else value
    if (
        isinstance(value, Mapping)
        and set(value) == {"content"}
        and isinstance(value["content"], str)
    ):
        return canonical_result(value["content"])
    return canonical_json(value)


def normalize_gemini(
    system_instruction: Mapping[str, Any] | None, contents: Sequence[Mapping[str, Any]]
) -> list[Turn]:
    """Turns of a generateContent request's ``systemInstruction`` and ``contents``."""
    turns: list[Turn] = []
    system_parts = (system_instruction or {}).get("parts") or []
    system_text = _joined([p for part in system_parts for p in _gemini_pieces(part)], "\n\n")
    if system_text:
        turns.append(("system", system_text))
    for content in contents:
        parts = content.get("parts") or []
        if content.get("role") == "model":
            pieces = [p for part in parts for p in _gemini_pieces(part)]
            for part in parts:
                call = field(part, "functionCall") if isinstance(part, Mapping) else None
                if isinstance(call, Mapping):
                    pieces.append(_call_text(call.get("name", ""), call.get("args") or {}))
            turns.append(("assistant", _joined(pieces)))
        else:
            turns.extend(_user_turns(parts, _gemini_result, _gemini_pieces))
    return turns
