"""Calendar windows for quota limits: which minute, hour, day, week or month ``now`` falls in.

Minute and hour windows are aligned to the UTC epoch, so every process agrees on them whatever
its time zone. Day, week (Monday first) and month windows begin at ``reset_hour`` o'clock in the
limit's time zone, so a day is 23 or 25 hours long across a DST change. Window bounds are
returned in UTC: aware datetimes that share a ``ZoneInfo`` compare and subtract by wall clock,
which is wrong on exactly the days this module exists for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

__all__ = ["Period", "Window", "window"]


class Period(StrEnum):
    """The length of a limit's window."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Window:
    """One window: ``start <= t < end`` (both UTC) and an ``id`` stable enough for a Redis key."""

    start: datetime
    end: datetime
    id: str

    @property
    def expires_at(self) -> float:
        """The window's end as a Unix timestamp (what a quota bucket expires with)."""
        return self.end.timestamp()

    def seconds_left(self, now: datetime) -> float:
        return max(0.0, (self.end - now).total_seconds())


def window(period: Period | str, now: datetime, tz: ZoneInfo, reset_hour: int = 0) -> Window:
    """The window of ``period`` that contains ``now`` (an aware datetime)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    if not 0 <= reset_hour <= 23:
        raise ValueError(f"reset_hour must be 0..23, not {reset_hour}")
    period = Period(period)
    utc_now = now.astimezone(UTC)
    if period is Period.MINUTE or period is Period.HOUR:
        step = 60 if period is Period.MINUTE else 3600
        epoch = int(utc_now.timestamp()) // step * step
        start = datetime.fromtimestamp(epoch, UTC)
        fmt = "m%Y%m%d%H%M" if period is Period.MINUTE else "h%Y%m%d%H"
        return Window(start, start + timedelta(seconds=step), start.strftime(fmt))

    today = utc_now.astimezone(tz).date()
    if period is Period.DAY:
        first, prefix = today, "d"
    elif period is Period.WEEK:
        first, prefix = today - timedelta(days=today.weekday()), "w"
    else:
        first, prefix = today.replace(day=1), "mo"
    if _at(first, reset_hour, tz) > utc_now:  # before today's reset: still the previous window
        first = _previous(period, first)
    following = _next(period, first)
    label = first.strftime("%Y%m") if period is Period.MONTH else first.strftime("%Y%m%d")
    return Window(_at(first, reset_hour, tz), _at(following, reset_hour, tz), prefix + label)


def _at(day: date, hour: int, tz: ZoneInfo) -> datetime:
    # A reset hour inside a spring-forward gap resolves (fold=0) to the instant of the change;
    # inside a fall-back overlap, to its first occurrence.
    return datetime.combine(day, time(hour), tzinfo=tz).astimezone(UTC)


def _previous(period: Period, first: date) -> date:
    if period is Period.DAY:
        return first - timedelta(days=1)
    if period is Period.WEEK:
        return first - timedelta(days=7)
    return (first - timedelta(days=1)).replace(day=1)


def _next(period: Period, first: date) -> date:
    if period is Period.DAY:
        return first + timedelta(days=1)
    if period is Period.WEEK:
        return first + timedelta(days=7)
    return (first + timedelta(days=32)).replace(day=1)
