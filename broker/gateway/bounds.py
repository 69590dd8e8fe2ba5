"""What a request body may hold beyond its schema: JSON that every later hop can encode again.
Python's JSON reader takes lone surrogates (``"\\ud800"``) and integers of any size, and a
schema cannot bound the nesting of free-form fields (``metadata``, ``tools``); each would fail
later, in a hop that can only call it a bug. Refused at the door instead, by name."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_DEPTH", "check_json"]

MAX_DEPTH = 64
"""Nesting allowed in a body (pydantic stops encoding at 255 and RabbitMQ's readers sooner)."""
_INT64 = (-(2**63), 2**64 - 1)


def check_json(value: Any) -> None:
    """Raise ``ValueError`` naming the first part of ``value`` no hop could encode."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "body")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, dict):
            if depth >= MAX_DEPTH:
                raise ValueError(f"{where}: nested more than {MAX_DEPTH} levels deep")
            for key, child in item.items():
                _text(key, where)
                stack.append((child, depth + 1, f"{where}.{key}"))
        elif isinstance(item, list):
            if depth >= MAX_DEPTH:
                raise ValueError(f"{where}: nested more than {MAX_DEPTH} levels deep")
            stack.extend((child, depth + 1, f"{where}.{i}") for i, child in enumerate(item))
        elif isinstance(item, str):
            _text(item, where)
        elif isinstance(item, int) and not _INT64[0] <= item <= _INT64[1]:
            raise ValueError(f"{where}: the integer is out of the 64-bit range")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where}: NaN and infinities are not JSON")


def _text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{where}: a lone surrogate is not text (not valid UTF-8)") from None
