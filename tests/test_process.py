"""Real `chronoplane serve` processes: grpcurl through reflection, restarts, signals, crashes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from harness import BIN, ServerProcess, running_server, start_server

from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

SERVICE = "chronoplane.v1.SchedulerService"


def grpcurl(address: str, *args: str, data: dict[str, Any] | None = None) -> Any:
    command = [str(BIN / "grpcurl"), "-plaintext"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run(
        [*command, address, *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for(stub: Any, job_id: str, predicate: Any, within: float = 20) -> list[epb.Execution]:
    deadline = time.monotonic() + within
    while True:
        executions = list(
            stub.ListExecutions(pb.ListExecutionsRequest(job_id=job_id), timeout=5).executions
        )
        if predicate(executions):
            return executions
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met; executions: {executions}")
        time.sleep(0.1)


def final(executions: list[epb.Execution]) -> list[epb.Execution]:
    return [
        e
        for e in executions
        if e.state not in (epb.EXECUTION_STATE_PENDING, epb.EXECUTION_STATE_RUNNING)
    ]


def ran_fire_after(execution: epb.Execution, when: datetime) -> bool:
    return (
        execution.HasField("start_time") and execution.scheduled_time.ToDatetime(tzinfo=UTC) > when
    )


def stamp(when: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(when)
    return message


def create_idle_job(stub: Any, job_id: str, task: str, **args: Any) -> None:
    """A job that only runs when triggered (its cron fires on 1 January)."""
    values = struct_pb2.Struct()
    values.update(args)
    never = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))
    stub.CreateJob(
        pb.CreateJobRequest(job=jpb.Job(id=job_id, task=task, args=values, trigger=never))
    )


def start_long_run(stub: Any) -> epb.Execution:
    """Triggers a job that blocks for 30 s and waits until it is RUNNING."""
    create_idle_job(stub, "long", "test.block")
    execution: epb.Execution = stub.TriggerJob(pb.TriggerJobRequest(id="long")).execution
    wait_for(stub, "long", lambda ex: ex and ex[0].state == epb.EXECUTION_STATE_RUNNING)
    return execution


def test_grpcurl_lists_services_creates_from_json_and_reads_camel_case(
    sqlite_url: str, tmp_path: Path
) -> None:
    with running_server(sqlite_url, tmp_path) as server:
        services = grpcurl(server.address, "list").split()
        assert SERVICE in services and "grpc.health.v1.Health" in services
        health = json.loads(grpcurl(server.address, "grpc.health.v1.Health/Check"))
        assert health == {"status": "SERVING"}

        created = json.loads(
            grpcurl(
                server.address,
                f"{SERVICE}/CreateJob",
                data={
                    "job": {
                        "id": "hello",
                        "displayName": "Hello",
                        "task": "chronoplane.echo",
                        "args": {"greeting": "hi"},
                        "trigger": {"interval": {"every": "3600s"}},
                        "maxConcurrent": 2,
                    }
                },
            )
        )["job"]
        got = json.loads(grpcurl(server.address, f"{SERVICE}/GetJob", data={"id": "hello"}))
        assert got["job"] == created
        for camel in ("displayName", "maxConcurrent", "misfireGrace", "createTime", "nextRunTime"):
            assert camel in got["job"], got
        assert "display_name" not in json.dumps(got)
        assert got["job"]["trigger"]["interval"]["every"] == "3600s"

        triggered = json.loads(
            grpcurl(server.address, f"{SERVICE}/TriggerJob", data={"id": "hello"})
        )["execution"]
        assert triggered["jobId"] == "hello" and triggered["source"] == "EXECUTION_SOURCE_MANUAL"

        described = grpcurl(server.address, "describe", SERVICE)
        assert "rpc CreateJob" in described and "rpc BatchCreateJobs" in described

        hourly = {"task": "chronoplane.echo", "trigger": {"interval": {"every": "3600s"}}}
        batch = json.loads(
            grpcurl(
                server.address,
                f"{SERVICE}/BatchCreateJobs",
                data={"requests": [{"job": {"id": name, **hourly}} for name in ("b2", "b1")]},
            )
        )
        assert [job["id"] for job in batch["jobs"]] == ["b2", "b1"]

        bad = subprocess.run(
            [
                str(BIN / "grpcurl"),
                "-plaintext",
                "-d",
                json.dumps({"job": {"task": "nope"}}),
                server.address,
                f"{SERVICE}/CreateJob",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert "Code: InvalidArgument" in bad.stderr
        # The google.rpc details decode through reflection: fields are named.
        assert '"fieldViolations":[{"field":"job.task"' in bad.stderr.replace(" ", "")


def test_jobs_keep_firing_across_a_restart(database_url: str, tmp_path: Path) -> None:
    server = start_server(database_url, tmp_path)
    try:
        stub = server.stub()
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        trigger = jpb.Trigger(
            interval=jpb.IntervalTrigger(
                every=duration_pb2.Duration(seconds=1), start_time=stamp(start)
            )
        )
        stub.CreateJob(
            pb.CreateJobRequest(job=jpb.Job(id="tick", task="chronoplane.echo", trigger=trigger))
        )
        wait_for(stub, "tick", lambda ex: len(final(ex)) >= 2)
        assert server.stop() == 0
        stopped_at = datetime.now(UTC)

        server = start_server(database_url, tmp_path)
        stub = server.stub()
        job = stub.GetJob(pb.GetJobRequest(id="tick")).job
        assert job.trigger.interval.start_time == stamp(start)
        executions = wait_for(
            stub,
            "tick",
            lambda ex: any(
                e.scheduled_time.ToDatetime(tzinfo=UTC) > stopped_at + timedelta(seconds=1)
                and e.state == epb.EXECUTION_STATE_SUCCEEDED
                for e in ex
            ),
        )
        # Every fire stays on the phase of the first one, and none is recorded twice.
        scheduled = [e.scheduled_time.ToDatetime(tzinfo=UTC) for e in executions]
        assert len(scheduled) == len(set(scheduled))
        assert all((t - start).total_seconds() % 1 == 0 for t in scheduled)
    finally:
        server.stop()


def test_a_fire_missed_while_down_is_recorded_and_one_within_grace_runs(
    database_url: str, tmp_path: Path
) -> None:
    server = start_server(database_url, tmp_path)
    try:
        stub = server.stub()
        due = datetime.now(UTC) + timedelta(seconds=3)
        for job_id, grace in (("strict", 1), ("lenient", 600)):
            stub.CreateJob(
                pb.CreateJobRequest(
                    job=jpb.Job(
                        id=job_id,
                        task="chronoplane.echo",
                        trigger=jpb.Trigger(date=jpb.DateTrigger(run_time=stamp(due))),
                        misfire_grace=duration_pb2.Duration(seconds=grace),
                        misfire_policy=jpb.MISFIRE_POLICY_SKIP,
                    )
                )
            )
        assert server.stop() == 0
        time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()) + 2)

        server = start_server(database_url, tmp_path)
        stub = server.stub()
        [missed] = wait_for(stub, "strict", lambda ex: len(final(ex)) == 1)
        assert missed.state == epb.EXECUTION_STATE_MISSED
        assert missed.scheduled_time == stamp(due)
        assert missed.missed.count == 1
        [ran] = wait_for(stub, "lenient", lambda ex: len(final(ex)) == 1)
        assert ran.state == epb.EXECUTION_STATE_SUCCEEDED
        assert ran.start_time.ToDatetime(tzinfo=UTC) - due > timedelta(seconds=1)
    finally:
        server.stop()


def test_after_downtime_each_misfire_policy_runs_what_it_promises(
    database_url: str, tmp_path: Path
) -> None:
    """Jobs firing every second; the server is down for about 8 fires, then starts again."""
    server = start_server(database_url, tmp_path)
    try:
        stub = server.stub()
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        every_second = jpb.Trigger(
            interval=jpb.IntervalTrigger(
                every=duration_pb2.Duration(seconds=1), start_time=stamp(start)
            )
        )
        policies: dict[str, dict[str, Any]] = {
            "skip": {"misfire_policy": jpb.MISFIRE_POLICY_SKIP},
            "once": {"misfire_policy": jpb.MISFIRE_POLICY_RUN_ONCE},
            "all3": {"misfire_policy": jpb.MISFIRE_POLICY_RUN_ALL, "catchup_limit": 3},
            "window": {
                "misfire_policy": jpb.MISFIRE_POLICY_RUN_ALL,
                "catchup_limit": 100,
                "catchup_window": duration_pb2.Duration(seconds=4),
            },
        }
        for job_id, fields in policies.items():
            stub.CreateJob(
                pb.CreateJobRequest(
                    job=jpb.Job(
                        id=job_id,
                        task="chronoplane.echo",
                        trigger=every_second,
                        misfire_grace=duration_pb2.Duration(seconds=1),
                        **fields,
                    )
                )
            )
        wait_for(stub, "skip", lambda ex: len(final(ex)) >= 1)
        assert server.stop() == 0
        stopped_at = datetime.now(UTC)
        time.sleep(8)

        server = start_server(database_url, tmp_path)
        stub = server.stub()
        # The new leader schedules before it logs that it serves, so a slow start-up can run
        # on-time fires before start_server returns: the restart is when its first run began
        # (RUN_ONCE's catch-up starts as soon as it leads).
        once = wait_for(stub, "once", lambda ex: any(ran_fire_after(e, stopped_at) for e in ex))
        restarted_at = min(
            e.start_time.ToDatetime(tzinfo=UTC) for e in once if ran_fire_after(e, stopped_at)
        )

        def outage(job_id: str) -> tuple[list[datetime], epb.Execution]:
            """The runs of fires scheduled while the server was down (or at its start, on
            time), and the one MISSED record."""
            wait_for(
                stub, job_id, lambda ex: any(e.state == epb.EXECUTION_STATE_MISSED for e in ex)
            )
            executions = wait_for(stub, job_id, lambda ex: len(final(ex)) == len(ex))
            during = [
                e
                for e in executions
                if stopped_at < e.scheduled_time.ToDatetime(tzinfo=UTC) <= restarted_at
            ]
            records = [e for e in during if e.state == epb.EXECUTION_STATE_MISSED]
            assert len(records) == 1, "one bounded record per outage, not a row per fire"
            runs = [
                e.scheduled_time.ToDatetime(tzinfo=UTC)
                for e in during
                if e.state == epb.EXECUTION_STATE_SUCCEEDED
            ]
            assert len(runs) + records[0].missed.count >= 6, "every fire is run or counted"
            return runs, records[0]

        runs, record = outage("skip")
        # Nothing missed runs; only a fire that was on time at the start may have.
        assert len(runs) <= 1
        assert all(restarted_at - t < timedelta(seconds=1.5) for t in runs)
        assert record.missed.first_time.ToDatetime(tzinfo=UTC) - stopped_at < timedelta(seconds=1.5)
        runs, record = outage("once")
        assert len(runs) == 1, "the latest missed fire, or the one on time at the start"
        runs, record = outage("all3")
        # The latest three missed fires ran (plus, perhaps, one on time at the start), one
        # after another; the earlier ones were counted.
        assert 3 <= len(runs) <= 4, runs
        assert sorted(runs) == [min(runs) + timedelta(seconds=i) for i in range(len(runs))]
        assert record.missed.last_time.ToDatetime(tzinfo=UTC) == min(runs) - timedelta(seconds=1)
        runs, record = outage("window")
        assert 3 <= len(runs) <= 6
        assert all(restarted_at - t <= timedelta(seconds=5) for t in runs)
        assert record.missed.last_time.ToDatetime(tzinfo=UTC) == min(runs) - timedelta(seconds=1)
    finally:
        server.stop()


def test_a_retry_waiting_out_its_backoff_runs_after_a_restart(
    database_url: str, tmp_path: Path
) -> None:
    server = start_server(database_url, tmp_path)
    try:
        stub = server.stub()
        args = struct_pb2.Struct()
        args.update({"key": "restart", "failures": 1})
        never = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))
        retry = jpb.RetryPolicy(
            max_attempts=3,
            initial_backoff=duration_pb2.Duration(seconds=3),
            backoff_multiplier=1.0,
        )
        stub.CreateJob(
            pb.CreateJobRequest(
                job=jpb.Job(id="flaky", task="test.flaky", args=args, trigger=never, retry=retry)
            )
        )
        first = stub.TriggerJob(pb.TriggerJobRequest(id="flaky")).execution
        wait_for(stub, "flaky", lambda ex: len(ex) == 2)  # the failure and its waiting retry
        assert server.stop() == 0
        stopped_at = datetime.now(UTC)

        server = start_server(database_url, tmp_path)
        stub = server.stub()
        # The new process's counter starts again: attempt 2 fails once more, attempt 3 succeeds.
        runs = wait_for(stub, "flaky", lambda ex: len(final(ex)) == 3)
        runs.sort(key=lambda e: e.attempt)
        assert [e.state for e in runs] == [
            epb.EXECUTION_STATE_FAILED,
            epb.EXECUTION_STATE_FAILED,
            epb.EXECUTION_STATE_SUCCEEDED,
        ]
        assert all(e.first_execution_id == first.id for e in runs[1:])
        assert runs[1].start_time.ToDatetime(tzinfo=UTC) > stopped_at
    finally:
        server.stop()


def test_sigterm_lets_short_runs_finish_and_interrupts_long_ones(
    database_url: str, tmp_path: Path
) -> None:
    server = start_server(database_url, tmp_path, "--shutdown-grace", "1.5")
    stub = server.stub()
    create_idle_job(stub, "short", "chronoplane.sleep", seconds=0.5)
    short = stub.TriggerJob(pb.TriggerJobRequest(id="short")).execution
    long = start_long_run(stub)
    # A synchronous task cannot be interrupted: the server exits without its thread.
    create_idle_job(stub, "stuck", "test.sync_sleep", seconds=3600)
    stuck = stub.TriggerJob(pb.TriggerJobRequest(id="stuck")).execution
    wait_for(stub, "stuck", lambda ex: ex and ex[0].state == epb.EXECUTION_STATE_RUNNING)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert "shutting down" in server.log
    assert "1 synchronous tasks still running; exiting without them" in server.log

    server = start_server(database_url, tmp_path)
    try:
        stub = server.stub()
        got_short = stub.GetExecution(pb.GetExecutionRequest(id=short.id)).execution
        got_long = stub.GetExecution(pb.GetExecutionRequest(id=long.id)).execution
        assert got_short.state == epb.EXECUTION_STATE_SUCCEEDED
        assert got_long.state == epb.EXECUTION_STATE_INTERRUPTED
        assert "shut down" in got_long.error_message
        got_stuck = stub.GetExecution(pb.GetExecutionRequest(id=stuck.id)).execution
        assert got_stuck.state == epb.EXECUTION_STATE_INTERRUPTED
    finally:
        server.stop()


def test_a_crash_leaves_running_executions_interrupted_or_abandoned_after_restart(
    database_url: str, tmp_path: Path
) -> None:
    """SQLite serves one process: the next start marks what the crashed one ran INTERRUPTED.
    PostgreSQL may have other instances running: once the crashed instance has been silent
    for the instance timeout, the leader marks its executions ABANDONED."""
    fast = ("--heartbeat-interval=0.5", "--leader-timeout=2.5", "--instance-timeout=2")
    server = start_server(database_url, tmp_path, *fast)
    stub = server.stub()
    execution = start_long_run(stub)
    server.process.kill()
    server.process.wait(10)

    server = start_server(database_url, tmp_path, *fast)
    try:
        request = pb.GetExecutionRequest(id=execution.id)
        if database_url.startswith("sqlite"):
            got = server.stub().GetExecution(request).execution
            assert got.state == epb.EXECUTION_STATE_INTERRUPTED
        else:
            deadline = time.monotonic() + 10
            while (got := server.stub().GetExecution(request).execution).state == (
                epb.EXECUTION_STATE_RUNNING
            ) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert got.state == epb.EXECUTION_STATE_ABANDONED
            assert execution.instance_id in got.error_message
        assert got.HasField("end_time")
    finally:
        server.stop()


def test_a_job_whose_task_is_gone_fails_clearly(database_url: str, tmp_path: Path) -> None:
    """A server started without the module that registered a job's task."""
    server = start_server(database_url, tmp_path)
    stub = server.stub()
    soon = datetime.now(UTC) + timedelta(seconds=3)
    stub.CreateJob(
        pb.CreateJobRequest(
            job=jpb.Job(
                id="orphan",
                task="test.add",
                trigger=jpb.Trigger(date=jpb.DateTrigger(run_time=stamp(soon))),
            )
        )
    )
    assert server.stop() == 0

    server = start_server(database_url, tmp_path, tasks=())
    try:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as caught:
            stub.TriggerJob(pb.TriggerJobRequest(id="orphan"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'test.add' is not registered" in caught.value.details()
        [fired] = wait_for(stub, "orphan", lambda ex: len(ex) == 1)
        assert fired.state == epb.EXECUTION_STATE_FAILED
        assert "not registered" in fired.error_message
    finally:
        server.stop()


def test_a_second_server_on_the_same_sqlite_file_refuses_to_start(
    sqlite_url: str, tmp_path: Path
) -> None:
    with running_server(sqlite_url, tmp_path) as first:
        second: ServerProcess = start_server(sqlite_url, tmp_path, wait=False)
        assert second.process.wait(30) == 1
        assert "another chronoplane server" in second.log
        assert "use PostgreSQL to run several" in second.log
        # The first one is unharmed.
        assert first.stub().ListTasks(pb.ListTasksRequest()).tasks


def test_a_sqlite_server_lists_itself_as_leader_and_forgets_a_crashed_one(
    sqlite_url: str, tmp_path: Path
) -> None:
    fast = ("--heartbeat-interval=0.5", "--leader-timeout=2.5", "--instance-timeout=2")
    crashed = start_server(sqlite_url, tmp_path, *fast)
    crashed.process.kill()
    crashed.process.wait(10)
    with running_server(sqlite_url, tmp_path, *fast) as server:
        time.sleep(3.5)  # longer than the leader timeout
        instances = server.stub().ListInstances(pb.ListInstancesRequest()).instances
        assert [(i.pid, i.leader) for i in instances] == [(server.process.pid, True)]


def test_listening_beyond_loopback_needs_an_explicit_opt_out(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "chronoplane"), "serve", "--address", "0.0.0.0:0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0:0" in result.stderr
    assert not (tmp_path / "chronoplane.db").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "nonsense"], "is not HOST:PORT"),
        (["--database-url", "mysql://x"], "database_url must start with"),
    ],
)
def test_bad_settings_fail_fast_with_a_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = subprocess.run(
        [str(BIN / "chronoplane"), "serve", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr


def test_migrate_command_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    result = subprocess.run(
        [str(BIN / "chronoplane"), "migrate", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "database is up to date" in result.stderr


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_refused_big_requests_do_not_pile_up_in_memory(database_url: str, tmp_path: Path) -> None:
    """500 requests of nearly 4 MiB each, every one refused (args past max_args_bytes): the
    server's memory stays bounded without waiting for a full garbage collection (a refusal
    must not keep its request alive in a reference cycle)."""
    args = struct_pb2.Struct()
    args.update({"blob": "x" * 3_900_000})
    request = pb.TriggerJobRequest(id="anything", args=args)
    with running_server(database_url, tmp_path) as server:
        channel = grpc.insecure_channel(
            server.address, options=[("grpc.max_send_message_length", 8 << 20)]
        )
        stub = pb_grpc.SchedulerServiceStub(channel)
        peak = 0.0
        for _ in range(50):  # 10 in flight at a time
            calls = [stub.TriggerJob.future(request) for _ in range(10)]
            for call in calls:
                assert call.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
            peak = max(peak, _rss_mib(server.process.pid))
        channel.close()
    assert peak < 300, f"the server grew to {peak:.0f} MiB"
