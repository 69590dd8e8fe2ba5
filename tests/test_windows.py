"""Calendar windows: boundaries per period, reset hours, DST days, and stable distinct ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from broker.core.windows import Period, Window, window

BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")  # +05:30: hour windows must still follow UTC


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def hours(w: Window) -> float:
    return (w.end - w.start).total_seconds() / 3600


def test_minute_and_hour_are_utc_epoch_aligned() -> None:
    now = datetime(2026, 11, 23, 17, 35, 37, 500_000, tzinfo=KOLKATA)  # 12:05:37.5 UTC
    minute = window(Period.MINUTE, now, KOLKATA)
    assert (minute.start, minute.end, minute.id) == (
        utc(2026, 11, 23, 12, 5),
        utc(2026, 11, 23, 12, 6),
        "m202611231205",
    )
    hour = window("hour", now, BERLIN, reset_hour=7)  # reset_hour has no say over hours
    assert (hour.start, hour.end, hour.id) == (
        utc(2026, 11, 23, 12),
        utc(2026, 11, 23, 13),
        "h2026112312",
    )
    assert window(Period.MINUTE, utc(2026, 11, 23, 12, 6), BERLIN).start == minute.end


def test_day_starts_at_midnight_in_the_zone() -> None:
    w = window(Period.DAY, utc(2026, 11, 23, 10), BERLIN)  # 11:00 in Berlin (CET, +1)
    assert (w.start, w.end, w.id) == (utc(2026, 11, 22, 23), utc(2026, 11, 23, 23), "d20261123")
    late = window(Period.DAY, utc(2026, 11, 23, 23, 30), BERLIN)  # 00:30 on the 24th in Berlin
    assert late.id == "d20261124"
    assert late.start == w.end


def test_reset_hour_moves_the_day_boundary() -> None:
    before = window(Period.DAY, datetime(2026, 11, 23, 5, 59, tzinfo=BERLIN), BERLIN, 6)
    at = window(Period.DAY, datetime(2026, 11, 23, 6, tzinfo=BERLIN), BERLIN, 6)
    assert before.id == "d20261122"
    assert before.end == at.start == utc(2026, 11, 23, 5)
    assert at.id == "d20261123"
    assert at.end == utc(2026, 11, 24, 5)


def test_week_starts_monday_at_reset_hour() -> None:
    wednesday = window(Period.WEEK, utc(2026, 11, 25, 12), BERLIN)
    assert (wednesday.start, wednesday.end, wednesday.id) == (
        utc(2026, 11, 22, 23),  # Monday 23 November, 00:00 in Berlin
        utc(2026, 11, 29, 23),
        "w20261123",
    )
    sunday = window(Period.WEEK, datetime(2026, 11, 29, 23, 59, tzinfo=BERLIN), BERLIN)
    assert sunday == wednesday
    early_monday = window(Period.WEEK, datetime(2026, 11, 30, 1, tzinfo=BERLIN), BERLIN, 2)
    assert early_monday.id == "w20261123"  # before Monday's 02:00 reset: last week still
    assert early_monday.end == utc(2026, 11, 30, 1)


def test_month_boundaries_and_year_end() -> None:
    w = window(Period.MONTH, utc(2026, 11, 15), BERLIN)
    assert (w.start, w.end, w.id) == (utc(2026, 10, 31, 23), utc(2026, 11, 30, 23), "mo202611")
    december = window(Period.MONTH, utc(2026, 12, 31, 12), BERLIN)
    assert december.id == "mo202612"
    assert december.end == utc(2026, 12, 31, 23)  # 1 January 2027, 00:00 in Berlin
    first_early = window(Period.MONTH, datetime(2027, 1, 1, 3, tzinfo=BERLIN), BERLIN, 4)
    assert first_early.id == "mo202612"
    assert first_early.end == utc(2027, 1, 1, 3)


def test_dst_days_in_berlin() -> None:
    spring = window(Period.DAY, datetime(2026, 3, 29, 12, tzinfo=BERLIN), BERLIN)
    assert (spring.start, spring.end) == (utc(2026, 3, 28, 23), utc(2026, 3, 29, 22))
    assert hours(spring) == 23
    autumn = window(Period.DAY, datetime(2026, 10, 25, 12, tzinfo=BERLIN), BERLIN)
    assert (autumn.start, autumn.end) == (utc(2026, 10, 24, 22), utc(2026, 10, 25, 23))
    assert hours(autumn) == 25
    assert hours(window(Period.WEEK, utc(2026, 3, 25), BERLIN)) == 7 * 24 - 1
    assert hours(window(Period.MONTH, utc(2026, 10, 10), BERLIN)) == 31 * 24 + 1


def test_reset_hour_inside_the_dst_gap_and_overlap() -> None:
    # 02:00 does not exist on 29 March: the day begins when the clocks jump (01:00 UTC).
    spring = window(Period.DAY, utc(2026, 3, 29, 12), BERLIN, reset_hour=2)
    assert (spring.start, spring.end, spring.id) == (
        utc(2026, 3, 29, 1),
        utc(2026, 3, 30, 0),
        "d20260329",
    )
    # 02:00 happens twice on 25 October: the day begins at the first.
    autumn = window(Period.DAY, utc(2026, 10, 25, 12), BERLIN, reset_hour=2)
    assert (autumn.start, autumn.end) == (utc(2026, 10, 25, 0), utc(2026, 10, 26, 1))
    assert hours(autumn) == 25


@pytest.mark.parametrize("period", list(Period))
@pytest.mark.parametrize("reset_hour", [0, 2, 3])
def test_windows_tile_time_across_dst(period: Period, reset_hour: int) -> None:
    """Every instant lies in its window, consecutive windows meet, and ids never repeat."""
    step = timedelta(seconds=20) if period is Period.MINUTE else timedelta(minutes=15)
    span = timedelta(hours=3) if period is Period.MINUTE else timedelta(days=70)
    start = utc(2026, 3, 27) if period is not Period.MONTH else utc(2026, 1, 15)
    if period is Period.MONTH:
        step, span = timedelta(hours=6), timedelta(days=400)
    seen: dict[str, Window] = {}
    previous: Window | None = None
    t = start
    while t < start + span:
        w = window(period, t, BERLIN, reset_hour)
        assert w.start <= t < w.end
        assert seen.setdefault(w.id, w) == w, "one id, one window"
        if previous is not None and w != previous:
            assert w.start == previous.end
        previous = w
        t += step
    assert len(seen) > 2


def test_same_window_same_id_and_bad_input() -> None:
    a = window(Period.DAY, utc(2026, 11, 23, 8), BERLIN)
    b = window(Period.DAY, utc(2026, 11, 23, 20), BERLIN)
    assert a == b
    assert a.seconds_left(utc(2026, 11, 23, 22)) == 3600
    assert a.expires_at == utc(2026, 11, 23, 23).timestamp()
    with pytest.raises(ValueError, match="aware"):
        window(Period.DAY, datetime(2026, 11, 23), BERLIN)
    with pytest.raises(ValueError, match="reset_hour"):
        window(Period.DAY, utc(2026, 11, 23), BERLIN, reset_hour=24)
    with pytest.raises(ValueError):
        window("fortnight", utc(2026, 11, 23), BERLIN)
