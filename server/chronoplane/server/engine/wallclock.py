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

import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger as ApsCronTrigger

from chronoplane.server.engine.cron import parse_crontab

__all__ = ["WallClockCronTrigger"]

_TICK = timedelta(microseconds=1)


class WallClockCronTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires when ``expression`` matches the wall clock of ``zone``, within optional bounds
    (aware datetimes, both inclusive); raises ``ValueError`` for a bad expression."""

    def __init__(
        self,
        expression: str,
        zone: ZoneInfo,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
    ) -> None:
        fields = parse_crontab(expression)
        self.expression = expression
        self.zone = zone
        self.start_time = start_time.astimezone(UTC) if start_time else None
        self.end_time = end_time.astimezone(UTC) if end_time else None
        self._matcher = ApsCronTrigger(
            second=fields.second,
            minute=fields.minute,
            hour=fields.hour,
            day=fields.day,
            month=fields.month,
            day_of_week=fields.day_of_week,
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
            fire = None if wall is None else self._instant(wall)
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
            transition = self._transition(first, before)
            return (transition - _TICK).astimezone(self.zone).replace(tzinfo=None) + _TICK
        return wall + _TICK

    def _next_match(self, wall: datetime) -> datetime | None:
        """The first wall time at or after ``wall`` that the expression matches."""
        found: datetime | None = self._matcher.get_next_fire_time(None, wall.replace(tzinfo=UTC))
        return None if found is None else found.replace(tzinfo=None)

    def _instant(self, wall: datetime) -> datetime:
        """When ``wall`` happens: its first occurrence, or the end of the gap it falls in."""
        instant = wall.replace(tzinfo=self.zone).astimezone(UTC)
        if instant.astimezone(self.zone).replace(tzinfo=None) == wall:
            return instant
        # In a gap fold=0 reads the wall time with the offset from before the jump, an instant
        # after the gap, and fold=1 with the offset from after it, an instant before the gap.
        earlier = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        return self._transition(earlier, instant)

    def _transition(self, earlier: datetime, later: datetime) -> datetime:
        """The first instant in (``earlier``, ``later``] with ``later``'s UTC offset, found by
        bisection in whole seconds (tzdata transitions fall on whole seconds)."""
        offset = later.astimezone(self.zone).utcoffset()
        low, high = math.floor(earlier.timestamp()), math.ceil(later.timestamp())
        while high - low > 1:
            middle = (low + high) // 2
            if datetime.fromtimestamp(middle, self.zone).utcoffset() == offset:
                high = middle
            else:
                low = middle
        return datetime.fromtimestamp(high, UTC)

    def __str__(self) -> str:
        return f"wallclock_cron[{self.expression!r}, {self.zone.key}]"

    def __repr__(self) -> str:
        bounds = "".join(
            f", {name}={value.isoformat()!r}"
            for name, value in (("start_time", self.start_time), ("end_time", self.end_time))
            if value is not None
        )
        return f"<WallClockCronTrigger ({self.expression!r}, zone={self.zone.key!r}{bounds})>"
