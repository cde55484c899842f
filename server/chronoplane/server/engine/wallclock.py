"""A cron trigger that matches wall-clock times and maps each one to a single instant.

APScheduler 3's CronTrigger does its arithmetic on aware datetimes in the job's zone and gets
daylight saving time wrong (issues 120 and 1021): ``30 2 * * *`` in America/New_York fires at
03:30 on 2026-03-08, when 02:00-03:00 does not exist, and in Europe/Berlin it fires twice on
2026-10-25, when 02:00-03:00 happens twice. Here APScheduler only matches the fields, on naive
wall times dressed as UTC (which has no transitions), and zoneinfo maps each matched wall time
to one instant:

* a wall time that does not exist (spring-forward gap) fires at the end of the gap, the
  transition instant; all the gap's wall times collapse into that one fire;
* an ambiguous wall time (fall-back overlap) fires at its first occurrence (fold=0) and is not
  fired again, so an every-minute cron has no fire in the repeated hour. A job that needs an
  elapsed-time period should use an interval trigger, which counts in UTC.

Fire instants strictly increase. There is no jitter here: the trigger's ``jitter`` is applied
by the runner as a deterministic delay after the fire, so that fire times are the same on every
server and after every restart, and the (job, scheduled time) dedupe keys built on them hold.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger as ApsCronTrigger
from apscheduler.triggers.cron.fields import DayOfMonthField

from chronoplane.server.engine.cron import parse_crontab
from chronoplane.server.engine.days import DayRule
from chronoplane.server.models import DayMatch
from chronoplane.server.walltime import first_instant, transition

__all__ = ["WallClockCronTrigger"]

_TICK = timedelta(microseconds=1)


class _DayField(DayOfMonthField):  # type: ignore[misc]
    """APScheduler's day-of-month field, answered by our ``DayRule`` (both day fields, their
    extensions and crontab's "either" rule), where APScheduler's own fields only "and"."""

    def __init__(self, name: str, exprs: Any, is_default: bool = False) -> None:
        assert isinstance(exprs, DayRule)
        self.name, self.is_default = name, False
        self.expressions: list[object] = []
        self.rule = exprs

    def get_next_value(self, dateval: datetime) -> int | None:
        return self.rule.next_day(dateval.year, dateval.month, dateval.day)

    def __str__(self) -> str:
        return repr(self.rule)


class _Matcher(ApsCronTrigger):  # type: ignore[misc]
    """APScheduler's walk through the calendar, with our day field."""

    FIELDS_MAP: ClassVar[dict[str, type]] = {**ApsCronTrigger.FIELDS_MAP, "day": _DayField}


class WallClockCronTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires when ``expression`` matches the wall clock of ``zone``, within optional bounds
    (aware datetimes, both inclusive); raises ``ValueError`` for a bad expression."""

    def __init__(
        self,
        expression: str,
        zone: ZoneInfo,
        *,
        day_match: DayMatch = DayMatch.ANY,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
    ) -> None:
        fields = parse_crontab(expression, day_match)
        self.expression = expression
        self.day_match = day_match
        self.zone = zone
        self.start_time = start_time.astimezone(UTC) if start_time else None
        self.end_time = end_time.astimezone(UTC) if end_time else None
        self._matcher = _Matcher(
            second=fields.second,
            minute=fields.minute,
            hour=fields.hour,
            day=fields.days,
            month=fields.month,
            timezone=UTC,
        )

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first fire after ``previous_fire_time`` or, without one, at or after ``now``
        (APScheduler's contract), in UTC; None when there is none before ``end_time``."""
        if previous_fire_time is None:
            threshold = now.astimezone(UTC)
        else:
            threshold = previous_fire_time.astimezone(UTC) + _TICK
        if self.start_time is not None:
            threshold = max(threshold, self.start_time)
        try:
            wall = self._next_match(self._first_wall(threshold))
            fire = None if wall is None else first_instant(wall, self.zone)
        except (OverflowError, ValueError):  # at the ends of datetime's range (year 1 or 9999)
            return None
        if fire is None or (self.end_time is not None and fire > self.end_time):
            return None
        return fire

    def _first_wall(self, threshold: datetime) -> datetime:
        """The earliest wall time whose instant is at or after ``threshold``.

        Instants only grow with wall times, so this is just after the wall time of the instant
        before ``threshold``, except in a repeated hour: there every wall time maps to its first
        occurrence, before ``threshold``, and the search starts where the repetition ends.
        """
        before = (threshold - _TICK).astimezone(self.zone)
        wall = before.replace(tzinfo=None, fold=0)
        if before.fold:
            first = wall.replace(tzinfo=self.zone).astimezone(UTC)
            end = transition(first, before, self.zone)
            return (end - _TICK).astimezone(self.zone).replace(tzinfo=None) + _TICK
        return wall + _TICK

    def _next_match(self, wall: datetime) -> datetime | None:
        """The first wall time at or after ``wall`` that the expression matches."""
        found: datetime | None = self._matcher.get_next_fire_time(None, wall.replace(tzinfo=UTC))
        return None if found is None else found.replace(tzinfo=None)

    def __str__(self) -> str:
        return f"wallclock_cron[{self.expression!r}, {self.zone.key}, {self.day_match}]"

    def __repr__(self) -> str:
        bounds = "".join(
            f", {name}={value.isoformat()!r}"
            for name, value in (("start_time", self.start_time), ("end_time", self.end_time))
            if value is not None
        )
        return (
            f"<WallClockCronTrigger ({self.expression!r}, zone={self.zone.key!r}, "
            f"day_match={self.day_match.value!r}{bounds})>"
        )
