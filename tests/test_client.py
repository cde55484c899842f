"""The Python SDK and the chronoctl CLI against the real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import InProcessServer
from harness import free_port

from chronoplane.client import (
    Aborted,
    AlreadyExists,
    AsyncClient,
    ChronoplaneError,
    InvalidArgument,
    NotFound,
    Unavailable,
    cron,
    every,
)
from chronoplane.v1 import execution_pb2 as epb

CHRONOCTL = str(Path(sys.executable).parent / "chronoctl")
FINAL = {
    epb.EXECUTION_STATE_SUCCEEDED,
    epb.EXECUTION_STATE_FAILED,
    epb.EXECUTION_STATE_MISSED,
    epb.EXECUTION_STATE_SKIPPED,
    epb.EXECUTION_STATE_INTERRUPTED,
}


@pytest_asyncio.fixture
async def client(server: InProcessServer) -> AsyncIterator[AsyncClient]:
    assert server.app.address is not None
    async with AsyncClient(server.app.address, timeout=10) as client:
        yield client


async def finished(client: AsyncClient, execution_id: str, within: float = 15) -> epb.Execution:
    deadline = asyncio.get_running_loop().time() + within
    while (execution := await client.get_execution(execution_id)).state not in FINAL:
        assert asyncio.get_running_loop().time() < deadline, f"still {execution.state}"
        await asyncio.sleep(0.05)
    return execution


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
    assert created.etag and created.HasField("next_run_time")
    assert created.misfire_grace.ToTimedelta() == timedelta(minutes=5)
    assert await client.get_job("adder") == created
    assert [job.id for job in await client.list_jobs()] == ["adder"]

    started = await client.trigger_job("adder", args={"a": 40, "b": 2}, request_id="r-1")
    assert started.source == epb.EXECUTION_SOURCE_MANUAL
    done = await finished(client, started.id)
    assert done.state == epb.EXECUTION_STATE_SUCCEEDED
    assert done.result.struct_value.fields["sum"].number_value == 42

    paused = await client.pause_job("adder")
    assert paused.paused and not paused.HasField("next_run_time")
    resumed = await client.resume_job("adder", etag=paused.etag)
    assert not resumed.paused and resumed.HasField("next_run_time")


async def test_update_changes_only_the_fields_given(client: AsyncClient) -> None:
    created = await client.create_job(
        "upd", task="chronoplane.echo", trigger=every(60), description="old", labels={"a": "1"}
    )
    updated = await client.update_job("upd", etag=created.etag, description="new")
    assert updated.description == "new"
    assert dict(updated.labels) == {"a": "1"}
    assert updated.etag != created.etag


async def test_lists_page_through_the_server_up_to_a_limit(client: AsyncClient) -> None:
    await client.create_job("many", task="chronoplane.echo", trigger=every(3600))
    started = [await client.trigger_job("many") for _ in range(5)]
    for execution in started:
        await finished(client, execution.id)
    everything = await client.list_executions(job_id="many")
    assert [e.id for e in everything] == sorted((e.id for e in started), reverse=True)
    assert [e.id for e in await client.list_executions(job_id="many", limit=2)] == [
        e.id for e in everything[:2]
    ]
    succeeded = await client.list_executions(states=[epb.EXECUTION_STATE_SUCCEEDED])
    assert len(succeeded) == 5


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


@pytest.mark.parametrize(
    "module",
    [
        "chronoplane.client",
        "chronoplane.client._client",
        "chronoplane.client._convert",
        "chronoplane.client.errors",
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


async def chronoctl(*args: str) -> Result:
    # The server runs on this event loop: a blocking subprocess.run would starve it.
    env = {**os.environ, "CHRONOPLANE_ADDRESS": "127.0.0.1:1"}  # --address must win
    process = await asyncio.create_subprocess_exec(
        CHRONOCTL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def ok(*args: str) -> str:
    result = await chronoctl(*args)
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
    job = json.loads(await ok(address, "--json", "jobs", "get", "j"))
    assert job["trigger"]["cron"] == {"expression": "0 3 * * *", "timeZone": "Europe/Berlin"}
    assert job["maxConcurrent"] == 2 and job["misfireGrace"] == "60s"
    assert "nextRunTime" in job and "next_run_time" not in job
    # --json is accepted after the command too.
    listed = json.loads(await ok("jobs", "list", address, "--json"))
    assert [j["id"] for j in listed["jobs"]] == ["j"]


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


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "create", "x", "--task", "t", "--every", "5x"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--cron", "* * * * *"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--tz", "UTC"],
        ["jobs", "create", "x", "--task", "t", "--every", "5s", "--args", "[1]"],
        ["executions", "list", "--state", "sleeping"],
        ["jobs"],
    ],
)
async def test_cli_usage_errors_exit_2_without_calling(args: list[str]) -> None:
    result = await chronoctl(*args)
    assert result.code == 2, result
    assert "usage: chronoctl" in result.err
