"""The SDK's Python values and typed errors, against the real server (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, timedelta

import pytest
import pytest_asyncio
import sdk_example
from conftest import InProcessServer, serving
from harness import free_port
from test_security import Pki, guarded_server, make_token, pki

from chronoplane.client import (
    AsyncClient,
    Client,
    ExecutionState,
    MisfirePolicy,
    NotFound,
    OutOfRange,
    OverlapPolicy,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    WatchEventKind,
    every,
)
from chronoplane.server.config import Settings
from chronoplane.server.models import Role

__all__ = ["pki"]  # test_security's fixture: the certificates, made once a session

ARGS = {"count": 3, "ratio": 0.5, "whole": 2.0, "nested": {"list": [1, 2.5, "x", None, True]}}


@pytest_asyncio.fixture
async def client(server: InProcessServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.app.address or "", timeout=10) as client:
        yield client


async def test_numbers_without_a_fraction_come_back_as_ints(client: AsyncClient) -> None:
    job = await client.create_job("values", task="chronoplane.echo", trigger=every(60), args=ARGS)
    assert job.args == {
        "count": 3,
        "ratio": 0.5,
        "whole": 2,  # a Struct holds doubles: a whole number reads back as an int
        "nested": {"list": [1, 2.5, "x", None, True]},
    }
    assert [type(v) for v in job.args["nested"]["list"]] == [int, float, str, type(None), bool]
    assert type(job.args["count"]) is int and type(job.args["ratio"]) is float
    # A Struct's keys travel in no order: they read back sorted, the same in every process.
    assert list(job.args) == ["count", "nested", "ratio", "whole"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.id = "other"  # type: ignore[misc]


async def test_times_are_aware_utc_and_durations_timedeltas(client: AsyncClient) -> None:
    job = await client.create_job(
        "times", task="test.add", trigger=every(timedelta(minutes=90)), args={"a": 1, "b": 2}
    )
    assert job.create_time is not None and job.create_time.tzinfo is UTC
    assert job.next_run_time is not None and job.next_run_time.tzinfo is UTC
    assert job.next_run_time - job.create_time == pytest.approx(
        timedelta(minutes=90), abs=timedelta(seconds=5)
    )
    assert job.misfire_grace == timedelta(seconds=60)
    started = await client.trigger_job("times")
    while (done := await client.get_execution(started.id)).state is not ExecutionState.SUCCEEDED:
        assert done.state in (ExecutionState.PENDING, ExecutionState.RUNNING), done
        await asyncio.sleep(0.05)
    assert done.result["sum"] == 3 and type(done.result["sum"]) is int
    assert done.start_time is not None and done.end_time is not None
    assert done.start_time.tzinfo is UTC and done.duration == done.end_time - done.start_time
    assert done.scheduled_time is not None and done.scheduled_time <= done.start_time


async def test_enums_are_str_enums_taken_by_any_name(client: AsyncClient) -> None:
    job = await client.create_job(
        "names",
        task="chronoplane.echo",
        trigger=every(3600),
        misfire_policy="RUN_ALL",
        overlap_policy="OVERLAP_POLICY_BUFFER_ALL",
    )
    assert job.misfire_policy is MisfirePolicy.RUN_ALL
    assert (
        job.overlap_policy is OverlapPolicy.BUFFER_ALL and str(job.overlap_policy) == "buffer_all"
    )
    assert ExecutionState("EXECUTION_STATE_TIMED_OUT") is ExecutionState.TIMED_OUT
    run = await client.trigger_job("names")
    for states in (["succeeded", "pending", "running"], ["SUCCEEDED", ExecutionState.RUNNING]):
        listed = await client.list_executions(states=states)
        assert [e.id for e in listed] in ([run.id], []), listed
    with pytest.raises(ValueError, match="one of: pending, running, succeeded"):
        await client.list_executions(states=["done"])
    with pytest.raises(ValueError, match="one of: skip, run_once, run_all"):
        await client.update_job("names", misfire_policy="never")


async def test_watch_events_carry_kinds_and_items(client: AsyncClient) -> None:
    await client.create_job("watched", task="chronoplane.echo", trigger=every(3600))
    stream = client.watch_jobs(snapshot=True)
    first, marker = await anext(stream), await anext(stream)
    await stream.aclose()
    assert first.kind is WatchEventKind.SNAPSHOT and first.item and first.item.id == "watched"
    assert marker.kind is WatchEventKind.SNAPSHOT_END and marker.item is None
    assert isinstance(marker.cursor, int) and marker.cursor >= first.cursor
    states = client.watch_executions(states=["SUCCEEDED", "failed"], snapshot=True)
    assert (await anext(states)).kind is WatchEventKind.SNAPSHOT_END  # no such execution yet
    await states.aclose()


async def test_the_synchronous_client_and_the_typed_example(server: InProcessServer) -> None:
    address = server.app.address or ""
    # The server runs on this loop: the blocking client runs in a thread beside it.
    job, execution = await asyncio.to_thread(sdk_example.nightly_report, address)
    assert job.id == "nightly-report" and job.overlap_policy is OverlapPolicy.BUFFER_ONE
    assert execution.state is ExecutionState.SUCCEEDED and execution.result["sum"] == 42
    until = await asyncio.to_thread(sdk_example.next_run_in, address, "nightly-report")
    assert until is not None and timedelta(0) < until <= timedelta(days=1, hours=1)
    assert await asyncio.to_thread(sdk_example.next_run_in, address, "ghost") is None
    assert await asyncio.to_thread(sdk_example.first_snapshot, address) == ["nightly-report"]
    assert await sdk_example.failed_runs(address, "quiet") == []

    def missing() -> None:
        with Client(address) as client, pytest.raises(NotFound) as caught:
            client.get_execution("no-such-execution")
        assert caught.value.reason == "EXECUTION_NOT_FOUND"

    await asyncio.to_thread(missing)


# -- a typed error for every status --------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_unauthenticated_and_permission_denied(database_url: str) -> None:
    async with guarded_server(database_url) as guarded:
        address = guarded.app.address or ""
        async with AsyncClient(address) as anonymous:
            with pytest.raises(Unauthenticated) as caught:
                await anonymous.list_jobs()
        assert isinstance(caught.value, PermissionError)
        viewer = await make_token(database_url, "dash", Role.VIEWER)
        async with AsyncClient(address, token=viewer) as client:
            assert await client.list_jobs() == []
            with pytest.raises(PermissionDenied) as denied:
                await client.create_job("x", task="chronoplane.echo", trigger=every(60))
        assert denied.value.reason == "PERMISSION_DENIED" and "viewer" in denied.value.message


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_out_of_range_and_resource_exhausted_carry_their_details(
    database_url: str,
) -> None:
    settings = Settings(
        address="127.0.0.1:0", database_url=database_url, shutdown_grace=1.0, max_watchers=1
    )
    async with serving(settings) as server, AsyncClient(server.app.address or "") as client:
        ahead = client.watch_executions(after_cursor=10**9, resume=False)
        with pytest.raises(OutOfRange) as caught:
            await anext(ahead)
        assert isinstance(caught.value, IndexError)
        assert caught.value.reason == "CURSOR_OUT_OF_RANGE"
        assert caught.value.newest_cursor is not None and caught.value.newest_cursor < 10**9
        assert caught.value.oldest_cursor is not None

        holding = client.watch_jobs(snapshot=True)
        await anext(holding)
        second = client.watch_jobs(snapshot=True)
        with pytest.raises(ResourceExhausted) as exhausted:
            await anext(second)
        assert exhausted.value.reason == "TOO_MANY_WATCHERS"
        assert exhausted.value.limit == "max_watchers" and exhausted.value.cursor is None
        await holding.aclose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_tls_plaintext_mismatch_says_which(database_url: str, pki: Pki) -> None:
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        shutdown_grace=1.0,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
    )
    async with serving(settings) as server:
        async with AsyncClient(server.app.address or "", timeout=5) as plain:
            with pytest.raises(Unavailable) as caught:
                await plain.list_jobs()
        assert caught.value.reason == "TLS_MISMATCH", caught.value.message
        assert "connect with TLS" in caught.value.message
    plaintext = Settings(address="127.0.0.1:0", database_url=database_url, shutdown_grace=1.0)
    async with serving(plaintext) as server:
        async with AsyncClient(server.app.address or "", timeout=5, tls_ca=str(pki.ca)) as tls:
            with pytest.raises(Unavailable) as caught:
                await tls.list_jobs()
        assert caught.value.reason == "TLS_MISMATCH", caught.value.message
        assert "connect without TLS" in caught.value.message
    # Nothing listening is not a mismatch.
    async with AsyncClient(f"127.0.0.1:{free_port()}", timeout=5) as nowhere:
        with pytest.raises(Unavailable) as caught:
            await nowhere.list_jobs()
    assert caught.value.reason == ""
