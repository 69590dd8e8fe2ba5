"""Switchyard's mock LLM provider: an HTTP server speaking the providers' own APIs (OpenAI Chat
Completions, Anthropic Messages, Gemini generateContent).

Answers are deterministic (see ``mock_provider.answers``); latency, rate limits, server errors
and other faults are configurable at start and at run time under ``/_mock/``.
"""

from __future__ import annotations

from mock_provider.answers import (
    BLOCKED_MARKER,
    SAFETY_MARKER,
    Reply,
    answer_text,
    count_tokens,
    expected_completion,
    expected_tool_call,
    normalize_anthropic,
    normalize_gemini,
    normalize_openai,
    prompt_tokens,
    reply,
    turns_answer_text,
    turns_prompt_tokens,
)
from mock_provider.app import create_app, run
from mock_provider.control import FAULT_KINDS, FailNext, MockState
from mock_provider.settings import MockSettings

__all__ = [
    "BLOCKED_MARKER",
    "FAULT_KINDS",
    "SAFETY_MARKER",
    "FailNext",
    "MockSettings",
    "MockState",
    "Reply",
    "answer_text",
    "count_tokens",
    "create_app",
    "expected_completion",
    "expected_tool_call",
    "normalize_anthropic",
    "normalize_gemini",
    "normalize_openai",
    "prompt_tokens",
    "reply",
    "run",
    "turns_answer_text",
    "turns_prompt_tokens",
]
