"""The scheduling promises through the real API: overlap, retries, timeouts, cancellation,
backfill, manual runs and retention, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from conftest import InProcessServer
from google.protobuf import duration_pb2, timestamp_pb2
from harness import violations
from test_api import create, cron, fails, interval, struct, wait_executions

from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

Stub = Any


def seconds(value: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(timedelta(seconds=value))
    return message


def stamp(when: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(when)
    return message


def when(message: timestamp_pb2.Timestamp) -> datetime:
    return message.ToDatetime(tzinfo=UTC)


async def executions(stub: Stub, job_id: str) -> list[epb.Execution]:
    response = await stub.ListExecutions(pb.ListExecutionsRequest(job_id=job_id, page_size=1000))
    return list(reversed(response.executions))  # oldest first


async def get(stub: Stub, execution_id: str) -> epb.Execution:
    response: pb.GetExecutionResponse = await stub.GetExecution(
        pb.GetExecutionRequest(id=execution_id)
    )
    return response.execution


async def wait_state(
    stub: Stub, execution_id: str, state: int, *, within: float = 15
) -> epb.Execution:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        execution = await get(stub, execution_id)
        if execution.state == state:
            return execution
        assert asyncio.get_running_loop().time() < deadline, execution
        await asyncio.sleep(0.05)


def most_at_once(runs: list[epb.Execution]) -> int:
    """The largest number of these executions that were running at the same moment."""
    edges: list[tuple[datetime, int]] = []
    for run in runs:
        if run.HasField("start_time"):
            edges.append((when(run.start_time), 1))
            end = (
                when(run.end_time) if run.HasField("end_time") else datetime.max.replace(tzinfo=UTC)
            )
            edges.append((end, -1))
    peak = current = 0
    for _, step in sorted(edges):  # an end sorts before a start at the same instant
        current += step
        peak = max(peak, current)
    return peak


# -- overlap --------------------------------------------------------------------------------------


async def test_each_overlap_policy_with_a_job_longer_than_its_interval(
    server: InProcessServer,
) -> None:
    """Every second a fire, each run 2.5 s long: what each policy makes of the overlap."""
    stub = server.stub
    policies = {
        "skip": jpb.OVERLAP_POLICY_SKIP,
        "allow": jpb.OVERLAP_POLICY_ALLOW,
        "buffer-one": jpb.OVERLAP_POLICY_BUFFER_ONE,
        "buffer-all": jpb.OVERLAP_POLICY_BUFFER_ALL,
        "cancel": jpb.OVERLAP_POLICY_CANCEL_RUNNING,
    }
    for job_id, policy in policies.items():
        await create(
            stub,
            job_id,
            task="test.block",
            args=struct(seconds=2.5),
            trigger=interval(1),
            overlap_policy=policy,
        )
    await create(
        stub,
        "allow-2",
        task="test.block",
        args=struct(seconds=2.5),
        trigger=interval(1),
        overlap_policy=jpb.OVERLAP_POLICY_ALLOW,
        max_concurrent=2,
    )
    await asyncio.sleep(6.5)
    for job_id in [*policies, "allow-2"]:
        await stub.PauseJob(pb.PauseJobRequest(id=job_id))
    history = {job_id: await executions(stub, job_id) for job_id in [*policies, "allow-2"]}

    def states(job_id: str) -> list[int]:
        return [e.state for e in history[job_id]]

    skip = history["skip"]
    assert most_at_once(skip) == 1
    assert states("skip").count(epb.EXECUTION_STATE_SKIPPED) >= 2
    assert all("max_concurrent" in e.error_message for e in skip if e.state == 6)

    assert most_at_once(history["allow"]) >= 2
    assert epb.EXECUTION_STATE_SKIPPED not in states("allow")
    assert most_at_once(history["allow-2"]) == 2
    assert epb.EXECUTION_STATE_SKIPPED in states("allow-2")

    buffer_one = history["buffer-one"]
    assert most_at_once(buffer_one) == 1
    assert states("buffer-one").count(epb.EXECUTION_STATE_PENDING) <= 1
    assert any("already waiting" in e.error_message for e in buffer_one)
    waited = [e for e in buffer_one if e.HasField("start_time")][1:]
    assert waited and all(
        when(e.start_time) - when(e.scheduled_time) > timedelta(seconds=0.5) for e in waited
    )

    buffer_all = history["buffer-all"]
    assert most_at_once(buffer_all) == 1
    assert epb.EXECUTION_STATE_SKIPPED not in states("buffer-all")
    assert states("buffer-all").count(epb.EXECUTION_STATE_PENDING) >= 2

    cancel = history["cancel"]
    assert most_at_once(cancel) == 1
    cancelled = [e for e in cancel if e.state == epb.EXECUTION_STATE_CANCELLED]
    assert len(cancelled) >= 3
    assert all("cancel_running" in e.error_message for e in cancelled)
    assert epb.EXECUTION_STATE_SKIPPED not in states("cancel")


async def test_trigger_honours_the_overlap_policy_unless_the_request_overrides_it(
    server: InProcessServer,
) -> None:
    stub = server.stub
    await create(
        stub,
        "manual",
        task="test.block",
        args=struct(seconds=30),
        overlap_policy=jpb.OVERLAP_POLICY_BUFFER_ONE,
    )
    first = (await stub.TriggerJob(pb.TriggerJobRequest(id="manual"))).execution
    await wait_state(stub, first.id, epb.EXECUTION_STATE_RUNNING)
    buffered = (await stub.TriggerJob(pb.TriggerJobRequest(id="manual"))).execution
    assert buffered.state == epb.EXECUTION_STATE_PENDING
    full = (await stub.TriggerJob(pb.TriggerJobRequest(id="manual"))).execution
    assert full.state == epb.EXECUTION_STATE_SKIPPED
    skipped = (
        await stub.TriggerJob(
            pb.TriggerJobRequest(id="manual", overlap_policy=jpb.OVERLAP_POLICY_SKIP)
        )
    ).execution
    assert skipped.state == epb.EXECUTION_STATE_SKIPPED
    forced = (
        await stub.TriggerJob(
            pb.TriggerJobRequest(id="manual", overlap_policy=jpb.OVERLAP_POLICY_ALLOW)
        )
    ).execution
    await wait_state(stub, forced.id, epb.EXECUTION_STATE_RUNNING)
    # The same request_id twice: one execution.
    again = [
        (
            await stub.TriggerJob(
                pb.TriggerJobRequest(
                    id="manual", request_id="once", overlap_policy=jpb.OVERLAP_POLICY_ALLOW
                )
            )
        ).execution
        for _ in range(2)
    ]
    assert again[0].id == again[1].id
    # The buffered one starts when every run holding a slot has ended.
    for running in (first, forced, again[0]):
        assert (await get(stub, buffered.id)).state == epb.EXECUTION_STATE_PENDING
        await stub.CancelExecution(pb.CancelExecutionRequest(id=running.id))
    await wait_state(stub, buffered.id, epb.EXECUTION_STATE_RUNNING)


async def test_bad_overlap_and_misfire_policies_are_named(server: InProcessServer) -> None:
    error = await fails(
        server.stub.CreateJob(
            pb.CreateJobRequest(
                job=jpb.Job(
                    id="bad",
                    task="chronoplane.echo",
                    trigger=cron("0 3 * * *"),
                    overlap_policy=42,  # type: ignore[arg-type]
                    misfire_policy=17,  # type: ignore[arg-type]
                )
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(violations(error)) == {
        "job.overlap_policy",
        "job.misfire_policy",
    }
    error = await fails(
        server.stub.CreateJob(
            pb.CreateJobRequest(
                job=jpb.Job(
                    id="bad",
                    task="chronoplane.echo",
                    trigger=cron("0 3 * * *"),
                    catchup_limit=-1,
                    catchup_window=seconds(-5),
                    history_limit=-3,
                    retry=jpb.RetryPolicy(max_attempts=1000, retry_on=["not a name"]),
                )
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(violations(error)) == {
        "job.catchup_limit",
        "job.catchup_window",
        "job.history_limit",
        "job.retry.max_attempts",
        "job.retry.retry_on",
    }
    await fails(server.stub.GetJob(pb.GetJobRequest(id="bad")), grpc.StatusCode.NOT_FOUND)


# -- retries --------------------------------------------------------------------------------------


async def test_a_failing_run_is_retried_with_backoff_each_attempt_its_own_execution(
    server: InProcessServer,
) -> None:
    stub = server.stub
    key = uuid.uuid4().hex
    await create(
        stub,
        "flaky",
        task="test.flaky",
        args=struct(key=key, failures=2),
        retry=jpb.RetryPolicy(max_attempts=4, initial_backoff=seconds(0.3), backoff_multiplier=2.0),
    )
    first = (await stub.TriggerJob(pb.TriggerJobRequest(id="flaky"))).execution
    runs = await wait_executions(stub, "flaky", 3)
    runs.sort(key=lambda e: e.attempt)
    assert [e.attempt for e in runs] == [1, 2, 3]
    assert [e.state for e in runs] == [
        epb.EXECUTION_STATE_FAILED,
        epb.EXECUTION_STATE_FAILED,
        epb.EXECUTION_STATE_SUCCEEDED,
    ]
    assert [e.source for e in runs] == [
        epb.EXECUTION_SOURCE_MANUAL,
        epb.EXECUTION_SOURCE_RETRY,
        epb.EXECUTION_SOURCE_RETRY,
    ]
    assert runs[0].id == first.id and runs[0].first_execution_id == ""
    assert all(e.first_execution_id == first.id for e in runs[1:])
    assert runs[0].error_type == "builtins.ConnectionError"
    assert runs[2].result.number_value == 3
    # Backoff: 0.3 s, then 0.6 s.
    for before, after, wait in ((runs[0], runs[1], 0.3), (runs[1], runs[2], 0.6)):
        gap = when(after.start_time) - when(before.end_time)
        assert timedelta(seconds=wait) <= gap < timedelta(seconds=wait + 2), gap
    await asyncio.sleep(0.5)
    assert len(await executions(stub, "flaky")) == 3, "no retry after a success"


async def test_only_listed_errors_are_retried_and_attempts_stop_at_the_maximum(
    server: InProcessServer,
) -> None:
    stub = server.stub
    quick = jpb.RetryPolicy(max_attempts=2, initial_backoff=seconds(0.1), retry_on=["OSError"])
    await create(
        stub,
        "value-error",
        task="test.flaky",
        args=struct(key=uuid.uuid4().hex, failures=5, error="ValueError"),
        retry=quick,
    )
    await create(
        stub,
        "os-error",  # ConnectionError is an OSError: a subclass matches
        task="test.flaky",
        args=struct(key=uuid.uuid4().hex, failures=5),
        retry=quick,
    )
    await stub.TriggerJob(pb.TriggerJobRequest(id="value-error"))
    await stub.TriggerJob(pb.TriggerJobRequest(id="os-error"))
    failed = await wait_executions(stub, "os-error", 2)
    assert sorted(e.attempt for e in failed) == [1, 2]
    await asyncio.sleep(0.5)
    assert len(await executions(stub, "os-error")) == 2
    [only] = await executions(stub, "value-error")
    assert only.state == epb.EXECUTION_STATE_FAILED and only.error_type == "builtins.ValueError"


# -- timeouts and cancellation --------------------------------------------------------------------


async def test_an_async_run_past_its_timeout_is_timed_out_and_retried(
    server: InProcessServer,
) -> None:
    stub = server.stub
    await create(
        stub,
        "slow",
        task="test.block",
        args=struct(seconds=30),
        timeout=seconds(0.5),
        retry=jpb.RetryPolicy(
            max_attempts=2, initial_backoff=seconds(0.1), retry_on=["TimeoutError"]
        ),
    )
    await stub.TriggerJob(pb.TriggerJobRequest(id="slow"))
    runs = await wait_executions(stub, "slow", 2)
    assert {e.state for e in runs} == {epb.EXECUTION_STATE_TIMED_OUT}
    for run in runs:
        assert "timeout of 0.5 s" in run.error_message
        assert (
            timedelta(seconds=0.5)
            <= when(run.end_time) - when(run.start_time)
            < timedelta(seconds=2)
        )


async def test_a_sync_run_past_its_timeout_keeps_its_slot_and_its_late_result_is_a_note(
    server: InProcessServer,
) -> None:
    stub = server.stub
    await create(
        stub, "thread", task="test.sync_sleep", args=struct(seconds=2), timeout=seconds(0.3)
    )
    first = (await stub.TriggerJob(pb.TriggerJobRequest(id="thread"))).execution
    timed_out = await wait_state(stub, first.id, epb.EXECUTION_STATE_TIMED_OUT, within=5)
    assert not timed_out.HasField("result")
    # The thread still runs: it holds the job's one slot.
    blocked = (await stub.TriggerJob(pb.TriggerJobRequest(id="thread"))).execution
    assert blocked.state == epb.EXECUTION_STATE_SKIPPED
    deadline = asyncio.get_running_loop().time() + 10
    while not (await get(stub, first.id)).note:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    noted = await get(stub, first.id)
    assert noted.state == epb.EXECUTION_STATE_TIMED_OUT
    assert 'returned "slept"' in noted.note
    again = (await stub.TriggerJob(pb.TriggerJobRequest(id="thread"))).execution
    assert again.state in (epb.EXECUTION_STATE_PENDING, epb.EXECUTION_STATE_RUNNING)


async def test_cancel_stops_a_running_and_a_waiting_execution(server: InProcessServer) -> None:
    stub = server.stub
    await create(
        stub,
        "long",
        task="test.block",
        args=struct(seconds=30),
        overlap_policy=jpb.OVERLAP_POLICY_BUFFER_ALL,
    )
    running = (await stub.TriggerJob(pb.TriggerJobRequest(id="long"))).execution
    waiting = (await stub.TriggerJob(pb.TriggerJobRequest(id="long"))).execution
    await wait_state(stub, running.id, epb.EXECUTION_STATE_RUNNING)
    assert (await get(stub, waiting.id)).state == epb.EXECUTION_STATE_PENDING

    stopped = (
        await stub.CancelExecution(pb.CancelExecutionRequest(id=waiting.id, reason="not needed"))
    ).execution
    assert stopped.state == epb.EXECUTION_STATE_CANCELLED
    assert stopped.error_message == "cancelled: not needed"
    assert not stopped.HasField("start_time")

    cancelled = (await stub.CancelExecution(pb.CancelExecutionRequest(id=running.id))).execution
    assert cancelled.state == epb.EXECUTION_STATE_CANCELLED
    assert cancelled.HasField("start_time") and cancelled.HasField("end_time")

    error = await fails(
        stub.CancelExecution(pb.CancelExecutionRequest(id=running.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "already cancelled" in (error.details() or "")
    await fails(
        stub.CancelExecution(pb.CancelExecutionRequest(id="0" * 28)), grpc.StatusCode.NOT_FOUND
    )
    await asyncio.sleep(0.3)
    assert (await get(stub, waiting.id)).state == epb.EXECUTION_STATE_CANCELLED
    # The job is free again.
    after = (await stub.TriggerJob(pb.TriggerJobRequest(id="long"))).execution
    await wait_state(stub, after.id, epb.EXECUTION_STATE_RUNNING)


# -- backfill -------------------------------------------------------------------------------------


async def test_backfill_runs_a_past_range_once_one_after_another(server: InProcessServer) -> None:
    stub = server.stub
    await create(
        stub,
        "minutely",
        task="test.sync_sleep",
        args=struct(seconds=0.2),
        trigger=cron("* * * * *"),
        # Paused, so that a minute turning during the test adds no scheduled run.
        paused=True,
    )
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    start = end - timedelta(minutes=5)
    request = pb.BackfillJobRequest(id="minutely", start_time=stamp(start), end_time=stamp(end))
    response = await stub.BackfillJob(request)
    assert [when(e.scheduled_time) for e in response.executions] == [
        start + timedelta(minutes=i) for i in range(5)
    ]
    assert {e.source for e in response.executions} == {epb.EXECUTION_SOURCE_BACKFILL}
    assert response.already_backfilled == 0
    done = await wait_executions(stub, "minutely", 5)
    assert {e.state for e in done} == {epb.EXECUTION_STATE_SUCCEEDED}
    assert most_at_once(done) == 1, "BUFFER_ALL by default: one after another"

    again = await stub.BackfillJob(request)
    assert len(again.executions) == 0 and again.already_backfilled == 5

    parallel = await stub.BackfillJob(
        pb.BackfillJobRequest(
            id="minutely",
            start_time=stamp(start - timedelta(minutes=3)),
            end_time=stamp(start),
            overlap_policy=jpb.OVERLAP_POLICY_SKIP,
        )
    )
    assert [e.state for e in parallel.executions].count(epb.EXECUTION_STATE_SKIPPED) == 2


async def test_backfill_refuses_future_empty_and_oversized_ranges(server: InProcessServer) -> None:
    stub = server.stub
    await create(stub, "minutely", trigger=cron("* * * * *"))
    now = datetime.now(UTC)
    cases = [
        (pb.BackfillJobRequest(id="minutely", end_time=stamp(now)), "start_time"),
        (pb.BackfillJobRequest(id="minutely", start_time=stamp(now)), "end_time"),
        (
            pb.BackfillJobRequest(
                id="minutely",
                start_time=stamp(now - timedelta(minutes=1)),
                end_time=stamp(now + timedelta(hours=1)),
            ),
            "end_time",
        ),
        (
            pb.BackfillJobRequest(
                id="minutely",
                start_time=stamp(now - timedelta(days=2)),
                end_time=stamp(now - timedelta(days=1)),
            ),
            "end_time",
        ),
    ]
    for request, field in cases:
        error = await fails(stub.BackfillJob(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert field in violations(error), violations(error)
    await fails(
        stub.BackfillJob(
            pb.BackfillJobRequest(
                id="nope",
                start_time=stamp(now - timedelta(hours=1)),
                end_time=stamp(now),
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert await executions(stub, "minutely") == []


# -- retention ------------------------------------------------------------------------------------


async def test_history_limit_and_purge_executions_keep_what_they_promise(
    server: InProcessServer,
) -> None:
    stub = server.stub
    await create(stub, "kept", history_limit=3)
    await create(stub, "purged")
    for job_id in ("kept", "purged"):
        for _ in range(6):
            await stub.TriggerJob(pb.TriggerJobRequest(id=job_id))
    await wait_executions(stub, "purged", 6)
    newest = [e.id for e in await executions(stub, "kept")][-3:]
    deadline = asyncio.get_running_loop().time() + 10
    while len(await executions(stub, "kept")) > 3:  # the periodic purge
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    assert [e.id for e in await executions(stub, "kept")] == newest

    await create(stub, "busy", task="test.block", args=struct(seconds=30))
    busy = (await stub.TriggerJob(pb.TriggerJobRequest(id="busy"))).execution
    purged = await stub.PurgeExecutions(pb.PurgeExecutionsRequest(job_id="purged", keep_last=2))
    assert purged.purged_count == 4
    everything = await stub.PurgeExecutions(
        pb.PurgeExecutionsRequest(older_than=stamp(datetime.now(UTC) + timedelta(seconds=1)))
    )
    assert everything.purged_count == 5
    assert (await get(stub, busy.id)).state == epb.EXECUTION_STATE_RUNNING, "never purged"

    error = await fails(
        stub.PurgeExecutions(pb.PurgeExecutionsRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(violations(error)) == {"older_than"}
    await fails(
        stub.PurgeExecutions(pb.PurgeExecutionsRequest(job_id="nope", keep_last=1)),
        grpc.StatusCode.NOT_FOUND,
    )


# -- triggers -------------------------------------------------------------------------------------


async def test_jitter_delays_runs_but_keeps_the_scheduled_time(server: InProcessServer) -> None:
    stub = server.stub
    trigger = interval(1)
    trigger.jitter.CopyFrom(seconds(0.8))
    created = await create(stub, "spread", trigger=trigger)
    assert created.trigger.jitter == seconds(0.8)
    runs = await wait_executions(stub, "spread", 4, within=20)
    await stub.PauseJob(pb.PauseJobRequest(id="spread"))
    delays = [when(e.start_time) - when(e.scheduled_time) for e in runs]
    assert all(timedelta(0) <= d < timedelta(seconds=1.3) for d in delays), delays
    assert max(delays) - min(delays) > timedelta(seconds=0.05), "the delays differ"
    assert all(
        when(e.scheduled_time).microsecond == created.trigger.interval.start_time.nanos // 1000
        for e in runs
    )


async def test_a_job_whose_trigger_has_ended_shows_no_next_run(server: InProcessServer) -> None:
    stub = server.stub
    now = datetime.now(UTC)
    trigger = cron("* * * * * *")
    trigger.cron.end_time.CopyFrom(stamp(now + timedelta(seconds=2)))
    created = await create(stub, "ending", trigger=trigger)
    assert created.HasField("next_run_time")
    await asyncio.sleep(3.5)
    job = (await stub.GetJob(pb.GetJobRequest(id="ending"))).job
    assert not job.HasField("next_run_time")
    runs = await executions(stub, "ending")
    assert 1 <= len(runs) <= 3
    assert all(when(e.scheduled_time) <= now + timedelta(seconds=2) for e in runs)
