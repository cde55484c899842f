"""BatchCreateJobs end to end (decision 0017): all or nothing, in order, one event and one audit
record per job; against the real server on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from conftest import InProcessServer
from google.protobuf import json_format
from harness import error_info, violations
from test_api import cron, fails, interval, job, wait_executions
from test_security import bearer, guarded_server, make_token

from chronoplane.server.models import Role
from chronoplane.v1 import audit_pb2 as apb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

Stub = Any


def batch(*jobs: jpb.Job, request_ids: list[str] | None = None) -> pb.BatchCreateJobsRequest:
    ids = request_ids or [""] * len(jobs)
    return pb.BatchCreateJobsRequest(
        requests=[pb.CreateJobRequest(job=j, request_id=r) for j, r in zip(jobs, ids, strict=True)]
    )


async def listed(stub: Stub) -> list[str]:
    return [j.id for j in (await stub.ListJobs(pb.ListJobsRequest(page_size=1000))).jobs]


async def cursor_now(stub: Stub) -> int:
    """The cursor of the watch history now (the SNAPSHOT_END of an empty snapshot)."""
    stream = stub.WatchJobs(pb.WatchJobsRequest(job_ids=["no-such-job"], snapshot=True))
    async for event in stream:
        if event.kind == pb.WATCH_EVENT_KIND_SNAPSHOT_END:
            stream.cancel()
            return int(event.cursor)
    raise AssertionError("no SNAPSHOT_END")


async def job_events(stub: Stub, after: int, count: int) -> list[tuple[int, str]]:
    """The next ``count`` job events after the cursor, as (kind, job id)."""
    found: list[tuple[int, str]] = []
    stream = stub.WatchJobs(pb.WatchJobsRequest(after_cursor=after))
    async with asyncio.timeout(30):
        async for event in stream:
            if event.kind != pb.WATCH_EVENT_KIND_PROGRESS:
                found.append((event.kind, event.job.id))
            if len(found) == count:
                break
    stream.cancel()
    return found


async def audited(stub: Stub, rpc: str, **auth: Any) -> list[apb.AuditEvent]:
    """The audit records of ``rpc``, oldest first."""
    request = pb.ListAuditEventsRequest(rpc=rpc, page_size=1000)
    events = []
    while True:
        page = await stub.ListAuditEvents(request, **auth)
        events += page.audit_events
        if not page.next_page_token:
            return events[::-1]
        request.page_token = page.next_page_token


async def test_a_thousand_jobs_in_order_each_with_one_event_and_one_audit_record(
    server: InProcessServer,
) -> None:
    stub = server.stub
    ids = [f"bulk-{n:04d}" for n in range(1000)][::-1]  # request order is not id order
    start = await cursor_now(stub)
    created = (await stub.BatchCreateJobs(batch(*(job(i) for i in ids)))).jobs
    assert [j.id for j in created] == ids
    assert all(j.etag == "1" and j.HasField("next_run_time") for j in created)
    assert created[500] == (await stub.GetJob(pb.GetJobRequest(id=ids[500]))).job
    assert await listed(stub) == sorted(ids)

    events = await job_events(stub, start, 1000)
    assert events == [(pb.WATCH_EVENT_KIND_ADDED, i) for i in ids]
    records = await audited(stub, "BatchCreateJobs")
    assert [(r.job_id, r.code) for r in records] == [(i, "OK") for i in ids]
    each = json_format.MessageToDict(records[0].request)
    assert each["job"]["id"] == ids[0]  # each record has its own entry


async def test_each_job_of_a_batch_is_scheduled(server: InProcessServer) -> None:
    await server.stub.BatchCreateJobs(
        batch(job("a", trigger=interval(1)), job("b", trigger=interval(1)), job("c", paused=True))
    )
    for job_id in ("a", "b"):
        await wait_executions(server.stub, job_id, 1)
    paused = (await server.stub.GetJob(pb.GetJobRequest(id="c"))).job
    assert paused.paused and not paused.HasField("next_run_time")


async def test_one_bad_job_refuses_the_batch_naming_each_bad_entry(
    server: InProcessServer,
) -> None:
    stub = server.stub
    start = await cursor_now(stub)
    jobs = [job(f"ok-{n}") for n in range(300)]
    jobs[3] = job("bad-cron", trigger=cron("0 0 31 2 *"))
    jobs[150] = job("bad-task", task="no.such.task")
    jobs[151] = jpb.Job(id="no-trigger", task="chronoplane.echo")
    jobs[299] = job("bad-enum", misfire_policy=99)
    error = await fails(stub.BatchCreateJobs(batch(*jobs)), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(error)) == {
        "requests[3].job.trigger.cron.expression",
        "requests[150].job.task",
        "requests[151].job.trigger",
        "requests[299].job.misfire_policy",
    }
    assert await listed(stub) == []
    # Nothing was written: the next event is that of a job created after.
    await stub.CreateJob(pb.CreateJobRequest(job=job("after")))
    assert await job_events(stub, start, 1) == [(pb.WATCH_EVENT_KIND_ADDED, "after")]
    [record] = await audited(stub, "BatchCreateJobs")
    assert (record.code, record.job_id) == ("INVALID_ARGUMENT", "")


async def test_violations_are_capped_and_counted(server: InProcessServer) -> None:
    jobs = [job(f"j{n}", task="no.such.task") for n in range(1000)]
    error = await fails(server.stub.BatchCreateJobs(batch(*jobs)), grpc.StatusCode.INVALID_ARGUMENT)
    found = violations(error)
    assert len(found) == 21
    assert list(found)[:2] == ["requests[0].job.task", "requests[1].job.task"]
    assert found["requests"] == "980 more violations not listed"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_empty_batch_or_one_over_a_thousand_is_refused(server: InProcessServer) -> None:
    for count in (0, 1001):
        request = batch(*(job(f"j{n}") for n in range(count)))
        error = await fails(server.stub.BatchCreateJobs(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert list(violations(error)) == ["requests"]
        assert f"has {count:,} entries" in violations(error)["requests"]
    assert await listed(server.stub) == []


async def test_an_id_twice_in_a_batch_or_already_taken(server: InProcessServer) -> None:
    stub = server.stub
    twice = batch(job("a"), job("b"), job("a"), job("c"), job("b"))
    error = await fails(stub.BatchCreateJobs(twice), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == {
        "requests[2].job.id": "repeats that of requests[0]",
        "requests[4].job.id": "repeats that of requests[1]",
    }
    await stub.CreateJob(pb.CreateJobRequest(job=job("taken")))
    error = await fails(
        stub.BatchCreateJobs(batch(job("x"), job("taken"), job("y"))),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    info = error_info(error)
    assert (info.reason, dict(info.metadata)) == (
        "JOB_ALREADY_EXISTS",
        {"job_id": "taken", "field": "requests[1].job.id"},
    )
    assert "requests[1].job.id" in (error.details() or "")
    assert await listed(stub) == ["taken"]


async def test_a_retried_batch_returns_the_same_jobs(server: InProcessServer) -> None:
    stub = server.stub
    request = batch(job(), job(), job("named"), request_ids=["r-0", "r-1", "r-2"])
    first = (await stub.BatchCreateJobs(request)).jobs
    start = await cursor_now(stub)
    again = (await stub.BatchCreateJobs(request)).jobs
    assert list(again) == list(first)
    # A retry that adds an entry creates only that one.
    request.requests.append(pb.CreateJobRequest(job=job("more"), request_id="r-3"))
    more = (await stub.BatchCreateJobs(request)).jobs
    assert list(more[:3]) == list(first) and more[3].id == "more"
    assert sorted(await listed(stub)) == sorted([j.id for j in first] + ["more"])
    assert await job_events(stub, start, 1) == [(pb.WATCH_EVENT_KIND_ADDED, "more")]
    # A request_id twice in one batch is refused.
    twice = batch(job("p"), job("q"), request_ids=["same", "same"])
    error = await fails(stub.BatchCreateJobs(twice), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == {"requests[1].request_id": "repeats that of requests[0]"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_only_admins_may_create_in_batches(database_url: str) -> None:
    async with guarded_server(database_url) as guarded:
        tokens = {
            role: bearer(await make_token(database_url, role.name.lower(), role)) for role in Role
        }
        request = batch(job("a"), job("b"))
        for role in (Role.VIEWER, Role.OPERATOR):
            await fails(
                guarded.stub.BatchCreateJobs(request, metadata=tokens[role]),
                grpc.StatusCode.PERMISSION_DENIED,
            )
        await fails(guarded.stub.BatchCreateJobs(request), grpc.StatusCode.UNAUTHENTICATED)
        created = (await guarded.stub.BatchCreateJobs(request, metadata=tokens[Role.ADMIN])).jobs
        assert [(j.id, j.created_by) for j in created] == [
            ("a", "token:admin"),
            ("b", "token:admin"),
        ]
        records = await audited(guarded.stub, "BatchCreateJobs", metadata=tokens[Role.ADMIN])
        assert [(r.principal, r.code, r.job_id) for r in records] == [
            ("token:viewer", "PERMISSION_DENIED", ""),
            ("token:operator", "PERMISSION_DENIED", ""),
            ("unauthenticated", "UNAUTHENTICATED", ""),
            ("token:admin", "OK", "a"),
            ("token:admin", "OK", "b"),
        ]
