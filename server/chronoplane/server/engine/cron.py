"""Crontab expressions, translated to APScheduler 3's CronTrigger fields.

Written here rather than taken from ``CronTrigger.from_crontab`` because that function is
wrong for crontab users in two ways (APScheduler issue 286, fixed only in 4.x):

* day of week: it counts 0 as Monday; crontab counts 0 (and 7) as Sunday, so ``0 9 * * 1``
  would run on Tuesdays. We translate day-of-week numbers into names.
* impossible dates: ``0 0 31 2 *`` makes ``get_next_fire_time`` walk to year 9999 (about
  0.5 s of CPU) before giving up; we spot day/month combinations that never exist up front.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass

__all__ = ["CronFields", "parse_crontab"]

_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_MONTH_NAMES = [m.lower() for m in calendar.month_abbr[1:]]
_MAX_EXPRESSION = 256
_ITEM = re.compile(r"^(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(\d+))?$")
# The longest each month can be, February in a leap year.
_MONTH_DAYS = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


@dataclass(frozen=True, kw_only=True)
class CronFields:
    second: str
    minute: str
    hour: str
    day: str
    month: str
    day_of_week: str


class CronSyntaxError(ValueError):
    pass


def parse_crontab(expression: str) -> CronFields:
    """Splits 5 fields (or 6, seconds first) and fixes day of week; raises ``ValueError``."""
    if len(expression) > _MAX_EXPRESSION:
        raise CronSyntaxError(f"longer than {_MAX_EXPRESSION} characters")
    fields = expression.lower().split()
    if len(fields) == 5:
        fields.insert(0, "0")
    elif len(fields) != 6:
        raise CronSyntaxError(
            f"has {len(fields)} fields; expected 5 (minute hour day month weekday) or 6 "
            "(second minute hour day month weekday)"
        )
    second, minute, hour, day, month, weekday = fields
    parsed = CronFields(
        second=second,
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_weekdays(weekday),
    )
    _check_possible(day, month)
    return parsed


def _expand(field: str, low: int, high: int, names: list[str], name_base: int) -> set[int]:
    """The numbers a crontab field matches; names count from ``name_base``."""

    def number(token: str) -> int:
        if token in names:
            return names.index(token) + name_base
        if not token.isdigit():
            raise CronSyntaxError(f"{token!r} is not a number or a name")
        value = int(token)
        if not low <= value <= high:
            raise CronSyntaxError(f"{value} is outside {low}-{high}")
        return value

    matched: set[int] = set()
    for item in field.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise CronSyntaxError(f"cannot read {item!r}")
        span, step_text = match.groups()
        step = int(step_text) if step_text else 1
        if step == 0:
            raise CronSyntaxError(f"step 0 in {item!r}")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first, last = (number(part) for part in span.split("-"))
        else:
            first = number(span)
            last = high if step_text else first
        if first > last:
            raise CronSyntaxError(f"range {span!r} runs backwards")
        matched.update(range(first, last + 1, step))
    return matched


def _weekdays(field: str) -> str:
    if field in ("*", "?"):
        return "*"
    days = _expand(field, 0, 7, _DAY_NAMES, 0)
    return ",".join(_DAY_NAMES[day % 7] for day in sorted({d % 7 for d in days}))


def _check_possible(day: str, month: str) -> None:
    """Rejects day-of-month/month pairs that no calendar has (``31 2``, ``30,31 2``)."""
    try:
        days = _expand(day, 1, 31, [], 1)
        months = _expand(month, 1, 12, _MONTH_NAMES, 1)
    except CronSyntaxError:
        return  # APScheduler extensions such as "last"; APScheduler itself judges them.
    if not any(d <= _MONTH_DAYS[m - 1] for d in days for m in months):
        raise CronSyntaxError("never fires: no month in the month field has such a day")
