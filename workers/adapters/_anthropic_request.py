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
    max_tokens                      job's max_tokens / max_completion_tokens, else the cap the
                                    scheduler reserved (Route.output_cap), else the model's
                                    ModelSpec.max_tokens, else 4096 (Anthropic requires one)
    temperature, top_p              as is; stop → stop_sequences (a list)
    tools                           {"name", "description", "input_schema", "strict"?}
    tool_choice                     auto → auto, required → any, none → none, a function → tool;
                                    parallel_tool_calls false → disable_parallel_tool_use
    response_format                 json_schema → output_config.format json_schema;
                                    json_object → the same with schema {"type": "object"}
    top_k, thinking                 passed through (Anthropic's own); user → metadata.user_id
    n > 1, seed, penalties, logprobs, and any other parameter Anthropic has no place for:
                                    refused by name (InvalidRequest), never dropped

A job Anthropic cannot express raises ProviderInvalidRequest naming the message by position.
"""

from __future__ import annotations

from typing import Any

from broker.core.config import ModelSpec
from broker.core.errors import ProviderInvalidRequest
from schemas import ChatMessage
from workers.adapters import _canonical as canonical
from workers.adapters.base import ProviderRequest

__all__ = ["DEFAULT_MAX_TOKENS", "messages_body"]

DEFAULT_MAX_TOKENS = 4096

_TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none"}
_PASSED_THROUGH = ("top_k", "thinking")
_TRANSLATED = frozenset({*_PASSED_THROUGH, "parallel_tool_calls", "user"})


def messages_body(
    request: ProviderRequest, spec: ModelSpec | None, pid: str, *, stream: bool
) -> dict[str, Any]:
    """The Messages API body for ``request``; ``spec`` is the model's config, if any."""
    params = request.params
    extra = params.model_extra or {}
    canonical.one_choice(params, pid, "Anthropic returns one completion")
    canonical.refuse_untranslated(params, _TRANSLATED, pid)
    system, messages = _messages(request.messages, pid)
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": canonical.output_cap(request, spec) or DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        body["system"] = system
    body.update(canonical.sampling(params, top_p="top_p", stop="stop_sequences"))
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
    if extra.get("user") is not None:
        body["metadata"] = {"user_id": extra["user"]}
    if stream:
        body["stream"] = True
    return body


def _messages(messages: list[ChatMessage], pid: str) -> tuple[str, list[dict[str, Any]]]:
    """The top-level system text and the alternating user/assistant turns."""
    system, rest = canonical.split_system(messages, pid)
    turns: list[dict[str, Any]] = []
    merging = False  # the last turn is a user turn holding tool results: later user input joins it
    for where, message in rest:
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
                    "content": canonical.text_of(message, where, pid),
                }
            ]
        else:
            content = _user_content(message, where, pid)
            if not merging:
                turns.append({"role": "user", "content": content})
                continue
            blocks = [_text(content)] if isinstance(content, str) else content
        if merging:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": "user", "content": blocks})
            merging = True
    return system, turns


def _user_content(message: ChatMessage, where: str, pid: str) -> str | list[dict[str, Any]]:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    return canonical.content_parts(content, where, pid, text=_text, image=_image)


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image(url: str) -> dict[str, Any]:
    inline = canonical.data_url(url)
    if inline is not None:
        source = {"type": "base64", "media_type": inline.mime, "data": inline.data}
    else:
        source = {"type": "url", "url": url}
    return {"type": "image", "source": source}


def _assistant_content(message: ChatMessage, where: str, pid: str) -> str | list[dict[str, Any]]:
    text = canonical.text_of(message, where, pid)
    if not message.tool_calls:
        return text
    blocks: list[dict[str, Any]] = [_text(text)] if text else []
    for call in message.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": canonical.arguments_object(call.function.arguments, where, pid),
            }
        )
    return blocks


def _tool(tool: dict[str, Any], index: int, pid: str) -> dict[str, Any]:
    function = canonical.function_of(tool, index, pid)
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
    mapped: dict[str, Any] | None = None
    if choice is not None:
        mode, name = canonical.forced_tool(choice, pid)
        mapped = (
            {"type": "tool", "name": name} if name is not None else {"type": _TOOL_CHOICE[mode]}
        )
    if parallel is False and (mapped is None or mapped["type"] != "none"):
        mapped = {**(mapped or {"type": "auto"}), "disable_parallel_tool_use": True}
    return mapped


def _output_config(response_format: dict[str, Any] | None, pid: str) -> dict[str, Any] | None:
    wanted = canonical.json_output(response_format, pid)
    if wanted is None:
        return None
    # Anthropic has no schema-less JSON mode: structured outputs always take a schema, and
    # "any object" is the schema that says what json_object promises.
    schema = wanted.schema if wanted.schema is not None else {"type": "object"}
    return {"format": {"type": "json_schema", "schema": schema}}
