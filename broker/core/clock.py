"""The one clock: timezone-aware UTC, so timestamps compare across hosts and serialise alike."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["elapsed_ms", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def elapsed_ms(start: datetime | None, end: datetime) -> float | None:
    """Milliseconds from ``start`` to ``end`` (None when the start is unknown)."""
    return None if start is None else round((end - start).total_seconds() * 1000, 3)
