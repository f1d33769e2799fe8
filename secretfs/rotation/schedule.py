"""Rotation schedules: AWS's RotationRules, validated, and the windows they open.

Owns the meaning of `AutomaticallyAfterDays`, `Duration` and `ScheduleExpression`
(`rate()` and `cron()`), as the Secrets Manager user guide ("Rotation schedules")
and the RotationRulesType reference describe them, and answers two questions:
when does the next rotation window open and close, and at which point inside it
does the next rotation start. Nothing here does I/O or reads a clock; every time
is an aware UTC datetime passed in. The rules, in short:

- `AutomaticallyAfterDays=N` and `rate(N days)`: the window is the UTC day N days
  after the day of the last rotation (or of `after`, never rotated); it opens at
  midnight and lasts `Duration`, by default the whole day.
- `rate(N hours)`: windows open every N hours on a grid that starts at midnight
  (of 1970-01-01, so at every midnight when N divides 24) and last `Duration`,
  by default one hour.
- `cron(0 H DoM Mon DoW *)`: a window opens at each time the expression names and
  lasts `Duration`; by default one hour when the expression fires more than once
  a day (a schedule "in hours"), else until the end of that UTC day.
- A window may extend neither into the next window nor into the next UTC day, and
  rotations are at least four hours apart.
"""

from __future__ import annotations

import calendar
import functools
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from secretfs.model import InvalidParameterException

AFTER_DAYS_MIN, AFTER_DAYS_MAX = 1, 1000  # RotationRulesType.AutomaticallyAfterDays
RATE_DAYS_MIN, RATE_DAYS_MAX = 1, 999  # the user guide: "the maximum rotation period is 999 days"
RATE_HOURS_MIN, RATE_HOURS_MAX = 4, 23  # beyond 23 hours, a rate is written in days
MIN_HOURS_BETWEEN_ROTATIONS = 4
DURATION_MIN_HOURS, DURATION_MAX_HOURS = 1, 24
EXPRESSION_MAX = 256  # ScheduleExpressionType

_DAY = timedelta(days=1)
_HOUR = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The Gregorian calendar repeats every 400 years (146097 days, a whole number of
# weeks), so whatever a day pattern does, it does within one such cycle.
_CYCLE_YEARS = 400
_CYCLE_START = 2000

_MONTHS = {name: number for number, name in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}
_WEEKDAYS = {name: number for number, name in enumerate(
    ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"), 1)}
_RATE_RE = re.compile(r"rate\((\d+) (hour|hours|day|days)\)")
_CRON_RE = re.compile(r"cron\((.*)\)", re.DOTALL)
_DURATION_RE = re.compile(r"(\d+)h")
_NUMBER_RE = re.compile(r"\d+")


class _CronError(ValueError):
    """Why a cron expression is refused; becomes InvalidParameterException with the expression."""


# --- schedules ------------------------------------------------------------------

@dataclass(frozen=True)
class _Every:
    """AutomaticallyAfterDays or a rate(): a fixed step between windows."""

    step: timedelta
    in_days: bool


@dataclass(frozen=True)
class _Cron:
    """A parsed cron(); exactly one of `days_of_month` and the day-of-week parts is set."""

    hours: tuple[int, ...]
    months: frozenset[int]
    days_of_month: frozenset[int] | None = None
    last_day_of_month: bool = False
    weekdays: frozenset[int] | None = None  # 1 = SUN ... 7 = SAT
    nth_weekday: tuple[int, int] | None = None  # (weekday, n): the n-th such day of the month
    last_weekday: int | None = None  # the last such day of the month

    @property
    def in_hours(self) -> bool:
        """AWS calls a schedule that opens several windows a day a schedule "in hours"."""
        return len(self.hours) > 1

    def days_in(self, year: int, month: int) -> tuple[int, ...]:
        """The days of that month on which the expression fires, ascending."""
        first_weekday, length = calendar.monthrange(year, month)
        return _month_days(self, month, length, (first_weekday + 1) % 7 + 1)

    def next_start(self, after: datetime) -> datetime:
        """The first time the expression names strictly after `after`."""
        year, month = after.year, after.month
        for _ in range(_CYCLE_YEARS * 12 + 12):
            for day in self.days_in(year, month):
                for hour in self.hours:
                    start = datetime(year, month, day, hour, tzinfo=UTC)
                    if start > after:
                        return start
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        # from_api refused every expression that names no day in a whole cycle
        raise AssertionError("a validated cron expression always fires within 400 years")


# A month's firing days depend only on which month it is, its length and the weekday
# of its first day, so a whole 400-year cycle needs at most 12 x 4 x 7 computations.
@functools.lru_cache(maxsize=4096)
def _month_days(cron: _Cron, month: int, length: int, first_weekday: int) -> tuple[int, ...]:
    """`first_weekday` counts as AWS does: 1 = SUN ... 7 = SAT."""
    if month not in cron.months:
        return ()
    if cron.days_of_month is not None or cron.last_day_of_month:
        days = {day for day in cron.days_of_month or () if day <= length}
        if cron.last_day_of_month:
            days.add(length)
        return tuple(sorted(days))
    weekday_of = {day: (first_weekday - 1 + day - 1) % 7 + 1 for day in range(1, length + 1)}
    if cron.nth_weekday is not None:
        weekday, n = cron.nth_weekday
        matching = [day for day, wd in weekday_of.items() if wd == weekday]
        return (matching[n - 1],) if n <= len(matching) else ()
    if cron.last_weekday is not None:
        return (max(day for day, wd in weekday_of.items() if wd == cron.last_weekday),)
    return tuple(day for day, wd in weekday_of.items() if wd in cron.weekdays)


@functools.cache
def _cycle_months() -> tuple[tuple[int, int, int, int], ...]:
    """Every month of one calendar cycle: (ordinal of its first day, month, length,
    weekday of its first day counted as AWS does)."""
    months = []
    for year in range(_CYCLE_START, _CYCLE_START + _CYCLE_YEARS):
        for month in range(1, 13):
            first_weekday, length = calendar.monthrange(year, month)
            months.append((date(year, month, 1).toordinal(), month, length,
                           (first_weekday + 1) % 7 + 1))
    return tuple(months)


@functools.lru_cache(maxsize=256)
def _day_gaps(cron: _Cron) -> tuple[int, int] | None:
    """The shortest and longest number of days between two firing days, over a whole
    calendar cycle (so exact for every year); None if the expression never fires."""
    gaps: set[int] = set()
    first_fire = last_fire = None
    for first, month, length, first_weekday in _cycle_months():
        days = _month_days(cron, month, length, first_weekday)
        if not days:
            continue
        if last_fire is not None:
            gaps.add(first + days[0] - 1 - last_fire)
        else:
            first_fire = first + days[0] - 1
        gaps.update(_inner_gaps(days))
        last_fire = first + days[-1] - 1
    if first_fire is None:
        return None
    cycle_days = date(_CYCLE_START + _CYCLE_YEARS, 1, 1).toordinal() - _cycle_months()[0][0]
    gaps.add(first_fire + cycle_days - last_fire)  # into the next cycle
    return min(gaps), max(gaps)


@functools.lru_cache(maxsize=1024)
def _inner_gaps(days: tuple[int, ...]) -> frozenset[int]:
    return frozenset(b - a for a, b in zip(days, days[1:], strict=False))


# --- parsing --------------------------------------------------------------------

def _number(text: str, field_name: str, low: int, high: int, names: dict[str, int] | None) -> int:
    if names and text.upper() in names:
        return names[text.upper()]
    if not _NUMBER_RE.fullmatch(text):
        raise _CronError(f"{text!r} is not a valid value for the {field_name} field.")
    value = int(text)
    if not low <= value <= high:
        raise _CronError(f"{value} is out of range for the {field_name} field ({low}-{high}).")
    return value


def _values(text: str, field_name: str, low: int, high: int,
            names: dict[str, int] | None = None) -> frozenset[int]:
    """A field of `*`, values, `a-b` ranges and `/` increments, joined by commas."""
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise _CronError(f"the {field_name} field has an empty list item.")
        base, slash, increment = item.partition("/")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            start_text, _, end_text = base.partition("-")
            first = _number(start_text, field_name, low, high, names)
            last = _number(end_text, field_name, low, high, names)
            if first > last:
                raise _CronError(f"the range {base} in the {field_name} field runs backwards; "
                                 "ranges that wrap around are not supported.")
        else:
            first = _number(base, field_name, low, high, names)
            # In cron, "a/n" means "from a to the end, every n".
            last = high if slash else first
        step = 1
        if slash:
            if not _NUMBER_RE.fullmatch(increment) or int(increment) < 1:
                raise _CronError(f"the increment in {item!r} ({field_name}) must be a positive "
                                 "whole number.")
            step = int(increment)
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _reject_unsupported(text: str, field_name: str, allowed: str,
                        names: dict[str, int] | None = None) -> None:
    # Names go first: JUL holds an L and WED a W that are no wildcards.
    bare = re.sub("|".join(names), "", text.upper()) if names else text.upper()
    for character in "?LW#/-,*":
        if character in bare and character not in allowed:
            raise _CronError(f"the {field_name} field does not allow {character!r} in Secrets "
                             "Manager cron expressions.")


def _parse_cron(body: str) -> _Cron:
    parts = body.split()
    if len(parts) != 6:
        raise _CronError(f"it must have six fields (Minutes Hours Day-of-month Month Day-of-week "
                         f"Year), not {len(parts)}.")
    minutes, hours, day_of_month, month, day_of_week, year = parts
    # Rotation windows always open on the hour.
    if minutes != "0":
        raise _CronError("the Minutes field must be 0, because rotation windows open on the hour.")
    # A fixed year would schedule rotations more than a year apart, which AWS does not support.
    if year != "*":
        raise _CronError("the Year field must be *, because Secrets Manager does not support "
                         "rotation schedules more than a year apart.")
    _reject_unsupported(hours, "Hours", ",-*/")
    _reject_unsupported(month, "Month", ",-*/", _MONTHS)
    _reject_unsupported(day_of_month, "Day-of-month", ",-*?/L")
    _reject_unsupported(day_of_week, "Day-of-week", "#,-*?/L", _WEEKDAYS)
    if (day_of_month == "?") == (day_of_week == "?"):
        raise _CronError("exactly one of the Day-of-month and Day-of-week fields must be ?; "
                         "a schedule names days by one of them, not both.")
    cron = {
        "hours": tuple(sorted(_values(hours, "Hours", 0, 23))),
        "months": _values(month, "Month", 1, 12, _MONTHS),
    }
    if day_of_week == "?":
        cron.update(_day_of_month(day_of_month))
    else:
        cron.update(_day_of_week(day_of_week))
    return _Cron(**cron)


def _day_of_month(text: str) -> dict:
    if "L" in text.upper():
        if text.upper() != "L":
            raise _CronError("L in the Day-of-month field must stand alone (the last day of "
                             "the month); offsets and lists with L are not supported.")
        return {"last_day_of_month": True}
    return {"days_of_month": _values(text, "Day-of-month", 1, 31)}


def _day_of_week(text: str) -> dict:
    upper = text.upper()
    if "#" in upper:
        weekday_text, _, n_text = upper.partition("#")
        if not _NUMBER_RE.fullmatch(n_text) or not 1 <= int(n_text) <= 5:
            raise _CronError(f"in {text!r}, the number after # must be 1 to 5 (the n-th such "
                             "weekday of the month).")
        if any(character in weekday_text for character in ",-/*L"):
            raise _CronError(f"{text!r}: # takes a single weekday, as in TUE#3.")
        return {"nth_weekday": (_number(weekday_text, "Day-of-week", 1, 7, _WEEKDAYS),
                                int(n_text))}
    if "L" in upper and upper not in _WEEKDAYS:  # SAT is a name, not a last-day marker
        if upper == "L":
            return {"last_weekday": _WEEKDAYS["SAT"]}  # the last day of the week
        if not upper.endswith("L") or any(c in upper[:-1] for c in ",-/*L"):
            raise _CronError(f"{text!r}: L in the Day-of-week field is either L alone or follows "
                             "a single weekday, as in FRIL (the last Friday of the month).")
        return {"last_weekday": _number(upper[:-1], "Day-of-week", 1, 7, _WEEKDAYS)}
    return {"weekdays": _values(text, "Day-of-week", 1, 7, _WEEKDAYS)}


def _parse_expression(expression: object) -> _Every | _Cron:
    if not isinstance(expression, str) or not 1 <= len(expression) <= EXPRESSION_MAX:
        raise InvalidParameterException(
            f"ScheduleExpression must be a cron() or rate() expression of 1 to {EXPRESSION_MAX} "
            "characters.")
    if expression.startswith("rate("):
        found = _RATE_RE.fullmatch(expression)
        if not found:
            raise InvalidParameterException(
                f"Invalid rate expression {expression!r}: use rate(Value Unit), where Value is a "
                "positive whole number and Unit is hour, hours, day or days.")
        value, unit = int(found[1]), found[2]
        if unit.startswith("day"):
            if not RATE_DAYS_MIN <= value <= RATE_DAYS_MAX:
                raise InvalidParameterException(
                    f"Invalid rate expression {expression!r}: a rate in days must be "
                    f"{RATE_DAYS_MIN} to {RATE_DAYS_MAX} days.")
            return _Every(timedelta(days=value), in_days=True)
        if value < MIN_HOURS_BETWEEN_ROTATIONS:
            raise InvalidParameterException(
                f"Invalid rate expression {expression!r}: you can rotate a secret at most every "
                f"{MIN_HOURS_BETWEEN_ROTATIONS} hours.")
        if value > RATE_HOURS_MAX:
            raise InvalidParameterException(
                f"Invalid rate expression {expression!r}: a rate in hours must be "
                f"{RATE_HOURS_MIN} to {RATE_HOURS_MAX} hours; use days for longer intervals.")
        return _Every(timedelta(hours=value), in_days=False)
    found = _CRON_RE.fullmatch(expression)
    if not found:
        raise InvalidParameterException(
            f"Invalid schedule expression {expression!r}: use a cron() or rate() expression.")
    try:
        cron = _parse_cron(found[1])
        _check_cron_frequency(cron)
    except _CronError as error:
        raise InvalidParameterException(
            f"Invalid cron expression {expression!r}: {error}") from None
    return cron


def _check_cron_frequency(cron: _Cron) -> None:
    """At least four hours and at most a year between two rotations, in every year."""
    gaps = _day_gaps(cron)
    if gaps is None:
        raise _CronError("it names no day that exists, so it would never rotate the secret.")
    shortest_days, longest_days = gaps
    if longest_days > 366:
        raise _CronError("it leaves more than a year between rotations, which Secrets Manager "
                         "does not support.")
    hours = cron.hours
    shortest = min((b - a for a, b in zip(hours, hours[1:], strict=False)), default=24)
    # The last window of one firing day and the first of the next firing day.
    shortest = min(shortest, 24 * shortest_days - hours[-1] + hours[0])
    if shortest < MIN_HOURS_BETWEEN_ROTATIONS:
        raise _CronError(f"it would rotate the secret {shortest} hour(s) apart; you can rotate a "
                         f"secret at most every {MIN_HOURS_BETWEEN_ROTATIONS} hours.")


def _parse_duration(duration: object) -> timedelta:
    found = _DURATION_RE.fullmatch(duration) if isinstance(duration, str) else None
    hours = int(found[1]) if found else 0
    if not DURATION_MIN_HOURS <= hours <= DURATION_MAX_HOURS:
        raise InvalidParameterException(
            f"Invalid Duration {duration!r}: the rotation window is a whole number of hours from "
            f"{DURATION_MIN_HOURS}h to {DURATION_MAX_HOURS}h, for example 3h.")
    return timedelta(hours=hours)


def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be an aware datetime (rotation schedules are in UTC)")
    return moment.astimezone(UTC)


def _midnight(moment: datetime) -> datetime:
    return datetime.combine(moment.date(), time(), tzinfo=UTC)


# --- the rules ------------------------------------------------------------------

@dataclass(frozen=True)
class RotationRules:
    """A secret's rotation schedule: AWS's RotationRulesType, validated on construction."""

    automatically_after_days: int | None
    duration: timedelta | None
    expression: str | None
    _schedule: _Every | _Cron = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if (self.automatically_after_days is None) == (self.expression is None):
            raise InvalidParameterException(
                "You must specify either AutomaticallyAfterDays or ScheduleExpression in "
                "RotationRules, but not both.")
        if self.expression is not None:
            schedule = _parse_expression(self.expression)
        else:
            days = self.automatically_after_days
            if (not isinstance(days, int) or isinstance(days, bool)
                    or not AFTER_DAYS_MIN <= days <= AFTER_DAYS_MAX):
                raise InvalidParameterException(
                    f"AutomaticallyAfterDays must be a whole number from {AFTER_DAYS_MIN} to "
                    f"{AFTER_DAYS_MAX}.")
            schedule = _Every(timedelta(days=days), in_days=True)
        object.__setattr__(self, "_schedule", schedule)
        if self.duration is not None:
            self._check_duration(self.duration)

    @classmethod
    def from_api(cls, rules: dict) -> RotationRules:
        """The rules from RotateSecret's `RotationRules`, or as DescribeSecret returned them.

        DescribeSecret adds the AutomaticallyAfterDays it derives from a ScheduleExpression;
        that pair reads back, while any other AutomaticallyAfterDays next to a
        ScheduleExpression is refused, as AWS refuses both in RotateSecret.
        """
        if not isinstance(rules, dict):
            raise InvalidParameterException("RotationRules must be a structure.")
        unknown = set(rules) - {"AutomaticallyAfterDays", "Duration", "ScheduleExpression"}
        if unknown:
            raise InvalidParameterException(
                f"RotationRules has unknown members: {', '.join(sorted(unknown))}.")
        days = rules.get("AutomaticallyAfterDays")
        expression = rules.get("ScheduleExpression")
        duration = rules.get("Duration")
        parsed_duration = None if duration is None else _parse_duration(duration)
        if days is not None and expression is not None:
            described = cls(None, parsed_duration, expression)
            if described.to_api().get("AutomaticallyAfterDays") == days:
                return described
        return cls(days, parsed_duration, expression)

    def to_api(self) -> dict:
        """RotationRules as DescribeSecret returns them: the expression as given, Duration
        only when set, and with a days-based ScheduleExpression the AutomaticallyAfterDays
        AWS derives from it, the fewest days between two rotations (14 for
        cron(0 16 1,15 * ? *), as in AWS's own DescribeSecret example)."""
        rules: dict = {}
        days = self.automatically_after_days
        schedule = self._schedule
        if isinstance(schedule, _Every) and schedule.in_days:
            days = schedule.step.days
        elif isinstance(schedule, _Cron) and not schedule.in_hours:
            days = _day_gaps(schedule)[0]
        if days is not None:
            rules["AutomaticallyAfterDays"] = days
        if self.duration is not None:
            rules["Duration"] = f"{self.duration // _HOUR}h"
        if self.expression is not None:
            rules["ScheduleExpression"] = self.expression
        return rules

    def next_window(self, after: datetime, *, last_rotated: datetime | None) -> tuple[datetime, datetime]:
        """Where the first rotation window that opens strictly after `after` opens and closes.

        A window already open at `after` is not returned: a caller catching up on a missed
        rotation decides that itself. `last_rotated` anchors AutomaticallyAfterDays and
        rate() in days (a manual PutSecretValue counts as a rotation, as in AWS); cron() and
        rate() in hours follow the calendar alone.
        """
        after = _utc(after, "after")
        schedule = self._schedule
        if isinstance(schedule, _Cron):
            start = schedule.next_start(after)
        elif schedule.in_days:
            anchor = after if last_rotated is None else _utc(last_rotated, "last_rotated")
            start = _midnight(anchor) + schedule.step
            if start <= after:
                # Overdue (the daemon was down, a rotation failed): the first window still
                # to open is tomorrow's; waiting for the next multiple of N days would leave
                # the secret unrotated for longer than the schedule allows.
                start = _midnight(after) + _DAY
        else:
            start = _EPOCH + ((after - _EPOCH) // schedule.step + 1) * schedule.step
        return start, start + self._window_length(start)

    def next_rotation(self, after: datetime, *, last_rotated: datetime | None,
                      rng: random.Random) -> datetime:
        """A point drawn uniformly from the next window: AWS rotates at some time inside the
        window, which also spreads the rotations of many secrets sharing a schedule."""
        start, end = self.next_window(after, last_rotated=last_rotated)
        offset = rng.randrange((end - start) // timedelta(microseconds=1))
        return start + timedelta(microseconds=offset)

    # --- windows ---------------------------------------------------------------------

    def _window_length(self, start: datetime) -> timedelta:
        if self.duration is not None:
            return self.duration
        schedule = self._schedule
        if isinstance(schedule, _Cron) and not schedule.in_hours:
            return _midnight(start) + _DAY - start  # to the end of the UTC day
        return _DAY if isinstance(schedule, _Every) and schedule.in_days else _HOUR

    def _check_duration(self, duration: timedelta) -> None:
        """A window must end before the next one opens and within its own UTC day."""
        hours, rest = divmod(duration, _HOUR)
        if rest or not DURATION_MIN_HOURS <= hours <= DURATION_MAX_HOURS:
            raise InvalidParameterException(
                f"Invalid Duration: the rotation window is a whole number of hours from "
                f"{DURATION_MIN_HOURS}h to {DURATION_MAX_HOURS}h.")
        schedule = self._schedule
        if isinstance(schedule, _Every):
            if not schedule.in_days and duration > schedule.step:
                raise InvalidParameterException(
                    f"Duration {hours}h is longer than the {schedule.step // _HOUR} hours between "
                    "rotations: the rotation window must not extend into the next rotation window.")
            return  # a days-based window opens at midnight, and Duration is at most 24h
        latest = schedule.hours[-1]
        if latest + hours > 24:
            raise InvalidParameterException(
                f"Duration {hours}h is too long for a window that opens at {latest:02d}:00: the "
                "rotation window must not extend into the next UTC day.")
        gaps = [b - a for a, b in zip(schedule.hours, schedule.hours[1:], strict=False)]
        if gaps and hours > min(gaps):
            raise InvalidParameterException(
                f"Duration {hours}h is longer than the {min(gaps)} hours between rotations: the "
                "rotation window must not extend into the next rotation window.")
