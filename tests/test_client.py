"""The Python SDK and the chronoctl CLI against the real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import InProcessServer
from harness import free_port

from chronoplane.client import (
    Aborted,
    AlreadyExists,
    AsyncClient,
    ChronoplaneError,
    CronTrigger,
    DateTrigger,
    Execution,
    ExecutionSource,
    ExecutionState,
    FailedPrecondition,
    IntervalTrigger,
    InvalidArgument,
    MisfirePolicy,
    NotFound,
    OverlapPolicy,
    RetryPolicy,
    Trigger,
    Unavailable,
    WatchEvent,
    WatchEventKind,
    at,
    cron,
    every,
    retry_policy,
)
from chronoplane.client._client import ProtoClient
from chronoplane.client._convert import trigger_message
from chronoplane.client.cli.executions import execution_text
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

CHRONOCTL = str(Path(sys.executable).parent / "chronoctl")
FINAL = {state for state in ExecutionState if state.final}


@pytest_asyncio.fixture
async def client(server: InProcessServer) -> AsyncIterator[AsyncClient]:
    assert server.app.address is not None
    async with AsyncClient(server.app.address, timeout=10) as client:
        yield client


async def finished(client: AsyncClient, execution_id: str, within: float = 15) -> Execution:
    deadline = asyncio.get_running_loop().time() + within
    while (execution := await client.get_execution(execution_id)).state not in FINAL:
        assert asyncio.get_running_loop().time() < deadline, f"still {execution.state}"
        await asyncio.sleep(0.05)
    return execution


async def running(client: AsyncClient, execution_id: str, within: float = 15) -> Execution:
    deadline = asyncio.get_running_loop().time() + within
    while (execution := await client.get_execution(execution_id)).state != "running":
        assert asyncio.get_running_loop().time() < deadline, f"still {execution.state}"
        await asyncio.sleep(0.05)
    return execution


def last_whole_minute() -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0)


# -- the SDK --------------------------------------------------------------------------------------


async def test_create_get_list_trigger_pause_resume(client: AsyncClient) -> None:
    created = await client.create_job(
        "adder",
        task="test.add",
        trigger=cron("0 3 * * *", "Europe/Berlin"),
        args={"a": 1, "b": 2},
        labels={"team": "data"},
        misfire_grace=timedelta(minutes=5),
    )
    assert created.etag and created.next_run_time is not None
    assert created.next_run_time.tzinfo is UTC and created.next_run_time.hour in (1, 2)
    assert created.misfire_grace == timedelta(minutes=5)
    assert created.trigger == CronTrigger(expression="0 3 * * *", time_zone="Europe/Berlin")
    assert created.args == {"a": 1, "b": 2} and type(created.args["a"]) is int
    assert await client.get_job("adder") == created
    assert [job.id for job in await client.list_jobs()] == ["adder"]

    started = await client.trigger_job("adder", args={"a": 40, "b": 2}, request_id="r-1")
    assert started.source is ExecutionSource.MANUAL and str(started.source) == "manual"
    done = await finished(client, started.id)
    assert done.state is ExecutionState.SUCCEEDED
    assert done.result["sum"] == 42 and type(done.result["sum"]) is int
    assert done.duration is not None and done.duration > timedelta(0)
    assert done.start_time is not None and done.start_time.utcoffset() == timedelta(0)

    paused = await client.pause_job("adder")
    assert paused.paused and paused.next_run_time is None
    resumed = await client.resume_job("adder", etag=paused.etag)
    assert not resumed.paused and resumed.next_run_time is not None


async def test_update_changes_only_the_fields_given(client: AsyncClient) -> None:
    created = await client.create_job(
        "upd", task="chronoplane.echo", trigger=every(60), description="old", labels={"a": "1"}
    )
    updated = await client.update_job("upd", etag=created.etag, description="new")
    assert updated.description == "new"
    assert updated.labels == {"a": "1"}
    assert updated.etag != created.etag


async def test_lists_page_through_the_server_up_to_a_limit(client: AsyncClient) -> None:
    await client.create_job("many", task="chronoplane.echo", trigger=every(3600))
    started = []
    for _ in range(5):  # one after another: a run still going would make the next SKIPPED
        started.append(await client.trigger_job("many"))
        await finished(client, started[-1].id)
    everything = await client.list_executions(job_id="many")
    assert [e.id for e in everything] == sorted((e.id for e in started), reverse=True)
    assert [e.id for e in await client.list_executions(job_id="many", limit=2)] == [
        e.id for e in everything[:2]
    ]
    for states in (["succeeded"], [ExecutionState.SUCCEEDED], ["EXECUTION_STATE_SUCCEEDED"]):
        assert len(await client.list_executions(states=states)) == 5
    assert await client.list_executions(states=["failed", "RUNNING"]) == []
    with pytest.raises(ValueError, match="succeeded"):
        await client.list_executions(states=["done"])


async def test_batch_create_takes_what_create_job_takes(client: AsyncClient) -> None:
    message = jpb.Job(id="m", task="chronoplane.echo", trigger=trigger_message(every(60)))
    created = await client.batch_create_jobs(
        [
            {"job_id": "a", "task": "test.add", "trigger": cron("0 3 * * *"), "args": {"a": 1}},
            {
                "job_id": "b",
                "task": "chronoplane.echo",
                "trigger": every(60),
                "overlap_policy": "allow",
                "retry": retry_policy(3),
                "request_id": "rb",
            },
            message,
            pb.CreateJobRequest(
                job=jpb.Job(id="r", task="chronoplane.echo", trigger=trigger_message(every(5)))
            ),
        ]
    )
    assert [job.id for job in created] == ["a", "b", "m", "r"]
    assert created[0].args == {"a": 1}
    assert created[1].overlap_policy is OverlapPolicy.ALLOW
    assert created[1].retry is not None and created[1].retry.max_attempts == 3
    again = await client.batch_create_jobs(
        [{"job_id": "b", "task": "chronoplane.echo", "trigger": every(60), "request_id": "rb"}]
    )
    assert again == [created[1]]
    with pytest.raises(InvalidArgument) as invalid:
        await client.batch_create_jobs(
            [{"job_id": "c", "task": "chronoplane.echo", "trigger": cron("0 0 31 2 *")}] * 2
        )
    assert set(invalid.value.field_violations) == {
        "requests[0].job.trigger.cron.expression",
        "requests[1].job.trigger.cron.expression",
        "requests[1].job.id",
    }
    with pytest.raises(AlreadyExists, match=r"requests\[0\]\.job\.id"):
        await client.batch_create_jobs([message])
    assert len(await client.list_jobs()) == 4


async def test_tasks_and_preview(client: AsyncClient) -> None:
    assert "chronoplane.echo" in {task.name for task in await client.list_tasks()}
    start = datetime(2030, 1, 1, tzinfo=UTC)
    times = await client.preview_trigger(every(timedelta(hours=1)), count=3, start_time=start)
    assert len(times) == 3 and all(t.tzinfo is not None for t in times)
    assert times[1] - times[0] == timedelta(hours=1)


async def test_a_cron_that_never_fires_is_invalid_argument_naming_the_field(
    client: AsyncClient,
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.create_job("feb31", task="chronoplane.echo", trigger=cron("0 0 31 2 *"))
    error = caught.value
    assert isinstance(error, ValueError) and isinstance(error, ChronoplaneError)
    assert "job.trigger.cron.expression" in error.field_violations, error.field_violations
    assert error.code.name == "INVALID_ARGUMENT"
    assert error.reason == "INVALID_ARGUMENT"


async def test_unknown_ids_are_not_found(client: AsyncClient) -> None:
    with pytest.raises(NotFound) as caught:
        await client.get_job("ghost")
    assert isinstance(caught.value, LookupError)
    assert caught.value.reason == "JOB_NOT_FOUND" and "ghost" in caught.value.message
    with pytest.raises(NotFound):
        await client.get_execution("no-such-execution")


async def test_a_taken_id_is_already_exists(client: AsyncClient) -> None:
    await client.create_job("taken", task="chronoplane.echo", trigger=every(60))
    with pytest.raises(AlreadyExists) as caught:
        await client.create_job("taken", task="chronoplane.echo", trigger=every(60))
    assert caught.value.reason == "JOB_ALREADY_EXISTS"


async def test_a_stale_etag_is_aborted(client: AsyncClient) -> None:
    created = await client.create_job("etag", task="chronoplane.echo", trigger=every(60))
    await client.update_job("etag", description="changed")
    with pytest.raises(Aborted):
        await client.update_job("etag", etag=created.etag, description="lost update")
    with pytest.raises(Aborted):
        await client.delete_job("etag", etag=created.etag)
    assert (await client.get_job("etag")).description == "changed"


async def test_no_server_is_unavailable() -> None:
    async with AsyncClient(f"127.0.0.1:{free_port()}", timeout=5) as client:
        with pytest.raises(Unavailable) as caught:
            await client.list_tasks()
    assert isinstance(caught.value, ConnectionError)


async def test_a_job_created_with_policies_reads_them_back(client: AsyncClient) -> None:
    start, end = datetime(2030, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC)
    created = await client.create_job(
        "policies",
        task="chronoplane.echo",
        trigger=cron("30 2 * * *", "Europe/Berlin", start=start, end=end, jitter=90),
        misfire_policy="run_all",
        catchup_window=timedelta(hours=6),
        catchup_limit=3,
        overlap_policy=OverlapPolicy.BUFFER_ONE,
        retry=retry_policy(
            4,
            initial_backoff=timedelta(seconds=30),
            backoff_multiplier=3,
            max_backoff=600,
            retry_on=["ConnectionError", "builtins.TimeoutError"],
        ),
        timeout=timedelta(hours=1),
        history_limit=500,
    )
    assert await client.get_job("policies") == created
    assert created.trigger == CronTrigger(
        expression="30 2 * * *",
        time_zone="Europe/Berlin",
        start_time=start,
        end_time=end,
        jitter=timedelta(seconds=90),
    )
    assert created.next_run_time is not None and created.next_run_time >= start
    assert created.misfire_policy is MisfirePolicy.RUN_ALL
    assert created.catchup_window == timedelta(hours=6)
    assert created.catchup_limit == 3
    assert created.overlap_policy is OverlapPolicy.BUFFER_ONE
    assert created.retry == RetryPolicy(
        max_attempts=4,
        initial_backoff=timedelta(seconds=30),
        backoff_multiplier=3,
        max_backoff=timedelta(minutes=10),
        retry_on=("ConnectionError", "builtins.TimeoutError"),
    )
    assert created.timeout == timedelta(hours=1)
    assert created.history_limit == 500

    # Update changes the policies named, and 0 / one attempt remove a setting.
    updated = await client.update_job(
        "policies",
        etag=created.etag,
        misfire_policy="SKIP",
        overlap_policy="buffer_all",
        timeout=0,
        retry=retry_policy(1),
        history_limit=0,
    )
    assert updated.misfire_policy == "skip"
    assert updated.overlap_policy is OverlapPolicy.BUFFER_ALL
    assert updated.timeout is None and updated.retry is None
    assert updated.history_limit == 0
    assert updated.catchup_window == created.catchup_window  # not named: unchanged
    assert updated.trigger == created.trigger


async def test_defaults_and_the_deprecated_coalesce(client: AsyncClient) -> None:
    plain = await client.create_job("plain", task="chronoplane.echo", trigger=every(60))
    assert plain.misfire_policy is MisfirePolicy.RUN_ONCE
    assert plain.overlap_policy is OverlapPolicy.SKIP
    assert plain.catchup_limit == 10
    assert plain.retry is None and plain.timeout is None
    legacy = await client.create_job(
        "legacy", task="chronoplane.echo", trigger=every(60), coalesce=False
    )
    assert legacy.misfire_policy is MisfirePolicy.RUN_ALL
    relaxed = await client.update_job("legacy", coalesce=True)
    assert relaxed.misfire_policy is MisfirePolicy.RUN_ONCE


async def test_a_policy_name_that_does_not_exist_fails_before_calling(
    client: AsyncClient,
) -> None:
    with pytest.raises(ValueError, match="run_once"):
        await client.create_job(
            "x", task="chronoplane.echo", trigger=every(60), misfire_policy="sometimes"
        )
    with pytest.raises(ValueError, match="cancel_running"):
        await client.trigger_job("x", overlap_policy="queue")
    assert await client.list_jobs() == []


async def test_jitter_on_every_trigger_kind(client: AsyncClient) -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    kinds: list[tuple[str, Trigger, timedelta]] = [
        ("c", cron("0 * * * *", "UTC", jitter=timedelta(minutes=5)), timedelta(minutes=5)),
        (
            "e",
            every(3600, start=later, end=later + timedelta(days=1), jitter=30),
            timedelta(seconds=30),
        ),
        ("a", at(later, jitter=10.5), timedelta(seconds=10.5)),
    ]
    for job_id, trigger, jitter in kinds:
        job = await client.create_job(job_id, task="chronoplane.echo", trigger=trigger)
        assert job.trigger == trigger and type(job.trigger) is type(trigger)
        assert trigger.jitter == jitter, job_id
    interval = (await client.get_job("e")).trigger
    assert interval == IntervalTrigger(
        every=timedelta(hours=1),
        start_time=later,
        end_time=later + timedelta(days=1),
        jitter=timedelta(seconds=30),
    )
    assert (await client.get_job("a")).trigger == DateTrigger(
        run_time=later, jitter=timedelta(seconds=10.5)
    )


async def test_cancel_a_running_execution(client: AsyncClient) -> None:
    await client.create_job("blocker", task="test.block", trigger=every(3600))
    started = await client.trigger_job("blocker", args={"seconds": 30})
    await running(client, started.id)
    cancelled = await client.cancel_execution(started.id, reason="deploy in progress")
    assert cancelled.state is ExecutionState.CANCELLED
    assert "deploy in progress" in cancelled.error_message
    assert cancelled.end_time is not None
    assert await client.get_execution(started.id) == cancelled

    with pytest.raises(FailedPrecondition) as caught:
        await client.cancel_execution(started.id)
    assert caught.value.reason == "EXECUTION_FINISHED"
    with pytest.raises(NotFound):
        await client.cancel_execution("no-such-execution")


async def test_trigger_overlap_policy_overrides_the_jobs(client: AsyncClient) -> None:
    await client.create_job("busy", task="test.block", trigger=every(3600), args={"seconds": 30})
    first = await client.trigger_job("busy")
    await running(client, first.id)
    skipped = await client.trigger_job("busy")  # the job's policy: SKIP
    assert skipped.state is ExecutionState.SKIPPED
    waiting = await client.trigger_job("busy", overlap_policy="buffer_one")
    assert waiting.state is ExecutionState.PENDING
    extra = await client.trigger_job("busy", overlap_policy=OverlapPolicy.ALLOW)
    await running(client, extra.id)
    for execution in (waiting, extra, first):
        cancelled = await client.cancel_execution(execution.id)
        assert cancelled.state is ExecutionState.CANCELLED


async def test_backfill_runs_each_past_fire_once(client: AsyncClient) -> None:
    await client.create_job("minutely", task="chronoplane.echo", trigger=cron("* * * * *"))
    minute = last_whole_minute()
    start, end = minute - timedelta(minutes=5), minute - timedelta(minutes=2)
    response = await client.backfill_job("minutely", start=start, end=end)
    assert response.already_backfilled == 0
    created = list(response.executions)
    assert [e.scheduled_time for e in created] == [start + timedelta(minutes=i) for i in range(3)]
    assert {e.source for e in created} == {ExecutionSource.BACKFILL}
    for execution in created:
        assert (await finished(client, execution.id)).state is ExecutionState.SUCCEEDED

    # A wider range runs only the fires not backfilled yet.
    earlier = start - timedelta(minutes=1)
    again = await client.backfill_job("minutely", start=earlier, end=end, overlap_policy="allow")
    assert again.already_backfilled == 3
    assert [e.scheduled_time for e in again.executions] == [earlier]

    with pytest.raises(InvalidArgument) as caught:
        await client.backfill_job(
            "minutely", start=start, end=datetime.now(UTC) + timedelta(hours=1)
        )
    assert "end_time" in caught.value.field_violations
    with pytest.raises(ValueError, match="time zone"):
        await client.backfill_job("minutely", start=datetime(2030, 1, 1), end=end)


async def test_purge_keeps_the_newest_or_the_recent(client: AsyncClient) -> None:
    await client.create_job("noisy", task="chronoplane.echo", trigger=every(3600))
    await client.create_job("quiet", task="chronoplane.echo", trigger=every(3600))
    ids = [(await client.trigger_job("noisy")).id for _ in range(5)]
    other = await client.trigger_job("quiet")
    for execution_id in [*ids, other.id]:
        await finished(client, execution_id)

    assert await client.purge_executions(job_id="noisy", keep_last=2) == 3
    left = await client.list_executions(job_id="noisy")
    assert [e.id for e in left] == sorted(ids, reverse=True)[:2]
    assert await client.purge_executions(job_id="noisy", keep_last=2) == 0

    # Every job's executions that ended before now.
    assert await client.purge_executions(older_than=datetime.now(UTC) + timedelta(seconds=1)) == 3
    assert await client.list_executions() == []

    with pytest.raises(InvalidArgument):
        await client.purge_executions(job_id="noisy")  # say what to purge
    with pytest.raises(NotFound):
        await client.purge_executions(job_id="ghost", keep_last=1)


async def test_purge_never_deletes_a_running_execution(client: AsyncClient) -> None:
    await client.create_job("long", task="test.block", trigger=every(3600))
    started = await client.trigger_job("long", args={"seconds": 30})
    await running(client, started.id)
    assert await client.purge_executions(older_than=datetime.now(UTC) + timedelta(hours=1)) == 0
    assert (await client.cancel_execution(started.id)).state is ExecutionState.CANCELLED


async def test_retries_are_executions_of_their_own(client: AsyncClient) -> None:
    key = uuid.uuid4().hex  # the flaky task counts attempts per key, across tests
    await client.create_job(
        "flaky",
        task="test.flaky",
        trigger=every(3600),
        args={"key": key, "failures": 2},
        retry=retry_policy(3, initial_backoff=0.05, retry_on=["ConnectionError"]),
    )
    first = await client.trigger_job("flaky")
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        attempts = await client.list_executions(job_id="flaky")
        if any(e.state is ExecutionState.SUCCEEDED for e in attempts):
            break
        assert asyncio.get_running_loop().time() < deadline, attempts
        await asyncio.sleep(0.05)
    attempts.sort(key=lambda e: e.attempt)
    assert [(e.attempt, e.state) for e in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert attempts[0].id == first.id and not attempts[0].first_execution_id
    assert [e.first_execution_id for e in attempts[1:]] == [first.id, first.id]
    assert [e.source for e in attempts[1:]] == [ExecutionSource.RETRY] * 2
    assert attempts[0].error_type == "builtins.ConnectionError"


async def test_a_run_past_its_timeout_is_timed_out(client: AsyncClient) -> None:
    await client.create_job(
        "slow", task="test.block", trigger=every(3600), timeout=timedelta(milliseconds=300)
    )
    done = await finished(client, (await client.trigger_job("slow")).id)
    assert done.state is ExecutionState.TIMED_OUT


@pytest.mark.parametrize(
    "module",
    [
        "chronoplane.client",
        "chronoplane.client._client",
        "chronoplane.client._async",
        "chronoplane.client._convert",
        "chronoplane.client._from_proto",
        "chronoplane.client._requests",
        "chronoplane.client._sync",
        "chronoplane.client.errors",
        "chronoplane.client.models",
        "chronoplane.client.cli",
    ],
)
def test_all_lists_exactly_the_public_names(module: str) -> None:
    loaded = importlib.import_module(module)
    defined = {
        name
        for name, value in vars(loaded).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == module
        and (callable(value) or isinstance(value, type))
    }
    assert defined <= set(loaded.__all__), defined - set(loaded.__all__)
    assert all(hasattr(loaded, name) for name in loaded.__all__)


# -- the CLI, as a real process -------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str


async def chronoctl(*args: str, stdin: str | None = None) -> Result:
    # The server runs on this event loop: a blocking subprocess.run would starve it.
    env = {**os.environ, "CHRONOPLANE_ADDRESS": "127.0.0.1:1"}  # --address must win
    process = await asyncio.create_subprocess_exec(
        CHRONOCTL,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    given = stdin.encode() if stdin is not None else None
    out, err = await asyncio.wait_for(process.communicate(given), 60)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def fields(text: str) -> dict[str, str]:
    """The ``key: value`` lines of a job or execution shown as text (not continuations)."""
    pairs = (line.partition(":") for line in text.splitlines() if not line.startswith(" "))
    return {key: value.strip() for key, _, value in pairs}


async def ok(*args: str, stdin: str | None = None) -> str:
    result = await chronoctl(*args, stdin=stdin)
    assert result.code == 0, result
    return result.out


async def test_cli_create_list_trigger_and_see_the_execution(server: InProcessServer) -> None:
    address = f"--address={server.app.address}"
    created = await ok(
        address,
        "jobs",
        "create",
        "beat",
        "--task",
        "chronoplane.echo",
        "--every",
        "5s",
        "--args",
        '{"n": 1}',
        "--label",
        "team=ops",
    )
    assert "every 5s" in created and "team=ops" in created and '{"n": 1}' in created
    [header, row] = (await ok(address, "jobs", "list")).splitlines()
    assert header.split()[:3] == ["ID", "TASK", "TRIGGER"]
    assert row.split()[:4] == ["beat", "chronoplane.echo", "every", "5s"]

    triggered = await ok(address, "jobs", "trigger", "beat")
    execution_id = triggered.splitlines()[0].split()[-1]
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        rows = (await ok(address, "executions", "list", "--job", "beat")).splitlines()[1:]
        mine = [r.split() for r in rows if r.startswith(execution_id)]
        if mine and mine[0][2] == "SUCCEEDED":
            break
        assert asyncio.get_running_loop().time() < deadline, rows
        await asyncio.sleep(0.1)
    assert mine[0][:4] == [execution_id, "beat", "SUCCEEDED", "MANUAL"]


async def test_cli_json_is_proto3_json_with_camel_case_keys(server: InProcessServer) -> None:
    address = f"--address={server.app.address}"
    await ok(
        address,
        "jobs",
        "create",
        "j",
        "--task",
        "chronoplane.echo",
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Berlin",
        "--max-concurrent",
        "2",
    )
    job = json.loads(await ok(address, "--json", "jobs", "get", "j"))["job"]
    assert job["trigger"]["cron"] == {
        "expression": "0 3 * * *",
        "timeZone": "Europe/Berlin",
        "dayMatch": "DAY_MATCH_ANY",
    }
    assert job["maxConcurrent"] == 2 and job["misfireGrace"] == "60s"
    assert "nextRunTime" in job and "next_run_time" not in job
    # --json is accepted after the command too.
    listed = json.loads(await ok("jobs", "list", address, "--json"))
    assert [j["id"] for j in listed["jobs"]] == ["j"]
    # --output json (-o json) is the same; --output text the default.
    assert json.loads(await ok(address, "-o", "json", "jobs", "list")) == listed
    assert json.loads(await ok("jobs", "list", address, "--output", "json")) == listed
    assert (await ok(address, "--output", "text", "jobs", "list")).startswith("ID ")


async def test_cli_reports_field_violations_and_exits_1(server: InProcessServer) -> None:
    result = await chronoctl(
        f"--address={server.app.address}",
        "jobs",
        "create",
        "feb31",
        "--task",
        "chronoplane.echo",
        "--cron",
        "0 0 31 2 *",
    )
    assert result.code == 1 and result.out == ""
    first, *violations = result.err.splitlines()
    assert first == "chronoctl: INVALID_ARGUMENT:"
    assert any(line.startswith("  job.trigger.cron.expression: ") for line in violations)


async def test_cli_not_found_exits_1(server: InProcessServer) -> None:
    result = await chronoctl(f"--address={server.app.address}", "executions", "get", "ghost")
    assert result.code == 1
    assert result.err.startswith("chronoctl: NOT_FOUND: ")


async def test_cli_preview_reads_compound_durations(server: InProcessServer) -> None:
    out = await ok(f"--address={server.app.address}", "preview", "--every", "1h30m", "--count", "2")
    first, second = (datetime.fromisoformat(line) for line in out.splitlines())
    assert second - first == timedelta(minutes=90)


async def test_cli_create_with_policies_shows_them(server: InProcessServer) -> None:
    address = f"--address={server.app.address}"
    created = await ok(
        address,
        "jobs",
        "create",
        "nightly",
        "--task",
        "chronoplane.echo",
        "--cron",
        "30 2 * * *",
        "--tz",
        "Europe/Berlin",
        "--start",
        "2030-01-01T00:00:00Z",
        "--end",
        "2031-01-01T00:00:00+01:00",
        "--jitter",
        "5m",
        "--misfire-policy",
        "run_all",
        "--catchup-window",
        "6h",
        "--catchup-limit",
        "3",
        "--overlap",
        "buffer_one",
        "--max-attempts",
        "4",
        "--initial-backoff",
        "30s",
        "--backoff-multiplier",
        "1.5",
        "--retry-on",
        "ConnectionError",
        "TimeoutError",
        "--timeout",
        "1h",
        "--history-limit",
        "500",
    )
    assert created == await ok(address, "jobs", "get", "nightly")
    shown = fields(created)
    assert shown["trigger"] == (
        "cron 30 2 * * * (Europe/Berlin) from 2030-01-01T00:00:00Z until 2030-12-31T23:00:00Z"
    )
    assert shown["jitter"] == "5m"
    assert shown["misfire policy"] == "run_all"
    assert shown["catch-up window"] == "6h" and shown["catch-up limit"] == "3"
    assert shown["overlap policy"] == "buffer_one" and shown["max concurrent"] == "1"
    assert shown["retry"] == (
        "4 attempts; backoff 30s, x1.5, at most 10m; on ConnectionError, TimeoutError"
    )
    assert shown["timeout"] == "1h" and shown["history limit"] == "500"

    job = json.loads(await ok(address, "--json", "jobs", "get", "nightly"))["job"]
    assert job["misfirePolicy"] == "MISFIRE_POLICY_RUN_ALL"
    assert job["overlapPolicy"] == "OVERLAP_POLICY_BUFFER_ONE"
    assert job["retry"]["retryOn"] == ["ConnectionError", "TimeoutError"]
    assert job["trigger"]["jitter"] == "300s" and job["timeout"] == "3600s"

    # Unset policies are left out of the text, defaults are spelled out.
    plain = await ok(
        address, "jobs", "create", "plain", "--task", "chronoplane.echo", "--every", "1m"
    )
    shown = fields(plain)
    assert shown["misfire policy"] == "run_once" and shown["overlap policy"] == "skip"
    assert not {"retry", "timeout", "catch-up window", "history limit", "jitter"} & set(shown)


async def test_cli_trigger_overlap_and_cancel(server: InProcessServer) -> None:
    address = f"--address={server.app.address}"
    async with AsyncClient(server.app.address or "", timeout=10) as client:
        await client.create_job(
            "blocker", task="test.block", trigger=every(3600), args={"seconds": 30}
        )
        first = await client.trigger_job("blocker")
        await running(client, first.id)
        beside = await ok(address, "jobs", "trigger", "blocker", "--overlap", "allow")
        beside_id = beside.splitlines()[0].split()[-1]
        await running(client, beside_id)

    for execution_id in (beside_id, first.id):
        cancelled = await ok(
            address, "executions", "cancel", execution_id, "--reason", "deploy in progress"
        )
        shown = fields(cancelled)
        assert shown["id"] == execution_id and shown["state"] == "CANCELLED"
        assert shown["error"] == "cancelled: deploy in progress"
        assert shown["attempt"] == "1"

    again = await chronoctl(address, "executions", "cancel", first.id)
    assert again.code == 1 and again.out == ""
    assert again.err.startswith("chronoctl: FAILED_PRECONDITION: ")


async def test_cli_backfill_shows_the_executions_it_created(server: InProcessServer) -> None:
    address = f"--address={server.app.address}"
    await ok(
        address, "jobs", "create", "minutely", "--task", "chronoplane.echo", "--cron", "* * * * *"
    )
    minute = last_whole_minute()
    start, end = (minute - timedelta(minutes=m) for m in (3, 1))
    out = await ok(
        address,
        "jobs",
        "backfill",
        "minutely",
        "--start",
        start.isoformat(),
        "--end",
        end.isoformat(),
        "--overlap",
        "buffer_all",
    )
    header, *rows, summary = out.splitlines()
    assert header.split() == ["ID", "JOB", "STATE", "SOURCE", "SCHEDULED", "DURATION", "ERROR"]
    assert [row.split()[1:4:2] for row in rows] == [["minutely", "BACKFILL"]] * 2
    assert [row.split()[4] for row in rows] == [
        t.isoformat().replace("+00:00", "Z") for t in (start, start + timedelta(minutes=1))
    ]
    assert summary == "2 executions created"

    # Again, from a duration ago: what was backfilled does not run again.
    ago = f"{(datetime.now(UTC) - start).total_seconds() + 2:.0f}s"
    again = await ok(address, "jobs", "backfill", "minutely", "--start", ago, "--end", "now")
    assert again.splitlines()[-1].endswith(
        "; 2 fires of the range had been backfilled before and did not run again"
    )
    as_json = json.loads(
        await ok(address, "--json", "jobs", "backfill", "minutely", "--start", ago, "--end", "now")
    )
    assert as_json["alreadyBackfilled"] >= 2


async def test_cli_purge(server: InProcessServer) -> None:
    address = f"--address={server.app.address}"
    async with AsyncClient(server.app.address or "", timeout=10) as client:
        await client.create_job("noisy", task="chronoplane.echo", trigger=every(3600))
        for _ in range(4):
            await finished(client, (await client.trigger_job("noisy")).id)
    out = await ok(address, "executions", "purge", "--job", "noisy", "--keep-last", "1")
    assert out == "purged 3 executions\n"
    assert await ok(address, "executions", "purge", "--older-than", "0s") == "purged 1 execution\n"
    as_json = json.loads(await ok(address, "--json", "executions", "purge", "--keep-last", "1"))
    assert as_json == {}  # proto3 JSON leaves out a zero purgedCount
    ghost = await chronoctl(address, "executions", "purge", "--job", "ghost", "--keep-last", "1")
    assert ghost.code == 1 and ghost.err.startswith("chronoctl: NOT_FOUND: ")


async def test_cli_shows_retries_and_their_attempts(server: InProcessServer) -> None:
    address = f"--address={server.app.address}"
    key = uuid.uuid4().hex
    await ok(
        address,
        "jobs",
        "create",
        "flaky",
        "--task",
        "test.flaky",
        "--every",
        "1h",
        "--args",
        json.dumps({"key": key, "failures": 1}),
        "--max-attempts",
        "2",
        "--initial-backoff",
        "50ms",
    )
    first_id = (await ok(address, "jobs", "trigger", "flaky")).splitlines()[0].split()[-1]
    deadline = asyncio.get_running_loop().time() + 15
    while "SUCCEEDED" not in (listed := await ok(address, "executions", "list", "--job", "flaky")):
        assert asyncio.get_running_loop().time() < deadline, listed
        await asyncio.sleep(0.1)
    header, *rows = listed.splitlines()
    assert header.split()[:5] == ["ID", "JOB", "STATE", "SOURCE", "ATTEMPT"]
    assert sorted(row.split()[2:5] for row in rows) == [
        ["FAILED", "MANUAL", "1"],
        ["SUCCEEDED", "RETRY", "2"],
    ]
    retry_id = next(row.split()[0] for row in rows if "RETRY" in row)
    shown = fields(await ok(address, "executions", "get", retry_id))
    assert shown["first attempt"] == first_id and shown["attempt"] == "2"
    assert shown["source"] == "RETRY"
    failed = fields(await ok(address, "executions", "get", first_id))
    assert failed["error type"] == "builtins.ConnectionError"
    assert "first attempt" not in failed


def test_execution_text_shows_missed_fires_and_notes() -> None:
    missed = epb.Execution(
        id="e1",
        job_id="j",
        state=epb.EXECUTION_STATE_MISSED,
        source=epb.EXECUTION_SOURCE_SCHEDULE,
        attempt=1,
        missed=epb.MissedFires(count=42, count_is_lower_bound=False),
    )
    missed.missed.first_time.FromDatetime(datetime(2030, 1, 1, 0, 0, tzinfo=UTC))
    missed.missed.last_time.FromDatetime(datetime(2030, 1, 1, 0, 41, tzinfo=UTC))
    shown = fields(execution_text(missed))
    assert shown["missed"] == "42 fires, 2030-01-01T00:00:00Z to 2030-01-01T00:41:00Z"
    missed.missed.count_is_lower_bound = True
    missed.missed.count = 10_000
    assert fields(execution_text(missed))["missed"].startswith("at least 10,000 fires, ")
    cancelled = epb.Execution(
        id="e2", state=epb.EXECUTION_STATE_CANCELLED, attempt=1, note='returned "slept"'
    )
    assert fields(execution_text(cancelled))["note"] == 'returned "slept"'


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "create", "x", "--task", "t", "--every", "5x"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--cron", "* * * * *"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--tz", "UTC"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--args", "[1]"],
        ["executions", "list", "--state", "sleeping"],
        ["jobs"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--misfire-policy", "sometimes"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--overlap", "queue"],
        ["jobs", "create", "x", "--task", "t", "--at", "2030-01-01T00:00Z", "--end", "2031-01-01"],
        ["jobs", "create", "x", "--task", "t", "--at", "2030-01-01T00:00Z", "--tz", "UTC"],
        ["jobs", "create", "x", "--task", "t", "--at", "next tuesday"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--retry-on", "ValueError"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--max-backoff", "1m"],
        ["jobs", "trigger", "x", "--overlap", "sometimes"],
        ["jobs", "backfill", "x", "--start", "yesterday", "--end", "now"],
        ["jobs", "backfill", "x", "--start", "1h"],
        ["executions", "purge"],
        ["executions", "purge", "--job", "x"],
        ["executions", "purge", "--older-than", "last week"],
        ["executions", "cancel"],
    ],
)
async def test_cli_usage_errors_exit_2_without_calling(args: list[str]) -> None:
    result = await chronoctl(*args)
    assert result.code == 2, result
    assert "usage: chronoctl" in result.err


async def test_instances_show_this_server_as_leader(
    client: AsyncClient, server: InProcessServer
) -> None:
    [instance] = await client.list_instances()
    assert instance.id == server.app.instance_id
    assert instance.leader and instance.pid == os.getpid()
    assert instance.address == server.app.address
    [header, row] = (await ok(f"--address={server.app.address}", "instances")).splitlines()
    assert header.split()[:2] == ["ID", "NAME"]
    assert row.split()[0] == instance.id and "leader" in row.split()


# -- watches --------------------------------------------------------------------------------------


async def test_watch_executions_follows_a_run_and_resumes_after_a_cursor(
    client: AsyncClient,
) -> None:
    await client.create_job("echo", task="chronoplane.echo", trigger=cron("0 3 * * *"), paused=True)
    events: list[WatchEvent[Execution]] = []

    async def follow(after: int | None) -> None:
        async for event in client.watch_executions(job_ids=["echo"], after_cursor=after):
            if event.kind is not WatchEventKind.PROGRESS:
                events.append(event)
            if event.item is not None and event.item.state is ExecutionState.SUCCEEDED:
                return

    following = asyncio.create_task(follow(None))
    await asyncio.sleep(0.3)
    first = await client.trigger_job("echo")
    await asyncio.wait_for(following, 15)
    assert [e.item.id for e in events if e.item] == [first.id] * len(events)
    assert events[0].kind is WatchEventKind.ADDED
    seen = events[-1].cursor
    second = await client.trigger_job("echo")
    await finished(client, second.id)
    events.clear()
    await asyncio.wait_for(follow(seen), 15)  # what happened while no one watched
    assert {e.item.id for e in events if e.item} == {second.id}
    assert all(e.cursor > seen for e in events)

    snapshot = client.watch_jobs(snapshot=True)
    current = await anext(snapshot)
    marker = await anext(snapshot)
    await snapshot.aclose()
    assert current.kind is WatchEventKind.SNAPSHOT and current.item is not None
    assert current.item.id == "echo" and current.item.paused
    assert marker.kind is WatchEventKind.SNAPSHOT_END and marker.item is None


async def test_chronoctl_watch_prints_events_as_json_lines(server: InProcessServer) -> None:
    address = f"--address={server.app.address}"
    await ok(address, "jobs", "create", "nightly", "--task=chronoplane.echo", "--cron=0 3 * * *")
    process = await asyncio.create_subprocess_exec(
        CHRONOCTL,
        address,
        "executions",
        "watch",
        "--job=nightly",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(1.0)  # the stream is open
        await ok(address, "jobs", "trigger", "nightly")
        lines: list[dict[str, Any]] = []
        assert process.stdout is not None
        while not lines or lines[-1]["execution"]["state"] != "EXECUTION_STATE_SUCCEEDED":
            line = await asyncio.wait_for(process.stdout.readline(), 15)
            assert line, (await process.stderr.read()).decode() if process.stderr else ""
            lines.append(json.loads(line))
    finally:
        process.terminate()
        await process.wait()
    assert lines[0]["kind"] == "WATCH_EVENT_KIND_ADDED"
    assert lines[0]["execution"]["jobId"] == "nightly"
    cursors = [int(line["cursor"]) for line in lines]
    assert cursors == sorted(set(cursors))


# -- chronoctl jobs apply -------------------------------------------------------------------------

APPLIED = """
- id: nightly
  task: chronoplane.echo
  trigger: {cron: {expression: "0 3 * * *", timeZone: Europe/Berlin}}
  args: {region: eu}
  labels: {team: data}
- id: hourly
  task: chronoplane.echo
  trigger: {interval: {every: 3600s, startTime: 2030-01-01T00:00:00Z}}
  misfire_grace: 30s
"""


async def test_apply_creates_from_yaml_then_changes_only_what_changed(
    server: InProcessServer, tmp_path: Path
) -> None:
    address = f"--address={server.app.address}"
    path = tmp_path / "jobs.yaml"
    path.write_text(APPLIED)
    out = await ok(address, "jobs", "apply", "-f", str(path))
    assert out.splitlines() == [
        "create  nightly",
        "create  hourly",
        "2 created, 0 updated, 0 deleted, 0 unchanged",
    ]
    async with AsyncClient(str(server.app.address)) as client:
        hourly = await client.get_job("hourly")
        nightly = await client.get_job("nightly")
    assert hourly.misfire_grace == timedelta(seconds=30)
    assert isinstance(hourly.trigger, IntervalTrigger) and hourly.trigger.start_time
    assert (await ok(address, "jobs", "apply", "-f", str(path))).splitlines() == [
        "0 created, 0 updated, 0 deleted, 2 unchanged"
    ]
    # A changed trigger and args, and a job paused: one UpdateJob (etag-checked), one pause.
    path.write_text(
        APPLIED.replace('"0 3 * * *"', '"0 4 * * *"').replace("region: eu", "region: us")
        + "  paused: true\n"
    )
    out = await ok(address, "jobs", "apply", "-f", str(path))
    assert out.splitlines() == [
        "update  nightly  (args, trigger)",
        "update  hourly  (paused)",
        "0 created, 2 updated, 0 deleted, 0 unchanged",
    ]
    async with AsyncClient(str(server.app.address)) as client:
        changed = await client.get_job("nightly")
        paused = await client.get_job("hourly")
    assert isinstance(changed.trigger, CronTrigger) and changed.trigger.expression == "0 4 * * *"
    assert changed.args == {"region": "us"}
    assert changed.labels == {"team": "data"} and changed.etag != nightly.etag
    assert paused.paused and paused.misfire_grace == timedelta(seconds=30)
    assert paused.etag != hourly.etag


async def test_apply_updates_with_the_etag_it_read(server: InProcessServer) -> None:
    """A job changed between apply's read and its write is not overwritten: ABORTED."""
    from chronoplane.client.cli import apply

    async with ProtoClient(str(server.app.address)) as client:  # apply works on messages
        await client.create_job("raced", task="chronoplane.echo", trigger=every(60))
        wanted = apply.wanted([{"id": "raced", "description": "from the file"}])
        todo = apply.plan(wanted, await client.list_jobs(), prune=False)
        assert [(job.id, fields) for job, fields in todo.update] == [("raced", ["description"])]
        await client.update_job("raced", description="meanwhile")
        with pytest.raises(Aborted):
            await apply.carry_out(client, todo)
        assert (await client.get_job("raced")).description == "meanwhile"


async def test_apply_dry_run_shows_the_diff_and_writes_nothing_then_prunes(
    server: InProcessServer,
) -> None:
    address = f"--address={server.app.address}"
    async with AsyncClient(str(server.app.address)) as client:
        await client.create_job("kept", task="chronoplane.echo", trigger=every(60))
        await client.create_job("changed", task="chronoplane.echo", trigger=every(60))
        await client.create_job("stale", task="chronoplane.echo", trigger=every(60))
        before = await client.list_jobs()
    document = {
        "jobs": [
            {"id": "kept", "task": "chronoplane.echo", "trigger": {"interval": {"every": "60s"}}},
            {"id": "changed", "description": "new", "maxConcurrent": 3},
            {"id": "new", "task": "chronoplane.echo", "trigger": {"interval": {"every": "5s"}}},
        ]
    }
    text = json.dumps(document)
    out = await ok(address, "jobs", "apply", "-f", "-", "--prune", "--dry-run", stdin=text)
    assert out.splitlines() == [
        "create  new",
        "update  changed  (description, max_concurrent)",
        "delete  stale",
        "dry run: 1 to create, 1 to update, 1 to delete, 1 unchanged; nothing was written",
    ]
    async with AsyncClient(str(server.app.address)) as client:
        assert await client.list_jobs() == before

    result = json.loads(
        await ok(address, "--json", "jobs", "apply", "-f", "-", "--prune", stdin=text)
    )
    assert result == {
        "dryRun": False,
        "created": ["new"],
        "updated": [{"id": "changed", "fields": ["description", "max_concurrent"]}],
        "deleted": ["stale"],
        "unchanged": 1.0,
    }
    async with AsyncClient(str(server.app.address)) as client:
        jobs = {job.id: job for job in await client.list_jobs()}
    assert sorted(jobs) == ["changed", "kept", "new"]
    assert (jobs["changed"].description, jobs["changed"].max_concurrent) == ("new", 3)


async def test_apply_creates_in_batches_of_a_thousand(
    server: InProcessServer, tmp_path: Path
) -> None:
    path = tmp_path / "many.json"
    trigger = {"cron": {"expression": "0 3 * * *"}}
    many = [
        {"id": f"j{n:04d}", "task": "chronoplane.echo", "trigger": trigger} for n in range(1500)
    ]
    path.write_text(json.dumps(many))
    out = await ok(f"--address={server.app.address}", "jobs", "apply", "-f", str(path))
    assert out.splitlines()[-1] == "1,500 created, 0 updated, 0 deleted, 0 unchanged"
    async with AsyncClient(str(server.app.address)) as client:
        assert len(await client.list_jobs()) == 1500
    records = await server.stub.ListAuditEvents(pb.ListAuditEventsRequest(rpc="BatchCreateJobs"))
    assert records.next_page_token  # one record per job: more than a page of 100


async def test_apply_refuses_a_bad_file_naming_the_entry(
    server: InProcessServer, tmp_path: Path
) -> None:
    address = f"--address={server.app.address}"
    path = tmp_path / "bad.yaml"
    for text, named in [
        ("- id: a\n  task: chronoplane.echo\n  triger: {}\n", "  jobs[0]: "),
        ("- task: chronoplane.echo\n", "  jobs[0].id: is required"),
        ("- {id: a}\n- {id: a}\n", "  jobs[1].id: repeats that of jobs[0]"),
        ("id: [unclosed\n", f"  {path}: is neither JSON nor YAML"),
    ]:
        path.write_text(text)
        result = await chronoctl(address, "jobs", "apply", "-f", str(path))
        assert result.code == 1 and result.out == ""
        assert result.err.splitlines()[1].startswith(named), result.err
    # A job the server refuses: nothing is created, the violation names the entry.
    path.write_text(
        "- {id: a, task: chronoplane.echo, trigger: {cron: {expression: '0 0 31 2 *'}}}"
    )
    result = await chronoctl(address, "jobs", "apply", "-f", str(path))
    assert result.code == 1
    assert "  requests[0].job.trigger.cron.expression: " in result.err
    assert await ok(address, "jobs", "list") == "ID  TASK  TRIGGER  NEXT RUN  LAST\n"
