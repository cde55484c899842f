"""Which days of a month a crontab expression's two day fields select.

The day fields' extensions (``L``, ``LW``, ``15W`` in day of month; ``5L``, ``1#2`` in day of
week) and the rule that joins the two fields are decided here, on a month's *shape*: its
length and the weekday of its 1st. Every Gregorian (month, length, weekday of the 1st) occurs
within 40 years (a leap February starting on a given weekday: every 28 years, 40 across the
non-leap 2100), so a rule that selects a day of some possible shape fires within 40 years,
and one that selects none never fires (``possible``).

Weekdays count as crontab does: 0 is Sunday, 6 is Saturday.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass

__all__ = ["DayOfMonth", "DayOfWeek", "DayRule", "month_shape"]

_SATURDAY, _SUNDAY = 6, 0
# The lengths each month can have (February: common and leap years).
_LENGTHS = {month: (calendar.monthrange(2001, month)[1],) for month in range(1, 13)} | {2: (28, 29)}


def month_shape(year: int, month: int) -> tuple[int, int]:
    """The month's length and the crontab weekday of its 1st."""
    monday_first, length = calendar.monthrange(year, month)
    return length, (monday_first + 1) % 7


def _weekday(first: int, day: int) -> int:
    return (first + day - 1) % 7


def _last_weekday(length: int, first: int) -> int:
    """The last Monday-to-Friday of the month (``LW``)."""
    last = _weekday(first, length)
    return length - 1 if last == _SATURDAY else length - 2 if last == _SUNDAY else length


def _nearest_weekday(day: int, length: int, first: int) -> int | None:
    """The Monday-to-Friday nearest ``day`` within the month (``15W``, as Quartz): a Saturday
    moves to the Friday before, a Sunday to the Monday after, never across the month's ends
    (the 1st on a Saturday moves to Monday the 3rd, a last day on a Sunday to the Friday
    before). None when the month has no such day."""
    if day > length:
        return None
    weekday = _weekday(first, day)
    if weekday == _SATURDAY:
        return day - 1 if day > 1 else day + 2
    if weekday == _SUNDAY:
        return day + 1 if day < length else day - 2
    return day


@dataclass(frozen=True, kw_only=True)
class DayOfMonth:
    """Day numbers, and ``L`` (the last day), ``LW`` (the last weekday), ``nW`` (nearest)."""

    days: frozenset[int] = frozenset()
    last: bool = False
    last_weekday: bool = False
    nearest: frozenset[int] = frozenset()

    def matches(self, length: int, first: int, day: int) -> bool:
        return (
            day in self.days
            or (self.last and day == length)
            or (self.last_weekday and day == _last_weekday(length, first))
            or any(day == _nearest_weekday(n, length, first) for n in self.nearest)
        )


@dataclass(frozen=True, kw_only=True)
class DayOfWeek:
    """Weekdays, ``nL`` (the last such weekday of the month) and ``n#k`` (the k-th)."""

    weekdays: frozenset[int] = frozenset()
    last_of: frozenset[int] = frozenset()
    nth: frozenset[tuple[int, int]] = frozenset()

    def matches(self, length: int, first: int, day: int) -> bool:
        weekday = _weekday(first, day)
        return (
            weekday in self.weekdays
            or (weekday in self.last_of and day + 7 > length)
            or (weekday, (day + 6) // 7) in self.nth
        )


@dataclass(frozen=True, kw_only=True)
class DayRule:
    """The two day fields and how they join: ``either`` (crontab's rule when both fields are
    restricted) or both (when either field starts with ``*`` or is ``?``, or under
    DAY_MATCH_ALL)."""

    of_month: DayOfMonth
    of_week: DayOfWeek
    either: bool

    def matches(self, length: int, first: int, day: int) -> bool:
        in_month = self.of_month.matches(length, first, day)
        if in_month and not self.either:
            return self.of_week.matches(length, first, day)
        return in_month or (self.either and self.of_week.matches(length, first, day))

    def next_day(self, year: int, month: int, day: int) -> int | None:
        """The first day from ``day`` on, in that month, that the rule selects."""
        length, first = month_shape(year, month)
        for candidate in range(day, length + 1):
            if self.matches(length, first, candidate):
                return candidate
        return None

    def possible(self, months: frozenset[int]) -> bool:
        """Whether the rule selects a day in some month of ``months`` of some year: only a
        month's length and the weekday of its 1st matter, and every pair occurs."""
        lengths = {length for month in months for length in _LENGTHS[month]}
        return any(
            self.matches(length, first, day)
            for length in lengths
            for first in range(7)
            for day in range(1, length + 1)
        )
