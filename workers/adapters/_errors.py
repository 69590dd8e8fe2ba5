"""Error handling every HTTP adapter shares.

``Guard`` is the one place where a failure that is not already a ``ProviderError`` becomes one::

    httpx.TimeoutException   ProviderTimeout        "provider 'x' timed out (ReadTimeout)"
    httpx.DecodingError      ProviderProtocolError  "... response body could not be decoded ..."
    other httpx errors       ProviderServerError    "provider 'x': connection failed: ConnectError"
    anything else            ProviderProtocolError  "provider 'x': unexpected KeyError while ..."

Only the exception's class is named: its text may carry a header, the key or the prompt.
``BaseException``s that are not ``Exception`` (``CancelledError``, ``GeneratorExit``) pass
untouched, so cancelling a call or closing a stream early is never reported as a failure.

The rest are small helpers for the status mappings each adapter keeps: the provider's message
made safe to log (``clean``), an error code kept only when it looks like one (``safe_code``),
and ``retry-after`` headers (``parse_retry_after``).
"""

from __future__ import annotations

import email.utils
import math
import re
from datetime import UTC, datetime
from types import TracebackType

import httpx

from broker.core.errors import (
    ProviderError,
    ProviderProtocolError,
    ProviderServerError,
    ProviderTimeout,
)

__all__ = ["Guard", "clean", "parse_retry_after", "safe_code"]

_MAX_PROVIDER_MESSAGE = 500
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Guard:
    """``with Guard(provider_id):`` lets ``ProviderError``s through and translates the rest."""

    def __init__(self, provider_id: str) -> None:
        self.provider_id = provider_id

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, ProviderError):
            raise translate(exc, self.provider_id) from exc


def translate(exc: Exception, pid: str) -> ProviderError:
    """The ``ProviderError`` for a failure raised while calling provider ``pid``."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"provider {pid!r} timed out ({name})", provider=pid)
    if isinstance(exc, httpx.DecodingError):
        return ProviderProtocolError(
            f"provider {pid!r}: response body could not be decoded ({name})", provider=pid
        )
    if isinstance(exc, httpx.RequestError):
        return ProviderServerError(f"provider {pid!r}: connection failed: {name}", provider=pid)
    return ProviderProtocolError(
        f"provider {pid!r}: unexpected {name} while handling the call", provider=pid
    )


def clean(message: object, key: str | None) -> str | None:
    """The provider's message on one line, trimmed, with our key redacted; ``None`` if empty."""
    if not isinstance(message, str):
        return None
    if key:
        message = message.replace(key, "[redacted]")
    message = " ".join(message.split())
    if len(message) > _MAX_PROVIDER_MESSAGE:
        message = message[: _MAX_PROVIDER_MESSAGE - 1] + "…"
    return message or None


def safe_code(code: object, key: str | None) -> str | None:
    """An error code or type, kept only when it is identifier-shaped and holds no key."""
    if not isinstance(code, str) or not _IDENTIFIER.match(code):
        return None
    if key and key in code:
        return None
    return code


def parse_retry_after(headers: httpx.Headers, now: datetime | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI's, in ms) or ``retry-after`` (seconds or
    an HTTP-date, RFC 9110 §10.2.3); ``None`` when absent or malformed. A past date gives 0."""
    ms = _non_negative(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = _non_negative(raw)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _non_negative(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
