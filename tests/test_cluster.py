"""Cluster mode with real processes: three ``chronoplane serve`` on one PostgreSQL database.

Each scenario hurts the cluster (kill -9, SIGSTOP, a terminated lock session, every instance
down) while jobs fire every second, then checks from the ledger that the test task writes
(tests/testtasks.py, test.cluster_ledger) and from the executions: no fire ran twice, none
went missing, a leader was back within the promised time, and what the dead left behind was
resolved. Timings are shortened: heartbeat 0.5 s, leader timeout 2.5 s, instance timeout 3 s.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from harness import ServerProcess, run_sync, start_server
from postgres import start_throwaway

from chronoplane.server.storage.migrate import upgrade
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import instance_pb2 as ipb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1.scheduler_service_pb2_grpc import SchedulerServiceStub

HEARTBEAT = 0.5
LEADER_TIMEOUT = 2.5
INSTANCE_TIMEOUT = 3.0
FAST = (
    f"--heartbeat-interval={HEARTBEAT}",
    f"--leader-timeout={LEADER_TIMEOUT}",
    f"--instance-timeout={INSTANCE_TIMEOUT}",
)
JOBS = 4


@dataclass
class Cluster:
    url: str
    workdir: Path
    ledger: Path
    servers: list[ServerProcess]
    paused: list[ServerProcess] = field(default_factory=list)

    def start(self, name: str) -> ServerProcess:
        server = start_server(self.url, self.workdir, *FAST, f"--instance-name={name}")
        self.servers.append(server)
        return server

    def alive(self) -> list[ServerProcess]:
        return [s for s in self.servers if s.process.poll() is None]

    def stub(self, avoid: ServerProcess | None = None) -> SchedulerServiceStub:
        for server in self.alive():
            if server is not avoid and server not in self.paused:
                return server.stub()
        raise AssertionError("no server is alive")

    def instances(self, avoid: ServerProcess | None = None) -> list[ipb.Instance]:
        return list(self.stub(avoid).ListInstances(pb.ListInstancesRequest()).instances)

    def leader(self, avoid: ServerProcess | None = None, within: float = 10) -> ServerProcess:
        """The server that leads, by ListInstances, waiting for one (other than ``avoid``)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for instance in self.instances(avoid):
                if instance.leader:
                    for server in self.alive():
                        if server.address == instance.address and server is not avoid:
                            return server
            time.sleep(0.05)
        raise AssertionError(f"no leader within {within} s: {self.instances(avoid)}")


@pytest.fixture
def cluster(postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    url = postgres_url
    made = Cluster(url, tmp_path, tmp_path / "ledger.txt", [])
    try:
        yield made
    finally:
        for server in made.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGCONT)
                server.process.kill()
                server.process.wait(10)


def create_jobs(cluster: Cluster, *, grace: float = 60.0, prefix: str = "tick") -> list[str]:
    stub = cluster.stub()
    args = struct_pb2.Struct()
    args.update({"path": str(cluster.ledger), "seconds": 0.3})
    ids = []
    for n in range(JOBS):
        job_id = f"{prefix}-{n}"
        stub.CreateJob(
            pb.CreateJobRequest(
                job=jpb.Job(
                    id=job_id,
                    task="test.cluster_ledger",
                    args=args,
                    trigger=jpb.Trigger(interval=jpb.IntervalTrigger(every=_seconds(1))),
                    misfire_grace=_seconds(grace),
                ),
            )
        )
        ids.append(job_id)
    return ids


def _seconds(value: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(value), nanos=int((value % 1) * 1e9))


def executions(cluster: Cluster, job_id: str) -> list[epb.Execution]:
    found: list[epb.Execution] = []
    token = ""
    while True:
        page = cluster.stub().ListExecutions(
            pb.ListExecutionsRequest(job_id=job_id, page_size=1000, page_token=token)
        )
        found.extend(page.executions)
        token = page.next_page_token
        if not token:
            return found


def ledger_starts(cluster: Cluster) -> list[list[str]]:
    if not cluster.ledger.exists():
        return []
    lines = [line.split() for line in cluster.ledger.read_text().splitlines()]
    return [line[1:] for line in lines if line and line[0] == "start"]


def _time(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def check_each_fire_once(cluster: Cluster, job_ids: list[str]) -> int:
    """No execution ran twice, no fire has two executions, and between a job's first and last
    recorded fire every fire is there (run, or counted in a MISSED record). Returns how many
    fires were checked."""
    starts = ledger_starts(cluster)
    twice = [e for e, n in Counter(line[0] for line in starts).items() if n > 1]
    assert not twice, f"executions that ran twice: {twice}"
    fires_run = Counter((line[1], line[2]) for line in starts)
    assert max(fires_run.values(), default=0) <= 1, "a fire ran in two executions"
    checked = 0
    for job_id in job_ids:
        covered: list[datetime] = []
        for execution in executions(cluster, job_id):
            if execution.source != epb.EXECUTION_SOURCE_SCHEDULE:
                continue
            if execution.state == epb.EXECUTION_STATE_MISSED:
                first = _time(execution.missed.first_time)
                covered += [first + timedelta(seconds=k) for k in range(execution.missed.count)]
            else:
                covered.append(_time(execution.scheduled_time))
        covered.sort()
        assert len(covered) == len(set(covered)), f"{job_id}: a fire recorded twice"
        gaps = [(a, b) for a, b in itertools.pairwise(covered) if b - a != timedelta(seconds=1)]
        assert not gaps, f"{job_id}: fires missing between {gaps}"
        checked += len(covered)
    return checked


def wait_until(predicate: Callable[[], object], within: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {within} s")


def three(cluster: Cluster) -> list[ServerProcess]:
    return [cluster.start(f"node-{n}") for n in range(3)]


def instance_id(cluster: Cluster, server: ServerProcess) -> str:
    for instance in cluster.instances(avoid=server):
        if instance.address == server.address:
            return str(instance.id)
    raise AssertionError(f"{server.address} is not registered")


# -- the scenarios ------------------------------------------------------------------------------


def test_instances_are_listed_with_one_leader(cluster: Cluster) -> None:
    servers = three(cluster)
    instances = cluster.instances()
    assert sorted(i.name for i in instances) == ["node-0", "node-1", "node-2"]
    assert sum(i.leader for i in instances) == 1
    assert {i.address for i in instances} == {s.address for s in servers}
    assert all(i.pid == s.process.pid for i, s in zip(instances, servers, strict=True))
    # Two processes with one name stay two instances.
    twin = cluster.start("node-0")
    names = Counter(i.name for i in cluster.instances())
    assert names["node-0"] == 2
    twin.stop()
    assert len(cluster.instances()) == 3  # a clean stop removes its row at once


def test_a_job_created_on_a_follower_fires_on_the_leader_within_a_second(
    cluster: Cluster,
) -> None:
    three(cluster)
    leader = cluster.leader()
    follower = next(s for s in cluster.alive() if s is not leader)
    args = struct_pb2.Struct()
    args.update({"path": str(cluster.ledger), "seconds": 0})
    run_at = datetime.now(UTC) + timedelta(seconds=1.5)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(run_at)
    follower.stub().CreateJob(
        pb.CreateJobRequest(
            job=jpb.Job(
                id="once",
                task="test.cluster_ledger",
                args=args,
                trigger=jpb.Trigger(date=jpb.DateTrigger(run_time=stamp)),
            ),
        )
    )
    wait_until(lambda: ledger_starts(cluster), 5, "the job created on a follower ran")
    started = float(cluster.ledger.read_text().split()[5])
    assert started - run_at.timestamp() < 1.0, "the leader fired more than 1 s late"
    # Paused on another follower: the leader stops firing it.
    every = follower.stub().CreateJob(
        pb.CreateJobRequest(
            job=jpb.Job(
                id="every",
                task="test.cluster_ledger",
                args=args,
                trigger=jpb.Trigger(interval=jpb.IntervalTrigger(every=_seconds(1))),
            ),
        )
    )
    time.sleep(1.5)
    follower.stub().PauseJob(pb.PauseJobRequest(id=every.job.id))
    time.sleep(1.0)  # a fire already written may still run
    before = len(executions(cluster, "every"))
    time.sleep(2.0)
    assert len(executions(cluster, "every")) == before


def test_kill_9_of_the_leader(cluster: Cluster) -> None:
    three(cluster)
    jobs = create_jobs(cluster)
    time.sleep(4)
    old = cluster.leader()
    old_id = instance_id(cluster, old)
    old.process.kill()
    killed = time.monotonic()
    new = cluster.leader(avoid=old, within=10)
    failover = time.monotonic() - killed
    assert failover < 5, f"new leader after {failover:.1f} s"
    assert new is not old

    # What the dead leader was running is resolved within the instance timeout and a sweep.
    def resolved() -> bool:
        running = [
            e
            for job in jobs
            for e in executions(cluster, job)
            if e.instance_id == old_id and e.state == epb.EXECUTION_STATE_RUNNING
        ]
        return not running

    wait_until(resolved, INSTANCE_TIMEOUT + 4, "executions of the dead leader resolved")
    time.sleep(3)
    assert check_each_fire_once(cluster, jobs) > JOBS * 8


def test_kill_9_of_a_follower(cluster: Cluster) -> None:
    three(cluster)
    jobs = create_jobs(cluster)
    time.sleep(3)
    leader = cluster.leader()
    follower = next(s for s in cluster.alive() if s is not leader)
    gone = instance_id(cluster, follower)
    follower.process.kill()
    time.sleep(INSTANCE_TIMEOUT + 1)
    listed = {i.id: i for i in cluster.instances()}
    # Listed until removed, its last_seen_time ageing.
    if gone in listed:
        seen = _time(listed[gone].last_seen_time)
        assert datetime.now(UTC) - seen > timedelta(seconds=INSTANCE_TIMEOUT)
    assert cluster.leader() is leader
    assert check_each_fire_once(cluster, jobs) > JOBS * 6


def test_sigstop_of_the_leader_for_15_s(cluster: Cluster) -> None:
    three(cluster)
    jobs = create_jobs(cluster)
    time.sleep(3)
    old = cluster.leader()
    old_id = instance_id(cluster, old)
    old.process.send_signal(signal.SIGSTOP)
    cluster.paused.append(old)
    stopped = datetime.now(UTC)
    new = cluster.leader(avoid=old, within=LEADER_TIMEOUT + 5)
    time.sleep(15 - (datetime.now(UTC) - stopped).total_seconds())
    abandoned = {
        e.id
        for job in jobs
        for e in executions(cluster, job)
        if e.state == epb.EXECUTION_STATE_ABANDONED
    }
    old.process.send_signal(signal.SIGCONT)
    cluster.paused.remove(old)
    time.sleep(4)
    assert old.process.poll() is None, "the old leader died instead of following"
    assert "stops leading" in old.log
    assert cluster.leader() is new
    for job in jobs:
        for execution in executions(cluster, job):
            if execution.instance_id == old_id:
                # Nothing written by the old leader after it was stopped, and what it ran
                # stays ABANDONED whatever its task did after SIGCONT.
                assert _time(execution.create_time) < stopped + timedelta(seconds=0.5)
            if execution.id in abandoned:
                assert execution.state == epb.EXECUTION_STATE_ABANDONED
    assert check_each_fire_once(cluster, jobs) > JOBS * 18
    # The old leader is back as a follower.
    assert any(i.id == old_id and not i.leader for i in cluster.instances())


def test_the_leaders_lock_session_terminated(cluster: Cluster) -> None:
    three(cluster)
    jobs = create_jobs(cluster)
    time.sleep(3)
    old = cluster.leader()
    old_id = instance_id(cluster, old)

    async def terminate() -> int:
        url = cluster.url.replace("postgresql+asyncpg://", "postgresql://")
        conn = await asyncpg.connect(url)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = $1",
                    f"chronoplane leader lock {old_id}",
                )
            )
        finally:
            await conn.close()

    assert asyncio.run(terminate()) == 1
    ended = time.monotonic()
    wait_until(lambda: "stops leading" in old.log, 5, "the leader noticed")
    cluster.leader(within=5 - (time.monotonic() - ended))
    time.sleep(3)
    assert all(s.process.poll() is None for s in cluster.servers)
    assert check_each_fire_once(cluster, jobs) >= JOBS * 5


def test_every_instance_down_across_several_fires(cluster: Cluster) -> None:
    three(cluster)
    jobs = create_jobs(cluster, grace=1.0)
    time.sleep(3)
    for server in cluster.alive():
        server.process.kill()
        server.process.wait(10)
    time.sleep(5)
    three(cluster)
    time.sleep(4)
    for job in jobs:
        missed = [e for e in executions(cluster, job) if e.state == epb.EXECUTION_STATE_MISSED]
        # misfire_policy run_once (the default): one record of the gap, its latest fire run.
        assert len(missed) == 1, f"{job}: {len(missed)} MISSED records: " + ", ".join(
            f"{_time(e.scheduled_time):%S.%f} {epb.ExecutionState.Name(e.state)}"
            for e in executions(cluster, job)
        )
        assert missed[0].missed.count >= 3
    assert check_each_fire_once(cluster, jobs) > JOBS * 10


def test_postgres_restarted_under_load(tmp_path: Path) -> None:
    """A throwaway PostgreSQL of its own, restarted with -m immediate while jobs fire: every
    session (pools, the leader lock, the listeners) ends as in a crash."""
    pg = start_throwaway()
    made = Cluster(pg.url_for("chronoplane"), tmp_path, tmp_path / "ledger.txt", [])
    try:

        async def create() -> None:
            conn = await asyncpg.connect(pg.dsn)
            try:
                await conn.execute("CREATE DATABASE chronoplane")
            finally:
                await conn.close()

        run_sync(create())
        run_sync(upgrade(made.url))
        three(made)
        jobs = create_jobs(made)
        time.sleep(3)
        pg.restart_immediately()
        restarted = time.monotonic()
        made.leader(within=15)
        time.sleep(max(0.0, 8 - (time.monotonic() - restarted)))
        assert all(s.process.poll() is None for s in made.servers), "a server died"
        assert sum(i.leader for i in made.instances()) == 1
        assert check_each_fire_once(made, jobs) >= JOBS * 10
    finally:
        for server in made.servers:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait(10)
        pg.stop()
