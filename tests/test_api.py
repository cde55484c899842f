"""The gRPC surface end to end: a real grpc.aio server on port 0, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from conftest import InProcessServer
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from harness import error_reason, violations

from chronoplane.server.models import Event, EventKind, EventResource
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore
from chronoplane.server.storage.sqlalchemy.session import Session
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

Stub = Any


def interval(seconds: float) -> jpb.Trigger:
    return jpb.Trigger(
        interval=jpb.IntervalTrigger(every=duration_pb2.Duration(seconds=int(seconds)))
    )


def cron(expression: str, time_zone: str = "") -> jpb.Trigger:
    return jpb.Trigger(cron=jpb.CronTrigger(expression=expression, time_zone=time_zone))


def at(when: datetime) -> jpb.Trigger:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return jpb.Trigger(date=jpb.DateTrigger(run_time=stamp))


def struct(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def job(job_id: str = "", **fields: Any) -> jpb.Job:
    fields.setdefault("task", "chronoplane.echo")
    fields.setdefault("trigger", cron("0 3 * * *"))
    return jpb.Job(id=job_id, **fields)


async def create(stub: Stub, job_id: str = "", **fields: Any) -> jpb.Job:
    response: pb.CreateJobResponse = await stub.CreateJob(
        pb.CreateJobRequest(job=job(job_id, **fields))
    )
    return response.job


async def fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def wait_executions(
    stub: Stub, job_id: str, count: int, *, final: bool = True, within: float = 15
) -> list[epb.Execution]:
    """Polls until the job has ``count`` executions (in a final state, if asked)."""
    done = {
        epb.EXECUTION_STATE_SUCCEEDED,
        epb.EXECUTION_STATE_FAILED,
        epb.EXECUTION_STATE_MISSED,
        epb.EXECUTION_STATE_SKIPPED,
        epb.EXECUTION_STATE_INTERRUPTED,
        epb.EXECUTION_STATE_CANCELLED,
        epb.EXECUTION_STATE_TIMED_OUT,
    }
    deadline = asyncio.get_running_loop().time() + within
    while True:
        listed = await stub.ListExecutions(pb.ListExecutionsRequest(job_id=job_id))
        executions = list(listed.executions)
        ready = [e for e in executions if not final or e.state in done]
        if len(ready) >= count:
            return executions
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"wanted {count} executions, have {executions}")
        await asyncio.sleep(0.1)


# -- jobs -----------------------------------------------------------------------------------------


async def test_create_then_get_returns_the_stored_job(server: InProcessServer) -> None:
    created = await create(
        server.stub,
        "nightly-report",
        display_name="Nightly report",
        description="Builds the report",
        args=struct(region="eu", days=7),
        trigger=cron("30 2 * * *", "Europe/Berlin"),
        labels={"team": "data"},
    )
    got = (await server.stub.GetJob(pb.GetJobRequest(id="nightly-report"))).job
    assert got == created
    assert got.display_name == "Nightly report"
    assert dict(got.args) == {"region": "eu", "days": 7}
    assert got.trigger.cron.time_zone == "Europe/Berlin"
    assert got.misfire_grace.seconds == 60 and got.coalesce and got.max_concurrent == 1
    assert got.etag == "1"
    next_run = got.next_run_time.ToDatetime(tzinfo=UTC)
    assert next_run > datetime.now(UTC)
    assert next_run.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin")).hour == 2


async def test_create_generates_an_id_when_none_is_given(server: InProcessServer) -> None:
    created = await create(server.stub)
    assert created.id.startswith("job-") and len(created.id) == 16


async def test_create_with_a_taken_id_is_already_exists(server: InProcessServer) -> None:
    await create(server.stub, "taken")
    error = await fails(
        server.stub.CreateJob(pb.CreateJobRequest(job=job("taken"))), grpc.StatusCode.ALREADY_EXISTS
    )
    assert error_reason(error) == "JOB_ALREADY_EXISTS"


async def test_create_with_the_same_request_id_returns_the_first_job(
    server: InProcessServer,
) -> None:
    request = pb.CreateJobRequest(job=job(), request_id="create-1")
    first = (await server.stub.CreateJob(request)).job
    second = (await server.stub.CreateJob(request)).job
    assert first.id == second.id
    listed = await server.stub.ListJobs(pb.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [first.id]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"trigger": cron("0 0 31 2 *")}, "job.trigger.cron.expression"),
        ({"trigger": cron("0 0 30,31 2 *")}, "job.trigger.cron.expression"),
        ({"trigger": cron("61 * * * *")}, "job.trigger.cron.expression"),
        ({"trigger": cron("* * *")}, "job.trigger.cron.expression"),
        ({"trigger": cron("0 9 * * 1", "Mars/Olympus_Mons")}, "job.trigger.cron.time_zone"),
        ({"trigger": cron("0 9 * * 1", "../../etc/passwd")}, "job.trigger.cron.time_zone"),
        ({"trigger": interval(0)}, "job.trigger.interval.every"),
        ({"trigger": interval(-5)}, "job.trigger.interval.every"),
        ({"trigger": jpb.Trigger()}, "job.trigger"),
        ({"task": "no.such.task"}, "job.task"),
        ({"task": ""}, "job.task"),
        ({"display_name": "x" * 257}, "job.display_name"),
        ({"description": "bad\x00byte"}, "job.description"),
        ({"max_concurrent": -1}, "job.max_concurrent"),
        ({"misfire_grace": duration_pb2.Duration(seconds=-1)}, "job.misfire_grace"),
        ({"labels": {"Bad Key": "x"}}, "job.labels"),
        ({"args": struct(blob="x" * 70_000)}, "job.args"),
    ],
)
async def test_bad_jobs_are_invalid_argument_naming_the_field(
    server: InProcessServer, fields: dict[str, Any], field: str
) -> None:
    call = server.stub.CreateJob(pb.CreateJobRequest(job=job("bad", **fields)))
    error = await fails(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert field in violations(error), violations(error)
    # Nothing was written.
    await fails(server.stub.GetJob(pb.GetJobRequest(id="bad")), grpc.StatusCode.NOT_FOUND)


async def test_bad_ids_are_rejected(server: InProcessServer) -> None:
    for bad in ["-starts-with-dash", "has space", "x" * 129, "slash/inside"]:
        error = await fails(
            server.stub.CreateJob(pb.CreateJobRequest(job=job(bad))),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "job.id" in violations(error)


async def test_every_violation_is_reported_at_once(server: InProcessServer) -> None:
    bad = job("", task="nope", trigger=cron("0 0 * * *", "Nowhere/City"), max_concurrent=-3)
    error = await fails(
        server.stub.CreateJob(pb.CreateJobRequest(job=bad)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(violations(error)) == {
        "job.task",
        "job.trigger.cron.time_zone",
        "job.max_concurrent",
    }


async def test_get_unknown_job_is_not_found(server: InProcessServer) -> None:
    error = await fails(server.stub.GetJob(pb.GetJobRequest(id="ghost")), grpc.StatusCode.NOT_FOUND)
    assert "ghost" in (error.details() or "")
    assert error_reason(error) == "JOB_NOT_FOUND"


async def test_list_jobs_pages_through_every_job_once(server: InProcessServer) -> None:
    ids = [f"job-{n:03d}" for n in range(25)]
    for job_id in reversed(ids):
        await create(server.stub, job_id)
    seen: list[str] = []
    token = ""
    while True:
        page = await server.stub.ListJobs(pb.ListJobsRequest(page_size=10, page_token=token))
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids


async def test_list_jobs_rejects_negative_page_size_and_tampered_tokens(
    server: InProcessServer,
) -> None:
    error = await fails(
        server.stub.ListJobs(pb.ListJobsRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "page_size" in violations(error)
    for n in range(3):
        await create(server.stub, f"j{n}")
    token = (await server.stub.ListJobs(pb.ListJobsRequest(page_size=1))).next_page_token
    body, signature = token.split(".")
    payload = base64.urlsafe_b64decode(body + "==").replace(b'"j0"', b'"j1"')
    forged = base64.urlsafe_b64encode(payload).rstrip(b"=").decode() + "." + signature
    for bad in [forged, token[:-3], "garbage", token + "x"]:
        error = await fails(
            server.stub.ListJobs(pb.ListJobsRequest(page_token=bad)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "page_token" in violations(error)


async def test_update_changes_only_masked_fields_and_bumps_etag(server: InProcessServer) -> None:
    created = await create(server.stub, "upd", description="old", display_name="Old")
    change = jpb.Job(id="upd", description="new", display_name="ignored", etag=created.etag)
    updated = (
        await server.stub.UpdateJob(
            pb.UpdateJobRequest(
                job=change, update_mask=field_mask_pb2.FieldMask(paths=["description"])
            )
        )
    ).job
    assert updated.description == "new"
    assert updated.display_name == "Old"
    assert updated.etag != created.etag
    assert updated.next_run_time == created.next_run_time


async def test_update_with_a_stale_etag_is_aborted_and_changes_nothing(
    server: InProcessServer,
) -> None:
    created = await create(server.stub, "etag", description="v1")
    mask = field_mask_pb2.FieldMask(paths=["description"])
    await server.stub.UpdateJob(
        pb.UpdateJobRequest(job=jpb.Job(id="etag", description="v2"), update_mask=mask)
    )
    stale = jpb.Job(id="etag", description="v3", etag=created.etag)
    await fails(
        server.stub.UpdateJob(pb.UpdateJobRequest(job=stale, update_mask=mask)),
        grpc.StatusCode.ABORTED,
    )
    assert (await server.stub.GetJob(pb.GetJobRequest(id="etag"))).job.description == "v2"


async def test_update_rejects_missing_or_unknown_mask_and_bad_values(
    server: InProcessServer,
) -> None:
    await create(server.stub, "mask")
    for paths, field in [
        ([], "update_mask"),
        (["id"], "update_mask"),
        (["create_time"], "update_mask"),
        (["trigger"], "job.trigger"),
    ]:
        error = await fails(
            server.stub.UpdateJob(
                pb.UpdateJobRequest(
                    job=jpb.Job(id="mask"), update_mask=field_mask_pb2.FieldMask(paths=paths)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert field in violations(error)


async def test_update_of_the_trigger_reschedules(server: InProcessServer) -> None:
    await create(server.stub, "resched", trigger=cron("0 3 * * *"))
    soon = datetime.now(UTC) + timedelta(seconds=1)
    updated = (
        await server.stub.UpdateJob(
            pb.UpdateJobRequest(
                job=jpb.Job(id="resched", trigger=at(soon)),
                update_mask=field_mask_pb2.FieldMask(paths=["trigger"]),
            )
        )
    ).job
    assert abs(updated.next_run_time.ToDatetime(tzinfo=UTC) - soon) < timedelta(milliseconds=1)
    executions = await wait_executions(server.stub, "resched", 1)
    assert executions[0].source == epb.EXECUTION_SOURCE_SCHEDULE


async def test_delete_removes_job_and_history(server: InProcessServer) -> None:
    await create(server.stub, "gone")
    await server.stub.TriggerJob(pb.TriggerJobRequest(id="gone"))
    await wait_executions(server.stub, "gone", 1)
    await server.stub.DeleteJob(pb.DeleteJobRequest(id="gone"))
    await fails(server.stub.GetJob(pb.GetJobRequest(id="gone")), grpc.StatusCode.NOT_FOUND)
    listed = await server.stub.ListExecutions(pb.ListExecutionsRequest())
    assert [e for e in listed.executions if e.job_id == "gone"] == []
    await fails(server.stub.DeleteJob(pb.DeleteJobRequest(id="gone")), grpc.StatusCode.NOT_FOUND)


async def test_delete_with_a_stale_etag_is_aborted(server: InProcessServer) -> None:
    await create(server.stub, "keep")
    await fails(
        server.stub.DeleteJob(pb.DeleteJobRequest(id="keep", etag="999")), grpc.StatusCode.ABORTED
    )
    await server.stub.GetJob(pb.GetJobRequest(id="keep"))


async def test_pause_stops_firing_and_resume_starts_again(server: InProcessServer) -> None:
    await create(server.stub, "pulse", trigger=interval(1))
    paused = (await server.stub.PauseJob(pb.PauseJobRequest(id="pulse"))).job
    assert paused.paused and not paused.HasField("next_run_time")
    await asyncio.sleep(2.2)
    listed = await server.stub.ListExecutions(pb.ListExecutionsRequest(job_id="pulse"))
    assert list(listed.executions) == []
    resumed = (await server.stub.ResumeJob(pb.ResumeJobRequest(id="pulse"))).job
    assert not resumed.paused and resumed.HasField("next_run_time")
    executions = await wait_executions(server.stub, "pulse", 1)
    assert executions[0].state == epb.EXECUTION_STATE_SUCCEEDED


async def _job_events_after(server: InProcessServer, cursor: int) -> list[Event]:
    store = SqlAlchemyStore.from_url(server.database_url)
    try:
        events = await store.newest_events(cursor, limit=1000)
    finally:
        await store.close()
    return [e for e in events if e.resource is EventResource.JOB]


async def _last_cursor(server: InProcessServer) -> int:
    store = SqlAlchemyStore.from_url(server.database_url)
    try:
        return (await store.event_window()).newest
    finally:
        await store.close()


@pytest.fixture
def transactions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of events each write transaction appends, in commit order."""
    sizes: list[int] = []
    append = Session._append_events

    async def counted(self: Session, conn: Any, changes: Any) -> None:
        sizes.append(len(changes.kinds))
        await append(self, conn, changes)

    monkeypatch.setattr(Session, "_append_events", counted)
    return sizes


async def test_concurrent_updates_share_transactions_and_stale_etags_fail_alone(
    server: InProcessServer, transactions: list[int]
) -> None:
    """50 UpdateJobs at once on 50 jobs, 10 with a stale etag: exactly those are ABORTED,
    the 40 others applied, with one event each; they were written in fewer transactions."""
    ids = [f"group-{n:02d}" for n in range(50)]
    await server.stub.BatchCreateJobs(
        pb.BatchCreateJobsRequest(requests=[pb.CreateJobRequest(job=job(i)) for i in ids])
    )
    mask = field_mask_pb2.FieldMask(paths=["description"])
    stale = set(ids[::5])
    for job_id in stale:  # now at etag "2"
        change = jpb.Job(id=job_id, description="moved")
        await server.stub.UpdateJob(pb.UpdateJobRequest(job=change, update_mask=mask))
    cursor = await _last_cursor(server)
    transactions.clear()

    async def update(job_id: str) -> grpc.StatusCode:
        change = jpb.Job(id=job_id, description=f"new {job_id}", etag="1")
        try:
            await server.stub.UpdateJob(pb.UpdateJobRequest(job=change, update_mask=mask))
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    codes = dict(zip(ids, await asyncio.gather(*map(update, ids)), strict=True))
    assert {i for i, code in codes.items() if code is not grpc.StatusCode.OK} == stale
    assert {codes[i] for i in stale} == {grpc.StatusCode.ABORTED}
    for job_id in ids:
        got = (await server.stub.GetJob(pb.GetJobRequest(id=job_id))).job
        assert got.etag == "2"
        assert got.description == ("moved" if job_id in stale else f"new {job_id}")
    events = await _job_events_after(server, cursor)
    assert sorted(e.job_id for e in events) == sorted(set(ids) - stale)
    assert {e.kind for e in events} == {EventKind.MODIFIED}
    assert [e.cursor for e in events] == sorted(e.cursor for e in events)
    assert all(e.job is not None and e.job.version == 2 for e in events)
    # The first write goes alone; the calls that came meanwhile share the next ones.
    assert sum(transactions) == 40 and len(transactions) < 40 and max(transactions) > 1


async def test_concurrent_changes_of_one_job_are_one_event_each_in_version_order(
    server: InProcessServer,
) -> None:
    await create(server.stub, "busy")
    cursor = await _last_cursor(server)
    mask = field_mask_pb2.FieldMask(paths=["description"])

    async def update(n: int, etag: str = "") -> jpb.Job:
        change = jpb.Job(id="busy", description=f"change {n}", etag=etag)
        request = pb.UpdateJobRequest(job=change, update_mask=mask)
        response: pb.UpdateJobResponse = await server.stub.UpdateJob(request)
        return response.job

    # Without an etag each retries until it applies (a call loses at most once per other
    # call: 5 attempts suffice for 5); with the same etag only one can.
    updated = await asyncio.gather(*(update(n) for n in range(5)))
    assert sorted(int(j.etag) for j in updated) == list(range(2, 7))
    results = await asyncio.gather(
        *(update(n, etag="6") for n in range(10)), return_exceptions=True
    )
    assert len([r for r in results if isinstance(r, jpb.Job)]) == 1
    refused = [r for r in results if not isinstance(r, jpb.Job)]
    assert len(refused) == 9
    assert all(
        isinstance(r, grpc.aio.AioRpcError) and r.code() is grpc.StatusCode.ABORTED for r in refused
    )
    paused = await server.stub.PauseJob(pb.PauseJobRequest(id="busy"))
    assert paused.job.etag == "8"
    await server.stub.DeleteJob(pb.DeleteJobRequest(id="busy", etag="8"))
    events = await _job_events_after(server, cursor)
    assert [e.kind for e in events] == [EventKind.MODIFIED] * 7 + [EventKind.DELETED]
    assert [e.job.version for e in events if e.job is not None] == [*range(2, 9), 8]


async def test_update_and_pause_return_the_job_as_get_job_does(server: InProcessServer) -> None:
    await create(server.stub, "same", trigger=interval(3600))
    await server.stub.TriggerJob(pb.TriggerJobRequest(id="same"))
    await wait_executions(server.stub, "same", 1)
    mask = field_mask_pb2.FieldMask(paths=["description"])
    updated = await server.stub.UpdateJob(
        pb.UpdateJobRequest(job=jpb.Job(id="same", description="new"), update_mask=mask)
    )
    assert updated.job.HasField("last_execution")
    assert updated.job == (await server.stub.GetJob(pb.GetJobRequest(id="same"))).job
    paused = await server.stub.PauseJob(pb.PauseJobRequest(id="same"))
    assert paused.job == (await server.stub.GetJob(pb.GetJobRequest(id="same"))).job
    resumed = await server.stub.ResumeJob(pb.ResumeJobRequest(id="same"))
    assert resumed.job == (await server.stub.GetJob(pb.GetJobRequest(id="same"))).job


# -- executions -----------------------------------------------------------------------------------


async def test_interval_job_fires_and_records_succeeded_executions(
    server: InProcessServer,
) -> None:
    await create(server.stub, "tick", trigger=interval(1), args=struct(n=1))
    executions = await wait_executions(server.stub, "tick", 2)
    newest, older = executions[0], executions[1]
    assert newest.id > older.id
    assert newest.scheduled_time.ToDatetime() - older.scheduled_time.ToDatetime() == timedelta(
        seconds=1
    )
    for e in executions[:2]:
        assert e.state == epb.EXECUTION_STATE_SUCCEEDED
        assert e.source == epb.EXECUTION_SOURCE_SCHEDULE
        assert e.instance_id == server.app.instance_id
        assert e.start_time.ToDatetime() >= e.scheduled_time.ToDatetime()
        assert e.end_time.ToDatetime() >= e.start_time.ToDatetime()
        assert e.result.struct_value.fields["n"].number_value == 1
    job_now = (await server.stub.GetJob(pb.GetJobRequest(id="tick"))).job
    assert job_now.last_execution.id >= executions[0].id  # it may have fired again since


async def test_trigger_runs_now_with_overridden_args_in_a_thread(server: InProcessServer) -> None:
    await create(server.stub, "adder", task="test.add", args=struct(a=1, b=2))
    execution = (
        await server.stub.TriggerJob(pb.TriggerJobRequest(id="adder", args=struct(a=40, b=2)))
    ).execution
    assert execution.source == epb.EXECUTION_SOURCE_MANUAL
    done = await wait_executions(server.stub, "adder", 1)
    got = (await server.stub.GetExecution(pb.GetExecutionRequest(id=execution.id))).execution
    assert got == done[0]
    assert got.state == epb.EXECUTION_STATE_SUCCEEDED
    assert got.result.struct_value.fields["sum"].number_value == 42
    assert got.result.struct_value.fields["thread"].string_value.startswith("chronoplane-task")
    assert dict(got.args) == {"a": 40, "b": 2}


async def test_trigger_with_the_same_request_id_creates_one_execution(
    server: InProcessServer,
) -> None:
    await create(server.stub, "once")
    request = pb.TriggerJobRequest(id="once", request_id="deploy-42")
    first, second = await asyncio.gather(
        server.stub.TriggerJob(request), server.stub.TriggerJob(request)
    )
    assert first.execution.id == second.execution.id
    await wait_executions(server.stub, "once", 1)
    third = await server.stub.TriggerJob(request)
    assert third.execution.id == first.execution.id
    listed = await server.stub.ListExecutions(pb.ListExecutionsRequest(job_id="once"))
    assert len(listed.executions) == 1


async def test_concurrent_triggers_share_transactions_and_fail_alone(
    server: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 TriggerJobs at once: 20 on jobs that exist (4 of them with one request_id), 10 on
    jobs that do not. The missing ones are NOT_FOUND, the repeated request_id makes one
    execution, the others one each, in fewer transactions than calls."""
    for name in ("t-a", "t-b"):
        await create(server.stub, name, paused=True, overlap_policy=jpb.OVERLAP_POLICY_ALLOW)
    admitted: list[int] = []
    admit = SqlAlchemyStore.admit_executions

    async def counted(self: SqlAlchemyStore, admissions: Any, **kwargs: Any) -> Any:
        admitted.append(len(admissions))
        return await admit(self, admissions, **kwargs)

    monkeypatch.setattr(SqlAlchemyStore, "admit_executions", counted)
    requests = [pb.TriggerJobRequest(id=("t-a", "t-b")[n % 2]) for n in range(16)]
    requests += [pb.TriggerJobRequest(id="t-a", request_id="once") for _ in range(4)]
    requests += [pb.TriggerJobRequest(id=f"ghost-{n}") for n in range(10)]
    results = await asyncio.gather(*map(server.stub.TriggerJob, requests), return_exceptions=True)
    missing = results[20:]
    assert all(
        isinstance(r, grpc.aio.AioRpcError) and r.code() is grpc.StatusCode.NOT_FOUND
        for r in missing
    )
    made = [r.execution for r in results[:20] if isinstance(r, pb.TriggerJobResponse)]
    assert len(made) == 20
    assert len({e.id for e in made[:16]}) == 16 and len({e.id for e in made[16:]}) == 1
    assert all(e.job_id == r.id for e, r in zip(made, requests, strict=False))
    executions = await wait_executions(server.stub, "t-a", 9)
    executions += await wait_executions(server.stub, "t-b", 8)
    assert {e.id for e in executions} == {e.id for e in made}
    # Shared: some admission wrote several triggers. (A group may be written again after a
    # deadlock with the runs' own writes, so the calls are not counted exactly.)
    assert max(admitted) > 1 and sum(admitted) >= 20


async def test_failing_task_records_error_and_traceback(server: InProcessServer) -> None:
    await create(server.stub, "boom", task="chronoplane.fail", args=struct(message="disk full"))
    await server.stub.TriggerJob(pb.TriggerJobRequest(id="boom"))
    [execution] = await wait_executions(server.stub, "boom", 1)
    assert execution.state == epb.EXECUTION_STATE_FAILED
    assert execution.error_message == "RuntimeError: disk full"
    assert "Traceback" in execution.error_traceback and "disk full" in execution.error_traceback
    assert not execution.HasField("result")


async def test_a_result_that_is_not_json_fails_the_execution(server: InProcessServer) -> None:
    await create(server.stub, "weird", task="test.not_json")
    await server.stub.TriggerJob(pb.TriggerJobRequest(id="weird"))
    [execution] = await wait_executions(server.stub, "weird", 1)
    assert execution.state == epb.EXECUTION_STATE_FAILED
    assert "not JSON" in execution.error_message


async def test_max_concurrent_records_skipped_runs(server: InProcessServer) -> None:
    await create(server.stub, "slow", task="test.block", args=struct(seconds=30), max_concurrent=1)
    running = (await server.stub.TriggerJob(pb.TriggerJobRequest(id="slow"))).execution
    skipped = (await server.stub.TriggerJob(pb.TriggerJobRequest(id="slow"))).execution
    assert skipped.state == epb.EXECUTION_STATE_SKIPPED
    assert "max_concurrent" in skipped.error_message
    await asyncio.sleep(0.3)
    got = (await server.stub.GetExecution(pb.GetExecutionRequest(id=running.id))).execution
    assert got.state == epb.EXECUTION_STATE_RUNNING and got.HasField("start_time")


async def test_a_fire_later_than_the_misfire_grace_is_recorded_missed(
    server: InProcessServer,
) -> None:
    past = datetime.now(UTC) - timedelta(minutes=5)
    await create(
        server.stub,
        "late",
        trigger=at(past),
        misfire_grace=duration_pb2.Duration(seconds=10),
        misfire_policy=jpb.MISFIRE_POLICY_SKIP,
    )
    [execution] = await wait_executions(server.stub, "late", 1)
    assert execution.state == epb.EXECUTION_STATE_MISSED
    assert execution.scheduled_time.ToDatetime(tzinfo=UTC) == past
    assert execution.missed.count == 1
    assert execution.missed.first_time.ToDatetime(tzinfo=UTC) == past
    assert "misfire grace" in execution.error_message
    # The next run time is written with the batch after the fire's record: soon, not at once.
    for _ in range(50):
        job_now = (await server.stub.GetJob(pb.GetJobRequest(id="late"))).job
        if not job_now.HasField("next_run_time"):
            break
        await asyncio.sleep(0.1)
    assert not job_now.HasField("next_run_time")


async def test_trigger_unknown_job_is_not_found(server: InProcessServer) -> None:
    await fails(server.stub.TriggerJob(pb.TriggerJobRequest(id="nope")), grpc.StatusCode.NOT_FOUND)


async def test_list_executions_filters_by_state_and_time_and_pages(
    server: InProcessServer,
) -> None:
    await create(server.stub, "mixed", task="chronoplane.echo")
    await create(server.stub, "bad", task="chronoplane.fail")
    for _ in range(5):
        await server.stub.TriggerJob(pb.TriggerJobRequest(id="mixed"))
    await server.stub.TriggerJob(pb.TriggerJobRequest(id="bad"))
    await wait_executions(server.stub, "mixed", 5)
    await wait_executions(server.stub, "bad", 1)

    failed = await server.stub.ListExecutions(
        pb.ListExecutionsRequest(states=[epb.EXECUTION_STATE_FAILED])
    )
    assert [e.job_id for e in failed.executions] == ["bad"]

    seen: list[str] = []
    token = ""
    while True:
        page = await server.stub.ListExecutions(
            pb.ListExecutionsRequest(job_id="mixed", page_size=2, page_token=token)
        )
        seen += [e.id for e in page.executions]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)

    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    none = await server.stub.ListExecutions(pb.ListExecutionsRequest(scheduled_after=future))
    assert list(none.executions) == []

    error = await fails(
        server.stub.ListExecutions(pb.ListExecutionsRequest(page_token="not-a-token")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in violations(error)
    error = await fails(
        server.stub.ListExecutions(
            pb.ListExecutionsRequest(states=[epb.ExecutionState.ValueType(0)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "states" in violations(error)
    await fails(
        server.stub.ListExecutions(pb.ListExecutionsRequest(job_id="ghost")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_a_token_from_one_filter_is_refused_for_another(server: InProcessServer) -> None:
    await create(server.stub, "a")
    for _ in range(3):
        await server.stub.TriggerJob(pb.TriggerJobRequest(id="a"))
    page = await server.stub.ListExecutions(pb.ListExecutionsRequest(job_id="a", page_size=1))
    assert page.next_page_token
    error = await fails(
        server.stub.ListExecutions(
            pb.ListExecutionsRequest(page_size=1, page_token=page.next_page_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in violations(error)


async def test_get_unknown_execution_is_not_found(server: InProcessServer) -> None:
    await fails(
        server.stub.GetExecution(pb.GetExecutionRequest(id="0123")), grpc.StatusCode.NOT_FOUND
    )


# -- tasks and triggers ---------------------------------------------------------------------------


async def test_list_tasks_shows_builtins_and_loaded_modules(server: InProcessServer) -> None:
    tasks = {
        t.name: t.description for t in (await server.stub.ListTasks(pb.ListTasksRequest())).tasks
    }
    assert {"chronoplane.echo", "chronoplane.sleep", "chronoplane.fail", "test.add"} <= set(tasks)
    assert tasks["test.add"] == "Adds a and b in a worker thread."
    assert tasks["test.block"] == "Sleeps for a long time (to hold a concurrency slot)."


async def test_preview_follows_crontab_weekdays_and_time_zones(server: InProcessServer) -> None:
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(datetime(2026, 6, 1, tzinfo=UTC))  # a Monday
    response = await server.stub.PreviewTrigger(
        pb.PreviewTriggerRequest(
            trigger=cron("0 9 * * 1", "America/New_York"), count=3, start_time=start
        )
    )
    fires = [t.ToDatetime(tzinfo=UTC) for t in response.fire_times]
    # 09:00 in New York in June is 13:00 UTC, on Mondays (crontab: 1 = Monday).
    assert fires == [datetime(2026, 6, d, 13, tzinfo=UTC) for d in (1, 8, 15)]
    sunday = await server.stub.PreviewTrigger(
        pb.PreviewTriggerRequest(trigger=cron("0 0 * * 0"), count=1, start_time=start)
    )
    assert sunday.fire_times[0].ToDatetime(tzinfo=UTC) == datetime(2026, 6, 7, tzinfo=UTC)


async def test_preview_interval_with_end_stops(server: InProcessServer) -> None:
    begin = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = interval(3600)
    trigger.interval.start_time.FromDatetime(begin)
    trigger.interval.end_time.FromDatetime(begin + timedelta(hours=2, minutes=30))
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(begin - timedelta(days=1))
    response = await server.stub.PreviewTrigger(
        pb.PreviewTriggerRequest(trigger=trigger, count=10, start_time=start)
    )
    assert [t.ToDatetime(tzinfo=UTC) for t in response.fire_times] == [
        begin + timedelta(hours=h) for h in range(3)
    ]


async def test_preview_rejects_bad_input(server: InProcessServer) -> None:
    for request, field in [
        (pb.PreviewTriggerRequest(trigger=cron("0 0 31 2 *")), "trigger.cron.expression"),
        (pb.PreviewTriggerRequest(trigger=cron("* * * * *"), count=5000), "count"),
        (pb.PreviewTriggerRequest(), "trigger"),
    ]:
        error = await fails(server.stub.PreviewTrigger(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert field in violations(error)


async def test_many_runs_at_once_are_all_recorded_to_the_end(server: InProcessServer) -> None:
    """Starts and ends of many executions are written in shared batches."""
    await create(server.stub, "crowd", max_concurrent=100)
    await asyncio.gather(
        *(server.stub.TriggerJob(pb.TriggerJobRequest(id="crowd")) for _ in range(60))
    )
    executions = await wait_executions(server.stub, "crowd", 60)
    assert len(executions) == 60
    assert {e.state for e in executions} == {epb.EXECUTION_STATE_SUCCEEDED}
