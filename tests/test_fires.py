"""The leader's fire writer (runner/fires.py), with a stand-in for admission: only how the
writer takes turns with a stop is checked here; tests/test_semantics.py and the fault suite
write real fires to real databases."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from chronoplane.server.models import (
    Execution,
    ExecutionSource,
    ExecutionState,
    IntervalTrigger,
    Job,
)
from chronoplane.server.runner.fires import MAX_BATCH, Due, Fires
from chronoplane.server.runner.state import Shared
from chronoplane.server.storage.abc import Admitted

T = datetime(2026, 12, 7, tzinfo=UTC)
WRITE_SECONDS = 0.2
EXECUTION = Execution(
    id="e",
    job_id="j",
    state=ExecutionState.PENDING,
    source=ExecutionSource.SCHEDULE,
    scheduled_time=T,
    create_time=T,
    task="chronoplane.echo",
    args={},
    instance_id="i",
)


class SlowAdmissions:
    """Admission that takes ``WRITE_SECONDS`` a batch, as a loaded database does."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def runnable(self, job: Job) -> bool:
        return True

    def new_execution(self, job: Job, source: Any, scheduled: datetime, now: datetime) -> Any:
        return replace(EXECUTION, id=f"e-{job.id}", job_id=job.id, scheduled_time=scheduled)

    async def admit_with_retry(self, admissions: list[Any], *, epoch: int | None) -> Admitted:
        self.batches.append(len(admissions))
        await asyncio.sleep(WRITE_SECONDS)
        return Admitted(inserted=[], displace=[], claimed=[])


class NextRuns:
    def next_runs(self, next_runs: Any) -> None:
        list(next_runs)


async def test_a_stop_bounds_the_fire_writer_already_at_work() -> None:
    """A leader that stops writes its queued fires for its deadline only, even when its
    writer is in the middle of a long catch-up (100,000 jobs behind held a SIGTERM past
    30 s); the rest is left to the next leader, which finds it missing."""
    shared = Shared(store=cast(Any, None), instance_id="i", clock=lambda: T, max_running=10)
    shared.epoch, shared.acting = 1, lambda: True
    admissions = SlowAdmissions()
    fires = Fires(shared, admissions=cast(Any, admissions), outcomes=cast(Any, NextRuns()))
    trigger = IntervalTrigger(every=timedelta(hours=1))
    batches = 10
    for n in range(batches * MAX_BATCH // 2):  # a fire and its next run: 2 a job
        job = Job(id=f"j{n:06d}", task="chronoplane.echo", trigger=trigger)
        fires.on_due(Due(job=job, run=[T], missed=None, next_run_time=None, noticed_time=T))
    writer = asyncio.create_task(fires.write_forever())
    try:
        await asyncio.sleep(WRITE_SECONDS / 4)  # at its first batch
        assert admissions.batches == [MAX_BATCH // 2]
        await fires.drain(deadline=time.monotonic() + WRITE_SECONDS * 1.5)
    finally:
        writer.cancel()
    assert 2 <= len(admissions.batches) <= 3, admissions.batches
