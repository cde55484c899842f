"""Crontab expressions, checked here and handed to APScheduler 3 in one canonical form.

Written here rather than taken from ``CronTrigger.from_crontab`` because that function is
wrong for crontab users in two ways (APScheduler issue 286, fixed only in 4.x):

* day of week: it counts 0 as Monday; crontab counts 0 (and 7) as Sunday, so ``0 9 * * 1``
  would run on Tuesdays. We translate day-of-week numbers into names.
* impossible dates: ``0 0 31 2 *`` makes ``get_next_fire_time`` walk to year 9999 (about
  0.5 s of CPU) before giving up; we spot day/month combinations that never exist up front.

Every field is read by the grammar below, never by APScheduler's, whose regular expressions use
``\\d`` (so ``٣٠`` would pass as 30) and whose steps and names differ from crontab's: APScheduler
gets ``*`` or a plain list of numbers, weekday names, or ``last``. Once a day and a month exist
together, the expression fires within 40 years whatever the day of week (a Feb 29 that is also
a given weekday, across a non-leap 2100), so a parsed expression never sends the matcher on a
long walk.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass

__all__ = ["CronFields", "CronSyntaxError", "parse_crontab"]

_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_MONTH_NAMES = [m.lower() for m in calendar.month_abbr[1:]]
_MAX_EXPRESSION = 256
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9*/,?\- \t]")
_ITEM = re.compile(r"^(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/([0-9]+))?$")
# APScheduler's day-of-month extension: the last day of the month.
_LAST = "last"
# The longest each month can be, February in a leap year.
_MONTH_DAYS = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


@dataclass(frozen=True, kw_only=True)
class CronFields:
    """APScheduler 3 CronTrigger field values: ``*``, number lists, or weekday names."""

    second: str
    minute: str
    hour: str
    day: str
    month: str
    day_of_week: str


class CronSyntaxError(ValueError):
    pass


def parse_crontab(expression: str) -> CronFields:
    """Splits 5 fields (or 6, seconds first) and checks each; raises ``CronSyntaxError``."""
    if len(expression) > _MAX_EXPRESSION:
        raise CronSyntaxError(f"longer than {_MAX_EXPRESSION} characters")
    if expression.startswith("@"):
        raise CronSyntaxError(
            "macros like @daily are not supported; write the fields (@daily is '0 0 * * *')"
        )
    bad = _NOT_ALLOWED.search(expression)
    if bad is not None:
        raise CronSyntaxError(f"character {bad.group()!r} at position {bad.start()} is not allowed")
    fields = expression.lower().split()
    if len(fields) == 5:
        fields.insert(0, "0")
    elif len(fields) != 6:
        raise CronSyntaxError(
            f"has {len(fields)} fields; expected 5 (minute hour day month weekday) or 6 "
            "(second minute hour day month weekday)"
        )
    second, minute, hour, day, month, weekday = fields
    seconds = _expand("second", second, 0, 59)
    minutes = _expand("minute", minute, 0, 59)
    hours = _expand("hour", hour, 0, 23)
    days, last_day = _days_of_month(day)
    months = _expand("month", month, 1, 12, names=_MONTH_NAMES, name_base=1)
    weekdays = _weekdays(weekday)
    if not last_day and not any(d <= _MONTH_DAYS[m - 1] for d in days for m in months):
        raise CronSyntaxError("never fires: no month in the month field has such a day")
    return CronFields(
        second=_canonical(seconds, 0, 59),
        minute=_canonical(minutes, 0, 59),
        hour=_canonical(hours, 0, 23),
        day=_canonical(days, 1, 31, last_day=last_day),
        month=_canonical(months, 1, 12),
        day_of_week=weekdays,
    )


def _expand(
    what: str,
    field: str,
    low: int,
    high: int,
    *,
    names: list[str] | None = None,
    name_base: int = 0,
) -> set[int]:
    """The numbers a crontab field matches; names count from ``name_base``."""
    known = names or []
    expected = "a number or a name" if known else "a number"

    def number(token: str) -> int:
        if token in known:
            return known.index(token) + name_base
        if not token.isdigit():
            raise CronSyntaxError(f"{what}: {token!r} is not {expected}")
        value = int(token)
        if not low <= value <= high:
            raise CronSyntaxError(f"{what}: {value} is outside {low}-{high}")
        return value

    matched: set[int] = set()
    for item in field.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise CronSyntaxError(f"{what}: cannot read {item!r}")
        span, step_text = match.groups()
        step = int(step_text) if step_text else 1
        if not 1 <= step <= high - low:
            raise CronSyntaxError(f"{what}: step {step_text} in {item!r} is not in 1-{high - low}")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first, last = (number(part) for part in span.split("-"))
        else:
            first = number(span)
            last = high if step_text else first
        if first > last:
            raise CronSyntaxError(f"{what}: range {span!r} runs backwards")
        matched.update(range(first, last + 1, step))
    return matched


def _days_of_month(field: str) -> tuple[set[int], bool]:
    """The days ``field`` names, and whether it names the last day of the month."""
    items = field.split(",")
    numbered = [item for item in items if item != _LAST]
    days = _expand("day of month", ",".join(numbered), 1, 31) if numbered else set()
    return days, len(numbered) < len(items)


def _canonical(values: set[int], low: int, high: int, *, last_day: bool = False) -> str:
    if set(range(low, high + 1)) <= values:
        return "*"
    return ",".join([*(str(v) for v in sorted(values)), *([_LAST] if last_day else [])])


def _weekdays(field: str) -> str:
    if field in ("*", "?"):
        return "*"
    days = {d % 7 for d in _expand("day of week", field, 0, 7, names=_DAY_NAMES)}
    return ",".join(_DAY_NAMES[day] for day in sorted(days))
