"""The Anthropic Messages API request for a canonical (OpenAI chat) request.

Follows https://platform.claude.com/docs/en/api/messages (the request),
https://platform.claude.com/docs/en/agents-and-tools/tool-use/implement-tool-use (``tools``,
``tool_choice``, ``tool_result`` blocks first in the user turn that answers the tool calls),
https://platform.claude.com/docs/en/build-with-claude/vision (base64 and URL image sources) and
https://platform.claude.com/docs/en/build-with-claude/structured-outputs (``output_config``;
anthropic-sdk-python ``OutputConfigParam`` / ``JSONOutputFormatParam``).

Request (canonical OpenAI → Anthropic)::

    system / developer messages     top-level "system", joined by blank lines
    user text / parts               string kept; text → text block; image_url data: URL →
                                    {"type": "image", "source": {"type": "base64", ...}};
                                    http(s) URL → source {"type": "url", "url"}
    assistant                       string kept; with tool_calls → text block + tool_use blocks
                                    (input = the parsed arguments object)
    tool messages                   tool_result blocks in one user turn, with any user message
                                    that follows merged into the same turn (roles must alternate)
    max_tokens                      job's max_tokens / max_completion_tokens, else the model's
                                    ModelSpec.max_tokens, else 4096 (Anthropic requires one)
    temperature, top_p              as is; stop → stop_sequences (a list)
    tools                           {"name", "description", "input_schema", "strict"?}
    tool_choice                     auto → auto, required → any, none → none, a function → tool;
                                    parallel_tool_calls false → disable_parallel_tool_use
    response_format                 json_schema → output_config.format json_schema;
                                    json_object → the same with schema {"type": "object"}
    top_k, thinking                 passed through (Anthropic's own); n > 1 refused; seed,
                                    penalties, logprobs and other OpenAI-only params dropped

A job Anthropic cannot express raises ProviderInvalidRequest naming the message by position.
"""

from __future__ import annotations

from typing import Any

from broker.core.config import ModelSpec
from broker.core.errors import ProviderInvalidRequest
from schemas import ChatMessage
from workers.adapters._errors import safe_code
from workers.adapters._wire import (
    arguments_object,
    data_url,
    image_url,
    max_tokens,
    stop_list,
    text_of,
    unsupported_part,
)
from workers.adapters.base import ProviderRequest

__all__ = ["DEFAULT_MAX_TOKENS", "messages_body"]

DEFAULT_MAX_TOKENS = 4096

_TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none"}
_PASSED_THROUGH = ("top_k", "thinking")


def messages_body(
    request: ProviderRequest, spec: ModelSpec | None, pid: str, *, stream: bool
) -> dict[str, Any]:
    """The Messages API body for ``request``; ``spec`` is the model's config, if any."""
    params = request.params
    extra = params.model_extra or {}
    if extra.get("n") not in (None, 1):
        raise ProviderInvalidRequest(
            f"provider {pid!r}: n > 1 is not supported (Anthropic returns one completion)",
            provider=pid,
        )
    system, messages = _messages(request.messages, pid)
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": max_tokens(params)
        or (spec.max_tokens if spec is not None else None)
        or DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        body["system"] = system
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    stop = stop_list(params.stop)
    if stop:
        body["stop_sequences"] = stop
    if params.tools:
        body["tools"] = [_tool(tool, index, pid) for index, tool in enumerate(params.tools)]
        choice = _tool_choice(params.tool_choice, extra.get("parallel_tool_calls"), pid)
        if choice is not None:
            body["tool_choice"] = choice
    output = _output_config(params.response_format, pid)
    if output is not None:
        body["output_config"] = output
    for key in _PASSED_THROUGH:
        if extra.get(key) is not None:
            body[key] = extra[key]
    if stream:
        body["stream"] = True
    return body


def _messages(messages: list[ChatMessage], pid: str) -> tuple[str, list[dict[str, Any]]]:
    """The top-level system text and the alternating user/assistant turns."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    merging = False  # the last turn is a user turn holding tool results: later user input joins it
    for number, message in enumerate(messages):
        where = f"message {number}"
        if message.role in ("system", "developer"):
            system.append(text_of(message, where, pid))
            continue
        if message.role == "assistant":
            turns.append({"role": "assistant", "content": _assistant_content(message, where, pid)})
            merging = False
            continue
        if message.role == "tool":
            if not message.tool_call_id:
                raise ProviderInvalidRequest(
                    f"provider {pid!r}: {where} (tool) has no tool_call_id", provider=pid
                )
            blocks: list[dict[str, Any]] = [
                {
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id,
                    "content": text_of(message, where, pid),
                }
            ]
        else:
            content = _user_content(message, where, pid)
            if not merging:
                turns.append({"role": "user", "content": content})
                continue
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if merging:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": "user", "content": blocks})
            merging = True
    return "\n\n".join(system), turns


def _user_content(message: ChatMessage, where: str, pid: str) -> str | list[dict[str, Any]]:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(image_url(part, where, pid)))
        else:
            raise unsupported_part(part, where, pid)
    return blocks


def _image(url: str) -> dict[str, Any]:
    inline = data_url(url)
    if inline is not None:
        source = {"type": "base64", "media_type": inline.mime, "data": inline.data}
    else:
        source = {"type": "url", "url": url}
    return {"type": "image", "source": source}


def _assistant_content(message: ChatMessage, where: str, pid: str) -> str | list[dict[str, Any]]:
    text = text_of(message, where, pid)
    if not message.tool_calls:
        return text
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for call in message.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": arguments_object(call.function.arguments, where, pid),
            }
        )
    return blocks


def _tool(tool: dict[str, Any], index: int, pid: str) -> dict[str, Any]:
    function = tool.get("function")
    if (
        tool.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise ProviderInvalidRequest(
            f"provider {pid!r}: tool {index} is not a function tool with a name", provider=pid
        )
    entry: dict[str, Any] = {
        "name": function["name"],
        # Anthropic requires an input schema; a function without parameters takes none.
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if isinstance(function.get("description"), str):
        entry["description"] = function["description"]
    if function.get("strict") is True:
        entry["strict"] = True
    return entry


def _tool_choice(choice: object, parallel: object, pid: str) -> dict[str, Any] | None:
    mapped: dict[str, Any] | None
    if choice is None:
        mapped = None
    elif isinstance(choice, str) and choice in _TOOL_CHOICE:
        mapped = {"type": _TOOL_CHOICE[choice]}
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        mapped = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise ProviderInvalidRequest(
            f"provider {pid!r}: tool_choice must be auto, required, none or a function",
            provider=pid,
        )
    if parallel is False and (mapped is None or mapped["type"] != "none"):
        mapped = {**(mapped or {"type": "auto"}), "disable_parallel_tool_use": True}
    return mapped


def _output_config(response_format: dict[str, Any] | None, pid: str) -> dict[str, Any] | None:
    if response_format is None or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ProviderInvalidRequest(
                f"provider {pid!r}: response_format json_schema has no schema object",
                provider=pid,
            )
        return {"format": {"type": "json_schema", "schema": schema}}
    if kind == "json_object":
        # Anthropic has no schema-less JSON mode: structured outputs always take a schema, and
        # "any object" is the schema that says what json_object promises.
        return {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    raise ProviderInvalidRequest(
        f"provider {pid!r}: response_format type {safe_code(kind, None)!r} is not supported",
        provider=pid,
    )
