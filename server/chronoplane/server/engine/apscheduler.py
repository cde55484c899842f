"""The engine on APScheduler 3: an ``AsyncIOScheduler`` with an in-memory job store.

APScheduler is used only as a timer. Its ``SQLAlchemyJobStore`` is synchronous (it would block
the event loop) and cannot be shared between processes, so the database of record is ours and
the in-memory store is rebuilt from it at start. A custom executor hands due fires to the
runner instead of calling the job function: APScheduler 3 does not tell a job function which
scheduled time it is running for, and we need it for every execution record.
"""

from __future__ import annotations

import contextlib
import logging
import math
import zoneinfo
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger as ApsCronTrigger
from apscheduler.triggers.date import DateTrigger as ApsDateTrigger
from apscheduler.triggers.interval import IntervalTrigger as ApsIntervalTrigger

from chronoplane.server.engine.abc import Engine, Fire, FireHandler
from chronoplane.server.engine.cron import parse_crontab
from chronoplane.server.errors import FieldViolation, InvalidArgument
from chronoplane.server.models import CronTrigger, IntervalTrigger, Job, Trigger

__all__ = ["ApschedulerEngine", "build_trigger"]

log = logging.getLogger(__name__)

MIN_INTERVAL = timedelta(seconds=1)
MAX_INTERVAL = timedelta(days=3650)
_MAX_TIME_ZONE = 64
# APScheduler's own overlap guard must never stop a fire: overlap is the runner's business.
_UNLIMITED_INSTANCES = 1 << 30


def _time_zone(name: str) -> zoneinfo.ZoneInfo:
    if len(name) > _MAX_TIME_ZONE:
        raise InvalidArgument.field("cron.time_zone", f"longer than {_MAX_TIME_ZONE} characters")
    try:
        return zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgument.field(
            "cron.time_zone", f"{name!r} is not an IANA time zone (like 'Europe/Berlin')"
        ) from None


def _cron_trigger(trigger: CronTrigger) -> BaseTrigger:
    """Reports a bad expression and a bad time zone together."""
    violations: list[FieldViolation] = []
    zone = None
    try:
        zone = _time_zone(trigger.time_zone)
    except InvalidArgument as error:
        violations += error.violations
    try:
        fields = parse_crontab(trigger.expression)
        built = ApsCronTrigger(
            second=fields.second,
            minute=fields.minute,
            hour=fields.hour,
            day=fields.day,
            month=fields.month,
            day_of_week=fields.day_of_week,
            timezone=zone or UTC,
        )
    except ValueError as error:
        violations.insert(
            0,
            FieldViolation(field="cron.expression", description=f"{trigger.expression!r}: {error}"),
        )
    if violations:
        raise InvalidArgument(violations)
    return built


def build_trigger(trigger: Trigger) -> BaseTrigger:
    """The APScheduler trigger for ours; raises ``InvalidArgument`` when malformed."""
    if isinstance(trigger, CronTrigger):
        return _cron_trigger(trigger)
    if isinstance(trigger, IntervalTrigger):
        if not MIN_INTERVAL <= trigger.every <= MAX_INTERVAL:
            raise InvalidArgument.field("interval.every", "must be between 1 second and 3650 days")
        if trigger.start_time and trigger.end_time and trigger.end_time <= trigger.start_time:
            raise InvalidArgument.field("interval.end_time", "must be after start_time")
        return ApsIntervalTrigger(
            seconds=trigger.every.total_seconds(),
            start_date=trigger.start_time,
            end_date=trigger.end_time,
            timezone=UTC,
        )
    return ApsDateTrigger(run_date=trigger.run_time, timezone=UTC)


class _FireExecutor(BaseExecutor):  # type: ignore[misc]
    """Turns APScheduler's due run times into ``Fire`` records for the handler."""

    def __init__(self, engine: ApschedulerEngine) -> None:
        super().__init__()
        self._engine = engine

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        self._engine._due(job, run_times)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        raise AssertionError("submit_job is overridden")


def _never_called() -> None:
    raise AssertionError("the fire executor does not call job functions")


class ApschedulerEngine(Engine):
    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_executor(_FireExecutor(self), alias="fire")
        self._handler: FireHandler | None = None
        self._jobs: dict[str, Job] = {}

    # -- trigger arithmetic -------------------------------------------------------------------

    def check(self, trigger: Trigger, *, now: datetime) -> None:
        built = build_trigger(trigger)
        if isinstance(trigger, IntervalTrigger) and trigger.end_time is not None:
            if built.get_next_fire_time(None, now) is None:
                raise InvalidArgument.field(
                    "interval.end_time", "is in the past: the trigger would never fire"
                )

    def next_fire_time(self, trigger: Trigger, *, after: datetime) -> datetime | None:
        fire: datetime | None = build_trigger(trigger).get_next_fire_time(None, after)
        return None if fire is None else fire.astimezone(UTC)

    def preview(self, trigger: Trigger, *, start: datetime, count: int) -> list[datetime]:
        built = build_trigger(trigger)
        fires: list[datetime] = []
        fire = built.get_next_fire_time(None, start)
        while fire is not None and len(fires) < count:
            if fire >= start:
                fires.append(fire.astimezone(UTC))
            fire = built.get_next_fire_time(fire, fire)
        return fires

    # -- the timer ----------------------------------------------------------------------------

    async def start(self, handler: FireHandler) -> None:
        # Jobs scheduled before this are added in one go, without a wake-up each.
        self._handler = handler
        self._scheduler.start()

    def schedule(self, job: Job, *, reschedule: bool) -> None:
        scheduler = self._scheduler
        if job.paused or job.next_run_time is None:
            self.unschedule(job.id)
            return
        # APScheduler wants whole seconds; the runner judges misfires on the exact value.
        grace = max(1, math.ceil(job.misfire_grace.total_seconds()))
        if job.id in self._jobs and not reschedule:
            scheduler.modify_job(job.id, coalesce=job.coalesce, misfire_grace_time=grace)
            self._jobs[job.id] = job
            return
        scheduler.add_job(
            _never_called,
            trigger=build_trigger(job.trigger),
            id=job.id,
            executor="fire",
            next_run_time=job.next_run_time,
            coalesce=job.coalesce,
            misfire_grace_time=grace,
            max_instances=_UNLIMITED_INSTANCES,
            replace_existing=True,
        )
        self._jobs[job.id] = job

    def unschedule(self, job_id: str) -> None:
        if self._jobs.pop(job_id, None) is not None:
            with contextlib.suppress(JobLookupError):  # a date job APScheduler already dropped
                self._scheduler.remove_job(job_id)

    async def shutdown(self) -> None:
        if self._scheduler.state != STATE_STOPPED:
            self._scheduler.shutdown(wait=False)
        self._jobs.clear()

    def _due(self, aps_job: Any, run_times: Sequence[datetime]) -> None:
        job = self._jobs.get(aps_job.id)
        if job is None or self._handler is None:
            return
        now = datetime.now(UTC)
        next_run = aps_job.trigger.get_next_fire_time(run_times[-1], now)
        if next_run is None:
            # APScheduler removes the job right after this call; forget our copy too.
            self._jobs.pop(job.id, None)
        fires = [
            Fire(
                job=job,
                scheduled_time=run_time.astimezone(UTC),
                noticed_time=now,
                next_run_time=next_run.astimezone(UTC) if next_run else None,
            )
            for run_time in run_times
        ]
        self._handler(fires)
