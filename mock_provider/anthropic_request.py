"""Validation of an Anthropic Messages request, worded like the API's 400s (``<path>: <problem>``).

Reference: https://docs.anthropic.com/en/api/messages and the tool-use rules of
https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use (every
``tool_use`` answered by a ``tool_result`` in the next user message, results first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mock_provider.answers import JsonFormat, ToolSpec
from mock_provider.normalize import Turn, normalize_anthropic
from mock_provider.validation import InvalidRequest, is_int, is_number

__all__ = ["MessagesRequest", "parse_messages_request"]

_KNOWN = frozenset(
    {
        "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature",
        "top_p", "top_k", "tools", "tool_choice", "metadata", "thinking", "service_tier",
        "output_config", "output_format", "container", "mcp_servers", "context_management",
    }
)  # fmt: skip
_USER_BLOCKS = ("text", "image", "document", "search_result", "tool_result")
_ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")
_CHOICES = ("auto", "any", "tool", "none")


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """The fields of a valid request that change the mock's answer."""

    model: str
    turns: list[Turn]
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    json_format: JsonFormat = None
    tools: list[ToolSpec] = field(default_factory=list)
    choice: Literal["auto", "required", "none"] = "auto"
    allowed: list[str] = field(default_factory=list)


def _bad(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {problem}", param)


def _required(body: Mapping[str, Any], key: str, where: str = "") -> Any:
    if body.get(key) is None:
        raise _bad(f"{where}{key}", "Field required")
    return body[key]


def _number(body: Mapping[str, Any], key: str, high: float) -> None:
    value = body.get(key)
    if value is not None and (not is_number(value) or not 0 <= value <= high):
        raise _bad(key, f"Input should be a number between 0 and {high:g}")


def _check_text(block: Mapping[str, Any], where: str) -> None:
    if not isinstance(block.get("text"), str):
        raise _bad(f"{where}.text", "Input should be a valid string")
    if not block["text"]:
        raise _bad(where, "text content blocks must be non-empty")


def _check_block(block: object, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(block, Mapping):
        raise _bad(where, "Input should be a valid dictionary or object")
    kind = block.get("type")
    if kind not in allowed:
        listed = ", ".join(f"'{k}'" for k in allowed)
        raise _bad(f"{where}.type", f"Input should be one of {listed}")
    if kind == "text":
        _check_text(block, where)
    elif kind in ("image", "document"):
        source = block.get("source")
        if not isinstance(source, Mapping) or source.get("type") not in (
            "base64",
            "url",
            "file",
            "text",
            "content",
        ):
            raise _bad(f"{where}.source", "Field required: an object with a valid type")
    elif kind == "tool_use":
        for key in ("id", "name"):
            if not isinstance(block.get(key), str):
                raise _bad(f"{where}.{key}", "Field required")
        if not isinstance(block.get("input"), Mapping):
            raise _bad(f"{where}.input", "Input should be a valid dictionary")
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            raise _bad(f"{where}.tool_use_id", "Field required")
        content = block.get("content")
        if isinstance(content, list):
            for k, sub in enumerate(content):
                _check_block(sub, f"{where}.content.{k}", ("text", "image", "search_result"))
        elif content is not None and not isinstance(content, str):
            raise _bad(f"{where}.content", "Input should be a valid string or list")
    return block


def _check_message(i: int, message: object, last: bool) -> Mapping[str, Any]:
    where = f"messages.{i}"
    if not isinstance(message, Mapping):
        raise _bad(where, "Input should be a valid dictionary")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"{where}.role", "Input should be 'user' or 'assistant'")
    content = _required(message, "content", f"{where}.")
    if not isinstance(content, str | list):
        raise _bad(f"{where}.content", "Input should be a valid string or list")
    if not content and not (last and role == "assistant"):
        raise _bad(
            where,
            "all messages must have non-empty content except for the optional final assistant "
            "message",
        )
    if isinstance(content, list):
        allowed = _USER_BLOCKS if role == "user" else _ASSISTANT_BLOCKS
        for j, block in enumerate(content):
            _check_block(block, f"{where}.content.{j}", allowed)
    return message


def _blocks(message: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    content = message.get("content")
    return [b for b in content if b.get("type") == kind] if isinstance(content, list) else []


def _check_tool_pairs(messages: list[Mapping[str, Any]]) -> None:
    """Each ``tool_use`` is answered in the next (user) message, whose results come first."""
    for i, message in enumerate(messages):
        if message["role"] != "user":
            continue
        content = message["content"] if isinstance(message["content"], list) else []
        kinds = [b["type"] for b in content]
        first_other = next((k for k, kind in enumerate(kinds) if kind != "tool_result"), None)
        if first_other is not None and "tool_result" in kinds[first_other:]:
            raise _bad(
                f"messages.{i}.content",
                "tool_result blocks must come first in the content, before any other block",
            )
        previous = messages[i - 1] if i else None
        uses = {b["id"] for b in _blocks(previous, "tool_use")} if previous else set()
        results = {b["tool_use_id"] for b in _blocks(message, "tool_result")}
        if results - uses:
            raise _bad(
                f"messages.{i}.content",
                f"unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{', '.join(sorted(results - uses))}. Each `tool_result` block must have a "
                "corresponding `tool_use` block in the previous message.",
            )
    for i, message in enumerate(messages):
        uses = {b["id"] for b in _blocks(message, "tool_use")}
        after = messages[i + 1] if i + 1 < len(messages) else None
        answered = {b["tool_use_id"] for b in _blocks(after, "tool_result")} if after else set()
        if uses and after is not None and uses - answered:
            raise _bad(
                "messages",
                f"`tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(sorted(uses - answered))}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message.",
            )


def _system(value: object) -> object:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad("system", "Input should be a valid string or list")
    for j, block in enumerate(value):
        _check_block(block, f"system.{j}", ("text",))
    return value


def _tools(value: object) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("tools", "Input should be a valid list")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(value):
        where = f"tools.{i}"
        if not isinstance(tool, Mapping):
            raise _bad(where, "Input should be a valid dictionary")
        if tool.get("type") not in (None, "custom"):
            continue  # a server tool (web search, code execution...): never called by the mock
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _bad(f"{where}.name", "Field required")
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping):
            raise _bad(f"{where}.input_schema", "Field required")
        if schema.get("type") != "object":
            raise _bad(f"{where}.input_schema.type", "Input should be 'object'")
        specs.append(ToolSpec(tool["name"], schema))
    return specs


def _choice(
    value: object, tools: list[ToolSpec], has_tools: bool
) -> tuple[Literal["auto", "required", "none"], list[str]]:
    if value is None:
        return "auto", []
    if not isinstance(value, Mapping) or value.get("type") not in _CHOICES:
        raise _bad("tool_choice.type", "Input should be 'auto', 'any', 'tool' or 'none'")
    if not has_tools and value["type"] != "none":
        raise _bad("tool_choice", "tool_choice may only be specified while providing tools")
    if value["type"] == "tool":
        name = value.get("name")
        if not isinstance(name, str):
            raise _bad("tool_choice.name", "Field required")
        if name not in [t.name for t in tools]:
            raise _bad("tool_choice.name", f"Tool '{name}' not found in tools")
        return "required", [name]
    return {"auto": "auto", "any": "required", "none": "none"}[value["type"]], []  # type: ignore[return-value]


def _format(body: Mapping[str, Any]) -> JsonFormat:
    config = body.get("output_config")
    if config is not None and not isinstance(config, Mapping):
        raise _bad("output_config", "Input should be a valid dictionary")
    # output_config.format is the GA spelling; output_format the beta one.
    fmt, where = (config or {}).get("format"), "output_config.format"
    if fmt is None and body.get("output_format") is not None:
        fmt, where = body["output_format"], "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
        raise _bad(f"{where}.type", "Input should be 'json_schema'")
    schema = fmt.get("schema")
    if not isinstance(schema, Mapping):
        raise _bad(f"{where}.schema", "Field required")
    return schema


def parse_messages_request(body: object) -> MessagesRequest:
    """Check a decoded JSON body; raise ``InvalidRequest`` on the first problem."""
    if not isinstance(body, Mapping):
        raise _bad("body", "Input should be a valid dictionary")
    extra = sorted(set(body) - _KNOWN)
    if extra:
        raise _bad(extra[0], "Extra inputs are not permitted")
    model = _required(body, "model")
    if not isinstance(model, str):
        raise _bad("model", "Input should be a valid string")
    max_tokens = _required(body, "max_tokens")
    if not is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens", "Input should be an integer greater than or equal to 1")
    messages = _required(body, "messages")
    if not isinstance(messages, list):
        raise _bad("messages", "Input should be a valid list")
    if not messages:
        raise _bad("messages", "at least one message is required")
    checked = [_check_message(i, m, i == len(messages) - 1) for i, m in enumerate(messages)]
    if checked[0]["role"] != "user":
        raise _bad("messages", 'first message must use the "user" role')
    _check_tool_pairs(checked)
    system = _system(body.get("system"))
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        raise _bad("stop_sequences", "Input should be a valid list of strings")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "Input should be a valid boolean")
    _number(body, "temperature", 1)
    _number(body, "top_p", 1)
    top_k = body.get("top_k")
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        raise _bad("top_k", "Input should be a non-negative integer")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise _bad("metadata", "Input should be a valid dictionary")
    tools = _tools(body.get("tools"))
    choice, allowed = _choice(body.get("tool_choice"), tools, bool(body.get("tools")))
    return MessagesRequest(
        model=model,
        turns=normalize_anthropic(system, checked),
        max_tokens=max_tokens,
        stops=list(stops or []),
        stream=bool(stream),
        json_format=_format(body),
        tools=tools,
        choice=choice,
        allowed=allowed,
    )
