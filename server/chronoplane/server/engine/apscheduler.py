"""The engine on APScheduler 3: an ``AsyncIOScheduler`` with an in-memory job store.

APScheduler is used only as a timer. Its ``SQLAlchemyJobStore`` is synchronous (it would block
the event loop) and cannot be shared between processes, so the database of record is ours and
the in-memory store is rebuilt from it at start. A custom executor hands due fires to the
runner instead of calling the job function: APScheduler 3 does not tell a job function which
scheduled time it is running for, and we need it for every execution record.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import islice
from types import MappingProxyType
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger as ApsDateTrigger
from apscheduler.triggers.interval import IntervalTrigger as ApsIntervalTrigger
from apscheduler.util import datetime_to_utc_timestamp

from chronoplane.server.engine.abc import Engine, Fire, FireHandler
from chronoplane.server.engine.wallclock import WallClockCronTrigger
from chronoplane.server.errors import FieldViolation, InvalidArgument
from chronoplane.server.models import CronTrigger, DateTrigger, IntervalTrigger, Job, Trigger
from chronoplane.server.walltime import time_zone, zone_names

__all__ = ["ApschedulerEngine", "build_trigger"]

log = logging.getLogger(__name__)

MIN_INTERVAL = timedelta(seconds=1)
MAX_INTERVAL = timedelta(days=3650)
MAX_JITTER = timedelta(days=1)
# A trigger whose first fire is further away than this is taken for a mistake.
HORIZON = timedelta(days=36525)
_MAX_SHOWN = 64
# APScheduler's own overlap guard must never stop a fire: overlap is the runner's business.
_UNLIMITED_INSTANCES = 1 << 30
# Distinct triggers whose built form is kept (a few KiB each).
TRIGGER_CACHE = 4096
# Due jobs the timer takes up in one turn of the event loop (about 100 µs each): thousands
# due on one second (hourly cron jobs at :00) would otherwise hold the loop for as long as
# all of them take, and with it the heartbeats and every call. Between turns the runner
# writes the fires handed over so far: 1,000 jobs due each second on one instant start
# with a lateness p99 of 94-124 ms with 100 a turn, 160 ms with 250, 300 ms with all at once
# (bench/fire_throughput.py --scenario steady --phase aligned).
DUE_PER_TURN = 100


def _time_zone(name: str) -> zoneinfo.ZoneInfo:
    return time_zone(name, "cron.time_zone")


class _BoundedIntervalTrigger(ApsIntervalTrigger):  # type: ignore[misc]
    """APScheduler's interval trigger, with no fire past year 9999 instead of a ``ValueError``
    (which a preview from year 9998 would otherwise turn into INTERNAL)."""

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        try:
            fire: datetime | None = super().get_next_fire_time(previous_fire_time, now)
        except (OverflowError, ValueError):
            return None
        return fire


def _shown(text: str) -> str:
    """``text`` quoted and cut short: a violation is sent back in a header (16 KiB at most)."""
    return repr(text) if len(text) <= _MAX_SHOWN else f"{text[:_MAX_SHOWN]!r}..."


def _cron_trigger(trigger: CronTrigger) -> WallClockCronTrigger:
    """Reports a bad expression, time zone and bounds together."""
    violations: list[FieldViolation] = []
    zone = None
    try:
        zone = _time_zone(trigger.time_zone)
    except InvalidArgument as error:
        violations += error.violations
    if trigger.start_time and trigger.end_time and trigger.end_time <= trigger.start_time:
        violations.append(
            FieldViolation(field="cron.end_time", description="must be after start_time")
        )
    try:
        built = WallClockCronTrigger(
            trigger.expression,
            zone or zoneinfo.ZoneInfo("UTC"),
            day_match=trigger.day_match,
            start_time=trigger.start_time,
            end_time=trigger.end_time,
        )
    except ValueError as error:
        violations.insert(
            0,
            FieldViolation(
                field="cron.expression", description=f"{_shown(trigger.expression)}: {error}"
            ),
        )
    if violations:
        raise InvalidArgument(violations)
    return built


@functools.lru_cache(maxsize=TRIGGER_CACHE)
def build_trigger(trigger: Trigger) -> BaseTrigger:
    """The APScheduler trigger for ours, without jitter (the runner applies it); raises
    ``InvalidArgument`` when malformed.

    Built triggers keep no state between calls, so equal triggers share one: compiling a cron
    expression is most of the cost of scheduling a job, and many jobs share a schedule."""
    if isinstance(trigger, CronTrigger):
        return _cron_trigger(trigger)
    if isinstance(trigger, IntervalTrigger):
        if not MIN_INTERVAL <= trigger.every <= MAX_INTERVAL:
            raise InvalidArgument.field("interval.every", "must be between 1 second and 3650 days")
        if trigger.start_time and trigger.end_time and trigger.end_time <= trigger.start_time:
            raise InvalidArgument.field("interval.end_time", "must be after start_time")
        return _BoundedIntervalTrigger(
            seconds=trigger.every.total_seconds(),
            start_date=trigger.start_time,
            end_date=trigger.end_time,
            timezone=UTC,
        )
    return ApsDateTrigger(run_date=trigger.run_time, timezone=UTC)


def _jitter_violations(trigger: Trigger) -> list[FieldViolation]:
    if not timedelta(0) <= trigger.jitter <= MAX_JITTER:
        return [FieldViolation(field="jitter", description="must be between 0 and 1 day")]
    if isinstance(trigger, IntervalTrigger) and trigger.jitter and trigger.jitter >= trigger.every:
        return [FieldViolation(field="jitter", description="must be less than interval.every")]
    return []


def _horizon(now: datetime) -> datetime:
    try:
        return now + HORIZON
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC)


def _first_fire(
    trigger: CronTrigger | IntervalTrigger, built: BaseTrigger, now: datetime
) -> datetime | None:
    """The first fire at or after ``now``. An interval without start_time is taken as the
    service stores it, anchored one period after ``now`` (APScheduler would anchor it to the
    wall clock, which a preview from another time must not see)."""
    if isinstance(trigger, IntervalTrigger) and trigger.start_time is None:
        try:
            first = now + trigger.every
        except OverflowError:
            return None
        return None if trigger.end_time is not None and first > trigger.end_time else first
    fire: datetime | None = built.get_next_fire_time(None, now)
    return fire


def _never_fires(trigger: CronTrigger | IntervalTrigger, now: datetime) -> InvalidArgument:
    """Names the field that leaves a trigger without a fire within ``HORIZON`` of ``now``."""
    kind = "cron" if isinstance(trigger, CronTrigger) else "interval"
    start = max(now, trigger.start_time or now)
    if trigger.end_time is not None and trigger.end_time < _horizon(now):
        return InvalidArgument.field(
            f"{kind}.end_time",
            f"the trigger would never fire: no fire from {start.isoformat()} to "
            f"end_time {trigger.end_time.isoformat()}",
        )
    if trigger.start_time is not None and trigger.start_time > now:
        return InvalidArgument.field(
            f"{kind}.start_time", "the trigger would not fire within 100 years"
        )
    return InvalidArgument.field("cron.expression", "the trigger would not fire within 100 years")


def _fires(
    built: BaseTrigger, *, start: datetime, end: datetime | None, limit: int
) -> list[datetime]:
    """At most ``limit`` fires from ``start`` to ``end``, asking the trigger at most
    ``limit + 1`` times."""
    fires: list[datetime] = []
    if limit <= 0:
        return fires
    fire: datetime | None = built.get_next_fire_time(None, start)
    if fire is not None and fire < start:  # a date trigger gives its run time regardless
        fire = built.get_next_fire_time(fire, start)
    while fire is not None and (end is None or fire <= end):
        fires.append(fire.astimezone(UTC))
        if len(fires) == limit:
            break
        fire = built.get_next_fire_time(fire, fire)
    return fires


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


class _DueInTurns(MemoryJobStore):  # type: ignore[misc]
    """APScheduler's memory store, handing out the soonest ``DUE_PER_TURN`` due jobs at a
    time: the scheduler then finds the store's next run time already past and wakes again at
    once, in the loop's next turn, for the rest."""

    def get_due_jobs(self, now: datetime) -> list[Any]:
        # The store's own loop, stopped at DUE_PER_TURN: slicing what it returns would walk
        # every due job each turn (3.6 ms a turn, 3.6 s in all, for 100,000 due at once).
        # ``_jobs`` is its list of (job, timestamp), soonest first (APScheduler is pinned).
        now_timestamp = datetime_to_utc_timestamp(now)
        due: list[Any] = []
        for job, timestamp in islice(self._jobs, DUE_PER_TURN):
            if timestamp is None or timestamp > now_timestamp:
                break
            due.append(job)
        return due


class _Timer(AsyncIOScheduler):  # type: ignore[misc]
    """APScheduler's asyncio scheduler, woken once however many jobs were added meanwhile:
    each ``add_job`` asks for a wake-up, and a page of jobs would otherwise queue a walk of
    the due jobs per job."""

    _wakeup_queued = False

    def wakeup(self) -> None:
        if self._wakeup_queued or self._eventloop is None:
            return
        self._wakeup_queued = True
        self._eventloop.call_soon_threadsafe(self._woken)

    def shutdown(self, wait: bool = True) -> None:
        """At once: APScheduler's asyncio scheduler stops in a later turn of the loop, and a
        term begun meanwhile would find it still running."""
        BaseScheduler.shutdown(self, wait)
        self._stop_timer()
        self._eventloop = None

    def _woken(self) -> None:
        self._wakeup_queued = False
        if self.state == STATE_STOPPED or self._eventloop is None:
            return
        self._stop_timer()
        self._start_timer(self._process_jobs())


class ApschedulerEngine(Engine):
    def __init__(self) -> None:
        zone_names()  # listed now, so that no request pays for it
        self._scheduler = _Timer(timezone=UTC, jobstores={"default": _DueInTurns()})
        self._scheduler.add_executor(_FireExecutor(self), alias="fire")
        self._handler: FireHandler | None = None
        self._jobs: dict[str, Job] = {}

    # -- trigger arithmetic -------------------------------------------------------------------

    def check(self, trigger: Trigger, *, now: datetime) -> None:
        violations = _jitter_violations(trigger)
        try:
            built = build_trigger(trigger)
        except InvalidArgument as error:
            raise InvalidArgument(error.violations + violations) from None
        if violations:
            raise InvalidArgument(violations)
        if isinstance(trigger, DateTrigger):
            return  # a past run time fires at once (or misfires): the runner decides
        fire = _first_fire(trigger, built, now)
        if fire is None or fire > _horizon(now):
            raise _never_fires(trigger, now)

    def next_fire_time(self, trigger: Trigger, *, after: datetime) -> datetime | None:
        fire: datetime | None = build_trigger(trigger).get_next_fire_time(None, after)
        return None if fire is None else fire.astimezone(UTC)

    def preview(self, trigger: Trigger, *, start: datetime, count: int) -> list[datetime]:
        return _fires(build_trigger(trigger), start=start, end=None, limit=count)

    def fires_between(
        self, trigger: Trigger, *, start: datetime, end: datetime, limit: int
    ) -> list[datetime]:
        return _fires(build_trigger(trigger), start=start, end=end, limit=limit)

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
        if job.id in self._jobs and not reschedule:
            self._jobs[job.id] = job
            return
        scheduler.add_job(
            _never_called,
            trigger=build_trigger(job.trigger),
            id=job.id,
            executor="fire",
            next_run_time=job.next_run_time,
            # Every due run time reaches the runner, which applies the misfire policy
            # (scheduling.plan_fires); APScheduler must neither fold nor drop any.
            coalesce=False,
            misfire_grace_time=None,
            max_instances=_UNLIMITED_INSTANCES,
            replace_existing=True,
        )
        self._jobs[job.id] = job

    def unschedule(self, job_id: str) -> None:
        if self._jobs.pop(job_id, None) is not None:
            with contextlib.suppress(JobLookupError):  # a date job APScheduler already dropped
                self._scheduler.remove_job(job_id)

    def scheduled(self) -> Mapping[str, Job]:
        return MappingProxyType(self._jobs)

    async def shutdown(self) -> None:
        if self._scheduler.state != STATE_STOPPED:
            self._scheduler.shutdown(wait=False)
        self._scheduler.remove_all_jobs()
        self._jobs.clear()
        self._handler = None

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
