"""NCRONTAB schedules, as the Functions host reads a timer trigger's `schedule`.

Written here rather than taken from PyPI: the popular cron libraries speak Vixie cron (seconds
last or absent, day-of-month OR day-of-week), while NCRONTAB puts seconds first and requires both
day fields to match. A dev host that fired on a different day than Azure would hide bugs, and the
dialect is small enough to keep exact and fully unit-tested. Times are UTC, as in Azure by default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FULL_NAMES = {
    "january", "february", "march", "april", "june", "july", "august", "september", "october",
    "november", "december", "sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
}  # fmt: skip
# (name, lowest, highest, names for lowest..): the field order of a six-field expression.
_FIELDS = (
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _WEEKDAYS),
)
# Searching further than this for a match means the schedule can never fire (e.g. 30 February).
_HORIZON = timedelta(days=366 * 5)


def _value(token: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    lowered = token.lower()
    if names and (lowered[:3] in names) and (len(lowered) == 3 or lowered in _FULL_NAMES):
        return low + names.index(lowered[:3])
    if not token.isdigit():
        raise ValueError(f"{token!r} is not a valid {name}")
    number = int(token)
    if not low <= number <= high:
        raise ValueError(f"{name} {number} is outside {low}-{high}")
    return number


def _field(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = _value(step_text, f"{name} step", 1, high - low + 1, ()) if step_text else 1
        if span == "*":
            first, last = low, high
        elif "-" in span:
            start, _, end = span.partition("-")
            first, last = _value(start, name, low, high, names), _value(end, name, low, high, names)
            if first > last:
                raise ValueError(f"{name} range {span!r} runs backwards")
        else:
            first = _value(span, name, low, high, names)
            last = high if step_text else first  # "5/15" means 5, 20, 35, 50 as in NCrontab
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """One parsed expression; `next_after` is all a timer needs."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Six fields, seconds first; five fields (no seconds) fire at second 0, as in the host."""
        parts = expression.split()
        if len(parts) == 5:
            parts = ["0", *parts]
        if len(parts) != 6:
            raise ValueError(f"NCRONTAB {expression!r} needs 6 fields (second minute hour day month weekday)")
        fields = [_field(text, *spec) for text, spec in zip(parts, _FIELDS, strict=True)]
        return cls(expression, *fields)

    def next_after(self, moment: datetime) -> datetime | None:
        """The first whole second strictly after `moment` that matches, or None if none ever does."""
        t = moment.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        limit = t + _HORIZON
        while t < limit:
            if t.month not in self.months:
                year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
                t = t.replace(year=year, month=month, day=1, hour=0, minute=0, second=0)
            elif t.day not in self.days or (t.weekday() + 1) % 7 not in self.weekdays:
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t = t.replace(second=0) + timedelta(minutes=1)
            elif t.second not in self.seconds:
                t += timedelta(seconds=1)
            else:
                return t
        return None


_SETTING = re.compile(r"%([^%\s]+)%")


def resolve_settings(value: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace `%NAME%` with the app setting NAME, as the host does for binding expressions."""
    source = os.environ if environ is None else environ

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if not source.get(name):
            raise LookupError(f"app setting {name!r} (named by {value!r}) is not set")
        return source[name]

    return _SETTING.sub(lookup, value)
