"""The leader's schedule: the engine filled from the database when a term begins, with the
catch-up of what was missed meanwhile (scheduling.py decides what runs), and kept in step
with jobs changed through any instance (a notification per change, a periodic resync as the
safety net). Only the leader's engine keeps time.

No gRPC, SQL or APScheduler here: the store, the engine and the runner do that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

from chronoplane.server.engine.abc import Engine
from chronoplane.server.errors import JobNotFound
from chronoplane.server.models import Job
from chronoplane.server.runner import Due, Runner
from chronoplane.server.scheduling import plan_fires
from chronoplane.server.storage.abc import Store

__all__ = ["MAX_CATCH_UP_SCAN", "TICK", "Schedule"]

# Fires of one job walked at most when working out what it missed.
MAX_CATCH_UP_SCAN = 10_000
TICK = timedelta(microseconds=1)


class Schedule:
    def __init__(
        self, *, store: Store, engine: Engine, runner: Runner, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._engine = engine
        self._runner = runner
        self._clock = clock
        # Only the leader's engine keeps time; other instances' job changes reach it through
        # sync_job (a notification) and resync (the safety net).
        self.leading = False

    async def load(self) -> int:
        """Gives the engine every active job from the database, after working out what each
        missed while no server ran (see scheduling.py); returns how many jobs."""
        now = self._clock()
        jobs = await self._store.list_schedulable_jobs()
        behind = [j.id for j in jobs if j.next_run_time is not None and j.next_run_time <= now]
        # A leader that died may have written fires but not yet the next run time after them.
        last_fires = await self._store.last_fires(behind) if behind else {}
        for job in jobs:
            if job.id in last_fires and job.next_run_time is not None:
                after = self._engine.next_fire_time(job.trigger, after=last_fires[job.id] + TICK)
                if after is None or after > job.next_run_time:
                    job = replace(job, next_run_time=after)
            if job.next_run_time is not None and job.next_run_time <= now:
                job = self._catch_up(job, now)
            self._engine.schedule(job, reschedule=True)
        return len(jobs)

    def _catch_up(self, job: Job, now: datetime) -> Job:
        """Plans the fires from the job's recorded next run time to now; returns the job
        with its next run time after now."""
        assert job.next_run_time is not None
        fires = self._engine.fires_between(
            job.trigger, start=job.next_run_time, end=now, limit=MAX_CATCH_UP_SCAN + 1
        )
        if len(fires) <= MAX_CATCH_UP_SCAN:
            plan = plan_fires(job, fires, now=now)
        else:
            recent = self._recent_fires(job, now, since=fires[-1])
            plan = plan_fires(
                job,
                recent,
                now=now,
                uncounted=MAX_CATCH_UP_SCAN,
                first_uncounted=fires[0],
            )
        next_run = self._engine.next_fire_time(job.trigger, after=now + TICK)
        if next_run is not None and next_run <= now:  # a date trigger that has had its fire
            next_run = None
        self._runner.on_due(
            Due(job=job, run=plan.run, missed=plan.missed, next_run_time=next_run, noticed_time=now)
        )
        return replace(job, next_run_time=next_run)

    def _recent_fires(self, job: Job, now: datetime, *, since: datetime) -> list[datetime]:
        """The fires shortly before ``now``, enough for the misfire policy to choose from,
        when the whole backlog is too long to walk: looks back further and further."""
        wanted = max(job.catchup_limit, 1) + 1
        lookback = max(job.misfire_grace * 2, timedelta(minutes=1))
        best: list[datetime] = []
        while True:
            start = max(now - lookback, since + TICK)
            fires = self._engine.fires_between(
                job.trigger, start=start, end=now, limit=MAX_CATCH_UP_SCAN + 1
            )
            if len(fires) > MAX_CATCH_UP_SCAN:
                return best
            best = fires
            window_start = now - job.catchup_window if job.catchup_window else None
            if (
                len(fires) >= wanted
                or start <= since + TICK
                or (window_start is not None and start <= window_start)
            ):
                return best
            lookback *= 4

    def schedule(self, job: Job, *, reschedule: bool) -> None:
        """The job as stored now, in the engine (while leading)."""
        if self.leading:
            self._engine.schedule(job, reschedule=reschedule)

    def unschedule(self, job_id: str) -> None:
        if self.leading:
            self._engine.unschedule(job_id)

    async def sync_job(self, job_id: str) -> None:
        """Brings the leader's engine up to date with the job's row (changed elsewhere)."""
        if not self.leading:
            return
        try:
            job = await self._store.get_job(job_id)
        except JobNotFound:
            self._engine.unschedule(job_id)
            return
        self._apply(job)

    async def resync(self) -> int:
        """Compares every job with the engine and fixes what differs; returns how many
        differed. The safety net under notifications, and what follows a reconnect."""
        if not self.leading:
            return 0
        jobs = {job.id: job for job in await self._store.list_schedulable_jobs()}
        if not self.leading:
            return 0
        fixed = 0
        for job_id in set(self._engine.scheduled()) - set(jobs):
            self._engine.unschedule(job_id)
            fixed += 1
        for job in jobs.values():
            fixed += self._apply(job)
        return fixed

    def _apply(self, job: Job) -> bool:
        known = self._engine.scheduled().get(job.id)
        if known is not None and known.version >= job.version:
            return False
        if known is None and job.next_run_time is None:
            return False
        moved = known is None or known.trigger != job.trigger or known.paused != job.paused
        self._engine.schedule(job, reschedule=moved)
        return True
