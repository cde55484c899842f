"""Watches across a cluster of real ``chronoplane serve`` processes on one PostgreSQL
database: every instance's watchers see every instance's changes, a watcher that loses its
server resumes on another with its cursor, a listener connection cut mid-flow leaves no gap,
and 20 writers committing slowly and out of step lose no event. The truth each watcher is
checked against is the events table itself. Plus grpcurl printing a watch as JSON."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from harness import BIN
from test_cluster import Cluster, cluster_on, ledger_job, wait_until
from test_process import create_idle_job

from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1.scheduler_service_pb2_grpc import SchedulerServiceStub

K = pb.WatchEventKind
CHANGES = (K.WATCH_EVENT_KIND_ADDED, K.WATCH_EVENT_KIND_MODIFIED, K.WATCH_EVENT_KIND_DELETED)


@pytest.fixture
def cluster(postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    with cluster_on(postgres_url, tmp_path) as made:
        yield made


class Watcher:
    """Follows WatchExecutions (or WatchJobs) in a thread; on a broken stream it resumes with
    its last cursor on the next address it is given, as a client should."""

    def __init__(self, addresses: list[str], *, jobs: bool = False) -> None:
        self.addresses = list(addresses)
        self.jobs = jobs
        self.items: list[Any] = []
        self.cursor: int | None = None
        self.errors: list[str] = []
        self.resumes = 0
        self._call: Any = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set() and self.addresses:
            channel = grpc.insecure_channel(self.addresses[0])
            stub = SchedulerServiceStub(channel)
            if self.jobs:
                jobs = pb.WatchJobsRequest()
                if self.cursor is not None:
                    jobs.after_cursor = self.cursor
                self._call = stub.WatchJobs(jobs)
            else:
                executions = pb.WatchExecutionsRequest()
                if self.cursor is not None:
                    executions.after_cursor = self.cursor
                self._call = stub.WatchExecutions(executions)
            try:
                for item in self._call:
                    if item.kind in CHANGES:
                        self.items.append(item)
                    self.cursor = item.cursor
            except grpc.RpcError as error:
                if self._closed.is_set():
                    return
                self.errors.append(f"{self.addresses[0]}: {error.code()}")
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self.addresses.append(self.addresses.pop(0))  # try the next server
                    self.resumes += 1
                    time.sleep(0.2)
                    continue
                return
            finally:
                channel.close()

    def cursors(self) -> list[int]:
        return [item.cursor for item in self.items]

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(10)


async def execute(cluster: Cluster, statements: str) -> None:
    conn = await asyncpg.connect(cluster.url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(statements)
    finally:
        await conn.close()


def committed(cluster: Cluster, resource: str) -> list[int]:
    async def read() -> list[int]:
        conn = await asyncpg.connect(cluster.url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            rows = await conn.fetch(
                "SELECT cursor FROM events WHERE resource = $1 ORDER BY cursor", resource
            )
            return [row["cursor"] for row in rows]
        finally:
            await conn.close()

    return asyncio.run(read())


def caught_up(watcher: Watcher, cluster: Cluster, resource: str, within: float = 15) -> list[int]:
    """Waits until the watcher has every committed event; returns the committed cursors."""
    truth: list[int] = []

    def done() -> bool:
        nonlocal truth
        truth = committed(cluster, resource)
        return bool(truth) and watcher.cursors()[-1:] == truth[-1:]

    wait_until(done, within, f"the watcher caught up ({len(watcher.items)} of {len(truth)})")
    return truth


def exact(watcher: Watcher, truth: list[int], first: int = 0) -> None:
    got = watcher.cursors()
    assert got == sorted(set(got)), "cursors repeated or out of order"
    wanted = [c for c in truth if c > first]
    missing = sorted(set(wanted) - set(got))
    assert not missing, f"{len(missing)} events never arrived, first {missing[:5]}"
    assert got == wanted


def every_second(cluster: Cluster, count: int, via: SchedulerServiceStub) -> list[str]:
    ids = [f"w{n}" for n in range(count)]
    for job_id in ids:
        ledger_job(cluster, job_id, seconds=0.05, via=via)
    return ids


def pause(stub: SchedulerServiceStub, ids: list[str]) -> None:
    for job_id in ids:
        stub.PauseJob(pb.PauseJobRequest(id=job_id))


def test_watchers_on_either_instance_see_everything_and_resume_across_kill_9(
    cluster: Cluster,
) -> None:
    a, b = cluster.start("node-a"), cluster.start("node-b")
    from_start = Watcher([a.address, b.address])
    on_b = Watcher([b.address])
    time.sleep(0.5)
    ids = every_second(cluster, 4, via=a.stub())
    time.sleep(3)
    assert from_start.items, "nothing arrived before the kill"
    a.process.kill()
    a.process.wait(10)
    time.sleep(4)  # the survivor leads, runs the jobs, abandons what a held
    pause(b.stub(), ids)
    time.sleep(1)
    truth = caught_up(from_start, cluster, "execution", within=20)
    caught_up(on_b, cluster, "execution")
    assert from_start.resumes >= 1, from_start.errors
    # Both were watching before the first execution: each has every one of them.
    exact(from_start, truth)
    exact(on_b, truth)
    from_start.close()
    on_b.close()


def test_the_listener_connection_terminated_while_events_flow_leaves_no_gap(
    cluster: Cluster,
) -> None:
    a, b = cluster.start("node-a"), cluster.start("node-b")
    watcher = Watcher([b.address])
    time.sleep(0.5)
    ids = every_second(cluster, 4, via=a.stub())
    b_id = next(i.id for i in cluster.instances() if i.address == b.address)

    async def terminate() -> int:
        conn = await asyncpg.connect(cluster.url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = $1",
                    f"chronoplane listener {b_id}",
                )
            )
        finally:
            await conn.close()

    for _ in range(3):
        time.sleep(1.5)
        assert asyncio.run(terminate()) == 1
    time.sleep(1.5)
    pause(a.stub(), ids)
    time.sleep(1)
    truth = caught_up(watcher, cluster, "execution")
    exact(watcher, truth)
    assert "change listener" in b.log  # it noticed, and reconnected
    watcher.close()


def test_twenty_writers_with_random_commit_delays_lose_no_event(cluster: Cluster) -> None:
    a, b = cluster.start("node-a"), cluster.start("node-b")
    # Every transaction that writes a job sleeps a random while before its events are
    # appended, and again after, with the cursor row locked, before it commits.
    asyncio.run(
        execute(
            cluster,
            """
            CREATE FUNCTION test_dawdle() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(random() * 0.02); RETURN NULL; END $$;
            CREATE TRIGGER test_dawdle_jobs AFTER INSERT OR UPDATE ON jobs
                FOR EACH ROW EXECUTE FUNCTION test_dawdle();
            CREATE TRIGGER test_dawdle_events AFTER INSERT ON events
                FOR EACH STATEMENT EXECUTE FUNCTION test_dawdle();
            """,
        )
    )
    watchers = [Watcher([a.address], jobs=True), Watcher([b.address], jobs=True)]
    time.sleep(0.5)
    stubs = [a.stub(), b.stub()]

    def write(n: int) -> None:
        stub = stubs[n % 2]
        rng = random.Random(n)
        never = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))
        for k in range(5):
            job_id = f"writer-{n}-{k}"
            stub.CreateJob(
                pb.CreateJobRequest(job=jpb.Job(id=job_id, task="chronoplane.echo", trigger=never))
            )
            time.sleep(rng.random() * 0.01)
            stub.PauseJob(pb.PauseJobRequest(id=job_id))

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(write, range(20)))
    for watcher in watchers:
        truth = caught_up(watcher, cluster, "job")
        assert len(truth) == 20 * 5 * 2
        exact(watcher, truth)
        watcher.close()


def test_grpcurl_streams_a_watch_as_json(cluster: Cluster) -> None:
    server = cluster.start("node-a")
    create_idle_job(server.stub(), "nightly", "chronoplane.echo", greeting="hi")
    watch = subprocess.Popen(
        [
            str(BIN / "grpcurl"),
            "-plaintext",
            "-max-time",
            "6",
            "-d",
            json.dumps({"jobIds": ["nightly"]}),
            server.address,
            "chronoplane.v1.SchedulerService/WatchExecutions",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    server.stub().TriggerJob(pb.TriggerJobRequest(id="nightly"))
    out, err = watch.communicate(timeout=20)
    decoder = json.JSONDecoder()
    events, at = [], 0
    while at < len(out.strip()):
        event, at = decoder.raw_decode(out, at)
        events.append(event)
        while at < len(out) and out[at].isspace():
            at += 1
    changes = [e for e in events if e["kind"] != "WATCH_EVENT_KIND_PROGRESS"]
    assert changes, (out, err)
    assert changes[0]["kind"] == "WATCH_EVENT_KIND_ADDED"
    assert changes[-1]["execution"]["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert changes[-1]["execution"]["result"] == {"greeting": "hi"}
    cursors = [int(e["cursor"]) for e in changes]
    assert cursors == sorted(set(cursors))
    assert "DeadlineExceeded" in err or "deadline" in err.lower()
