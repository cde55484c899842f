"""Schedules the engine must reject, quickly: shared by tests/test_hostile_schedules.py and
bench/hostile_schedules.py.

Each entry names the violation field relative to the trigger message (``cron.expression``);
through the API it is prefixed with ``job.trigger.`` or ``trigger.``. Bounds are fixed dates
chosen to be wrong whenever the suite runs (before 2100).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from chronoplane.server.models import CronTrigger, DayMatch, IntervalTrigger, Trigger

__all__ = ["ACCEPTED_TIME_ZONES", "CORPUS", "Hostile"]


@dataclass(frozen=True, kw_only=True)
class Hostile:
    id: str
    trigger: Trigger
    field: str


def _expression(id: str, expression: str, day_match: DayMatch = DayMatch.ANY) -> Hostile:
    trigger = CronTrigger(expression=expression, day_match=day_match)
    return Hostile(id=id, trigger=trigger, field="cron.expression")


def _zone(id: str, time_zone: str) -> Hostile:
    return Hostile(
        id=f"zone-{id}",
        trigger=CronTrigger(expression="0 0 * * *", time_zone=time_zone),
        field="cron.time_zone",
    )


def _utc(year: int, month: int, day: int, hour: int = 0) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


CORPUS: list[Hostile] = [
    # Field counts.
    _expression("empty", ""),
    _expression("blank", "   \t "),
    _expression("four-fields", "* * * *"),
    _expression("seven-fields", "* * * * * * *"),
    # Out of range.
    _expression("minute-61", "61 * * * *"),
    _expression("minute-60", "60 * * * *"),
    _expression("second-60", "60 * * * * *"),
    _expression("hour-24", "0 24 * * *"),
    _expression("day-0", "0 0 0 * *"),
    _expression("day-32", "0 0 32 * *"),
    _expression("month-0", "0 0 * 0 *"),
    _expression("month-13", "0 0 * 13 *"),
    _expression("weekday-8", "0 0 * * 8"),
    _expression("negative-minute", "-1 * * * *"),
    _expression("huge-number", "99999999999999999999999999 * * * *"),
    # Steps.
    _expression("step-0", "*/0 * * * *"),
    _expression("step-negative", "*/-1 * * * *"),
    _expression("range-step-0", "1-5/0 * * * *"),
    _expression("step-past-span", "*/60 * * * *"),
    _expression("step-huge", "*/99999999999999999999 * * * *"),
    _expression("day-step-huge", "0 0 */400 * *"),
    # Ranges and names.
    _expression("range-backwards", "5-1 * * * *"),
    _expression("weekday-names-backwards", "0 0 * * fri-mon"),
    _expression("month-names-backwards", "0 0 * dec-jan *"),
    _expression("dangling-range", "0 0 * * mon-"),
    _expression("empty-list-item", "1,,2 * * * *"),
    _expression("weekday-name-in-minutes", "mon * * * *"),
    _expression("last-in-minutes", "last * * * *"),
    _expression("quartz-l-offset", "0 0 L-3 * *"),
    _expression("quartz-l-alone-in-weekday", "0 0 * * L"),
    _expression("w-in-a-range", "0 0 1-5W * *"),
    _expression("w-in-weekday", "0 0 * * 1W"),
    _expression("hash-in-day-of-month", "0 0 1#2 * *"),
    _expression("hash-sixth", "0 0 * * 1#6"),
    _expression("question-in-month", "0 0 * ? *"),
    _expression("jenkins-hash", "H 0 * * *"),
    _expression("year-field", "0 0 1 1 * 2027"),
    # Garbage characters.
    _expression("letters", "a b c d e"),
    _expression("shell", "0 0 * * * ;rm -rf /"),
    _expression("template", "${MINUTE} * * * *"),
    _expression("exponent", "1e3 * * * *"),
    _expression("hex", "0x10 * * * *"),
    _expression("arabic-indic-digits", "\u0663\u0660 2 * * *"),
    _expression("fullwidth-digits", "\uff10 \uff10 * * *"),
    _expression("superscript-digit", "\u00b3 * * * *"),
    _expression("nul", "0\x00 0 * * *"),
    _expression("trailing-newline", "0 0 * * *\n"),
    _expression("newline-separator", "0\n0 * * *"),
    _expression("crlf", "0 0 * * *\r\n"),
    _expression("no-break-space", "0\u00a00 * * *"),
    _expression("ten-thousand-chars", "x" * 10_000),
    _expression("long-list", "1," * 200 + "1 * * * *"),
    # Dates that never exist, alone or with a day of week.
    _expression("feb-30", "0 0 30 2 *"),
    _expression("feb-31", "0 0 31 2 *"),
    _expression("31-in-short-months", "0 0 31 4,6,9,11 *"),
    _expression("feb-30-31-names", "0 0 30,31 feb *"),
    _expression("feb-31-weekdays-all", "0 0 31 2 1-5", DayMatch.ALL),
    _expression("short-months-31-monday-all", "0 0 31 apr,jun mon", DayMatch.ALL),
    _expression("last-weekday-on-sunday-all", "0 0 LW * 0", DayMatch.ALL),
    _expression("feb-31-starred-weekday", "0 0 31 2 */2"),
    # Macros.
    _expression("reboot", "@reboot"),
    _expression("unknown-macro", "@fortnightly"),
    _expression("macro-with-fields", "@daily 5"),
    _expression("macro-with-newline", "@daily\n"),
    _expression("every-macro", "@every 5m"),
    # Time zones.
    _zone("unknown", "Mars/Olympus"),
    _zone("path-traversal", "../../etc/passwd"),
    _zone("absolute-path", "/etc/localtime"),
    _zone("nul", "UTC\x00"),
    _zone("trailing-newline", "Europe/Berlin\n"),
    _zone("leading-space", " UTC"),
    _zone("thousand-chars", "A" * 1000),
    _zone("localtime", "localtime"),
    _zone("posixrules", "posixrules"),
    _zone("right-prefix", "right/UTC"),
    _zone("posix-prefix", "posix/Europe/Berlin"),
    _zone("lower-case", "europe/berlin"),
    _zone("directory", "Europe"),
    _zone("double-slash", "Europe//Berlin"),
    _zone("offset", "+05:00"),
    # Bounds and periods that leave nothing to fire.
    Hostile(
        id="cron-end-before-start",
        trigger=CronTrigger(
            expression="0 0 * * *", start_time=_utc(2090, 1, 2), end_time=_utc(2090, 1, 1)
        ),
        field="cron.end_time",
    ),
    Hostile(
        id="cron-end-equals-start",
        trigger=CronTrigger(
            expression="0 0 * * *", start_time=_utc(2090, 1, 1), end_time=_utc(2090, 1, 1)
        ),
        field="cron.end_time",
    ),
    Hostile(
        id="cron-end-passed",
        trigger=CronTrigger(expression="0 0 * * *", end_time=_utc(2020, 1, 1)),
        field="cron.end_time",
    ),
    Hostile(
        id="cron-window-without-fire",
        trigger=CronTrigger(
            expression="0 12 * * *",
            time_zone="Europe/Berlin",
            start_time=_utc(2090, 1, 1, 12),
            end_time=_utc(2090, 1, 2, 10),
        ),
        field="cron.end_time",
    ),
    Hostile(
        id="cron-start-beyond-100-years",
        trigger=CronTrigger(expression="0 0 * * *", start_time=_utc(2200, 1, 1)),
        field="cron.start_time",
    ),
    Hostile(
        id="cron-start-year-9999",
        trigger=CronTrigger(
            expression="* * * * *", time_zone="Pacific/Kiritimati", start_time=_utc(9999, 12, 31)
        ),
        field="cron.start_time",
    ),
    Hostile(
        id="interval-end-passed",
        trigger=IntervalTrigger(
            every=timedelta(hours=1), start_time=_utc(2020, 1, 1), end_time=_utc(2020, 1, 2)
        ),
        field="interval.end_time",
    ),
    Hostile(
        id="interval-end-before-start",
        trigger=IntervalTrigger(
            every=timedelta(hours=1), start_time=_utc(2090, 1, 2), end_time=_utc(2090, 1, 1)
        ),
        field="interval.end_time",
    ),
    Hostile(
        id="interval-start-beyond-100-years",
        trigger=IntervalTrigger(every=timedelta(days=1), start_time=_utc(2200, 1, 1)),
        field="interval.start_time",
    ),
    Hostile(
        id="interval-every-zero",
        trigger=IntervalTrigger(every=timedelta(0)),
        field="interval.every",
    ),
    Hostile(
        id="interval-every-below-a-second",
        trigger=IntervalTrigger(every=timedelta(milliseconds=999)),
        field="interval.every",
    ),
    Hostile(
        id="interval-every-negative",
        trigger=IntervalTrigger(every=timedelta(seconds=-60)),
        field="interval.every",
    ),
    Hostile(
        id="interval-every-3651-days",
        trigger=IntervalTrigger(every=timedelta(days=3651)),
        field="interval.every",
    ),
    # Jitter.
    Hostile(
        id="jitter-negative",
        trigger=CronTrigger(expression="0 0 * * *", jitter=timedelta(seconds=-1)),
        field="jitter",
    ),
    Hostile(
        id="jitter-over-a-day",
        trigger=CronTrigger(expression="0 0 * * *", jitter=timedelta(days=1, seconds=1)),
        field="jitter",
    ),
    Hostile(
        id="jitter-equals-period",
        trigger=IntervalTrigger(every=timedelta(minutes=5), jitter=timedelta(minutes=5)),
        field="jitter",
    ),
]

# Valid per the rule the engine keeps: a name zoneinfo.available_timezones() lists, except
# "localtime"; empty means UTC (as the API documents).
ACCEPTED_TIME_ZONES = ["", "UTC", "Etc/UTC", "US/Eastern", "EST5EDT", "Etc/GMT+5", "Factory"]
