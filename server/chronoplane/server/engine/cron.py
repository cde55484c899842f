"""Crontab expressions, checked here and handed to APScheduler 3 in one canonical form.

Written here rather than taken from ``CronTrigger.from_crontab`` because that function is
wrong for crontab users (APScheduler issue 286, fixed only in 4.x): it counts day of week 0
as Monday, so ``0 9 * * 1`` would run on Tuesdays, and it joins the two day fields with
"and" where crontab uses "or". Its grammar also lacks ``W``, ``LW``, ``5L`` and ``1#2`` and
reads ``\\d`` (so ``٣٠`` would pass as 30).

Every field is read by the grammar below. APScheduler gets the time fields and the month as
``*`` or plain lists of numbers, and the days as a ``DayRule`` (days.py), which also tells
up front whether the expression can ever fire, so a parsed expression never sends the
matcher on a long walk. Messages quote a token as it was written.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass

from chronoplane.server.engine.days import DayOfMonth, DayOfWeek, DayRule
from chronoplane.server.models import DayMatch

__all__ = ["MACROS", "CronFields", "CronSyntaxError", "parse_crontab"]

_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_MONTH_NAMES = [m.lower() for m in calendar.month_abbr[1:]]
_MAX_EXPRESSION = 256
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9*/,?#\- \t]")
_ITEM = re.compile(r"^(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/([0-9]+))?$")
# The macros of cronie and Kubernetes, and the fields each stands for.
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MACRO_LIST = ", ".join(f"{name} ('{fields}')" for name, fields in MACROS.items())
# A day of month item: L (last), LW (last weekday), 15W (nearest weekday); 'last' is the
# spelling Chronoplane accepted first (APScheduler's).
_LAST_DAY = {"l", "last"}
_NEAREST = re.compile(r"^([0-9]+)w$")
# A day of week item: 5L / friL (the last Friday), 5#2 / fri#2 (the second Friday).
_LAST_OF = re.compile(r"^([0-9]+|sun|mon|tue|wed|thu|fri|sat)l$")
_NTH = re.compile(r"^([a-z0-9]+)#([0-9]+)$")
_YEAR = re.compile(r"^[0-9]{4}")


@dataclass(frozen=True, kw_only=True)
class CronFields:
    """APScheduler 3 CronTrigger field values (``*`` or number lists), and the day rule."""

    second: str
    minute: str
    hour: str
    month: str
    months: frozenset[int]
    days: DayRule


class CronSyntaxError(ValueError):
    pass


def parse_crontab(expression: str, day_match: DayMatch = DayMatch.ANY) -> CronFields:
    """Splits 5 fields (or 6, seconds first), or reads a macro, and checks each field;
    raises ``CronSyntaxError`` naming the field and quoting the token."""
    if len(expression) > _MAX_EXPRESSION:
        raise CronSyntaxError(f"longer than {_MAX_EXPRESSION} characters")
    fields = _fields(expression)
    second, minute, hour, day, month, weekday = fields
    months = frozenset(_expand("month", month, 1, 12, names=_MONTH_NAMES, name_base=1))
    either = day_match == DayMatch.ANY and not _unrestricted(day) and not _unrestricted(weekday)
    rule = DayRule(of_month=_days_of_month(day), of_week=_days_of_week(weekday), either=either)
    parsed = CronFields(
        second=_canonical(_expand("second", second, 0, 59), 0, 59),
        minute=_canonical(_expand("minute", minute, 0, 59), 0, 59),
        hour=_canonical(_expand("hour", hour, 0, 23), 0, 23),
        month=_canonical(set(months), 1, 12),
        months=months,
        days=rule,
    )
    if not rule.possible(months):
        raise CronSyntaxError(
            "never fires: no month in the month field has a day that the day fields select"
        )
    return parsed


def _unrestricted(field: str) -> bool:
    """crontab's test for "not restricted": the field starts with ``*`` (cronie, Vixie
    cron), or is ``?`` (Quartz, Kubernetes)."""
    return field.startswith("*") or field == "?"


def _fields(expression: str) -> list[str]:
    """The six fields (seconds first), from a macro or from 5 or 6 fields."""
    if expression.startswith("@"):
        return _macro(expression).split()
    bad = _NOT_ALLOWED.search(expression)
    if bad is not None:
        raise CronSyntaxError(f"character {bad.group()!r} at position {bad.start()} is not allowed")
    fields = expression.split()
    if len(fields) == 7 or (len(fields) == 6 and _YEAR.match(fields[5])):
        raise CronSyntaxError(
            f"{fields[-1]!r} looks like a year field: a year field is not supported (five "
            "fields are minute hour day month weekday; six put a second first)"
        )
    if len(fields) == 5:
        fields.insert(0, "0")
    elif len(fields) != 6:
        raise CronSyntaxError(
            f"has {len(fields)} fields; expected 5 (minute hour day month weekday) or 6 "
            "(second minute hour day month weekday), or a macro like @daily"
        )
    return fields


def _macro(text: str) -> str:
    name = text.lower()
    if name in MACROS:
        return "0 " + MACROS[name]
    if name == "@reboot":
        raise CronSyntaxError(
            "@reboot is not supported: it means 'when the cron daemon starts', and a "
            "Chronoplane schedule does not depend on any server starting; to run a task once "
            "now, trigger the job (chronoctl jobs trigger) or give it a date trigger"
        )
    if name.startswith("@every"):
        raise CronSyntaxError(
            f"{text!r} is not supported: for a fixed period use an interval trigger "
            "(chronoctl --every 1h30m)"
        )
    raise CronSyntaxError(f"{text!r} is not a macro; the macros are {_MACRO_LIST}")


def _number(what: str, token: str, low: int, high: int, names: list[str], base: int) -> int:
    """A number or a name in ``what``'s range; ``token`` as written."""
    if token.lower() in names:
        return names.index(token.lower()) + base
    if not token.isascii() or not token.isdigit():
        expected = "a number or a name" if names else "a number"
        raise CronSyntaxError(f"{what}: {token!r} is not {expected}")
    value = int(token)
    if not low <= value <= high:
        raise CronSyntaxError(f"{what}: {value} is outside {low}-{high}")
    return value


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
    matched: set[int] = set()
    for item in field.split(","):
        _refuse_extension(what, item)
        match = _ITEM.match(item.lower())
        if match is None or item == "":
            raise CronSyntaxError(f"{what}: cannot read {item!r}")
        span, step_text = match.groups()
        step = int(step_text) if step_text else 1
        if not 1 <= step <= high - low:
            raise CronSyntaxError(f"{what}: step {step_text} in {item!r} is not in 1-{high - low}")
        if span == "*":
            first, last = low, high
        else:
            written = item.split("/")[0]
            bounds = [
                _number(what, part, low, high, known, name_base) for part in written.split("-")
            ]
            first = bounds[0]
            last = bounds[-1] if len(bounds) == 2 else (high if step_text else first)
            if first > last:
                raise CronSyntaxError(f"{what}: range {written!r} runs backwards")
        matched.update(range(first, last + 1, step))
    return matched


def _refuse_extension(what: str, item: str) -> None:
    """Names the extension a token uses where this field does not take it."""
    lower = item.lower()
    if item == "?":
        if what.startswith("day of"):
            raise CronSyntaxError(f"{what}: '?' (no specific value) must be the whole field")
        raise CronSyntaxError(f"{what}: '?' (no specific value) is only allowed in the day fields")
    if "#" in item and what == "day of week":
        raise CronSyntaxError(
            f"{what}: {item!r}: '#' takes one weekday and a count from 1 to 5, like 1#2"
        )
    if "#" in item:
        raise CronSyntaxError(
            f"{what}: {item!r}: '#' (the nth weekday of the month) is only supported in day "
            "of week, like 1#2 for the second Monday"
        )
    if lower == "h" or lower.startswith("h/"):
        raise CronSyntaxError(f"{what}: {item!r}: 'H' (Jenkins' hashed value) is not supported")
    if (lower.endswith("w") and lower[:-1].isdigit()) or lower == "lw":
        raise CronSyntaxError(
            f"{what}: {item!r}: 'W' (nearest weekday) is only supported in day of month"
        )
    if lower in _LAST_DAY or _LAST_OF.match(lower):
        raise CronSyntaxError(
            f"{what}: {item!r}: 'L' (last) is only supported in day of month (L, LW) and day "
            "of week (5L, FRIL)"
        )


def _days_of_month(field: str) -> DayOfMonth:
    what = "day of month"
    if field == "?":
        return DayOfMonth(days=frozenset(range(1, 32)))
    plain: list[str] = []
    last = last_weekday = False
    nearest: set[int] = set()
    for item in field.split(","):
        lower = item.lower()
        if lower in _LAST_DAY:
            last = True
        elif lower == "lw":
            last_weekday = True
        elif (found := _NEAREST.match(lower)) is not None:
            nearest.add(_number(what, found.group(1), 1, 31, [], 0))
        elif lower.startswith("l-"):
            raise CronSyntaxError(
                f"{what}: {item!r}: 'L-n' (n days before the last) is not supported"
            )
        elif "w" in lower:
            raise CronSyntaxError(
                f"{what}: {item!r}: 'W' (nearest weekday) takes a single day, like 15W"
            )
        else:
            plain.append(item)
    days = _expand(what, ",".join(plain), 1, 31) if plain else set()
    return DayOfMonth(
        days=frozenset(days), last=last, last_weekday=last_weekday, nearest=frozenset(nearest)
    )


def _days_of_week(field: str) -> DayOfWeek:
    what = "day of week"
    if field == "?":
        return DayOfWeek(weekdays=frozenset(range(7)))
    plain: list[str] = []
    last_of: set[int] = set()
    nth: set[tuple[int, int]] = set()
    for item in field.split(","):
        lower = item.lower()
        if lower == "l":
            raise CronSyntaxError(
                f"{what}: {item!r}: 'L' alone (Quartz's Saturday) is not supported; write 6 or "
                "SAT, or 5L for the last Friday of the month"
            )
        if _LAST_OF.match(lower):
            last_of.add(_number(what, item[:-1], 0, 7, _DAY_NAMES, 0) % 7)
        elif _NTH.match(lower):
            day, _, count = item.partition("#")
            weekday = _number(what, day, 0, 7, _DAY_NAMES, 0) % 7
            nth.add((weekday, _number(f"{what}: {item!r}", count, 1, 5, [], 0)))
        else:
            plain.append(item)
    weekdays = _expand(what, ",".join(plain), 0, 7, names=_DAY_NAMES) if plain else set()
    return DayOfWeek(
        weekdays=frozenset(d % 7 for d in weekdays),
        last_of=frozenset(last_of),
        nth=frozenset(nth),
    )


def _canonical(values: set[int], low: int, high: int) -> str:
    if set(range(low, high + 1)) <= values:
        return "*"
    return ",".join(str(v) for v in sorted(values))
