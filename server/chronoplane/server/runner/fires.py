"""Scheduled fires, on the leader: the engine's fires (and the catch-up worked out when a
term begins) are planned by the job's misfire policy, queued, and written in batches with the
leader's epoch. Fires that come while a batch is written go in the next one (group commit, no
timer), so a burst costs a few transactions. A job's next run time moves only once its fires
are recorded; fires a leader could not record are found missing by the next one, which
applies the misfire policy (docs/decisions/0015-faults.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from chronoplane.server.engine.abc import Fire
from chronoplane.server.logs import failure
from chronoplane.server.models import (
    Execution,
    ExecutionSource,
    ExecutionState,
    Job,
    MissedFires,
    OverlapPolicy,
)
from chronoplane.server.runner.admission import Admissions
from chronoplane.server.runner.outcomes import Outcomes
from chronoplane.server.runner.state import Shared
from chronoplane.server.scheduling import jitter_delay, plan_fires
from chronoplane.server.storage.abc import Admission, NextRun

__all__ = ["MAX_BATCH", "Due", "Fires"]

log = logging.getLogger("chronoplane.server.runner")

MAX_BATCH = 2_000


@dataclass(frozen=True, kw_only=True)
class Due:
    """What a job's fires came to: the plan's runs and missed summary, and the fire after."""

    job: Job
    run: list[datetime]
    missed: MissedFires | None
    next_run_time: datetime | None
    noticed_time: datetime


def _stamp(value: datetime) -> str:
    """A fire time as people read it: UTC, to the second (more only when it has more)."""
    text = value.astimezone(UTC).isoformat(
        timespec="milliseconds" if value.microsecond else "seconds"
    )
    return text.replace("+00:00", "Z")


def _seconds(value: timedelta) -> str:
    return f"{value.total_seconds():g} s"


class Fires:
    def __init__(self, shared: Shared, *, admissions: Admissions, outcomes: Outcomes) -> None:
        self._shared = shared
        self._admissions = admissions
        self._outcomes = outcomes
        self._due: deque[Due] = deque()
        self._ready = asyncio.Event()
        # Held while a batch is written, so that stop() never cancels a write half-way.
        self.lock = asyncio.Lock()
        # When a stopping leader gives up writing (monotonic), for the writer already at it
        # too: a catch-up of 100,000 jobs would otherwise hold the stop until all are written.
        self._give_up_at: float | None = None

    def on_fires(self, fires: Sequence[Fire]) -> None:
        """The engine's handler: queue, wake the writer, return at once."""
        if self._shared.stopping or not fires:
            return
        by_job: dict[str, list[Fire]] = defaultdict(list)
        for fire in fires:
            by_job[fire.job.id].append(fire)
        for job_fires in by_job.values():
            job = job_fires[-1].job
            now = job_fires[-1].noticed_time
            plan = plan_fires(job, [f.scheduled_time for f in job_fires], now=now)
            self._due.append(
                Due(
                    job=job,
                    run=plan.run,
                    missed=plan.missed,
                    next_run_time=job_fires[-1].next_run_time,
                    noticed_time=now,
                )
            )
        self._ready.set()

    def on_due(self, due: Due) -> None:
        """Queues a job's planned catch-up (computed at start-up from the database)."""
        if self._shared.stopping:
            return
        self._due.append(due)
        self._ready.set()

    def drop(self) -> None:
        """No longer leading: fires not yet written are left to the next leader, which finds
        them missing and applies the misfire policy."""
        dropped = sum(len(due.run) for due in self._due)
        self._due.clear()
        if dropped:
            log.warning("left %d unwritten fires to the next leader", dropped)

    async def write_forever(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            await self.drain()

    async def drain(self, *, deadline: float | None = None) -> None:
        """Writes every fire queued so far; past ``deadline`` (monotonic; a stop's, kept for
        every later drain, the one already writing included), leaves the rest to the next
        leader."""
        if deadline is not None:
            self._give_up_at = deadline
        async with self.lock:
            while self._due:
                deadline = self._give_up_at
                if deadline is not None and time.monotonic() >= deadline:
                    self.drop()
                    return
                batch: list[Due] = []
                size = 0
                while self._due and size < MAX_BATCH:
                    due = self._due.popleft()
                    batch.append(due)
                    size += len(due.run) + 1
                try:
                    await self._write(batch)
                except Exception as error:
                    # A bug must not stop every later fire from being recorded; these are
                    # recorded from the database when the leader takes up its term again.
                    failure(log, f"could not record the fires of {len(batch)} jobs", error)
                    if self._shared.relead is not None:
                        self._shared.relead()

    async def _write(self, batch: list[Due]) -> None:
        shared = self._shared
        epoch = shared.epoch
        if epoch is None or not shared.acting():
            log.warning("not leading: %d fires left to the leader", sum(len(d.run) for d in batch))
            return
        now = shared.clock()
        admissions: list[Admission] = []
        for due in batch:
            admissions += self._admissions_of(due, epoch, now)
        if await self._admissions.admit_with_retry(admissions, epoch=epoch) is None:
            # Not recorded, so the next run times stay where they were: whoever leads next
            # finds these fires missing and applies the jobs' misfire policies.
            return
        # Next run times are written after, with progress: a task need not wait for them,
        # and a fire re-fired from a stale one after a crash finds its execution exists.
        self._outcomes.next_runs(
            NextRun(job_id=due.job.id, version=due.job.version, next_run_time=due.next_run_time)
            for due in batch
        )

    def _admissions_of(self, due: Due, epoch: int, now: datetime) -> list[Admission]:
        """A job's planned fires as admissions: its MISSED record, and its runs."""
        job = due.job
        admissions: list[Admission] = []
        if due.missed is not None:
            missed = self._missed_record(job, due.missed, now)
            admissions.append(Admission(execution=missed, epoch=epoch))
        for scheduled in due.run:
            execution = self._admissions.new_execution(
                job, ExecutionSource.SCHEDULE, scheduled, now
            )
            if not self._admissions.runnable(job):
                admissions.append(Admission(execution=_unrunnable(execution, now)))
                continue
            # Catch-up runs the misfire policy chose queue up, one after another.
            late = due.noticed_time - scheduled > job.misfire_grace
            admissions.append(
                Admission(
                    execution=execution,
                    due_time=scheduled + jitter_delay(job.id, scheduled, job.trigger.jitter),
                    policy=OverlapPolicy.BUFFER_ALL if late else job.overlap_policy,
                    epoch=epoch,
                )
            )
        return admissions

    def _missed_record(self, job: Job, missed: MissedFires, now: datetime) -> Execution:
        first, last = _stamp(missed.first_time), _stamp(missed.last_time)
        if missed.count == 1:
            what = f"1 fire at {first}"
        else:
            at_least = "at least " if missed.count_is_lower_bound else ""
            what = f"{at_least}{missed.count} fires from {first} to {last}"
        window = f", catch-up window {_seconds(job.catchup_window)}" if job.catchup_window else ""
        return replace(
            self._admissions.new_execution(job, ExecutionSource.SCHEDULE, missed.first_time, now),
            state=ExecutionState.MISSED,
            end_time=now,
            missed=missed,
            error_message=(
                f"{what} came later than the misfire grace of {_seconds(job.misfire_grace)} "
                f"and did not run (misfire policy {job.misfire_policy.value}{window})"
            ),
        )


def _unrunnable(execution: Execution, now: datetime) -> Execution:
    return replace(
        execution,
        state=ExecutionState.FAILED,
        end_time=now,
        error_message=f"task {execution.task!r} is not registered on this server",
    )
