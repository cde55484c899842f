"""Cluster mode with real processes: three ``chronoplane serve`` on one PostgreSQL database.

Each scenario hurts the cluster (kill -9, SIGSTOP, a terminated lock session, every instance
down) while jobs fire every second, then checks from the ledger that the test task writes
(tests/testtasks.py, test.cluster_ledger) and from the executions: no fire ran twice, none
went missing, a leader was back within the promised time, and what the dead left behind was
resolved. Timings are shortened: heartbeat 0.5 s, leader timeout 2.5 s, instance timeout 3 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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

    def start(self, name: str, *extra: str) -> ServerProcess:
        server = start_server(self.url, self.workdir, *FAST, f"--instance-name={name}", *extra)
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


@contextlib.contextmanager
def cluster_on(url: str, workdir: Path) -> Iterator[Cluster]:
    """A cluster to start servers in; every one of them is killed at the end."""
    made = Cluster(url, workdir, workdir / "ledger.txt", [])
    try:
        yield made
    finally:
        for server in made.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGCONT)
                server.process.kill()
                server.process.wait(10)


@pytest.fixture
def cluster(postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    with cluster_on(postgres_url, tmp_path) as made:
        yield made


def ledger_job(
    cluster: Cluster,
    job_id: str,
    *,
    seconds: float,
    trigger: jpb.Trigger | None = None,
    via: SchedulerServiceStub | None = None,
    **fields: Any,
) -> jpb.Job:
    """Creates a job of test.cluster_ledger running ``seconds``, every second unless told."""
    args = struct_pb2.Struct()
    args.update({"path": str(cluster.ledger), "seconds": seconds})
    every_second = jpb.Trigger(interval=jpb.IntervalTrigger(every=_seconds(1)))
    job = jpb.Job(
        id=job_id, task="test.cluster_ledger", args=args, trigger=trigger or every_second, **fields
    )
    response: pb.CreateJobResponse = (via or cluster.stub()).CreateJob(pb.CreateJobRequest(job=job))
    return response.job


def create_jobs(
    cluster: Cluster,
    *,
    grace: float = 60.0,
    prefix: str = "tick",
    seconds: float = 0.3,
    count: int = JOBS,
) -> list[str]:
    ids = [f"{prefix}-{n}" for n in range(count)]
    for job_id in ids:
        ledger_job(cluster, job_id, seconds=seconds, misfire_grace=_seconds(grace))
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


async def sql(cluster: Cluster, query: str, *args: object) -> Any:
    """One value, read straight from the cluster's database."""
    conn = await asyncpg.connect(cluster.url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


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
    run_at = datetime.now(UTC) + timedelta(seconds=1.5)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(run_at)
    date = jpb.Trigger(date=jpb.DateTrigger(run_time=stamp))
    ledger_job(cluster, "once", seconds=0, trigger=date, via=follower.stub())
    wait_until(lambda: ledger_starts(cluster), 5, "the job created on a follower ran")
    started = float(cluster.ledger.read_text().split()[5])
    assert started - run_at.timestamp() < 1.0, "the leader fired more than 1 s late"
    # Paused on another follower: the leader stops firing it.
    every = ledger_job(cluster, "every", seconds=0, via=follower.stub())
    time.sleep(1.5)
    follower.stub().PauseJob(pb.PauseJobRequest(id=every.id))
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
    time.sleep(max(3.0, 6 - (time.monotonic() - killed)))
    assert check_each_fire_once(cluster, jobs) > JOBS * 8
    # The survivor that leads says so, and who it declared dead, in lines, not tracebacks.
    wait_until(lambda: f"instance {old_id} declared dead by" in new.log, 5, "declared dead")
    assert "this instance leads now (epoch" in new.log
    for survivor in cluster.alive():
        assert "Traceback" not in survivor.log, survivor.log


def test_kill_9_of_a_follower(cluster: Cluster) -> None:
    # Room for two runs each: the leader runs one of the four jobs' runs, others the rest.
    for n in range(3):
        cluster.start(f"node-{n}", "--max-running=2")
    jobs = create_jobs(cluster, seconds=0.8)
    created = time.monotonic()
    time.sleep(2)
    leader = cluster.leader()
    leader_id = instance_id(cluster, leader)
    by_id = {instance_id(cluster, s): s for s in cluster.alive()}

    def running_on_a_follower() -> epb.Execution | None:
        for job in jobs:
            for e in executions(cluster, job):
                if e.state == epb.EXECUTION_STATE_RUNNING and e.instance_id != leader_id:
                    return e
        return None

    wait_until(running_on_a_follower, 10, "an execution running on a follower")
    orphan = running_on_a_follower()
    assert orphan is not None
    by_id[orphan.instance_id].process.kill()

    def abandoned() -> bool:
        got = cluster.stub().GetExecution(pb.GetExecutionRequest(id=orphan.id)).execution
        if got.state == epb.EXECUTION_STATE_RUNNING:
            return False
        # It ended before the kill, or the leader took it for abandoned.
        return got.state in (epb.EXECUTION_STATE_SUCCEEDED, epb.EXECUTION_STATE_ABANDONED)

    resolved = wait_until(abandoned, INSTANCE_TIMEOUT + 4, "the dead follower's run resolved")
    assert resolved <= INSTANCE_TIMEOUT + 2 * HEARTBEAT + 1
    listed = {i.id: i for i in cluster.instances()}
    # Listed until removed, its last_seen_time ageing.
    if orphan.instance_id in listed:
        seen = _time(listed[orphan.instance_id].last_seen_time)
        assert datetime.now(UTC) - seen > timedelta(seconds=INSTANCE_TIMEOUT)
    assert cluster.leader() is leader, "the leader was undisturbed"
    time.sleep(max(0.0, 9 - (time.monotonic() - created)))
    assert check_each_fire_once(cluster, jobs) > JOBS * 6


def test_sigstop_of_the_leader_for_15_s(cluster: Cluster) -> None:
    three(cluster)
    jobs = create_jobs(cluster)
    time.sleep(3)
    old = cluster.leader()
    old_id = instance_id(cluster, old)
    old_epoch = run_sync(sql(cluster, "SELECT epoch FROM leadership"))
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
    # Nothing written by the old leader as leader after it was stopped (every fire carries
    # the term that wrote it) ...
    last_write = run_sync(
        sql(cluster, "SELECT max(create_time) FROM executions WHERE epoch = $1", old_epoch)
    )
    assert last_write < stopped + timedelta(seconds=0.5)
    # ... and what it ran stays ABANDONED whatever its task did after SIGCONT.
    for job in jobs:
        for execution in executions(cluster, job):
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
        # One record of the gap (5 s, at least 3 fires). A fire before it may be missed
        # alone, on a machine too busy to start it within the grace of 1 s: another record.
        missed = [
            e
            for e in executions(cluster, job)
            if e.state == epb.EXECUTION_STATE_MISSED and e.missed.count >= 3
        ]
        assert len(missed) == 1, f"{job}: {len(missed)} MISSED records: " + ", ".join(
            f"{_time(e.scheduled_time):%S.%f} {epb.ExecutionState.Name(e.state)}"
            for e in executions(cluster, job)
        )
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


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def ledger_intervals(cluster: Cluster) -> dict[str, tuple[str, str, float, float]]:
    """Execution id -> (job, pid, start, end), for the runs that ended."""
    starts: dict[str, tuple[str, str, float]] = {}
    runs: dict[str, tuple[str, str, float, float]] = {}
    for line in cluster.ledger.read_text().splitlines():
        kind, execution_id, job_id, _scheduled, pid, when = line.split()
        if kind == "start":
            starts[execution_id] = (job_id, pid, float(when))
        elif execution_id in starts:
            job_id, pid, start = starts[execution_id]
            runs[execution_id] = (job_id, pid, start, float(when))
    return runs


def test_executions_spread_over_every_instance_within_their_limits(cluster: Cluster) -> None:
    """Twelve jobs each running 0.6 s every second need about seven runs at once; one
    instance may run two (--max-running=2): the others' room must take the rest. One job
    runs 2.5 s every second with max_concurrent 2: never more than two at once, cluster-wide."""
    servers = [cluster.start(f"node-{n}", "--max-running=2") for n in range(3)]
    jobs = create_jobs(cluster, seconds=0.6, count=12)
    ledger_job(
        cluster,
        "pair",
        seconds=2.5,
        max_concurrent=2,
        overlap_policy=jpb.OVERLAP_POLICY_BUFFER_ONE,
    )
    time.sleep(8)
    for server in servers:
        assert server.process.poll() is None
    runs = ledger_intervals(cluster)
    pids = {str(s.process.pid) for s in servers}
    by_pid = {pid: [(a, b) for _, p, a, b in runs.values() if p == pid] for pid in pids}
    assert all(by_pid.values()), (
        f"an instance ran nothing: { {p: len(r) for p, r in by_pid.items()} }"
    )
    for pid, intervals in by_pid.items():
        assert most_at_once(intervals) <= 2, f"instance {pid} ran more than --max-running"
    pair = [(a, b) for job, _, a, b in runs.values() if job == "pair"]
    assert len(pair) >= 3
    assert most_at_once(pair) <= 2, "max_concurrent 2 was exceeded across the cluster"
    listed = cluster.instances()
    assert {i.max_running for i in listed} == {2}
    assert check_each_fire_once(cluster, jobs) > 12 * 5


def test_cancel_through_one_instance_stops_a_run_on_another(cluster: Cluster) -> None:
    three(cluster)
    stub = cluster.stub()
    hourly = jpb.Trigger(interval=jpb.IntervalTrigger(every=_seconds(3600)))
    ledger_job(cluster, "long", seconds=60, trigger=hourly)
    queued = stub.TriggerJob(pb.TriggerJobRequest(id="long")).execution
    request = pb.GetExecutionRequest(id=queued.id)
    wait_until(
        lambda: stub.GetExecution(request).execution.state == epb.EXECUTION_STATE_RUNNING,
        5,
        "the run started",
    )
    owner = stub.GetExecution(request).execution.instance_id
    other = next(s for s in cluster.alive() if instance_id(cluster, s) != owner)
    started = time.monotonic()
    cancelled = (
        other.stub()
        .CancelExecution(pb.CancelExecutionRequest(id=queued.id, reason="from elsewhere"))
        .execution
    )
    assert time.monotonic() - started < 3
    assert cancelled.state == epb.EXECUTION_STATE_CANCELLED
    assert cancelled.error_message == "cancelled: from elsewhere"
    assert cancelled.instance_id == owner
    # The task really stopped: its ledger says it started and was cancelled, never that it
    # ended.
    lines = cluster.ledger.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["start", "cancel"]
