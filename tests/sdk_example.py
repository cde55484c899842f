"""A user's code against the SDK, checked by mypy --strict (pyproject's override) and run by
tests/test_sdk.py against a real server: what the types promise is what the values are."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from chronoplane.client import (
    AsyncClient,
    Client,
    CronTrigger,
    Execution,
    ExecutionState,
    Job,
    NotFound,
    OverlapPolicy,
    WatchEventKind,
    cron,
    every,
    retry_policy,
)


def nightly_report(address: str) -> tuple[Job, Execution]:
    """Creates a job, runs it once and waits for the run to end: synchronous code."""
    with Client(address, timeout=10) as client:
        job = client.create_job(
            "nightly-report",
            task="test.add",
            trigger=cron("0 3 * * *", "Europe/Berlin", jitter=timedelta(minutes=5)),
            args={"a": 40, "b": 2},
            overlap_policy=OverlapPolicy.BUFFER_ONE,
            retry=retry_policy(3, initial_backoff=10),
        )
        assert isinstance(job.trigger, CronTrigger)
        started = client.trigger_job(job.id)
        execution = client.get_execution(started.id)
        while execution.state in (ExecutionState.PENDING, ExecutionState.RUNNING):
            time.sleep(0.05)
            execution = client.get_execution(started.id)
        return job, execution


def next_run_in(address: str, job_id: str) -> timedelta | None:
    """How long until the job fires next; None when it is paused or gone."""
    with Client(address) as client:
        try:
            job = client.get_job(job_id)
        except NotFound:
            return None
        if job.next_run_time is None:
            return None
        return job.next_run_time - datetime.now(UTC)


def first_snapshot(address: str) -> list[str]:
    """The ids of the jobs a watch's snapshot lists, read from a synchronous iterator."""
    ids: list[str] = []
    with Client(address) as client:
        for event in client.watch_jobs(snapshot=True):
            if event.kind is WatchEventKind.SNAPSHOT_END:
                break
            if event.item is not None:
                ids.append(event.item.id)
    return ids


async def failed_runs(address: str, job_id: str) -> list[tuple[int, str]]:
    """(attempt, error type) of a job's failed runs: asynchronous code."""
    async with AsyncClient(address) as client:
        await client.create_job(job_id, task="chronoplane.echo", trigger=every(3600), paused=True)
        executions = await client.list_executions(job_id=job_id, states=["failed", "timed_out"])
        return [(e.attempt, e.error_type) for e in executions]
