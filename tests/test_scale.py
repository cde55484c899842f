"""A real `chronoplane serve` over 30,000 jobs (inserted with SQL, so that the test is quick):
it takes up leadership without losing it, a one-second probe fires on time from the first
second, and SIGTERM ends it in a few seconds (issue 15; the figures are bench/scale.py's)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import sqlalchemy as sa
from harness import start_server
from sqlalchemy.ext.asyncio import create_async_engine

from chronoplane.server.models import CronTrigger, IntervalTrigger, Job, Trigger
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

DAILY = 25_000  # due tomorrow: beyond the horizon
SOON = 5_000  # due within it, after the test: loaded at start
PROBE_START = timedelta(seconds=5)
WATCHED = 12.0
STOP_WITHIN = 5.0

_COPY = """
INSERT INTO jobs (id, display_name, description, task, args, trigger, paused,
    misfire_grace_seconds, max_concurrent, labels, misfire_policy, catchup_window_seconds,
    catchup_limit, overlap_policy, retry, timeout_seconds, history_limit, version, request_id,
    create_time, update_time, next_run_time, created_by, updated_by, executor, celery)
SELECT :template || '-' || g, display_name, description, task, args, trigger, paused,
    misfire_grace_seconds, max_concurrent, labels, misfire_policy, catchup_window_seconds,
    catchup_limit, overlap_policy, retry, timeout_seconds, history_limit, version, NULL,
    create_time, update_time, next_run_time, created_by, updated_by, executor, celery
FROM jobs, generate_series(1, :count) AS g WHERE id = :template
"""


async def _world(url: str, now: datetime) -> datetime:
    """The jobs, and a probe that fires every second from the time returned."""
    store = SqlAlchemyStore.from_url(url)
    probe_start = now + PROBE_START
    # Every five minutes, next at a boundary at least two minutes away (after the test).
    soon = now.replace(second=0, microsecond=0) + timedelta(minutes=5 - now.minute % 5)
    soon += timedelta(minutes=5) if soon - now < timedelta(minutes=2) else timedelta(0)
    templates: dict[str, tuple[Trigger, datetime | None]] = {
        "daily": (CronTrigger(expression="0 3 * * *"), now + timedelta(days=1)),
        "soon": (CronTrigger(expression="*/5 * * * *"), soon),
        "probe": (IntervalTrigger(every=timedelta(seconds=1), start_time=probe_start), None),
    }
    try:
        for job_id, (trigger, next_run) in templates.items():
            job = Job(
                id=job_id,
                task="chronoplane.echo",
                trigger=trigger,
                next_run_time=next_run or probe_start,
            )
            await store.create_job(job, request_id=None)
    finally:
        await store.close()
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for template, count in (("daily", DAILY), ("soon", SOON)):
                await conn.execute(sa.text(_COPY), {"template": template, "count": count})
    finally:
        await engine.dispose()
    return probe_start


def test_a_server_over_30000_jobs_leads_fires_on_time_and_stops_quickly(
    postgres_url: str, tmp_path: Path
) -> None:
    probe_start = asyncio.run(_world(postgres_url, datetime.now(UTC)))
    server = start_server(postgres_url, tmp_path, "--schedule-horizon", "600")
    try:
        time.sleep(max(0.0, (probe_start - datetime.now(UTC)).total_seconds()) + WATCHED)
        stub = pb_grpc.SchedulerServiceStub(grpc.insecure_channel(server.address))
        listed = stub.ListExecutions(pb.ListExecutionsRequest(job_id="probe", page_size=1000))
    finally:
        stopped = time.monotonic()
        server.stop(timeout=STOP_WITHIN)
    took = time.monotonic() - stopped
    assert took < STOP_WITHIN, f"SIGTERM took {took:.1f} s"
    log = server.log
    lost = [line for line in log.splitlines() if "stops leading" in line and "stopping" not in line]
    assert not lost, lost
    loaded = re.search(r"leading \(epoch \d+\): (\d+) jobs due within", log)
    assert loaded is not None, log[-5000:]
    assert int(loaded.group(1)) == SOON + 2, "only the jobs due within the horizon are loaded"
    runs = sorted(listed.executions, key=lambda e: e.scheduled_time.ToDatetime())
    states = {epb.ExecutionState.Name(e.state) for e in runs}
    assert states <= {"EXECUTION_STATE_SUCCEEDED", "EXECUTION_STATE_RUNNING"}, states
    fires = [run.scheduled_time.ToDatetime(tzinfo=UTC) for run in runs]
    assert fires[0] == probe_start, "the probe's first fire ran on time, not caught up"
    expected = int(WATCHED) - 1
    assert len(fires) >= expected and fires == [
        probe_start + timedelta(seconds=n) for n in range(len(fires))
    ], fires
    late = [
        (run.start_time.ToDatetime(tzinfo=UTC) - fire).total_seconds()
        for run, fire in zip(runs, fires, strict=True)
        if run.HasField("start_time")
    ]
    assert max(late) < 0.5, f"the probe ran late: {late}"
