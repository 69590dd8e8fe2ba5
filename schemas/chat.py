"""OpenAI chat-completions shapes: Switchyard's canonical request and response form.

Follows https://platform.openai.com/docs/api-reference/chat (Create chat completion, The chat
completion object). Unknown fields are kept (``extra="allow"``): newer provider fields pass through.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_OUTPUT_TOKENS",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "Choice",
    "ChunkChoice",
    "ChunkDelta",
    "CompletionParams",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallFunction",
    "ToolCallFunctionDelta",
    "Usage",
]


MAX_OUTPUT_TOKENS = 10_000_000
"""Beyond any model's output: a larger cap is a mistake, not a request."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ToolCallFunction(_Open):
    name: str
    arguments: str = Field(description="JSON-encoded arguments, as OpenAI sends them.")


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Open):
    """One message; ``content`` is a string or a list of content parts (text, image_url, ...)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class CompletionParams(_Open):
    """Sampling and output parameters; anything not named here is passed through unchanged."""

    max_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False

    @property
    def own_max_tokens(self) -> int | None:
        """The job's own output cap: ``max_tokens``, else OpenAI's newer name for it,
        ``max_completion_tokens`` (passed through); None when it set neither. The scheduler
        reserves by it and the adapters send it, so both read it here."""
        if self.max_tokens is not None:
            return self.max_tokens
        extra = (self.model_extra or {}).get("max_completion_tokens")
        if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0:
            return extra
        return None

    @property
    def consumer(self) -> str | None:
        """The end user the caller named (OpenAI's ``user``, passed through; at most 256
        characters kept): cost reports group by it."""
        user = (self.model_extra or {}).get("user")
        return user[:256] if isinstance(user, str) and user else None


class Usage(_Open):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class Choice(_Open):
    index: int
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: Any | None = None


class ChatCompletion(_Open):
    """The ``chat.completion`` object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ToolCallFunctionDelta(_Open):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Open):
    """A piece of a tool call; pieces with the same ``index`` concatenate."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta | None = None


class ChunkDelta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    refusal: str | None = None


class ChunkChoice(_Open):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: Any | None = None


class ChatCompletionChunk(_Open):
    """The ``chat.completion.chunk`` object: Switchyard's one streaming chunk type, whatever
    the provider. The last chunk of a stream may have no choices and carry ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
