"""Parts of the providers file besides providers and models: time zones, discount windows, free
tiers, virtual keys and their budgets, task routes and alerts; ``broker.core.config`` re-exports
all.

Times of day are ``"HH:MM"`` in a named IANA zone (``Europe/Paris``), never a UTC offset, so a
window stays put across daylight-saving changes.
"""

from __future__ import annotations

import fnmatch
import re
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, Field, HttpUrl, field_validator, model_validator

from broker.core.strict import StrictModel

__all__ = [
    "Alerts",
    "Budgets",
    "ConsumerConfig",
    "Discount",
    "FreeTier",
    "KeyConfig",
    "Policy",
    "Reset",
    "TaskRoute",
    "TimeZoneName",
    "zone",
]

Policy = Literal["free_first", "cheapest", "fastest", "weighted", "round_robin", "priority"]
"""How a job's candidates are ordered (see ``broker.scheduler.routing``)."""


def zone(name: str) -> ZoneInfo:
    """The ``ZoneInfo`` for an IANA name; ``ValueError`` naming it if there is none."""
    try:
        return ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError (a KeyError), or ValueError for a malformed name
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name like 'Europe/Paris')"
        ) from None


def _check_zone(name: str) -> str:
    zone(name)
    return name


TimeZoneName = Annotated[str, AfterValidator(_check_zone)]
"""An IANA time zone name, checked against the zone database at load."""

_HH_MM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def _clock_time(text: str) -> str:
    if not _HH_MM.match(text):
        raise ValueError(f"{text!r} is not a time of day as HH:MM (00:00 to 23:59)")
    return text


ClockTime = Annotated[str, AfterValidator(_clock_time)]


class Discount(StrictModel):
    """A price multiplier during a daily window ``[start, end)`` in ``timezone``, for off-peak
    prices; ``end`` before ``start`` wraps midnight, ``start == end`` is the whole day."""

    start: ClockTime
    end: ClockTime
    timezone: TimeZoneName | None = Field(
        default=None, description="Default: the file's top-level timezone."
    )
    # 0 = Monday; the day a window *starts*: with [4], 22:00-06:00 covers Friday 22:00 to
    # Saturday 06:00.
    weekdays: list[Annotated[int, Field(ge=0, le=6)]] | None = Field(default=None, min_length=1)
    multiplier: Decimal = Field(gt=0, le=1, description="Price factor, 0.5 = half price.")

    def _bounds(self) -> tuple[time, time]:
        return time.fromisoformat(self.start), time.fromisoformat(self.end)

    def contains(self, at: datetime, default_zone: ZoneInfo) -> bool:
        """Whether the aware datetime ``at`` falls inside this window."""
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("a discount window needs an aware datetime")
        local = at.astimezone(zone(self.timezone) if self.timezone else default_zone)
        start, end = self._bounds()
        clock = local.time().replace(tzinfo=None)
        if start < end:
            opened = local if start <= clock < end else None
        elif clock >= start:
            opened = local  # started today (or all day when start == end)
        elif clock < end:
            opened = local - timedelta(days=1)  # started yesterday evening
        else:
            opened = None
        return opened is not None and (self.weekdays is None or opened.weekday() in self.weekdays)

    def next_start(self, after: datetime, default_zone: ZoneInfo) -> datetime | None:
        """When this window next opens after ``after`` (within a week), in UTC."""
        tz = zone(self.timezone) if self.timezone else default_zone
        local = after.astimezone(tz)
        start, _ = self._bounds()
        for days in range(8):
            day = local.date() + timedelta(days=days)
            if self.weekdays is not None and day.weekday() not in self.weekdays:
                continue
            opens = datetime.combine(day, start, tzinfo=tz)
            if opens > after:
                return opens.astimezone(UTC)
        return None

    def describe(self, default_zone: str = "UTC") -> str:
        """``"0.5 until 06:00 Asia/Shanghai"``."""
        return f"{self.multiplier.normalize()} until {self.end} {self.timezone or default_zone}"


class Reset(StrictModel):
    """When day and month windows of a free tier begin (minute and hour windows are UTC-aligned)."""

    timezone: TimeZoneName = "UTC"
    hour: int = Field(default=0, ge=0, le=23)


class FreeTier(StrictModel):
    """A provider's free quota; calls within it cost nothing. At least one limit is set."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    requests_per_day: int | None = Field(default=None, ge=1)
    requests_per_month: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)
    tokens_per_month: int | None = Field(default=None, ge=1)
    reset: Reset = Field(default_factory=Reset)

    @model_validator(mode="after")
    def _has_a_limit(self) -> FreeTier:
        if all(value is None for name, value in self if name != "reset"):
            raise ValueError("a free tier needs at least one limit (requests_per_day, ...)")
        return self


class Budgets(StrictModel):
    """Spending caps per calendar period (in the file's timezone); unset means unlimited."""

    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_week: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)
    usd_per_day: Decimal | None = Field(default=None, ge=0)
    usd_per_week: Decimal | None = Field(default=None, ge=0)
    usd_per_month: Decimal | None = Field(default=None, ge=0)


class ConsumerConfig(StrictModel):
    """A team or application; its budgets are shared by all of its keys."""

    budgets: Budgets = Field(default_factory=Budgets)


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_GLOB = re.compile(r"[*?\[]")


class KeyConfig(StrictModel):
    """A virtual key. Only its SHA-256 is stored: ``printf %s "$KEY" | sha256sum``."""

    id: str = Field(min_length=1, max_length=128)
    key_sha256: str
    consumer: str | None = None
    tags: list[str] = Field(default_factory=list)
    scopes: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Public model names or glob patterns (claude-*) this key may use.",
    )
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    budgets: Budgets | None = None

    @field_validator("key_sha256", mode="before")
    @classmethod
    def _hex_digest(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            if not _SHA256_HEX.match(value):
                raise ValueError(
                    "must be the SHA-256 of the key as 64 hex characters (never the key itself)"
                )
        return value

    def allows(self, public_model: str) -> bool:
        """Whether a scope names ``public_model`` or a pattern matching it."""
        return any(fnmatch.fnmatchcase(public_model, scope) for scope in self.scopes)

    def unknown_scopes(self, public_models: list[str]) -> list[str]:
        """Scopes that are plain names (no ``*?[``) of no known model: most likely typos."""
        return [s for s in self.scopes if not _GLOB.search(s) and s not in public_models]


class TaskRoute(StrictModel):
    """The public models that serve a task type, tried together under one policy."""

    models: list[str] = Field(min_length=1)
    policy: Policy | None = Field(default=None, description="Default: the top-level policy.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `coding: [gpt-4o, claude-haiku]` is short for `coding: {models: [...]}`.
        return {"models": data} if isinstance(data, list) else data


class Alerts(StrictModel):
    """Fractions of a limit or budget at which an alert fires (once per window)."""

    thresholds: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.8, 0.95]
    )
    webhook: HttpUrl | None = Field(
        default=None,
        description="Each alert is also POSTed here, signed (``webhooks``), as ``quota.alert``.",
    )

    @property
    def percents(self) -> list[int]:
        return [max(1, round(t * 100)) for t in self.thresholds]
