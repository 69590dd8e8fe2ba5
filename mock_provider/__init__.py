"""Switchyard's mock LLM provider: an HTTP server speaking the providers' own APIs.

Answers are deterministic (see ``mock_provider.answers``); latency, rate limits, server errors
and other faults are configurable at start and at run time under ``/_mock/``.
"""

from __future__ import annotations

from mock_provider.answers import (
    answer_text,
    count_tokens,
    expected_completion,
    expected_tool_call,
    prompt_tokens,
)
from mock_provider.app import create_app, run
from mock_provider.control import FAULT_KINDS, FailNext, MockState
from mock_provider.settings import MockSettings

__all__ = [
    "FAULT_KINDS",
    "FailNext",
    "MockSettings",
    "MockState",
    "answer_text",
    "count_tokens",
    "create_app",
    "expected_completion",
    "expected_tool_call",
    "prompt_tokens",
    "run",
]
