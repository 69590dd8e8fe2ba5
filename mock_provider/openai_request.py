"""Validation of a Chat Completions request body, with OpenAI's 400 wording and ``param`` paths.

Reference: https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mock_provider.validation import InvalidRequest, is_int, json_kind

__all__ = ["ChatRequest", "InvalidRequest", "parse_chat_request"]

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_CONTENT_REQUIRED = ("system", "developer", "user", "tool")
_FORMATS = ("text", "json_object", "json_schema")
_TOOL_CHOICES = ("none", "auto", "required")
_MAX_STOPS = 4


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The fields of a valid request that change the mock's answer."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


def _wrong_type(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {json_kind(value)} instead.",
        param,
    )


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param)


def _invalid_value(param: str, value: object, allowed: tuple[str, ...]) -> InvalidRequest:
    listed = ", ".join(f"'{a}'" for a in allowed[:-1]) + f", and '{allowed[-1]}'"
    return InvalidRequest(
        f"Invalid value for '{param}': '{value}'. Supported values are: {listed}.", param
    )


def _optional(body: dict[str, Any], key: str, ok: Callable[[object], bool], expected: str) -> Any:
    value = body.get(key)
    if value is not None and not ok(value):
        raise _wrong_type(key, expected, value)
    return value


def _check_message(i: int, message: object) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _wrong_type(where, "an object", message)
    role = message.get("role")
    if role is None:
        raise _missing(f"{where}.role")
    if role not in _ROLES:
        raise _invalid_value(f"{where}.role", role, _ROLES)
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise _wrong_type(f"{where}.content", "one of a string or array of objects", content)
    if content is None and role in _CONTENT_REQUIRED:
        raise _missing(f"{where}.content")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise _missing(f"{where}.tool_call_id")
    return message


def _check_tools(tools: list[Any]) -> list[dict[str, Any]]:
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _wrong_type(where, "an object", tool)
        if tool.get("type") != "function":
            raise _invalid_value(f"{where}.type", tool.get("type"), ("function", "custom"))
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _missing(f"{where}.function")
        if not isinstance(function.get("name"), str):
            raise _missing(f"{where}.function.name")
    return tools


def _check_tool_choice(choice: object, has_tools: bool) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if not has_tools:
        raise InvalidRequest(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified.",
            "tool_choice",
        )
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise _invalid_value("tool_choice", choice, _TOOL_CHOICES)
        return choice
    if isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        return choice
    raise _wrong_type("tool_choice", "a string or an object naming a function", choice)


def _check_response_format(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _wrong_type("response_format", "an object", value)
    if value.get("type") not in _FORMATS:
        raise _invalid_value("response_format.type", value.get("type"), _FORMATS)
    if value["type"] == "json_schema" and not isinstance(value.get("json_schema"), dict):
        raise _missing("response_format.json_schema")
    return value


def _max_tokens(body: dict[str, Any]) -> int | None:
    # max_completion_tokens supersedes the deprecated max_tokens when both are sent.
    chosen: int | None = None
    for key in ("max_tokens", "max_completion_tokens"):
        value = _optional(body, key, is_int, "an integer")
        if value is not None and value < 1:
            raise InvalidRequest(
                f"Invalid '{key}': integer below minimum value. Expected a value >= 1, but got "
                f"{value} instead.",
                key,
            )
        chosen = value if value is not None else chosen
    return chosen


def _stop(body: dict[str, Any]) -> str | list[str] | None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _wrong_type("stop", "one of a string or array of strings", stop)
    if len(stop) > _MAX_STOPS:
        raise InvalidRequest(
            f"Invalid 'stop': array too long. Expected an array with maximum length {_MAX_STOPS}, "
            f"but got an array with length {len(stop)} instead.",
            "stop",
        )
    return stop


def parse_chat_request(body: object) -> ChatRequest:
    """Check a decoded JSON body; raise ``InvalidRequest`` on the first problem."""
    if not isinstance(body, dict):
        raise _wrong_type("body", "an object", body)
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            "messages",
        )
    checked = [_check_message(i, m) for i, m in enumerate(messages)]
    n = _optional(body, "n", is_int, "an integer")
    if n not in (None, 1):
        raise InvalidRequest("The mock provider supports only n=1.", "n")
    stream = bool(_optional(body, "stream", lambda v: isinstance(v, bool), "a boolean"))
    options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    if options is not None and not stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    tools = _optional(body, "tools", lambda v: isinstance(v, list), "an array")
    return ChatRequest(
        model=model,
        messages=checked,
        stream=stream,
        include_usage=bool((options or {}).get("include_usage")),
        max_tokens=_max_tokens(body),
        stop=_stop(body),
        response_format=_check_response_format(body.get("response_format")),
        tools=_check_tools(tools) if tools else None,
        tool_choice=_check_tool_choice(body.get("tool_choice"), bool(tools)),
    )
