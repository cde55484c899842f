"""Who changed what: created_by, updated_by, triggered_by and cancelled_by in the API, and the
audit log of mutating calls (ListAuditEvents), against the real server on both databases."""

from __future__ import annotations

import asyncio
import base64
import getpass
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from conftest import InProcessServer, serving
from google.protobuf import duration_pb2, json_format, struct_pb2
from harness import BIN, violations
from test_security import bearer, guarded_server, make_token

from chronoplane.server.config import Settings
from chronoplane.server.models import Role
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb


@pytest_asyncio.fixture
async def guarded(database_url: str) -> AsyncIterator[InProcessServer]:
    async with guarded_server(database_url) as server:
        yield server


class People:
    """Tokens of alice (admin), bob (operator) and carol (viewer), as call metadata."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.alice = bearer(tokens["alice"])
        self.bob = bearer(tokens["bob"])
        self.carol = bearer(tokens["carol"])


@pytest_asyncio.fixture
async def people(guarded: InProcessServer) -> People:
    roles = {"alice": Role.ADMIN, "bob": Role.OPERATOR, "carol": Role.VIEWER}
    return People(
        {name: await make_token(guarded.database_url, name, role) for name, role in roles.items()}
    )


def _job(job_id: str, task: str = "test.block", **fields: Any) -> jpb.Job:
    args = struct_pb2.Struct()
    args.update(fields.pop("args", {"seconds": 30}))
    return jpb.Job(
        id=job_id,
        task=task,
        args=args,
        trigger=jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *")),
        **fields,
    )


async def _state(
    server: InProcessServer, execution_id: str, auth: Any, state: int
) -> epb.Execution:
    for _ in range(200):
        response = await server.stub.GetExecution(
            pb.GetExecutionRequest(id=execution_id), metadata=auth
        )
        execution: epb.Execution = response.execution
        if execution.state == state:
            return execution
        await asyncio.sleep(0.05)
    raise AssertionError(f"{execution_id} never reached state {state}: {execution}")


async def test_every_change_names_who_made_it(guarded: InProcessServer, people: People) -> None:
    stub = guarded.stub
    created = (
        await stub.CreateJob(pb.CreateJobRequest(job=_job("nightly")), metadata=people.alice)
    ).job
    assert (created.created_by, created.updated_by) == ("token:alice", "token:alice")

    paused = (await stub.PauseJob(pb.PauseJobRequest(id="nightly"), metadata=people.bob)).job
    assert (paused.created_by, paused.updated_by) == ("token:alice", "token:bob")
    seen = (await stub.GetJob(pb.GetJobRequest(id="nightly"), metadata=people.carol)).job
    assert (seen.created_by, seen.updated_by) == ("token:alice", "token:bob")

    running = (
        await stub.TriggerJob(pb.TriggerJobRequest(id="nightly"), metadata=people.bob)
    ).execution
    assert running.triggered_by == "token:bob"
    await _state(guarded, running.id, people.bob, epb.EXECUTION_STATE_RUNNING)
    # A second run waits for the first (max_concurrent 1, BUFFER_ONE): cancelled while PENDING.
    waiting = (
        await stub.TriggerJob(
            pb.TriggerJobRequest(id="nightly", overlap_policy=jpb.OVERLAP_POLICY_BUFFER_ONE),
            metadata=people.alice,
        )
    ).execution
    assert waiting.state == epb.EXECUTION_STATE_PENDING
    cancelled = (
        await stub.CancelExecution(pb.CancelExecutionRequest(id=waiting.id), metadata=people.bob)
    ).execution
    assert (cancelled.state, cancelled.triggered_by, cancelled.cancelled_by) == (
        epb.EXECUTION_STATE_CANCELLED,
        "token:alice",
        "token:bob",
    )
    stopped = (
        await stub.CancelExecution(pb.CancelExecutionRequest(id=running.id), metadata=people.alice)
    ).execution
    assert (stopped.state, stopped.cancelled_by) == (epb.EXECUTION_STATE_CANCELLED, "token:alice")
    listed = (
        await stub.ListExecutions(pb.ListExecutionsRequest(job_id="nightly"), metadata=people.carol)
    ).executions
    assert {(e.id, e.triggered_by, e.cancelled_by) for e in listed} == {
        (running.id, "token:bob", "token:alice"),
        (waiting.id, "token:alice", "token:bob"),
    }

    # A run that finishes on its own names no canceller; a scheduled one is the schedule's.
    await stub.CreateJob(
        pb.CreateJobRequest(
            job=jpb.Job(
                id="often",
                task="test.add",
                args=json_format.ParseDict({"a": 1, "b": 2}, struct_pb2.Struct()),
                trigger=jpb.Trigger(
                    interval=jpb.IntervalTrigger(every=duration_pb2.Duration(seconds=1))
                ),
            )
        ),
        metadata=people.alice,
    )
    for _ in range(100):
        runs = (
            await stub.ListExecutions(
                pb.ListExecutionsRequest(job_id="often", states=[epb.EXECUTION_STATE_SUCCEEDED]),
                metadata=people.carol,
            )
        ).executions
        if runs:
            break
        await asyncio.sleep(0.1)
    assert runs and (runs[0].triggered_by, runs[0].cancelled_by) == ("system:schedule", "")


async def test_the_audit_log_holds_every_mutating_call_allowed_or_refused(
    guarded: InProcessServer, people: People
) -> None:
    stub = guarded.stub
    await stub.CreateJob(pb.CreateJobRequest(job=_job("report")), metadata=people.alice)
    triggered = (
        await stub.TriggerJob(pb.TriggerJobRequest(id="report"), metadata=people.bob)
    ).execution
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.DeleteJob(pb.DeleteJobRequest(id="report"), metadata=people.carol)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.PauseJob(pb.PauseJobRequest(id="report"))
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ResumeJob(pb.ResumeJobRequest(id="ghost"), metadata=people.bob)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # Reads are not recorded.
    await stub.GetJob(pb.GetJobRequest(id="report"), metadata=people.carol)
    await stub.ListJobs(pb.ListJobsRequest(), metadata=people.bob)

    for who in (people.bob, people.carol):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=who)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    log = (
        await stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=people.alice)
    ).audit_events
    assert [(e.rpc, e.principal, e.role, e.code, e.job_id) for e in log] == [
        ("ResumeJob", "token:bob", "operator", "NOT_FOUND", "ghost"),
        ("PauseJob", "unauthenticated", "", "UNAUTHENTICATED", "report"),
        ("DeleteJob", "token:carol", "viewer", "PERMISSION_DENIED", "report"),
        ("TriggerJob", "token:bob", "operator", "OK", "report"),
        ("CreateJob", "token:alice", "admin", "OK", "report"),
    ]
    assert [e.id for e in log] == sorted((e.id for e in log), reverse=True)
    resumed, paused, deleted, trigger, create = log
    assert trigger.execution_id == triggered.id
    assert "may not call DeleteJob" in deleted.message
    assert "ghost" in resumed.message
    assert json_format.MessageToDict(create.request)["job"]["task"] == "test.block"
    assert create.instance_id == guarded.app.instance_id
    assert create.peer.startswith("ipv4:127.0.0.1:")
    assert all(e.time.seconds > 0 for e in log)

    # Filters, and pages of the filtered list.
    async def listed(**filters: Any) -> list[tuple[str, str]]:
        request = pb.ListAuditEventsRequest(**filters)
        events = (await stub.ListAuditEvents(request, metadata=people.alice)).audit_events
        return [(e.rpc, e.code) for e in events]

    assert await listed(principal="token:bob") == [("ResumeJob", "NOT_FOUND"), ("TriggerJob", "OK")]
    assert await listed(rpc="CreateJob") == [("CreateJob", "OK")]
    assert await listed(execution_id=triggered.id) == [("TriggerJob", "OK")]
    assert len(await listed(job_id="report")) == 4
    assert await listed(start_time=log[0].time) == [("ResumeJob", "NOT_FOUND")]
    assert len(await listed(end_time=log[0].time)) == 4

    pages, token = [], ""
    while True:
        page = await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(job_id="report", page_size=3, page_token=token),
            metadata=people.alice,
        )
        pages.append([e.id for e in page.audit_events])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[paused.id, deleted.id, trigger.id], [create.id]]

    first = await stub.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1), metadata=people.alice
    )
    body, signature = first.next_page_token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["p"] = str(int(payload["p"]) + 1000)
    forged = (
        base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode())
        .rstrip(b"=")
        .decode()
        + "."
        + signature
    )
    for call in [
        stub.ListAuditEvents(pb.ListAuditEventsRequest(page_token=forged), metadata=people.alice),
        stub.ListAuditEvents(  # other filters than the first page's
            pb.ListAuditEventsRequest(principal="token:bob", page_token=first.next_page_token),
            metadata=people.alice,
        ),
        stub.ListJobs(  # another list
            pb.ListJobsRequest(page_token=first.next_page_token), metadata=people.alice
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in violations(error.value)
    # Asking is not a change: the listing calls above left no trace.
    assert len(await listed()) == 5


async def test_a_refused_call_with_no_json_form_is_audited_with_placeholders(
    guarded: InProcessServer, people: People, caplog: pytest.LogCaptureFixture
) -> None:
    """A request proto3 JSON cannot render (a field mask path in camelCase, NaN in args) is
    still recorded when refused, what cannot be JSON replaced by a placeholder; nothing is
    logged as an error."""
    stub = guarded.stub
    await stub.CreateJob(pb.CreateJobRequest(job=_job("report")), metadata=people.alice)
    camel = pb.UpdateJobRequest(job=_job("report", display_name="Report"))
    camel.update_mask.paths.append("displayName")
    not_a_number = _job("nan")
    not_a_number.args["ratio"] = float("nan")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.UpdateJob(camel, metadata=people.alice)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateJob(pb.CreateJobRequest(job=not_a_number), metadata=people.alice)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    log = (
        await stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=people.alice)
    ).audit_events
    created, updated = (json_format.MessageToDict(e.request) for e in log[:2])
    assert [(e.rpc, e.code) for e in log[:2]] == [
        ("CreateJob", "INVALID_ARGUMENT"),
        ("UpdateJob", "INVALID_ARGUMENT"),
    ]
    assert updated["job"]["displayName"] == "Report"
    assert updated["updateMask"].startswith("(not representable as JSON")
    assert created["job"]["task"] == "test.block"
    assert created["job"]["args"].startswith("(not representable as JSON")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_audit_events_are_purged_after_their_max_age(database_url: str) -> None:
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        tasks=["testtasks"],
        shutdown_grace=1.0,
        purge_interval=0.2,
        audit_max_age_days=1.5 / 86_400,  # 1.5 s
    )
    async with serving(settings) as server:
        await server.stub.CreateJob(pb.CreateJobRequest(job=_job("short-lived")))
        events = (await server.stub.ListAuditEvents(pb.ListAuditEventsRequest())).audit_events
        assert [(e.rpc, e.principal) for e in events] == [("CreateJob", "anonymous")]
        for _ in range(100):
            await asyncio.sleep(0.1)
            if not (await server.stub.ListAuditEvents(pb.ListAuditEventsRequest())).audit_events:
                break
        else:
            raise AssertionError("the audit event outlived audit_max_age_days")
        # The job itself is not history: it stays.
        await server.stub.GetJob(pb.GetJobRequest(id="short-lived"))


# -- filter strings are parameters, never SQL text --------------------------------------------

MARK = "zq9'; DROP TABLE jobs; --"


@pytest.fixture
def statements() -> Iterator[list[tuple[str, Any]]]:
    """Every SQL statement any engine of this process sends, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)


async def test_filter_strings_reach_the_database_only_as_parameters(
    server: InProcessServer, statements: list[tuple[str, Any]]
) -> None:
    stub = server.stub
    job = _job("plain", labels={"team": MARK})
    await stub.CreateJob(pb.CreateJobRequest(job=job))
    await stub.TriggerJob(pb.TriggerJobRequest(id="plain", request_id=MARK))
    statements.clear()

    for request in [
        pb.ListAuditEventsRequest(principal=MARK),
        pb.ListAuditEventsRequest(rpc=MARK),
        pb.ListAuditEventsRequest(job_id=MARK),
        pb.ListAuditEventsRequest(execution_id=MARK[:32]),
    ]:
        assert not (await stub.ListAuditEvents(request)).audit_events
    # A request_id is looked up, and found, as a value.
    again = await stub.TriggerJob(pb.TriggerJobRequest(id="plain", request_id=MARK))
    assert again.execution.request_id == MARK
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ListExecutions(pb.ListExecutionsRequest(job_id=MARK))
    assert error.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetJob(pb.GetJobRequest(id=MARK))
    stream = stub.WatchJobs(pb.WatchJobsRequest(labels={"team": MARK}, snapshot=True))
    first = await stream.read()
    assert first.job.id == "plain"  # the label matched, as a value
    stream.cancel()

    texts = [statement for statement, _ in statements]
    assert texts, "no statement was seen: the listener is not attached"
    assert not [t for t in texts if "zq9" in t]
    assert any("zq9" in repr(parameters) for _, parameters in statements)
    # The table is still there.
    assert (await stub.GetJob(pb.GetJobRequest(id="plain"))).job.labels["team"] == MARK


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_chronoctl_audit_lists_calls_and_token_changes(database_url: str) -> None:
    async def run(*command: str, token: str = "") -> str:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CHRONOPLANE_TOKEN": token},
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        return out.decode()

    token = (
        await run(
            str(BIN / "chronoplane"),
            "token",
            "create",
            "--name=root",
            "--role=admin",
            f"--database-url={database_url}",
        )
    ).strip()
    async with guarded_server(database_url) as server:
        await server.stub.CreateJob(pb.CreateJobRequest(job=_job("etl")), metadata=bearer(token))
        address = f"--address={server.app.address}"
        table = await run(str(BIN / "chronoctl"), address, "audit", token=token)
        shown = await run(str(BIN / "chronoctl"), address, "jobs", "get", "etl", token=token)
    header, created, minted = table.splitlines()
    assert header.split() == ["TIME", "PRINCIPAL", "RPC", "JOB", "EXECUTION", "CODE"]
    assert created.split()[1:] == ["token:root", "CreateJob", "etl", "OK"]
    assert minted.split()[1].startswith(f"cli:{getpass.getuser()}@")
    assert minted.split()[2:] == ["token", "create", "OK"]
    assert re.search(r"^created: +\S+ by token:root$", shown, re.MULTILINE), shown
