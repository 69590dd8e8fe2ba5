"""The Gemini ``generateContent`` request for a canonical (OpenAI chat) request.

Follows https://ai.google.dev/api/generate-content (``GenerateContentRequest``,
``GenerationConfig``), https://ai.google.dev/api/caching#Content (``Content`` / ``Part``),
https://ai.google.dev/gemini-api/docs/function-calling (``functionDeclarations``,
``functionCallingConfig``) and https://ai.google.dev/gemini-api/docs/structured-output
(``responseMimeType``, ``responseJsonSchema``); googleapis/python-genai ``types.py``
(``GenerateContentConfig``, ``FunctionDeclaration``).

Request (canonical OpenAI → Gemini)::

    system / developer messages    systemInstruction {"parts": [{"text": joined by blank lines}]}
    user                           role user; text → {"text"}; image data: URL → inlineData;
                                   http(s) URL → fileData (mimeType from the extension, else
                                   image/jpeg)
    assistant                      role model; text part + {"functionCall": {"name", "args"}}
    tool messages                  role user {"functionResponse": {"name" (of the call with that
                                   id), "response" (the JSON object, else {"content": text})}};
                                   consecutive ones share one user turn
    generationConfig               maxOutputTokens (job's, else the scheduler's reserved cap,
                                   else ModelSpec's, else omitted),
                                   temperature, topP, stopSequences, seed, presencePenalty,
                                   frequencyPenalty, topK; json_object → responseMimeType
                                   application/json; json_schema → that + responseJsonSchema
    tools / tool_choice            [{"functionDeclarations": [...]}]; auto → AUTO, required →
                                   ANY, none → NONE, a function → ANY + allowedFunctionNames
    n > 1                          refused (one candidate is read)
    any other parameter            refused by name (InvalidRequest): Gemini has no place for it

A job Gemini cannot express raises ProviderInvalidRequest naming the message by position.
"""

from __future__ import annotations

import json
import mimetypes
from typing import Any
from urllib.parse import urlparse

from broker.core.config import ModelSpec
from broker.core.errors import ProviderInvalidRequest
from schemas import ChatMessage
from workers.adapters import _canonical as canonical
from workers.adapters.base import ProviderRequest

__all__ = ["generate_content_body"]

_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
_CONFIG_PARAMS = {  # pass-through OpenAI name → GenerationConfig name, sent as given
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "top_k": "topK",
}


def generate_content_body(
    request: ProviderRequest, spec: ModelSpec | None, pid: str
) -> dict[str, Any]:
    """The generateContent body for ``request``; ``spec`` is the model's config, if any."""
    params = request.params
    extra = params.model_extra or {}
    canonical.one_choice(params, pid, "one candidate is read")
    canonical.refuse_untranslated(params, frozenset({"seed", *_CONFIG_PARAMS}), pid)
    system, contents = _contents(request.messages, pid)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config: dict[str, Any] = {}
    limit = canonical.output_cap(request, spec)
    if limit is not None:
        config["maxOutputTokens"] = limit
    config.update(canonical.sampling(params, top_p="topP", stop="stopSequences"))
    if params.seed is not None:
        config["seed"] = params.seed
    for name, gemini_name in _CONFIG_PARAMS.items():
        if extra.get(name) is not None:
            config[gemini_name] = extra[name]
    config.update(_response_format(params.response_format, pid))
    if config:
        body["generationConfig"] = config
    if params.tools:
        declarations = [_declaration(tool, i, pid) for i, tool in enumerate(params.tools)]
        body["tools"] = [{"functionDeclarations": declarations}]
        if params.tool_choice is not None:
            body["toolConfig"] = {"functionCallingConfig": _calling(params.tool_choice, pid)}
    return body


def _contents(messages: list[ChatMessage], pid: str) -> tuple[str, list[dict[str, Any]]]:
    """The system instruction's text and the conversation's ``contents``."""
    system, rest = canonical.split_system(messages, pid)
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id → function name, for the functionResponse
    answering = False  # the last content is a user turn of function responses
    for where, message in rest:
        if message.role == "tool":
            part = _function_response(message, names, where, pid)
            if answering:
                contents[-1]["parts"].append(part)
            else:
                contents.append({"role": "user", "parts": [part]})
                answering = True
            continue
        answering = False
        if message.role == "assistant":
            parts = _model_parts(message, names, where, pid)
            if parts:  # an empty assistant turn carries nothing Gemini would accept
                contents.append({"role": "model", "parts": parts})
        else:
            contents.append({"role": "user", "parts": _user_parts(message, where, pid)})
    return system, contents


def _user_parts(message: ChatMessage, where: str, pid: str) -> list[dict[str, Any]]:
    content = message.content
    if content is None or isinstance(content, str):
        return [{"text": content or ""}]
    return canonical.content_parts(
        content, where, pid, text=lambda text: {"text": text}, image=_image
    )


def _image(url: str) -> dict[str, Any]:
    inline = canonical.data_url(url)
    if inline is not None:
        return {"inlineData": {"mimeType": inline.mime, "data": inline.data}}
    mime = mimetypes.guess_type(urlparse(url).path)[0] or "image/jpeg"
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _model_parts(
    message: ChatMessage, names: dict[str, str], where: str, pid: str
) -> list[dict[str, Any]]:
    text = canonical.text_of(message, where, pid)
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    for call in message.tool_calls or []:
        names[call.id] = call.function.name
        args = canonical.arguments_object(call.function.arguments, where, pid)
        parts.append({"functionCall": {"name": call.function.name, "args": args}})
    return parts


def _function_response(
    message: ChatMessage, names: dict[str, str], where: str, pid: str
) -> dict[str, Any]:
    name = names.get(message.tool_call_id or "")
    if name is None:
        raise ProviderInvalidRequest(
            f"provider {pid!r}: {where} (tool) answers no earlier tool call", provider=pid
        )
    text = canonical.text_of(message, where, pid)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    response = parsed if isinstance(parsed, dict) else {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


def _response_format(response_format: dict[str, Any] | None, pid: str) -> dict[str, Any]:
    wanted = canonical.json_output(response_format, pid)
    if wanted is None:
        return {}
    if wanted.schema is None:
        return {"responseMimeType": "application/json"}
    # responseJsonSchema takes JSON Schema as OpenAI clients write it (lower-case types,
    # additionalProperties, $defs/$ref, anyOf); responseSchema takes only the OpenAPI 3.0
    # subset (upper-case types, no additionalProperties), which would reject many of them.
    return {"responseMimeType": "application/json", "responseJsonSchema": wanted.schema}


def _declaration(tool: dict[str, Any], index: int, pid: str) -> dict[str, Any]:
    function = canonical.function_of(tool, index, pid)
    declaration: dict[str, Any] = {"name": function["name"]}
    if isinstance(function.get("description"), str):
        declaration["description"] = function["description"]
    if function.get("parameters"):
        declaration["parameters"] = function["parameters"]
    return declaration


def _calling(choice: str | dict[str, Any], pid: str) -> dict[str, Any]:
    mode, name = canonical.forced_tool(choice, pid)
    if name is not None:
        return {"mode": "ANY", "allowedFunctionNames": [name]}
    return {"mode": _MODES[mode]}
