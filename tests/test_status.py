"""``chronoctl status`` against a real server process: what an operator checks first."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2, struct_pb2
from harness import BIN, running_server

from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb


def _chronoctl(address: str, *args: str) -> str:
    result = subprocess.run(
        [str(BIN / "chronoctl"), f"--address={address}", "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _job(stub: Any, job_id: str, task: str, trigger: jpb.Trigger, **fields: Any) -> None:
    args = struct_pb2.Struct()
    args.update(fields.pop("args", {}))
    job = jpb.Job(id=job_id, task=task, args=args, trigger=trigger, **fields)
    stub.CreateJob(pb.CreateJobRequest(job=job))


def _wait(stub: Any, states: dict[str, int]) -> None:
    """Until the server counts executions in these states as given."""
    deadline = time.monotonic() + 20
    while True:
        executions = stub.ListExecutions(pb.ListExecutionsRequest(page_size=100)).executions
        counted = {
            name: sum(epb.ExecutionState.Name(e.state) == name for e in executions)
            for name in states
        }
        if counted == states:
            return
        assert time.monotonic() < deadline, counted
        time.sleep(0.05)


def test_status_shows_leader_due_jobs_and_what_runs_waits_and_failed(
    sqlite_url: str, tmp_path: Path
) -> None:
    never = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))
    soon = jpb.Trigger(interval=jpb.IntervalTrigger(every=duration_pb2.Duration(seconds=40)))
    with running_server(sqlite_url, tmp_path) as server:
        stub = server.stub()
        _job(stub, "soon", "test.add", soon, args={"a": 1, "b": 2})
        _job(stub, "yearly", "test.add", never, args={"a": 1, "b": 2})
        buffered = jpb.OVERLAP_POLICY_BUFFER_ALL
        _job(stub, "one-at-a-time", "test.block", never, max_concurrent=1, overlap_policy=buffered)
        _job(stub, "broken", "test.flaky", never, args={"key": "k", "failures": 9})
        running = stub.TriggerJob(pb.TriggerJobRequest(id="one-at-a-time")).execution
        _wait(stub, {"EXECUTION_STATE_RUNNING": 1})
        waiting = stub.TriggerJob(pb.TriggerJobRequest(id="one-at-a-time")).execution
        stub.TriggerJob(pb.TriggerJobRequest(id="broken"))
        _wait(
            stub,
            {
                "EXECUTION_STATE_RUNNING": 1,
                "EXECUTION_STATE_PENDING": 1,
                "EXECUTION_STATE_FAILED": 1,
            },
        )
        deadline = time.monotonic() + 10
        while True:  # its count of running executions is its last heartbeat's
            [instance] = stub.ListInstances(pb.ListInstancesRequest()).instances
            if instance.running == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        status = json.loads(_chronoctl(server.address, "--json"))
        text = _chronoctl(server.address)

    assert instance.leader and instance.epoch >= 1
    assert status["leader"] == instance.id and status["epoch"] == instance.epoch
    [listed] = status["instances"]
    assert listed["running"] == 1 and listed["epoch"] == instance.epoch
    assert status["jobsDueNextMinute"] == {"count": 1, "more": False}
    runs = status["executions"]
    assert runs["running"] == {"count": 1, "more": False}, running.id
    assert runs["pending"] == {"count": 1, "more": False}
    assert runs["failedLastHour"] == {"count": 1, "more": False}
    assert status["oldestPending"]["id"] == waiting.id
    assert status["oldestPending"]["jobId"] == "one-at-a-time"
    assert 0 <= status["oldestPending"]["ageSeconds"] < 30
    # For people: the instance as a row, then the counts.
    assert "leader:" in text and f"{instance.id} (epoch {instance.epoch})" in text
    row = next(line for line in text.splitlines() if line.startswith(instance.id))
    assert row.split()[3:6] == ["leader", str(instance.epoch), "1/1000"]
    assert f"{waiting.id} (job one-at-a-time), waiting" in text
    for label in (
        "jobs due in the next minute:",
        "executions running:",
        "executions pending:",
        "failed in the last hour:",
    ):
        assert next(line for line in text.splitlines() if line.startswith(label)).split()[-1] == "1"
