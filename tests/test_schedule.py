"""Rotation schedules: parsing RotationRules, the windows they open, and a simulated year.

Expected windows are computed here independently of the module: each cron expression
comes with a hand-written predicate over UTC datetimes, checked hour by hour across a
year (cron minutes can only be 0, see the parsing cases, so every firing time is on the
hour), and interval schedules are checked against the day arithmetic AWS documents.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
import trio

from secretfs.model import InvalidParameterException
from secretfs.rotation.schedule import RotationRules

YEAR_START = datetime(2024, 1, 1, tzinfo=UTC)  # a leap year: 29 Feb is in it
YEAR_END = datetime(2025, 1, 1, tzinfo=UTC)
HOUR, DAY = timedelta(hours=1), timedelta(days=1)


def rules(expression: str | None = None, *, days: int | None = None,
          duration: str | None = None) -> RotationRules:
    given: dict = {}
    if expression is not None:
        given["ScheduleExpression"] = expression
    if days is not None:
        given["AutomaticallyAfterDays"] = days
    if duration is not None:
        given["Duration"] = duration
    return RotationRules.from_api(given)


def end_of_day(moment: datetime) -> datetime:
    return datetime(moment.year, moment.month, moment.day, tzinfo=UTC) + DAY


# --- parsing ----------------------------------------------------------------------

GOOD = [
    # (RotationRules given, as DescribeSecret returns them)
    ({"AutomaticallyAfterDays": 1}, {"AutomaticallyAfterDays": 1}),
    ({"AutomaticallyAfterDays": 1000}, {"AutomaticallyAfterDays": 1000}),
    ({"AutomaticallyAfterDays": 30, "Duration": "3h"},
     {"AutomaticallyAfterDays": 30, "Duration": "3h"}),
    ({"ScheduleExpression": "rate(1 day)"},
     {"AutomaticallyAfterDays": 1, "ScheduleExpression": "rate(1 day)"}),
    ({"ScheduleExpression": "rate(10 days)", "Duration": "24h"},
     {"AutomaticallyAfterDays": 10, "Duration": "24h", "ScheduleExpression": "rate(10 days)"}),
    ({"ScheduleExpression": "rate(999 days)"},
     {"AutomaticallyAfterDays": 999, "ScheduleExpression": "rate(999 days)"}),
    ({"ScheduleExpression": "rate(4 hours)"}, {"ScheduleExpression": "rate(4 hours)"}),
    ({"ScheduleExpression": "rate(23 hours)", "Duration": "23h"},
     {"Duration": "23h", "ScheduleExpression": "rate(23 hours)"}),
    # AWS's own DescribeSecret example (botocore's examples-1.json) reports 14 days.
    ({"ScheduleExpression": "cron(0 16 1,15 * ? *)", "Duration": "2h"},
     {"AutomaticallyAfterDays": 14, "Duration": "2h", "ScheduleExpression": "cron(0 16 1,15 * ? *)"}),
    ({"ScheduleExpression": "cron(0 10 * * ? *)"},
     {"AutomaticallyAfterDays": 1, "ScheduleExpression": "cron(0 10 * * ? *)"}),
    ({"ScheduleExpression": "cron(0 18 ? * SAT *)"},
     {"AutomaticallyAfterDays": 7, "ScheduleExpression": "cron(0 18 ? * SAT *)"}),
    ({"ScheduleExpression": "cron(0 8 1 * ? *)"},
     {"AutomaticallyAfterDays": 28, "ScheduleExpression": "cron(0 8 1 * ? *)"}),
    ({"ScheduleExpression": "cron(0 17 L * ? *)"},
     {"AutomaticallyAfterDays": 28, "ScheduleExpression": "cron(0 17 L * ? *)"}),
    ({"ScheduleExpression": "cron(0 8 ? * mon-fri *)"},
     {"AutomaticallyAfterDays": 1, "ScheduleExpression": "cron(0 8 ? * mon-fri *)"}),
    ({"ScheduleExpression": "cron(0 0 ? * SUN#1 *)"},
     {"AutomaticallyAfterDays": 28, "ScheduleExpression": "cron(0 0 ? * SUN#1 *)"}),
    ({"ScheduleExpression": "cron(0 10 ? FEB,MAY,AUG,NOV TUE#2 *)"},
     {"AutomaticallyAfterDays": 84, "ScheduleExpression": "cron(0 10 ? FEB,MAY,AUG,NOV TUE#2 *)"}),
    ({"ScheduleExpression": "cron(0 0 ? JAN,APR,JUL,OCT 2L *)"},
     {"AutomaticallyAfterDays": 84, "ScheduleExpression": "cron(0 0 ? JAN,APR,JUL,OCT 2L *)"}),
    ({"ScheduleExpression": "cron(0 0 ? * L *)"},
     {"AutomaticallyAfterDays": 28, "ScheduleExpression": "cron(0 0 ? * L *)"}),
    ({"ScheduleExpression": "cron(0 0 1/10 * ? *)"},
     {"AutomaticallyAfterDays": 1, "ScheduleExpression": "cron(0 0 1/10 * ? *)"}),
    ({"ScheduleExpression": "cron(0 0 1 1 ? *)"},
     {"AutomaticallyAfterDays": 365, "ScheduleExpression": "cron(0 0 1 1 ? *)"}),
    # Schedules "in hours": several windows a day, so no whole number of days between them.
    ({"ScheduleExpression": "cron(0 4/12 * * ? *)"}, {"ScheduleExpression": "cron(0 4/12 * * ? *)"}),
    ({"ScheduleExpression": "cron(0 0/4 * * ? *)", "Duration": "4h"},
     {"Duration": "4h", "ScheduleExpression": "cron(0 0/4 * * ? *)"}),
    # DescribeSecret's own output reads back.
    ({"AutomaticallyAfterDays": 14, "ScheduleExpression": "cron(0 16 1,15 * ? *)"},
     {"AutomaticallyAfterDays": 14, "ScheduleExpression": "cron(0 16 1,15 * ? *)"}),
]


@pytest.mark.parametrize(("given", "described"), GOOD, ids=[str(g) for g, _ in GOOD])
def test_good_rules_are_described_as_aws_describes_them(given, described):
    parsed = RotationRules.from_api(given)
    assert parsed.to_api() == described
    assert RotationRules.from_api(parsed.to_api()) == parsed


def test_rules_keep_what_was_given():
    parsed = rules("rate(10 days)", duration="3h")
    assert (parsed.automatically_after_days, parsed.duration, parsed.expression) == (
        None, timedelta(hours=3), "rate(10 days)")
    assert RotationRules(30, None, None) == rules(days=30)


BAD = [
    ({}, "either AutomaticallyAfterDays or ScheduleExpression"),
    ({"AutomaticallyAfterDays": 10, "ScheduleExpression": "rate(5 days)"}, "but not both"),
    ({"AutomaticallyAfterDays": 0}, "AutomaticallyAfterDays must be a whole number from 1 to 1000"),
    ({"AutomaticallyAfterDays": 1001}, "from 1 to 1000"),
    ({"AutomaticallyAfterDays": "30"}, "must be a whole number"),
    ({"AutomaticallyAfterDays": True}, "must be a whole number"),
    ({"AutomaticallyAfterDays": 30, "Duration": "0h"}, "Invalid Duration '0h'"),
    ({"AutomaticallyAfterDays": 30, "Duration": "25h"}, "from 1h to 24h"),
    ({"AutomaticallyAfterDays": 30, "Duration": "3"}, "Invalid Duration '3'"),
    ({"AutomaticallyAfterDays": 30, "Duration": "3H"}, "Invalid Duration '3H'"),
    ({"ScheduleExpression": ""}, "1 to 256 characters"),
    ({"ScheduleExpression": "every 10 days"}, "Invalid schedule expression 'every 10 days'"),
    ({"ScheduleExpression": "rate(0 days)"}, r"Invalid rate expression 'rate\(0 days\)'.*1 to 999 days"),
    ({"ScheduleExpression": "rate(1000 days)"}, "a rate in days must be 1 to 999 days"),
    ({"ScheduleExpression": "rate(3 hours)"}, "Invalid rate expression.*at most every 4 hours"),
    ({"ScheduleExpression": "rate(24 hours)"}, "a rate in hours must be 4 to 23 hours"),
    ({"ScheduleExpression": "rate(2 weeks)"}, r"Invalid rate expression.*use rate\(Value Unit\)"),
    ({"ScheduleExpression": "rate(10days)"}, r"use rate\(Value Unit\)"),
    ({"ScheduleExpression": "rate(-1 days)"}, r"use rate\(Value Unit\)"),
    ({"ScheduleExpression": "cron(0 16 1,15 * ?)"}, "Invalid cron expression.*six fields.*not 5"),
    ({"ScheduleExpression": "cron(30 16 * * ? *)"}, "Minutes field must be 0"),
    ({"ScheduleExpression": "cron(0 16 * * ? 2025)"}, r"Year field must be \*"),
    ({"ScheduleExpression": "cron(0 0 ? * ? *)"}, "exactly one of the Day-of-month and Day-of-week"),
    ({"ScheduleExpression": "cron(0 0 1 * MON *)"}, "exactly one of the Day-of-month and Day-of-week"),
    ({"ScheduleExpression": "cron(0 1 * 1/3 SUN *)"}, "exactly one of the Day-of-month"),
    ({"ScheduleExpression": "cron(0 24 * * ? *)"}, r"24 is out of range for the Hours field \(0-23\)"),
    ({"ScheduleExpression": "cron(0 0 32 * ? *)"}, "out of range for the Day-of-month field"),
    ({"ScheduleExpression": "cron(0 0 1 13 ? *)"}, "out of range for the Month field"),
    ({"ScheduleExpression": "cron(0 0 ? * 8 *)"}, "out of range for the Day-of-week field"),
    ({"ScheduleExpression": "cron(0 0 ? * FUN *)"}, "'FUN' is not a valid value for the Day-of-week"),
    ({"ScheduleExpression": "cron(0 0 15W * ? *)"}, "Day-of-month field does not allow 'W'"),
    ({"ScheduleExpression": "cron(0 0 LW * ? *)"}, "does not allow 'W'"),
    ({"ScheduleExpression": "cron(0 L * * ? *)"}, "Hours field does not allow 'L'"),
    ({"ScheduleExpression": "cron(0 0 1#2 * ? *)"}, "Day-of-month field does not allow '#'"),
    ({"ScheduleExpression": "cron(0 0 1 ? * *)"}, "Month field does not allow '?'"),
    ({"ScheduleExpression": "cron(0 0 L-2 * ? *)"}, "L in the Day-of-month field must stand alone"),
    ({"ScheduleExpression": "cron(0 0 ? * 6#6 *)"}, "the number after # must be 1 to 5"),
    ({"ScheduleExpression": "cron(0 0 ? * MON-FRI#2 *)"}, "# takes a single weekday"),
    ({"ScheduleExpression": "cron(0 0 ? * MON,FRIL *)"}, "L in the Day-of-week field"),
    ({"ScheduleExpression": "cron(0 0 ? * FRI-MON *)"}, "runs backwards"),
    ({"ScheduleExpression": "cron(0 0/0 * * ? *)"}, "increment.*positive whole number"),
    ({"ScheduleExpression": "cron(0 0,,12 * * ? *)"}, "empty list item"),
    ({"ScheduleExpression": "cron(0 */2 * * ? *)"}, "2 hour.s. apart.*at most every 4 hours"),
    # 22:00 and then 01:00 the next day: three hours apart, across midnight.
    ({"ScheduleExpression": "cron(0 1,22 * * ? *)"}, "3 hour.s. apart"),
    ({"ScheduleExpression": "cron(0 0 30 2 ? *)"}, "names no day that exists"),
    ({"ScheduleExpression": "cron(0 0 29 FEB ? *)"}, "more than a year between rotations"),
    ({"ScheduleExpression": "rate(6 hours)", "Duration": "7h"},
     "longer than the 6 hours between rotations.*next rotation window"),
    ({"ScheduleExpression": "cron(0 2,8 * * ? *)", "Duration": "7h"},
     "longer than the 6 hours between rotations"),
    ({"ScheduleExpression": "cron(0 20 * * ? *)", "Duration": "5h"},
     "opens at 20:00.*next UTC day"),
    ({"ScheduleExpression": "cron(0 4/12 * * ? *)", "Duration": "9h"}, "opens at 16:00"),
    ({"ScheduleExpression": "rate(1 days)", "Frequency": "often"}, "unknown members: Frequency"),
]


@pytest.mark.parametrize(("given", "message"), BAD, ids=[str(g) for g, _ in BAD])
def test_bad_rules_are_refused_with_a_message_that_says_why(given, message):
    with pytest.raises(InvalidParameterException, match=message) as refused:
        RotationRules.from_api(given)
    assert refused.value.code == "InvalidParameterException"


def test_rules_that_are_not_a_structure_are_refused():
    with pytest.raises(InvalidParameterException, match="must be a structure"):
        RotationRules.from_api(["rate(1 days)"])


def test_constructing_directly_validates_too():
    with pytest.raises(InvalidParameterException, match="whole number of hours"):
        RotationRules(None, timedelta(minutes=90), "rate(6 hours)")
    with pytest.raises(InvalidParameterException, match="but not both"):
        RotationRules(None, None, None)


# --- cron windows over a year, against brute force -----------------------------------

def third_friday(moment: datetime) -> bool:
    return moment.weekday() == 4 and 15 <= moment.day <= 21


def last_day_of_month(moment: datetime) -> bool:
    return (moment + DAY).day == 1


def last_monday(moment: datetime) -> bool:
    return moment.weekday() == 0 and (moment + 7 * DAY).month != moment.month


CRON_CASES = {
    "cron(0 16 1,15 * ? *)": lambda t: t.hour == 16 and t.day in (1, 15),
    "cron(0 8 ? * MON-FRI *)": lambda t: t.hour == 8 and t.weekday() < 5,
    "cron(0 0 L * ? *)": lambda t: t.hour == 0 and last_day_of_month(t),
    "cron(0 12 ? * 6#3 *)": lambda t: t.hour == 12 and third_friday(t),
    "cron(0 0 1/10 * ? *)": lambda t: t.hour == 0 and t.day in (1, 11, 21, 31),
    "cron(0 10 ? FEB,MAY,AUG,NOV TUE#2 *)":
        lambda t: t.hour == 10 and t.month in (2, 5, 8, 11) and t.weekday() == 1 and 8 <= t.day <= 14,
    "cron(0 0 ? JAN,APR,JUL,OCT 2L *)":
        lambda t: t.hour == 0 and t.month in (1, 4, 7, 10) and last_monday(t),
    "cron(0 4/12 * * ? *)": lambda t: t.hour in (4, 16),
}


def brute_force_starts(fires) -> list[datetime]:
    starts, moment = [], YEAR_START
    while moment < YEAR_END:
        if fires(moment):
            starts.append(moment)
        moment += HOUR
    return starts


def year_of_windows(schedule: RotationRules) -> list[tuple[datetime, datetime]]:
    """Every window opening in the year, each found from the opening of the one before."""
    windows, after = [], YEAR_START - timedelta(microseconds=1)
    while (window := schedule.next_window(after, last_rotated=None))[0] < YEAR_END:
        windows.append(window)
        after = window[0]
    return windows


@pytest.mark.parametrize("expression", CRON_CASES)
def test_cron_windows_over_a_year_match_brute_force(expression):
    schedule = rules(expression)
    expected = brute_force_starts(CRON_CASES[expression])
    windows = year_of_windows(schedule)
    assert [start for start, _ in windows] == expected
    in_hours = expression == "cron(0 4/12 * * ? *)"
    for start, end in windows:
        assert end == (start + HOUR if in_hours else end_of_day(start))


def test_third_friday_and_last_day_in_2024_by_name():
    fridays = [s for s, _ in year_of_windows(rules("cron(0 12 ? * 6#3 *)"))]
    assert [d.date() for d in fridays[:3]] == [date(2024, 1, 19), date(2024, 2, 16), date(2024, 3, 15)]
    last_days = [s for s, _ in year_of_windows(rules("cron(0 0 L * ? *)"))]
    assert [d.date() for d in last_days[:3]] == [date(2024, 1, 31), date(2024, 2, 29), date(2024, 3, 31)]


def test_a_cron_window_is_found_from_inside_the_previous_one():
    schedule = rules("cron(0 16 1,15 * ? *)")
    inside = datetime(2024, 3, 1, 20, 30, tzinfo=UTC)
    assert schedule.next_window(inside, last_rotated=inside)[0] == datetime(2024, 3, 15, 16, tzinfo=UTC)
    on_the_hour = datetime(2024, 3, 15, 16, tzinfo=UTC)
    assert schedule.next_window(on_the_hour, last_rotated=None)[0] == datetime(2024, 4, 1, 16, tzinfo=UTC)


# --- interval windows: rate() and AutomaticallyAfterDays -----------------------------

@pytest.mark.parametrize(("schedule", "days", "count"), [
    (rules("rate(1 days)"), 1, 365),  # 2 Jan to 31 Dec
    (rules("rate(10 days)"), 10, 36),  # 11 Jan to 26 Dec
    (rules(days=30), 30, 12),  # 31 Jan to 26 Dec
])
def test_interval_windows_are_the_whole_day_n_days_after_the_last_rotation(schedule, days, count):
    rng = random.Random(7)
    last, after, rotations = None, YEAR_START, 0
    while True:
        start, end = schedule.next_window(after, last_rotated=last)
        if start >= YEAR_END:
            break
        anchor = (last or YEAR_START).date()
        assert start == datetime.combine(anchor + timedelta(days=days), datetime.min.time(), UTC)
        assert end - start == DAY
        rotated = schedule.next_rotation(after, last_rotated=last, rng=rng)
        assert start <= rotated < end
        last = after = rotated
        rotations += 1
    assert rotations == count


def test_rate_in_hours_opens_one_hour_windows_on_a_grid_from_midnight():
    schedule = rules("rate(6 hours)")
    expected = brute_force_starts(lambda t: t.hour % 6 == 0)
    rng = random.Random(3)
    starts, after = [], YEAR_START - timedelta(microseconds=1)
    while (window := schedule.next_window(after, last_rotated=None))[0] < YEAR_END:
        start, end = window
        assert end - start == HOUR
        starts.append(start)
        # rotating anywhere inside the window leads to the next one, never to the same
        after = schedule.next_rotation(after, last_rotated=None, rng=rng)
        assert start <= after < end
    assert starts == expected


def test_an_overdue_interval_schedule_opens_tomorrow_rather_than_skipping_a_cycle():
    schedule = rules(days=30)
    last = datetime(2024, 1, 1, 9, tzinfo=UTC)
    now = datetime(2024, 3, 1, 12, tzinfo=UTC)  # 60 days later: the Jan 31 window was missed
    assert schedule.next_window(now, last_rotated=last) == (
        datetime(2024, 3, 2, tzinfo=UTC), datetime(2024, 3, 3, tzinfo=UTC))


def test_a_manual_rotation_moves_the_next_interval_window():
    schedule = rules(days=30)
    now = datetime(2024, 1, 10, 12, tzinfo=UTC)
    assert schedule.next_window(now, last_rotated=now)[0] == datetime(2024, 2, 9, tzinfo=UTC)


# --- Duration -----------------------------------------------------------------------

@pytest.mark.parametrize(("schedule", "after", "window"), [
    (rules("cron(0 16 1,15 * ? *)", duration="2h"), datetime(2024, 1, 2, tzinfo=UTC),
     (datetime(2024, 1, 15, 16, tzinfo=UTC), datetime(2024, 1, 15, 18, tzinfo=UTC))),
    (rules("cron(0 16 1,15 * ? *)", duration="8h"), datetime(2024, 1, 2, tzinfo=UTC),
     (datetime(2024, 1, 15, 16, tzinfo=UTC), datetime(2024, 1, 16, tzinfo=UTC))),
    (rules("rate(10 days)", duration="3h"), datetime(2024, 1, 2, 5, tzinfo=UTC),
     (datetime(2024, 1, 12, tzinfo=UTC), datetime(2024, 1, 12, 3, tzinfo=UTC))),
    (rules(days=30, duration="24h"), datetime(2024, 1, 2, 5, tzinfo=UTC),
     (datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 2, 2, tzinfo=UTC))),
    (rules("rate(6 hours)", duration="6h"), datetime(2024, 1, 2, 5, tzinfo=UTC),
     (datetime(2024, 1, 2, 6, tzinfo=UTC), datetime(2024, 1, 2, 12, tzinfo=UTC))),
    (rules("cron(0 4/12 * * ? *)", duration="8h"), datetime(2024, 1, 2, 5, tzinfo=UTC),
     (datetime(2024, 1, 2, 16, tzinfo=UTC), datetime(2024, 1, 3, tzinfo=UTC))),
    # Defaults: the rest of the UTC day for a cron in days, one hour for one in hours.
    (rules("cron(0 20 * * ? *)"), datetime(2024, 1, 2, 5, tzinfo=UTC),
     (datetime(2024, 1, 2, 20, tzinfo=UTC), datetime(2024, 1, 3, tzinfo=UTC))),
    (rules("cron(0 0/8 * * ? *)"), datetime(2024, 1, 2, 5, tzinfo=UTC),
     (datetime(2024, 1, 2, 8, tzinfo=UTC), datetime(2024, 1, 2, 9, tzinfo=UTC))),
])
def test_duration_sets_the_window_length(schedule, after, window):
    assert schedule.next_window(after, last_rotated=None) == window
    rng = random.Random(11)
    for _ in range(200):
        assert window[0] <= schedule.next_rotation(after, last_rotated=None, rng=rng) < window[1]


# --- where inside the window -----------------------------------------------------------

def test_next_rotation_is_spread_uniformly_over_the_window():
    schedule = rules("cron(0 0 L * ? *)")  # a whole-day window
    rng = random.Random(2024)
    after = datetime(2024, 5, 1, tzinfo=UTC)
    start, end = schedule.next_window(after, last_rotated=None)
    samples = [schedule.next_rotation(after, last_rotated=None, rng=rng) for _ in range(4800)]
    assert all(start <= s < end for s in samples)
    assert len(set(samples)) == len(samples)  # not always the start, nor any one point
    per_hour = [0] * 24
    for s in samples:
        per_hour[(s - start) // HOUR] += 1
    # 200 expected per hour; a uniform draw stays within these bounds (chi-square well inside)
    assert all(140 <= count <= 260 for count in per_hour), per_hour
    chi_square = sum((count - 200) ** 2 / 200 for count in per_hour)
    assert chi_square < 49.7  # p = 0.001 for 23 degrees of freedom
    assert min(samples) - start < timedelta(minutes=30)
    assert end - max(samples) < timedelta(minutes=30)


def test_next_rotation_is_deterministic_for_a_seeded_rng():
    schedule = rules("rate(10 days)")
    after = datetime(2024, 1, 1, tzinfo=UTC)
    first = [schedule.next_rotation(after, last_rotated=None, rng=random.Random(5)) for _ in range(3)]
    assert len(set(first)) == 1


# --- UTC only -------------------------------------------------------------------------

@pytest.mark.parametrize("day", [date(2024, 3, 10), date(2024, 3, 31), date(2024, 10, 27),
                                 date(2024, 11, 3)])
def test_daylight_saving_changes_do_not_touch_windows(day):
    """US and EU clock changes: windows stay whole UTC days and hours."""
    before = datetime.combine(day - DAY, datetime.min.time(), UTC)
    assert rules("rate(1 days)").next_window(before, last_rotated=before) == (
        datetime.combine(day, datetime.min.time(), UTC), datetime.combine(day + DAY, datetime.min.time(), UTC))
    start, end = rules("cron(0 8 ? * * *)").next_window(before + 12 * HOUR, last_rotated=None)
    assert (start, end - start) == (datetime.combine(day, datetime.min.time(), UTC) + 8 * HOUR, 16 * HOUR)


def test_times_in_other_zones_are_read_as_the_same_instant_and_answered_in_utc():
    schedule = rules("cron(0 16 1,15 * ? *)")
    new_york = timezone(timedelta(hours=-5))
    local = datetime(2024, 1, 1, 12, tzinfo=new_york)  # 17:00 UTC, after that day's window opened
    start, end = schedule.next_window(local, last_rotated=None)
    assert (start, end) == (datetime(2024, 1, 15, 16, tzinfo=UTC), datetime(2024, 1, 16, tzinfo=UTC))
    assert start.tzinfo is UTC
    with pytest.raises(ValueError, match="aware"):
        schedule.next_window(datetime(2024, 1, 1), last_rotated=None)


# --- a simulated year on trio's clock ------------------------------------------------------

async def rotate_for_a_year(schedule: RotationRules, rng: random.Random) -> list[datetime]:
    """A scheduler loop: sleep until each next rotation, trio time mapped onto UTC."""
    origin = trio.current_time()

    def utc_now() -> datetime:
        return YEAR_START + timedelta(seconds=trio.current_time() - origin)

    rotated: list[datetime] = []
    last = None
    while True:
        due = schedule.next_rotation(utc_now(), last_rotated=last, rng=rng)
        if due >= YEAR_END:
            return rotated
        await trio.sleep_until(origin + (due - YEAR_START).total_seconds())
        assert abs(utc_now() - due) < timedelta(milliseconds=1)
        last = due
        rotated.append(due)


@pytest.mark.parametrize(("expression", "expected"), [
    ("rate(10 days)", range(36, 38)),
    ("cron(0 16 1,15 * ? *)", range(24, 25)),
])
async def test_a_year_of_rotations_on_the_autojump_clock(autojump_clock, expression, expected):
    schedule = rules(expression)
    started = time.perf_counter()
    rotated = await rotate_for_a_year(schedule, random.Random(42))
    assert time.perf_counter() - started < 0.5
    assert len(rotated) in expected
    assert rotated == sorted(rotated)
    assert YEAR_START < rotated[0] <= rotated[-1] < YEAR_END
    if expression.startswith("cron"):
        assert {(r.day, r.hour >= 16) for r in rotated} == {(1, True), (15, True)}
    else:
        gaps = {(b.date() - a.date()).days for a, b in zip(rotated, rotated[1:], strict=False)}
        assert gaps == {10}
