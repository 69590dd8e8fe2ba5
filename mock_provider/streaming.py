"""Helpers shared by the streaming responses of every API: chunking and SSE framing."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = [
    "ARG_CHARS_PER_CHUNK",
    "STREAM_ERROR_AFTER",
    "WORDS_PER_CHUNK",
    "arg_pieces",
    "compact",
    "sse",
    "stream_error_cut",
    "text_pieces",
]

WORDS_PER_CHUNK = 3
ARG_CHARS_PER_CHUNK = 16
STREAM_ERROR_AFTER = 2  # a "stream_error" stream breaks after this many content pieces


def text_pieces(text: str, words: int = WORDS_PER_CHUNK) -> list[str]:
    """Split into runs of a few words; joining them gives back ``text`` exactly."""
    tokens = re.findall(r"\S+\s*|\s+", text)
    return ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]


def arg_pieces(arguments: str, step: int = ARG_CHARS_PER_CHUNK) -> list[str]:
    """Split a tool call's JSON arguments into fixed-size slices."""
    return [arguments[i : i + step] for i in range(0, len(arguments), step)]


def stream_error_cut(n_pieces: int) -> int:
    """How many of ``n_pieces`` a broken stream sends: a few, and never all of them."""
    return min(STREAM_ERROR_AFTER, max(n_pieces - 1, 0))


def compact(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def sse(data: Any, event: str | None = None, end: bytes = b"\n\n") -> bytes:
    """One server-sent event: an optional ``event:`` line, a ``data:`` line of compact JSON."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + compact(data) + end
