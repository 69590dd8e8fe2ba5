"""Error handling every HTTP adapter shares.

``Guard`` is the one place where a failure that is not already a ``ProviderError`` becomes one::

    httpx.TimeoutException   ProviderTimeout        "provider 'x' timed out (ReadTimeout)"
    httpx.DecodingError      ProviderProtocolError  "... response body could not be decoded ..."
    other httpx errors       ProviderServerError    "provider 'x': connection failed: ConnectError"
    anything else            ProviderProtocolError  "provider 'x': unexpected KeyError while ..."

Only the exception's class is named: its text may carry a header, the key or the prompt.
``BaseException``s that are not ``Exception`` (``CancelledError``, ``GeneratorExit``) pass
untouched, so cancelling a call or closing a stream early is never reported as a failure.

``status_error`` is the one status → error ladder. Each adapter reads its provider's error body
into a ``Failure`` and names its ``Statuses``; the ladder is the same for all::

    429                          RateLimited (retry_after from the body, else the headers);
                                 QuotaExhausted when the provider says the quota is used up
    Statuses.auth                ProviderAuthentication (never repeats the provider's text);
                                 also a 400 whose body says the key was refused
    400, 404, 409, 413, 422      ProviderInvalidRequest; ContentFiltered when the provider says
                                 the request was filtered
    Statuses.timeout             ProviderTimeout
    5xx, any other status        ProviderServerError

The rest are small helpers: the provider's message made safe to log (``clean``), an error code
kept only when it looks like one (``safe_code``) and ``retry-after`` headers
(``parse_retry_after``).
"""

from __future__ import annotations

import email.utils
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx

from broker.core.errors import (
    ContentFiltered,
    ProviderAuthentication,
    ProviderError,
    ProviderInvalidRequest,
    ProviderProtocolError,
    ProviderServerError,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
)

__all__ = [
    "Failure",
    "Guard",
    "Statuses",
    "clean",
    "error_object",
    "parse_retry_after",
    "safe_code",
    "status_error",
]

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


# --- the status ladder ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statuses:
    """The statuses a provider documents for refused credentials, rejected requests and
    timeouts (its error guide); the defaults are OpenAI's."""

    auth: frozenset[int] = frozenset({401, 403})
    invalid: frozenset[int] = frozenset({400, 404, 409, 413, 422})
    timeout: frozenset[int] = frozenset({408})


@dataclass(frozen=True, slots=True)
class Failure:
    """What a provider said about a failed call, already safe to repeat in our message."""

    status: int | None  # the HTTP status; None for an error event inside a 200 stream
    name: str | None = None  # the provider's error code or type, as the message labels it
    message: str | None = None  # the provider's message, ``clean``ed
    implied: int = 500  # an error event's status, from its code or type
    retry_after: float | None = None  # from the body; None falls back to the headers
    out_of_quota: bool = False  # a 429 that no retry helps (OpenAI's insufficient_quota)
    filtered: bool = False  # a rejected request that was content-filtered
    key_rejected: bool = False  # the body says our key was refused, whatever the status

    @property
    def effective(self) -> int:
        return self.status if self.status is not None else self.implied

    @property
    def label(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "error event"
        return f"{where}, {self.name}" if self.name else where


def status_error(
    pid: str, failure: Failure, statuses: Statuses, headers: httpx.Headers | None = None
) -> ProviderError:
    """The typed error for a failed call to provider ``pid``; ``headers`` are the response's."""
    status, label = failure.effective, failure.label
    said = f" ({label}): {failure.message}" if failure.message else f" ({label})"
    if status == 429:
        if failure.out_of_quota:
            return QuotaExhausted(
                f"provider {pid!r} refused the call: the account's quota is used up{said}",
                provider=pid,
            )
        retry_after = failure.retry_after
        if retry_after is None and headers is not None:
            retry_after = parse_retry_after(headers)
        return RateLimited(
            f"provider {pid!r} rate limited the call{said}", provider=pid, retry_after=retry_after
        )
    if status in statuses.auth or failure.key_rejected:
        # The provider's text may echo part of the key; the label's name is code-shaped.
        return ProviderAuthentication(
            f"provider {pid!r} refused our credentials ({label})", provider=pid
        )
    if status in statuses.invalid:
        if failure.filtered:
            return ContentFiltered(f"provider {pid!r} filtered the request{said}", provider=pid)
        return ProviderInvalidRequest(f"provider {pid!r} rejected the request{said}", provider=pid)
    if status in statuses.timeout:
        return ProviderTimeout(f"provider {pid!r} timed out{said}", provider=pid)
    if status >= 500:
        return ProviderServerError(f"provider {pid!r} failed{said}", provider=pid)
    return ProviderServerError(
        f"provider {pid!r} answered with unexpected status{said}", provider=pid
    )


def error_object(data: object) -> dict[str, Any]:
    """The ``error`` object of a parsed error body; ``{}`` when there is none."""
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else {}


# --- the provider's words ------------------------------------------------------------------


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
