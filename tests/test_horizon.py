"""The leader's moving horizon (docs/decisions/0018-horizon.md) through the real API: with a
horizon of 2 s, jobs due later wait in the database and still fire on time, once, whether
they were created beyond it, left it after a fire, or were moved into it by an update."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest_asyncio
from conftest import InProcessServer, serving
from google.protobuf import field_mask_pb2
from test_api import at, create, interval, wait_executions

from chronoplane.server.config import Settings
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

HORIZON = 2.0
# Late by more than this, a run was not in the timer when it was due.
ON_TIME = timedelta(seconds=1)


@pytest_asyncio.fixture
async def server(database_url: str) -> AsyncIterator[InProcessServer]:
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        tasks=["testtasks"],
        shutdown_grace=1.0,
        schedule_horizon=HORIZON,
    )
    async with serving(settings) as running:
        yield running


def done(runs: list[epb.Execution]) -> list[epb.Execution]:
    """The runs that have ended (the latest may still be running)."""
    return [run for run in runs if run.state != epb.EXECUTION_STATE_RUNNING]


def lateness(run: epb.Execution) -> timedelta:
    return run.start_time.ToDatetime(tzinfo=UTC) - run.scheduled_time.ToDatetime(tzinfo=UTC)


async def test_jobs_due_beyond_the_horizon_fire_on_time_and_once(server: InProcessServer) -> None:
    stub = server.stub
    start = datetime.now(UTC)
    await create(stub, "near", trigger=interval(1))
    await create(stub, "far", trigger=interval(4))
    await create(stub, "once", trigger=at(start + timedelta(seconds=5)))
    moved = await create(stub, "moved", trigger=interval(3600))
    change = jpb.Job(id="moved", trigger=interval(3), etag=moved.etag)
    await stub.UpdateJob(
        pb.UpdateJobRequest(job=change, update_mask=field_mask_pb2.FieldMask(paths=["trigger"]))
    )

    far = await wait_executions(stub, "far", 3, within=30)
    once = await wait_executions(stub, "once", 1, within=10)
    again = await wait_executions(stub, "moved", 2, within=10)
    near = await wait_executions(stub, "near", 8, within=10)
    far, once, again, near = (done(runs) for runs in (far, once, again, near))
    for run in [*far, *once, *again, *near]:
        assert run.state == epb.EXECUTION_STATE_SUCCEEDED, run
        assert lateness(run) < ON_TIME, (run.job_id, lateness(run))
    fires = sorted(run.scheduled_time.ToDatetime(tzinfo=UTC) for run in far)
    assert [b - a for a, b in pairwise(fires)] == [timedelta(seconds=4)] * 2
    scheduled = [run.scheduled_time.ToDatetime() for run in near]
    assert len(set(scheduled)) == len(scheduled), "a fire of the near job ran twice"
    job = (await stub.GetJob(pb.GetJobRequest(id="far"))).job
    assert job.next_run_time.ToDatetime(tzinfo=UTC) > fires[-1], "its next run time is stored"
