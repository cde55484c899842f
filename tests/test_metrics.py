"""The Prometheus endpoint of a real server process (--metrics-address): what it counts is
what the test caused."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from harness import BIN, ROOT, free_port, start_server
from prometheus_client.parser import text_string_to_metric_families

from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

GET_JOB = "/chronoplane.v1.SchedulerService/GetJob"
WATCH = "/chronoplane.v1.SchedulerService/WatchExecutions"
SUCCEEDED, FAILED = epb.EXECUTION_STATE_SUCCEEDED, epb.EXECUTION_STATE_FAILED


def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, by name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def executions(stub: Any, job_id: str) -> list[epb.Execution]:
    request = pb.ListExecutionsRequest(job_id=job_id, page_size=1000)
    return list(stub.ListExecutions(request, timeout=5).executions)


def settled(stub: Any, job_id: str, count: int) -> list[epb.Execution]:
    """The job's executions once at least ``count`` exist and none is pending or running."""
    deadline = time.monotonic() + 20
    while True:
        found = executions(stub, job_id)
        done = all(e.state in (SUCCEEDED, FAILED) for e in found)
        if len(found) >= count and done:
            return found
        assert time.monotonic() < deadline, f"{job_id}: {found}"
        time.sleep(0.1)


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    metrics = f"127.0.0.1:{free_port()}"
    server = start_server(database_url, tmp_path, f"--metrics-address={metrics}")
    try:
        assert f"metrics on http://{metrics}/metrics" in server.log
        yield server.stub(), metrics
    finally:
        assert server.stop() == 0


def test_the_metrics_count_what_happened(served: tuple[Any, str]) -> None:
    stub, address = served
    every_second = jpb.Trigger(interval=jpb.IntervalTrigger(every=duration_pb2.Duration(seconds=1)))
    stub.CreateJob(
        pb.CreateJobRequest(job=jpb.Job(id="tick", task="chronoplane.echo", trigger=every_second))
    )
    args = struct_pb2.Struct()
    args.update({"key": "boom", "failures": 100})
    never = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))
    stub.CreateJob(
        pb.CreateJobRequest(
            job=jpb.Job(
                id="boom",
                task="test.flaky",
                args=args,
                trigger=never,
                # Both manual runs run, whether or not the first has ended.
                overlap_policy=jpb.OVERLAP_POLICY_ALLOW,
            )
        )
    )
    for _ in range(2):
        stub.TriggerJob(pb.TriggerJobRequest(id="boom"))
    stub.GetJob(pb.GetJobRequest(id="tick"))
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetJob(pb.GetJobRequest(id="no-such-job"))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND

    watch = stub.WatchExecutions(pb.WatchExecutionsRequest(job_ids=["tick"]))
    received = [next(watch) for _ in range(2)]  # a tick's events
    assert received
    while_open = scrape(address)
    watch.cancel()
    assert value(while_open, "chronoplane_watchers_open", kind="executions") == 1
    assert value(while_open, "chronoplane_grpc_server_streams_open", grpc_method=WATCH) == 1
    assert value(while_open, "chronoplane_watch_events_sent_total", kind="executions") >= 2
    assert value(while_open, "chronoplane_watch_event_lag_seconds_count") >= 2

    settled(stub, "tick", 2)
    stub.PauseJob(pb.PauseJobRequest(id="tick"))
    ticks = settled(stub, "tick", 2)
    booms = settled(stub, "boom", 2)
    time.sleep(0.5)  # the watch's end reaches the hub
    samples = scrape(address)

    assert value(samples, "chronoplane_leader") == 1
    assert value(samples, "chronoplane_watchers_open", kind="executions") == 0
    assert value(samples, "chronoplane_fires_total") == len(ticks)
    assert value(samples, "chronoplane_manual_runs_total") == len(booms) == 2
    succeeded = value(
        samples, "chronoplane_executions_finished_total", state="succeeded", executor="inline"
    )
    failed = value(
        samples, "chronoplane_executions_finished_total", state="failed", executor="inline"
    )
    assert (succeeded, failed) == (len(ticks), 2)
    assert value(samples, "chronoplane_fire_lateness_seconds_count") == len(ticks) + 2
    assert (
        value(samples, "chronoplane_grpc_server_handled_total", grpc_method=GET_JOB, grpc_code="OK")
        == 1
    )
    not_found = {"grpc_method": GET_JOB, "grpc_code": "NOT_FOUND"}
    assert value(samples, "chronoplane_grpc_server_handled_total", **not_found) == 1
    assert (
        value(samples, "chronoplane_grpc_server_handling_seconds_count", grpc_method=GET_JOB) == 2
    )
    assert (
        value(
            samples,
            "chronoplane_grpc_server_handled_total",
            grpc_method=WATCH,
            grpc_code="CANCELLED",
        )
        == 1
    )
    assert value(samples, "chronoplane_grpc_server_msg_sent_total", grpc_method=WATCH) >= 2
    assert value(samples, "chronoplane_event_loop_lag_seconds_count") > 0
    assert value(samples, "chronoplane_heartbeat_duration_seconds_count") > 0
    assert value(samples, "chronoplane_instances_alive") == 1
    assert ("process_cpu_seconds_total", frozenset()) in samples


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_without_metrics_address_nothing_more_listens(database_url: str, tmp_path: Path) -> None:
    server = start_server(database_url, tmp_path)
    try:
        ports = _listening_ports(server.process.pid)
        assert ports == {int(server.address.rpartition(":")[2])}, ports
        assert "metrics on" not in server.log
    finally:
        server.stop()


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports the process listens on (its sockets, found in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_bad_metrics_address_is_refused_naming_the_setting(
    database_url: str, tmp_path: Path
) -> None:
    def serve(metrics: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(BIN / "chronoplane"),
                "serve",
                f"--address=127.0.0.1:{free_port()}",
                f"--database-url={database_url}",
                f"--metrics-address={metrics}",
            ],
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    malformed = serve("9464")
    assert malformed.returncode == 2
    assert "metrics_address '9464' is not HOST:PORT" in malformed.stderr
    beyond_loopback = serve("0.0.0.0:9464")
    assert beyond_loopback.returncode == 1
    assert "refusing to serve metrics on 0.0.0.0:9464 (metrics_address)" in beyond_loopback.stderr
    with socket_taken() as port:
        taken = serve(f"127.0.0.1:{port}")
    assert taken.returncode == 1
    assert f"metrics_address 127.0.0.1:{port}: cannot serve metrics there" in taken.stderr


@contextlib.contextmanager
def socket_taken() -> Iterator[int]:
    """A loopback port someone else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_leader_reports_the_queue_and_task_labels_on_request(
    database_url: str, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    server = start_server(
        database_url,
        tmp_path,
        f"--metrics-address={address}",
        "--metrics-task-labels",
        "--shutdown-grace=0",
    )
    try:
        stub = server.stub()
        never = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))
        job = jpb.Job(
            id="slow",
            task="test.block",
            trigger=never,
            max_concurrent=1,
            overlap_policy=jpb.OVERLAP_POLICY_BUFFER_ALL,
        )
        stub.CreateJob(pb.CreateJobRequest(job=job))
        for _ in range(3):  # one runs, two wait for its slot
            stub.TriggerJob(pb.TriggerJobRequest(id="slow"))
        deadline = time.monotonic() + 15  # the census reads every 5 s
        while True:
            samples = scrape(address)
            if value(samples, "chronoplane_executions_pending") == 2:
                break
            assert time.monotonic() < deadline, "the census never saw the queue"
            time.sleep(0.2)
        assert value(samples, "chronoplane_executions_running") == 1
        assert value(samples, "chronoplane_oldest_pending_execution_age_seconds") > 0
        assert value(samples, "chronoplane_manual_runs_total", task="test.block") == 3
        assert value(samples, "chronoplane_manual_runs_total") == 0  # no series without task
    finally:
        assert server.stop() == 0


def test_the_leader_counts_the_ends_of_celery_runs(postgres_url: str, tmp_path: Path) -> None:
    """Celery runs end on workers: the leader counts them from the database, once."""
    from brokers import redis_url, start_worker

    broker = redis_url(tmp_path)
    queue = f"chronoplane-metrics-{tmp_path.name[-12:]}"
    metrics = f"127.0.0.1:{free_port()}"
    server = start_server(
        postgres_url,
        tmp_path,
        f"--metrics-address={metrics}",
        f"--celery-broker-url={broker}",
    )
    worker = start_worker(tmp_path, broker=broker, database_url=postgres_url, queue=queue)
    try:
        stub = server.stub()
        never = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))
        for job_id, task in (("sum", "celery.add"), ("fail", "celery.fail")):
            args = struct_pb2.Struct()
            args.update({"a": 1, "b": 2} if task == "celery.add" else {})
            job = jpb.Job(
                id=job_id,
                task=task,
                args=args,
                trigger=never,
                executor=epb.EXECUTOR_CELERY,
                celery=jpb.CeleryOptions(queue=queue),
            )
            stub.CreateJob(pb.CreateJobRequest(job=job))
            stub.TriggerJob(pb.TriggerJobRequest(id=job_id))
        settled(stub, "sum", 1)
        settled(stub, "fail", 1)
        ended = {"succeeded": 0.0, "failed": 0.0}
        deadline = time.monotonic() + 40  # the census reads ends some seconds behind
        while time.monotonic() < deadline:
            samples = scrape(metrics)
            ended = {
                state: value(
                    samples, "chronoplane_executions_finished_total", state=state, executor="celery"
                )
                for state in ended
            }
            if all(ended.values()):
                break
            time.sleep(1)
        time.sleep(6)  # a census later, nothing is counted again
        samples = scrape(metrics)
        again = {
            state: value(
                samples, "chronoplane_executions_finished_total", state=state, executor="celery"
            )
            for state in ended
        }
        assert ended == again == {"succeeded": 1.0, "failed": 1.0}
    finally:
        worker.stop()
        assert server.stop() == 0
