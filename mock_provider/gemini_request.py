"""Validation of a Gemini generateContent request, worded like Google's INVALID_ARGUMENT 400s.

Reference: https://ai.google.dev/api/generate-content. Google's JSON parser accepts camelCase and
snake_case field names alike, so both are read; unknown fields are rejected as the API does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mock_provider.answers import JsonFormat, ToolSpec
from mock_provider.normalize import Turn, normalize_gemini
from mock_provider.normalize import field as get
from mock_provider.validation import InvalidRequest, is_int, is_number

__all__ = ["GenerateRequest", "camel", "parse_generate_request"]

_REQUEST_FIELDS = frozenset(
    {
        "contents", "model", "systemInstruction", "tools", "toolConfig", "safetySettings",
        "generationConfig", "cachedContent", "labels",
    }
)  # fmt: skip
_CONFIG_FIELDS = frozenset(
    {
        "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
        "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK",
        "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
        "enableEnhancedCivicAnswers", "speechConfig", "thinkingConfig", "imageConfig",
        "mediaResolution",
    }
)  # fmt: skip
_DATA_FIELDS = (
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
)
_MIME_TYPES = ("text/plain", "application/json", "text/x.enum")
_MODES = ("MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED")
_MAX_STOPS = 5


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """The fields of a valid request that change the mock's answer."""

    model: str
    turns: list[Turn]
    max_tokens: int | None = None
    stops: list[str] = field(default_factory=list)
    json_format: JsonFormat = None
    tools: list[ToolSpec] = field(default_factory=list)
    choice: Literal["auto", "required", "none"] = "auto"
    allowed: list[str] = field(default_factory=list)
    sse: bool = False  # streamed as server-sent events (alt=sse), else as a JSON array


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _bad(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"* GenerateContentRequest.{param}: {problem}\n", param)


def _unknown(obj: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for key in obj:
        if camel(key) not in known:
            at = f" at '{where}'" if where else ""
            raise InvalidRequest(
                f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.',
                f"{where}.{key}" if where else key,
            )


def _check_part(part: object, where: str, role: str) -> Mapping[str, Any]:
    if not isinstance(part, Mapping):
        raise _bad(where, "part must be an object")
    present = [f for f in _DATA_FIELDS if get(part, f) is not None]
    if not present:
        raise _bad(f"{where}.data", "required oneof field 'data' must have one initialized field")
    if len(present) > 1:
        raise InvalidRequest(
            f"Invalid value at '{where}' (oneof), oneof field 'data' is already set. Cannot set "
            f"'{present[1]}'",
            where,
        )
    kind = present[0]
    value = get(part, kind)
    if kind == "text" and not isinstance(value, str):
        raise _bad(f"{where}.text", "must be a string")
    if kind == "inlineData" and not (
        isinstance(value, Mapping) and isinstance(get(value, "mimeType"), str) and value.get("data")
    ):
        raise _bad(f"{where}.inline_data", "inline data must have a mime type and data")
    if kind == "fileData" and not (
        isinstance(value, Mapping) and isinstance(get(value, "fileUri"), str)
    ):
        raise _bad(f"{where}.file_data.file_uri", "file_uri is required")
    if kind in ("functionCall", "functionResponse"):
        expected = "model" if kind == "functionCall" else "user"
        if role != expected:
            raise _bad(f"{where}.{kind}", f"{kind} parts belong in a '{expected}' turn")
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            raise _bad(f"{where}.{kind}.name", "Name cannot be empty.")
        payload = value.get("args" if kind == "functionCall" else "response")
        if payload is not None and not isinstance(payload, Mapping):
            raise _bad(f"{where}.{kind}", "must be a JSON object")
    return part


def _count(content: Mapping[str, Any], kind: str) -> int:
    return sum(1 for p in content["parts"] if get(p, kind) is not None)


def _check_contents(contents: object) -> list[Mapping[str, Any]]:
    if not isinstance(contents, list) or not contents:
        raise _bad("contents", "contents is not specified")
    checked: list[Mapping[str, Any]] = []
    for i, content in enumerate(contents):
        where = f"contents[{i}]"
        if not isinstance(content, Mapping):
            raise _bad(where, "content must be an object")
        role = content.get("role") or "user"
        if role not in ("user", "model"):
            raise InvalidRequest("Please use a valid role: user, model.", f"{where}.role")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise _bad(f"{where}.parts", "contents.parts must not be empty.")
        for j, part in enumerate(parts):
            _check_part(part, f"{where}.parts[{j}]", role)
        checked.append({**content, "role": role})
    for i, content in enumerate(checked):
        calls = _count(content, "functionCall")
        if not calls:
            continue
        before = checked[i - 1] if i else None
        if before is None or before["role"] != "user":
            raise InvalidRequest(
                "Please ensure that function call turn comes immediately after a user turn or "
                "after a function response turn.",
                f"contents[{i}]",
            )
        after = checked[i + 1] if i + 1 < len(checked) else None
        if after is not None and _count(after, "functionResponse") != calls:
            raise InvalidRequest(
                "Please ensure that the number of function response parts is equal to the number "
                "of function call parts of the function call turn.",
                f"contents[{i + 1}]",
            )
    return checked


def _check_system(value: object) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("parts"), list):
        raise _bad("system_instruction", "system_instruction must be a Content with parts")
    for j, part in enumerate(value["parts"]):
        if not isinstance(part, Mapping) or not isinstance(part.get("text"), str):
            raise _bad(f"system_instruction.parts[{j}]", "system instruction parts must be text")
    return value


def _tools(value: object) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("tools", "tools must be a list")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(value):
        if not isinstance(tool, Mapping):
            raise _bad(f"tools[{i}]", "tool must be an object")
        declarations = get(tool, "functionDeclarations") or []
        if not isinstance(declarations, list):
            raise _bad(f"tools[{i}].function_declarations", "must be a list")
        for j, decl in enumerate(declarations):
            where = f"tools[{i}].function_declarations[{j}]"
            if not isinstance(decl, Mapping) or not isinstance(decl.get("name"), str):
                raise _bad(f"{where}.name", "Name cannot be empty.")
            schema = decl.get("parameters")
            if schema is None:
                schema = get(decl, "parametersJsonSchema")
            if schema is not None and not isinstance(schema, Mapping):
                raise _bad(f"{where}.parameters", "parameters must be a schema object")
            specs.append(ToolSpec(decl["name"], schema))
    return specs


def _choice(
    value: object, tools: list[ToolSpec]
) -> tuple[Literal["auto", "required", "none"], list[str]]:
    if value is None:
        return "auto", []
    config = get(value, "functionCallingConfig") if isinstance(value, Mapping) else None
    if config is None:
        return "auto", []
    if not isinstance(config, Mapping):
        raise _bad("tool_config.function_calling_config", "must be an object")
    mode = config.get("mode") or "AUTO"
    if mode not in _MODES:
        raise InvalidRequest(
            f"Invalid value at 'tool_config.function_calling_config.mode' "
            f"(type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode)"
            f', "{mode}"',
            "tool_config.function_calling_config.mode",
        )
    allowed = get(config, "allowedFunctionNames") or []
    if allowed:
        if mode not in ("ANY", "VALIDATED"):
            raise _bad(
                "tool_config.function_calling_config.allowed_function_names",
                "allowed_function_names may only be set when mode is ANY.",
            )
        unknown = [n for n in allowed if n not in [t.name for t in tools]]
        if unknown:
            raise _bad(
                "tool_config.function_calling_config.allowed_function_names",
                f"function '{unknown[0]}' is not declared in tools.",
            )
    if mode == "NONE":
        return "none", []
    return ("required" if mode == "ANY" else "auto"), list(allowed)


def _number(config: Mapping[str, Any], key: str, low: float, high: float) -> None:
    value = get(config, key)
    if value is not None and (not is_number(value) or not low <= value <= high):
        raise _bad(f"generation_config.{key}", f"{key} must be between {low:g} and {high:g}")


def _config(value: object) -> tuple[int | None, list[str], JsonFormat]:
    if value is None:
        return None, [], None
    if not isinstance(value, Mapping):
        raise _bad("generation_config", "generation_config must be an object")
    _unknown(value, _CONFIG_FIELDS, "generation_config")
    max_tokens = get(value, "maxOutputTokens")
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
        raise _bad("generation_config.max_output_tokens", "max_output_tokens must be positive.")
    _number(value, "temperature", 0, 2)
    _number(value, "topP", 0, 1)
    top_k = get(value, "topK")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise _bad("generation_config.top_k", "top_k must be positive.")
    count = get(value, "candidateCount")
    if count is not None and count != 1:
        raise _bad("generation_config.candidate_count", "The mock supports only 1 candidate.")
    stops = get(value, "stopSequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("generation_config.stop_sequences", "stop_sequences must be strings.")
    if len(stops) > _MAX_STOPS:
        raise _bad(
            "generation_config.stop_sequences",
            f"the number of stop sequences must not exceed {_MAX_STOPS}",
        )
    mime = get(value, "responseMimeType") or "text/plain"
    if mime not in _MIME_TYPES:
        raise _bad(
            "generation_config.response_mime_type",
            "allowed mimetypes are `text/plain`, `application/json` and `text/x.enum`.",
        )
    schema = get(value, "responseJsonSchema") or get(value, "responseSchema")
    if schema is not None and not isinstance(schema, Mapping):
        raise _bad("generation_config.response_schema", "response_schema must be an object")
    if schema is not None and mime == "text/plain":
        raise _bad(
            "generation_config.response_mime_type",
            "response_mime_type must be set to `application/json` or `text/x.enum` when "
            "response_schema is set.",
        )
    json_format: JsonFormat = None
    if mime == "application/json":
        json_format = schema if schema is not None else "object"
    return max_tokens, list(stops), json_format


def parse_generate_request(model: str, body: object, *, sse: bool = False) -> GenerateRequest:
    """Check a decoded JSON body; raise ``InvalidRequest`` on the first problem."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("Invalid JSON payload received. Expected an object.", None)
    _unknown(body, _REQUEST_FIELDS, "")
    contents = _check_contents(body.get("contents"))
    system = _check_system(get(body, "systemInstruction"))
    safety = get(body, "safetySettings")
    if safety is not None and (
        not isinstance(safety, list) or not all(isinstance(s, Mapping) for s in safety)
    ):
        raise _bad("safety_settings", "safety_settings must be a list of objects")
    tools = _tools(body.get("tools"))
    choice, allowed = _choice(get(body, "toolConfig"), tools)
    max_tokens, stops, json_format = _config(get(body, "generationConfig"))
    return GenerateRequest(
        model=model,
        turns=normalize_gemini(system, contents),
        max_tokens=max_tokens,
        stops=stops,
        json_format=json_format,
        tools=tools,
        choice=choice,
        allowed=allowed,
        sse=sse,
    )
