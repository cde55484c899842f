"""The leader's schedule: the engine's timer holds the jobs due within a moving horizon,
filled from the database's index on next run times (docs/decisions/0018-horizon.md), with the
catch-up of what was missed meanwhile (scheduling.py decides what runs), and kept in step with
jobs changed through any instance (a notification per change, a periodic resync as the safety
net). Only the leader's engine keeps time.

The horizon: every job that is not paused and whose next run time is at or before ``until``
is in the engine. A term begins by filling the engine up to now + ``HORIZON``, a page at a
time, soonest first, while the engine already fires; ``refill`` moves ``until`` on. A job
whose next fire, after a fire, lies beyond ``until`` leaves the engine and is *away* until
the horizon reaches that time: its row's next run time is written a moment after the fire,
so an away job comes back from what the fire said if the row does not have it yet.

No gRPC, SQL or APScheduler here: the store, the engine and the runner do that. Work
proportional to the number of jobs goes a page at a time, so the loop is never held long.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from chronoplane.server.aio import in_turns
from chronoplane.server.engine.abc import Engine, Fire
from chronoplane.server.errors import JobNotFound
from chronoplane.server.models import Job
from chronoplane.server.runner import Due, Runner
from chronoplane.server.scheduling import plan_fires
from chronoplane.server.storage.abc import DueKey, Store

__all__ = ["HORIZON", "MAX_CATCH_UP_SCAN", "PAGE", "TICK", "Schedule"]

# Fires of one job walked at most when working out what it missed.
MAX_CATCH_UP_SCAN = 10_000
TICK = timedelta(microseconds=1)
# How far ahead the engine holds jobs, and how many jobs are read and scheduled at a time.
HORIZON = timedelta(minutes=5)
PAGE = 500


class Schedule:
    def __init__(
        self,
        *,
        store: Store,
        engine: Engine,
        runner: Runner,
        clock: Callable[[], datetime],
        horizon: timedelta = HORIZON,
        page: int = PAGE,
    ) -> None:
        self._store = store
        self._engine = engine
        self._runner = runner
        self._clock = clock
        self.horizon = horizon
        self._page = page
        # Only the leader's engine keeps time; other instances' job changes reach it through
        # sync_job (a notification) and resync (the safety net).
        self.leading = False
        # Every due job up to here is in the engine (None: no term has begun filling it).
        self.until: datetime | None = None
        # Jobs that left the engine after a fire, while their row may not yet say when they
        # fire next: id -> (version, next fire).
        self._away: dict[str, tuple[int, datetime]] = {}
        # Bumped when a term begins: a refill of an earlier term stops.
        self._term = 0
        self._loading = False

    # -- filling the engine -------------------------------------------------------------------

    async def load(self) -> int:
        """Fills the engine (already firing) with the jobs due within the horizon, soonest
        first, after working out what each missed while no leader ran (see scheduling.py);
        returns how many jobs it scheduled."""
        self._term += 1
        self._away.clear()
        self.until = self._clock() + self.horizon
        scheduled, self._loading = 0, True
        try:
            async for page in self._due_pages(since=None, until=self.until, term=self._term):
                scheduled += await self._take(page)
        finally:
            self._loading = False
        return scheduled

    async def refill(self) -> int:
        """Moves the horizon on: schedules the jobs that came within it, and the away jobs
        whose next fire it now reaches. Returns how many it scheduled."""
        since, term = self.until, self._term
        if not self.leading or since is None:
            return 0
        until = self._clock() + self.horizon
        if until <= since:
            return 0
        # Moved first: a job fired or changed meanwhile stays in the engine if due by then.
        self.until = until
        scheduled = 0
        try:
            async for page in self._due_pages(since=since, until=until, term=term):
                scheduled += await self._take(page)
            scheduled += await self._bring_back(until, term)
        except BaseException:
            if term == self._term:
                self.until = since  # the window is read again next time
            raise
        return scheduled

    async def _due_pages(
        self, *, since: datetime | None, until: datetime, term: int
    ) -> AsyncIterator[list[Job]]:
        """The due jobs a page at a time, for as long as this term lasts."""
        after: DueKey | None = None
        while self.leading and term == self._term:
            page = await self._store.due_jobs(
                since=since, until=until, after=after, limit=self._page
            )
            if not page or not self.leading or term != self._term:
                return
            yield page
            last = page[-1]
            if len(page) < self._page or last.next_run_time is None:
                return
            after = (last.next_run_time, last.id)

    async def _take(self, page: Sequence[Job]) -> int:
        """Schedules a page of due jobs the engine does not have yet, with the catch-up of
        those that are behind."""
        now = self._clock()
        behind = [j.id for j in page if j.next_run_time is not None and j.next_run_time <= now]
        # A leader that died may have written fires but not yet the next run time after them.
        last_fires = await self._store.last_fires(behind) if behind else {}
        scheduled = 0
        async for job in in_turns(page):
            if not self._news(job):
                continue
            if job.id in last_fires and job.next_run_time is not None:
                after = self._engine.next_fire_time(job.trigger, after=last_fires[job.id] + TICK)
                if after is None or after > job.next_run_time:
                    job = replace(job, next_run_time=after)
            if job.next_run_time is not None and job.next_run_time <= now:
                job = self._catch_up(job, now)
                scheduled += self._place(job, reschedule=True, lagging=True)
            else:
                scheduled += self._place(job, reschedule=True)
        return scheduled

    async def _bring_back(self, until: datetime, term: int) -> int:
        """Schedules the away jobs whose next fire is now within the horizon, from their rows
        (or from what their fire said, while their rows lag behind)."""
        back = [job_id for job_id, (_, when) in self._away.items() if when <= until]
        scheduled = 0
        for start in range(0, len(back), self._page):
            chunk = back[start : start + self._page]
            rows = {job.id: job for job in await self._store.get_jobs(chunk)}
            if term != self._term:
                return scheduled
            for job_id in chunk:
                entry, job = self._away.pop(job_id, None), rows.get(job_id)
                if entry is None or job is None or not self._news(job):
                    continue
                version, when = entry
                if job.version == version and (
                    job.next_run_time is None or job.next_run_time < when
                ):
                    job = replace(job, next_run_time=when)
                scheduled += self._place(job, reschedule=True)
        return scheduled

    def _news(self, job: Job) -> bool:
        """Whether the row tells the engine something new: a job it does not hold or holds
        at an older version (an away job at its version comes back through _bring_back)."""
        known = self._engine.scheduled().get(job.id)
        if known is not None:
            return known.version < job.version
        away = self._away.get(job.id)
        return away is None or away[0] < job.version

    def _place(self, job: Job, *, reschedule: bool, lagging: bool = False) -> bool:
        """Puts ``job`` in the engine if it is due within the horizon, or takes it out;
        ``lagging``: its row may not have this next run time yet. Returns whether the engine
        holds it now."""
        held = job.id in self._engine.scheduled()
        due = job.next_run_time
        if job.paused or due is None or self.until is None or due > self.until:
            if due is not None and lagging and not job.paused:
                self._away[job.id] = (job.version, due)
            else:
                self._away.pop(job.id, None)
            if held:
                self._engine.unschedule(job.id)
            return False
        self._away.pop(job.id, None)
        self._engine.schedule(job, reschedule=reschedule)
        return True

    # -- catch-up -----------------------------------------------------------------------------

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

    # -- fires --------------------------------------------------------------------------------

    def on_fires(self, fires: Sequence[Fire]) -> None:
        """The engine's handler: the fires go to the runner; a job whose next fire lies beyond
        the horizon leaves the engine, away until the horizon reaches it."""
        self._runner.on_fires(fires)
        last = {fire.job.id: fire for fire in fires}
        loop = asyncio.get_running_loop()
        for fire in last.values():
            after = fire.next_run_time
            if after is None or (self.until is not None and after <= self.until):
                continue  # the engine keeps it (or has done with it)
            self._away[fire.job.id] = (fire.job.version, after)
            # Not now: APScheduler updates the job in its store once this handler returns.
            loop.call_soon(self._release, fire.job)

    def _release(self, job: Job) -> None:
        if self._engine.scheduled().get(job.id) is job and job.id in self._away:
            self._engine.unschedule(job.id)

    # -- changes ------------------------------------------------------------------------------

    def schedule(self, job: Job, *, reschedule: bool) -> None:
        """The job as stored now, in the engine if due within the horizon (while leading).
        With ``reschedule=False`` the job keeps the timing the engine gave it."""
        if not self.leading:
            return
        away = self._away.get(job.id)
        if not reschedule and away is not None and job.id not in self._engine.scheduled():
            self._place(replace(job, next_run_time=away[1]), reschedule=True, lagging=True)
            return
        self._place(job, reschedule=reschedule)

    def unschedule(self, job_id: str) -> None:
        if self.leading:
            self._away.pop(job_id, None)
            self._engine.unschedule(job_id)

    async def sync_job(self, job_id: str) -> None:
        """Brings the leader's engine up to date with the job's row (changed elsewhere)."""
        if not self.leading:
            return
        try:
            job = await self._store.get_job(job_id)
        except JobNotFound:
            self.unschedule(job_id)
            return
        self._apply(job)

    async def resync(self) -> int:
        """Compares the jobs due within the horizon, and those the engine holds, with their
        rows, and fixes what differs; returns how many differed. The safety net under
        notifications, and what follows a reconnect."""
        until, term = self.until, self._term
        if not self.leading or until is None or self._loading:
            return 0  # a load reads every row it would compare
        fixed, seen = 0, set()
        async for page in self._due_pages(since=None, until=until, term=term):
            async for job in in_turns(page):
                seen.add(job.id)
                fixed += self._apply(job)
        held = [job_id for job_id in self._engine.scheduled() if job_id not in seen]
        for start in range(0, len(held), self._page):
            chunk = held[start : start + self._page]
            rows = {job.id: job for job in await self._store.get_jobs(chunk)}
            if not self.leading or term != self._term:
                return fixed
            for job_id in chunk:
                if job_id not in rows:
                    fixed += job_id in self._engine.scheduled()
                    self.unschedule(job_id)
                else:
                    fixed += self._apply(rows[job_id])
        return fixed

    def _apply(self, job: Job) -> bool:
        """Brings the engine in step with a row read from the database; returns whether it
        changed anything."""
        if not self._news(job):
            return False
        known = self._engine.scheduled().get(job.id)
        if known is None and (job.paused or job.next_run_time is None):
            self._away.pop(job.id, None)
            return False
        moved = known is None or known.trigger != job.trigger or known.paused != job.paused
        return self._place(job, reschedule=moved) or known is not None
