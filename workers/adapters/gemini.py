"""The adapter for Google's Gemini API ``generateContent`` (provider type ``gemini``).

Follows:

- https://ai.google.dev/api/generate-content (``generateContent``, ``streamGenerateContent``,
  ``GenerationConfig``, ``GenerateContentResponse``, ``FinishReason``, ``UsageMetadata``)
- https://ai.google.dev/api/caching#Content (``Content`` / ``Part``: ``text``, ``inlineData``,
  ``fileData``, ``functionCall``, ``functionResponse``)
- https://ai.google.dev/gemini-api/docs/function-calling (``tools.functionDeclarations``,
  ``toolConfig.functionCallingConfig`` modes AUTO / ANY / NONE, ``allowedFunctionNames``)
- https://ai.google.dev/gemini-api/docs/structured-output (``responseMimeType``,
  ``responseJsonSchema``)
- https://ai.google.dev/gemini-api/docs/text-generation#streaming (``?alt=sse``: each ``data:``
  is a whole ``GenerateContentResponse``)
- https://ai.google.dev/gemini-api/docs/troubleshooting (status codes) and
  https://cloud.google.com/apis/design/errors (``{"error": {"code", "message", "status",
  "details"}}``, ``google.rpc.RetryInfo``, ``google.rpc.ErrorInfo``)
- googleapis/python-genai ``google/genai/types.py`` (``GenerateContentConfig``,
  ``FunctionDeclaration``, ``FinishReason``)

Request: see ``workers/adapters/_gemini_request.py``.

Response::

    candidates[0] text parts       message.content, joined (thought summaries left out)
    functionCall parts             tool_calls: id = the part's id, else call_<ordinal>;
                                   arguments = JSON text of args
    finishReason                   STOP → stop (tool_calls when it called functions);
                                   MAX_TOKENS → length; SAFETY, RECITATION, BLOCKLIST,
                                   PROHIBITED_CONTENT, SPII, IMAGE_SAFETY, IMAGE_PROHIBITED_CONTENT,
                                   IMAGE_RECITATION → ContentFiltered when nothing was produced,
                                   else content_filter; any other → its lower-case name
    no candidates + blockReason    ContentFiltered
    usageMetadata                  prompt = promptTokenCount + toolUsePromptTokenCount;
                                   completion = candidatesTokenCount + thoughtsTokenCount (thoughts
                                   are billed as output); total = totalTokenCount
    id / model                     responseId (else generated) / modelVersion (else the request's)

Status → error, by the ladder in ``_errors.py``::

    429 RESOURCE_EXHAUSTED         RateLimited (retry_after from RetryInfo.retryDelay, else the
                                   retry-after header)
    401, 403, 400 with an ErrorInfo reason API_KEY_*
                                   ProviderAuthentication (never repeats the provider's text)
    400, 404, 409, 413, 422        ProviderInvalidRequest (INVALID_ARGUMENT, FAILED_PRECONDITION,
                                   NOT_FOUND)
    408, 504 DEADLINE_EXCEEDED     ProviderTimeout
    500 INTERNAL, 503 UNAVAILABLE  ProviderServerError (and any other 5xx or unknown status)
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import Field

from broker.core.errors import ContentFiltered, ProviderError
from schemas import ChatCompletion, ChatCompletionChunk, ToolCall, Usage
from workers.adapters import _wire as wire
from workers.adapters._errors import Failure, Statuses, error_object, safe_code
from workers.adapters._gemini_request import generate_content_body
from workers.adapters._http import HTTPAdapter
from workers.adapters.base import ProviderRequest
from workers.streaming import sse_events

__all__ = ["GeminiAdapter"]

_FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"}
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")


class _FunctionCall(wire.Open):
    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    id: str | None = None


class _Part(wire.Open):
    text: str | None = None
    thought: bool | None = None
    functionCall: _FunctionCall | None = None


class _Content(wire.Open):
    parts: list[_Part] = Field(default_factory=list)
    role: str | None = None


class _Candidate(wire.Open):
    content: _Content | None = None
    finishReason: str | None = None


class _PromptFeedback(wire.Open):
    blockReason: str | None = None


class _UsageMetadata(wire.Open):
    promptTokenCount: int = Field(default=0, ge=0)
    candidatesTokenCount: int = Field(default=0, ge=0)
    thoughtsTokenCount: int = Field(default=0, ge=0)
    toolUsePromptTokenCount: int = Field(default=0, ge=0)
    cachedContentTokenCount: int | None = Field(default=None, ge=0)
    totalTokenCount: int | None = Field(default=None, ge=0)


class _Response(wire.Open):
    candidates: list[_Candidate] = Field(default_factory=list)
    promptFeedback: _PromptFeedback | None = None
    usageMetadata: _UsageMetadata | None = None
    modelVersion: str | None = None
    responseId: str | None = None


class GeminiAdapter(HTTPAdapter):
    """``POST {base_url}/models/{model}:generateContent`` (``:streamGenerateContent?alt=sse``);
    ``base_url`` includes the version (``https://generativelanguage.googleapis.com/v1beta``)."""

    statuses = Statuses(timeout=frozenset({408, 504}))

    def _url(self, request: ProviderRequest, *, stream: bool) -> str:
        model = quote(request.model.removeprefix("models/"), safe="")
        if stream:
            return f"{self.base}/models/{model}:streamGenerateContent?alt=sse"
        return f"{self.base}/models/{model}:generateContent"

    def _key_headers(self, key: str) -> dict[str, str]:
        return {"x-goog-api-key": key}

    def _body(self, request: ProviderRequest, *, stream: bool) -> dict[str, Any]:
        spec = self.model_spec(request.model)
        return generate_content_body(request, spec, self.provider.id)

    def _failure(self, data: object, status: int | None) -> Failure:
        if isinstance(data, list) and data:  # streamGenerateContent without alt=sse wraps it
            data = data[0]
        error = error_object(data)
        details = [d for d in error.get("details") or [] if isinstance(d, dict)]
        name, message = self._said(error, "status")
        code = error.get("code")
        failure = Failure(
            status,
            name,
            message,
            implied=code if isinstance(code, int) else 500,
            retry_after=_retry_delay(details),
        )
        if failure.effective == 400 and _key_rejected(details):
            return dataclasses.replace(failure, key_rejected=True)
        return failure

    # --- the response --------------------------------------------------------------------

    def _completion(self, data: dict[str, Any], request: ProviderRequest) -> ChatCompletion:
        pid = self.provider.id
        response = wire.validated(_Response, data, pid, "response")
        if not response.candidates:
            raise self._no_candidates(response)
        candidate = response.candidates[0]
        texts, calls = _read_parts(candidate)
        text = "".join(texts)
        finish = self._finish(candidate.finishReason, bool(text or calls), bool(calls))
        if response.usageMetadata is None:
            raise wire.protocol_error(pid, "response has no usageMetadata")
        return wire.completion(
            id=response.responseId or _new_id(),
            model=response.modelVersion or request.model,
            text=text,
            calls=calls,
            finish=finish,
            usage=_usage(response.usageMetadata),
        )

    def _no_candidates(self, response: _Response) -> ProviderError:
        pid = self.provider.id
        feedback = response.promptFeedback
        if feedback is not None and feedback.blockReason:
            reason = safe_code(feedback.blockReason, None) or "unknown"
            return ContentFiltered(
                f"provider {pid!r} blocked the prompt (blockReason {reason})", provider=pid
            )
        return wire.protocol_error(pid, "response has no candidates")

    def _finish(self, reason: str | None, produced: bool, called: bool) -> str | None:
        if reason in _FILTERED:
            return wire.filtered_finish(self.provider.id, produced, f"finishReason {reason}")
        if reason is None:
            return None
        if reason == "STOP" and called:
            return "tool_calls"
        return _FINISH.get(reason, reason.lower())

    async def _chunks(
        self, response: httpx.Response, request: ProviderRequest
    ) -> AsyncIterator[ChatCompletionChunk]:
        pid = self.provider.id
        out: wire.Chunks | None = None
        usage: _UsageMetadata | None = None
        calls = 0
        produced = finished = False
        async for event in sse_events(response):
            data = wire.json_object(event.data, pid, "stream event data")
            if "error" in data and "candidates" not in data:
                raise self._error(data)
            piece = wire.validated(_Response, data, pid, "stream chunk")
            if out is None:
                out = wire.Chunks(
                    piece.responseId or _new_id(), piece.modelVersion or request.model, wire.now()
                )
                yield out.role()
            usage = piece.usageMetadata or usage
            if not piece.candidates:
                if piece.promptFeedback is not None and piece.promptFeedback.blockReason:
                    raise self._no_candidates(piece)
                continue
            candidate = piece.candidates[0]
            for part in candidate.content.parts if candidate.content is not None else []:
                if part.functionCall is not None:
                    call = part.functionCall
                    produced = True
                    yield out.tool_call(
                        calls,
                        id=call.id or f"call_{calls}",
                        name=call.name,
                        arguments=wire.dumps(call.args),
                    )
                    calls += 1
                elif part.text and not part.thought:
                    produced = True
                    yield out.text(part.text)
            if candidate.finishReason is not None:
                finished = True
                yield out.finish(self._finish(candidate.finishReason, produced, calls > 0))
        if out is None or not finished:
            raise wire.ended_early(pid)
        if usage is None:
            raise wire.protocol_error(pid, "stream has no usageMetadata")
        yield out.usage(_usage(usage))


# --- response translation ----------------------------------------------------------------


def _read_parts(candidate: _Candidate) -> tuple[list[str], list[ToolCall]]:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for part in candidate.content.parts if candidate.content is not None else []:
        if part.functionCall is not None:
            call = part.functionCall
            calls.append(wire.tool_call(call.id or f"call_{len(calls)}", call.name, call.args))
        elif part.text is not None and not part.thought:
            texts.append(part.text)
    return texts, calls


def _usage(meta: _UsageMetadata) -> Usage:
    prompt = meta.promptTokenCount + meta.toolUsePromptTokenCount
    output = meta.candidatesTokenCount + meta.thoughtsTokenCount
    fields: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": meta.totalTokenCount
        if meta.totalTokenCount is not None
        else prompt + output,
    }
    if meta.cachedContentTokenCount is not None:
        fields["prompt_tokens_details"] = {"cached_tokens": meta.cachedContentTokenCount}
    if meta.thoughtsTokenCount:
        fields["completion_tokens_details"] = {"reasoning_tokens": meta.thoughtsTokenCount}
    return Usage.model_validate(fields)


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail's ``retryDelay`` ("30s", "1.5s")."""
    for item in details:
        if item.get("@type") == _RETRY_INFO and isinstance(item.get("retryDelay"), str):
            match = _DURATION.match(item["retryDelay"])
            if match:
                return float(match.group(1))
    return None


def _key_rejected(details: list[dict[str, Any]]) -> bool:
    """Gemini answers a bad key with 400 and an ``ErrorInfo`` reason like API_KEY_INVALID."""
    return any(
        item.get("@type") == _ERROR_INFO and str(item.get("reason", "")).startswith("API_KEY_")
        for item in details
    )


def _new_id() -> str:
    return f"gemini-{uuid.uuid4().hex}"
