"""Faults done to a real cluster, and the checker that counts what they cost.

Shared by ``tests/faults/test_faults.py`` (short runs, every count asserted to be 0) and
``bench/chaos.py`` (longer, heavier, repeated; the counts printed).

A case runs on a PostgreSQL the tests start and stop themselves (never the shared one): a
fresh database, three ``chronoplane serve`` processes with short timings, and jobs of
``test.cluster_ledger`` firing every second from a whole second on. The task writes its own
log, the *ledger*: a line when a run starts, and one when it ends or is cancelled. After the
fault and time to recover, the checker reads the ledger and the database and counts:

- **duplicates**: fires (a scheduled fire together with its retries) run twice in a way that
  matters: two runs that overlapped in time, or that both ran to completion;
- **lost** fires: due before the horizon, with neither an execution nor a MISSED record that
  counts them;
- **stuck** executions: still PENDING or RUNNING long after they were due.

Jobs retry (three attempts, any error, ABANDONED included) in the cases where no instance
dies: there, one false ABANDONED would be a duplicate. Where an instance really dies (kill -9,
a pause past instance_timeout) a run that completed but whose outcome was not yet recorded is
ABANDONED, and running it again is what a retry policy that covers chronoplane.Abandoned asks
for (docs/decisions/0015-faults.md): those jobs do not retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ServerProcess, start_server, wait_serving
from postgres import PostgresServer

from chronoplane.server.storage.migrate import upgrade
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1.scheduler_service_pb2_grpc import SchedulerServiceStub

__all__ = [
    "CASES",
    "Case",
    "Cluster",
    "Counts",
    "Timings",
    "cluster_on",
    "sigterm_during_long_runs",
]

TASK = "test.cluster_ledger"
SECOND = duration_pb2.Duration(seconds=1)
# The event writers' advisory lock (docs/decisions/0002-advisory-lock-keys.md, key 3).
EVENT_WRITERS = (0x43504C4E, 3)


@dataclass(frozen=True, kw_only=True)
class Timings:
    heartbeat: float = 0.5
    leader_timeout: float = 2.5
    instance_timeout: float = 3.0
    shutdown_grace: float = 10.0

    def flags(self) -> tuple[str, ...]:
        return (
            f"--heartbeat-interval={self.heartbeat}",
            f"--leader-timeout={self.leader_timeout}",
            f"--instance-timeout={self.instance_timeout}",
            f"--shutdown-grace={self.shutdown_grace}",
        )

    @property
    def failover_bound(self) -> float:
        """How soon after the leader stops a new one must lead, however it stopped: the
        leader timeout plus a renewal (two polls of the followers), and half a second for
        the measurement (7 s with the default timings)."""
        return self.leader_timeout + 2 * self.heartbeat + 0.5


@dataclass
class Counts:
    fires: int = 0
    runs: int = 0
    abandoned: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        return {
            "fires": self.fires,
            "runs": self.runs,
            "abandoned": self.abandoned,
            "duplicates": len(self.duplicates),
            "lost": len(self.lost),
            "stuck": len(self.stuck),
        }


@dataclass
class Case:
    """What a case did: its counts, the failover it measured (None if no leader stopped),
    and what else it saw (named figures)."""

    name: str
    counts: Counts
    failover: float | None = None
    seen: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        failover = None if self.failover is None else round(self.failover, 2)
        return {"case": self.name, **self.counts.figures(), "failover_s": failover, **self.seen}


@dataclass
class _Run:
    execution_id: str
    pid: int
    start: float
    end: float | None = None
    completed: bool = False


class Cluster:
    """Servers on one database of a throwaway PostgreSQL, the jobs they run, and the faults
    done to them."""

    def __init__(self, pg: PostgresServer, workdir: Path, timings: Timings) -> None:
        self.pg = pg
        self.workdir = workdir
        self.timings = timings
        self.database = f"chaos_{os.getpid()}_{time.monotonic_ns()}"
        self.url = pg.url_for(self.database)
        self.ledger = workdir / "ledger.txt"
        self.servers: list[ServerProcess] = []
        self.paused: set[int] = set()
        # Processes killed, by pid: when (their runs ended then).
        self.deaths: dict[int, float] = {}
        self.jobs: dict[str, datetime] = {}

    # -- set-up -----------------------------------------------------------------------------

    async def create(self) -> None:
        conn = await asyncpg.connect(self.pg.dsn)
        try:
            await conn.execute(f"CREATE DATABASE {self.database}")
        finally:
            await conn.close()
        await upgrade(self.url)

    def start(self, count: int, *extra: str) -> list[ServerProcess]:
        """Starts ``count`` servers side by side; returns once each serves."""
        names = itertools.count(len(self.servers))
        started = [
            start_server(
                self.url,
                self.workdir,
                *self.timings.flags(),
                f"--instance-name=node-{next(names)}",
                *extra,
                wait=False,
            )
            for _ in range(count)
        ]
        for server in started:
            wait_serving(server, timeout=60)
        self.servers += started
        return started

    def close(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.process.pid, signal.SIGCONT)
                server.process.kill()
                server.process.wait(10)

    def alive(self) -> list[ServerProcess]:
        return [s for s in self.servers if s.process.poll() is None]

    def stub(self, avoid: ServerProcess | None = None) -> SchedulerServiceStub:
        for server in self.alive():
            if server is not avoid and server.process.pid not in self.paused:
                return server.stub()
        raise AssertionError("no server is alive")

    def create_jobs(
        self, count: int, *, seconds: float, retries: bool, prefix: str = "tick"
    ) -> datetime:
        """Jobs firing every second on the second, from the next whole second but one;
        returns it. Each job is due from its first fire after it was created."""
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        stub = self.stub()
        for n in range(count):
            job_id = f"{prefix}-{n}"
            created = stub.CreateJob(
                pb.CreateJobRequest(job=self.job(job_id, seconds, start, retries))
            ).job
            self.jobs[job_id] = created.next_run_time.ToDatetime(tzinfo=UTC)
        return start

    def job(self, job_id: str, seconds: float, start: datetime, retries: bool) -> jpb.Job:
        args = struct_pb2.Struct()
        args.update({"path": str(self.ledger), "seconds": seconds})
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(start)
        job = jpb.Job(
            id=job_id,
            task=TASK,
            args=args,
            trigger=jpb.Trigger(
                interval=jpb.IntervalTrigger(
                    every=duration_pb2.Duration(seconds=1), start_time=stamp
                )
            ),
            misfire_grace=duration_pb2.Duration(seconds=60),
        )
        if retries:
            job.retry.max_attempts = 3
            job.retry.initial_backoff.FromTimedelta(timedelta(seconds=0.5))
        return job

    # -- who is who -------------------------------------------------------------------------

    def instance_ids(self) -> dict[str, str]:
        """Instance id by address, of every registered instance."""
        listed = self.stub().ListInstances(pb.ListInstancesRequest()).instances
        return {i.address: i.id for i in listed if i.pid}

    def leader(self, avoid: ServerProcess | None = None, within: float = 15) -> ServerProcess:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                listed = self.stub(avoid).ListInstances(pb.ListInstancesRequest()).instances
            except grpc.RpcError:
                listed = []
            for instance in listed:
                if not instance.leader:
                    continue
                for server in self.alive():
                    if server.address == instance.address and server is not avoid:
                        return server
            time.sleep(0.05)
        raise AssertionError(f"no leader within {within} s")

    async def epoch(self) -> int:
        return int(await self.sql("SELECT epoch FROM leadership WHERE id = 1"))

    async def wait_epoch_past(self, epoch: int, within: float) -> float:
        """Seconds until a leader of a later epoch is elected."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                if await self.epoch() > epoch:
                    return time.monotonic() - started
            await asyncio.sleep(0.02)
        raise AssertionError(f"no new leader within {within:.1f} s")

    # -- faults -----------------------------------------------------------------------------

    def kill(self, server: ServerProcess) -> None:
        server.process.kill()
        self.deaths[server.process.pid] = time.time()
        server.process.wait(10)

    def pause(self, server: ServerProcess) -> None:
        os.kill(server.process.pid, signal.SIGSTOP)
        self.paused.add(server.process.pid)

    def resume(self, server: ServerProcess) -> None:
        os.kill(server.process.pid, signal.SIGCONT)
        self.paused.discard(server.process.pid)

    async def fenced_writer(self, instance_id: str, conn: asyncpg.Connection) -> int | None:
        """A backend of the instance inside a fenced (leader's) write, if any."""
        return await _backend(
            conn,
            "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.relation = 'leadership'::regclass AND l.mode = 'RowShareLock' "
            "AND a.application_name = $1 LIMIT 1",
            f"chronoplane {instance_id}",
        )

    async def event_writer(self, instance_id: str, conn: asyncpg.Connection) -> int | None:
        """A backend of the instance between its events and its commit, if any."""
        return await _backend(
            conn,
            "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = $2 AND l.objid = $3 "
            "AND l.granted AND a.application_name = $1 LIMIT 1",
            f"chronoplane {instance_id}",
            *EVENT_WRITERS,
        )

    async def pause_inside(self, server: ServerProcess, find: Finder, *, within: float = 60) -> int:
        """Pauses the server while one of its sessions is where ``find`` looks (and still is,
        once the process has stopped); returns that backend's pid. One connection looks,
        over and over: its queries take a fraction of a millisecond, the window a few."""
        instance_id = self.instance_ids()[server.address]
        deadline = time.monotonic() + within
        conn = await asyncpg.connect(self.pg.dsn_for(self.database), timeout=5)
        try:
            while time.monotonic() < deadline:
                backend = await find(instance_id, conn)
                if backend is None:
                    continue
                self.pause(server)
                if await find(instance_id, conn) == backend:
                    return backend
                self.resume(server)  # it got past there first: try again
        finally:
            await conn.close()
        raise AssertionError(f"never caught {server.address} there within {within} s")

    def health(self, server: ServerProcess) -> int:
        with grpc.insecure_channel(server.address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
            return int(answer.status)

    # -- the database -----------------------------------------------------------------------

    async def sql(self, query: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.pg.dsn_for(self.database), timeout=5)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    async def rows(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.pg.dsn_for(self.database), timeout=5)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    # -- the checker ------------------------------------------------------------------------

    async def stuck(self, older_than: float) -> list[str]:
        """Executions still PENDING or RUNNING ``older_than`` seconds after they were due."""
        rows = await self.rows(
            "SELECT id, state, instance_id FROM executions WHERE state IN ('pending', 'running') "
            "AND due_time < now() - make_interval(secs => $1)",
            older_than,
        )
        return [f"{r['id']} {r['state']} on {r['instance_id'] or 'nobody'}" for r in rows]

    async def count(self, horizon: datetime, stuck: list[str]) -> Counts:
        """Counts over every fire due up to ``horizon``; the servers have stopped (every run
        has ended, been cancelled, or died with its process)."""
        executions = await self.rows(
            "SELECT id, job_id, state, source, scheduled_time, first_execution_id, missed "
            "FROM executions"
        )
        fire_of: dict[str, tuple[str, datetime]] = {}
        for row in executions:
            if row["source"] == "schedule":
                fire_of[row["id"]] = (row["job_id"], row["scheduled_time"])
        for row in executions:
            if row["source"] == "retry" and row["first_execution_id"] in fire_of:
                fire_of[row["id"]] = fire_of[row["first_execution_id"]]
        counts = Counts(stuck=stuck)
        counts.abandoned = sum(row["state"] == "abandoned" for row in executions)
        runs = self._runs()
        counts.runs = len(runs)
        by_fire: dict[tuple[str, datetime], list[_Run]] = defaultdict(list)
        for run in runs:
            if run.execution_id in fire_of:
                by_fire[fire_of[run.execution_id]].append(run)
        for (job_id, scheduled), fire_runs in sorted(by_fire.items()):
            if _twice(fire_runs):
                counts.duplicates.append(f"{job_id} {scheduled.isoformat()}: {fire_runs}")
        covered = _covered(executions)
        for job_id, start in self.jobs.items():
            due = start
            while due <= horizon:
                counts.fires += 1
                if due not in covered[job_id]:
                    counts.lost.append(f"{job_id} {due.isoformat()}")
                due += timedelta(seconds=1)
        return counts

    def _runs(self) -> list[_Run]:
        runs: dict[str, _Run] = {}
        if not self.ledger.exists():
            return []
        for line in self.ledger.read_text().splitlines():
            kind, execution_id, _job, _scheduled, pid, when = line.split()
            if kind == "start":
                runs[execution_id] = _Run(execution_id, int(pid), float(when))
            elif execution_id in runs:
                runs[execution_id].end = float(when)
                runs[execution_id].completed = kind == "end"
        for run in runs.values():
            if run.end is None:  # its process died with it
                run.end = self.deaths.get(run.pid, float("inf"))
        return list(runs.values())

    def stop_all(self) -> None:
        """SIGTERM to every server (SIGCONT first to a paused one), waiting for each."""
        for server in self.alive():
            self.resume(server)
            server.stop(timeout=self.timings.shutdown_grace + 30)


Finder = Callable[[str, asyncpg.Connection], Awaitable[int | None]]


async def _backend(conn: asyncpg.Connection, query: str, *args: Any) -> int | None:
    found = await conn.fetchval(query, *args)
    return None if found is None else int(found)


def _twice(runs: list[_Run]) -> bool:
    for a, b in itertools.combinations(runs, 2):
        assert a.end is not None and b.end is not None
        if a.completed and b.completed:
            return True
        if a.start < b.end and b.start < a.end:
            return True
    return False


def _covered(executions: list[asyncpg.Record]) -> dict[str, set[datetime]]:
    """Each job's fires that have an execution, or are counted in a MISSED record."""
    covered: dict[str, set[datetime]] = defaultdict(set)
    for row in executions:
        if row["source"] != "schedule":
            continue
        covered[row["job_id"]].add(row["scheduled_time"])
        if row["state"] == "missed" and row["missed"]:
            missed = _json(row["missed"])
            first = datetime.fromisoformat(missed["first_time"])
            covered[row["job_id"]].update(
                first + timedelta(seconds=k) for k in range(int(missed["count"]))
            )
    return covered


def _json(value: Any) -> dict[str, Any]:
    import json

    return value if isinstance(value, dict) else dict(json.loads(value))


@contextlib.contextmanager
def cluster_on(pg: PostgresServer, workdir: Path, timings: Timings) -> Iterator[Cluster]:
    cluster = Cluster(pg, workdir, timings)
    asyncio.run(cluster.create())
    try:
        yield cluster
    finally:
        cluster.close()


async def _finish(cluster: Cluster, case: Case, settle: float, run_seconds: float) -> Case:
    """Lets the cluster settle, looks for stuck executions while it runs, stops it, and
    counts."""
    await asyncio.sleep(settle)
    horizon = datetime.now(UTC) - timedelta(seconds=2)
    stuck = await cluster.stuck(older_than=settle + run_seconds + 5)
    cluster.stop_all()
    case.counts = await cluster.count(horizon, stuck)
    return case


# -- the cases ------------------------------------------------------------------------------


async def sigterm_during_long_runs(
    cluster: Cluster, *, jobs: int = 6, long_runs: int = 8, run_seconds: float = 5.0
) -> Case:
    """A rolling restart: SIGTERM to an instance running long runs (shorter than the
    shutdown grace). They finish there; none is ABANDONED or run again elsewhere, the
    instance says it is draining meanwhile, and scheduled fires go on."""
    # Room for every long run on the target, within its share of the three.
    [target] = cluster.start(1, f"--max-running={3 * long_runs}")
    cluster.start(2)
    await asyncio.to_thread(cluster.create_jobs, jobs, seconds=0.2, retries=True)
    stub = target.stub()
    long = cluster.job("long", run_seconds, datetime.now(UTC), retries=True)
    long.max_concurrent, long.paused = 100, True  # run only when triggered
    stub.CreateJob(pb.CreateJobRequest(job=long))
    for n in range(long_runs):
        stub.TriggerJob(pb.TriggerJobRequest(id="long", request_id=f"long-{n}"))
    await asyncio.sleep(1.5)
    target_id = cluster.instance_ids()[target.address]
    running_there = int(
        await cluster.sql(
            "SELECT count(*) FROM executions WHERE state = 'running' AND instance_id = $1",
            target_id,
        )
    )
    target.process.send_signal(signal.SIGTERM)
    draining = await _seen_draining(cluster, target, target_id)
    exit_code = await asyncio.to_thread(target.process.wait, cluster.timings.shutdown_grace + 30)
    long_states = await cluster.rows(
        "SELECT state, count(*) AS n FROM executions WHERE job_id = 'long' GROUP BY state"
    )
    case = Case("sigterm_during_long_runs", Counts())
    case.seen = {
        "running_on_target": running_there,
        "draining_listed": draining,
        "exit_code": exit_code,
        "long_runs": {r["state"]: r["n"] for r in long_states},
    }
    return await _finish(cluster, case, settle=2.0, run_seconds=run_seconds)


async def _seen_draining(cluster: Cluster, server: ServerProcess, instance_id: str) -> bool:
    """Whether ListInstances (through another instance) shows it draining before it exits."""
    other = next(s for s in cluster.alive() if s is not server)
    while server.process.poll() is None:
        listed = other.stub().ListInstances(pb.ListInstancesRequest()).instances
        if any(i.id == instance_id and i.draining for i in listed):
            return True
        await asyncio.sleep(0.05)
    return False


async def database_outage(
    cluster: Cluster, *, jobs: int = 8, outage: float = 20.0, run_seconds: float = 6.0
) -> Case:
    """PostgreSQL stopped for ``outage`` seconds and started again, runs in flight on every
    instance: no run is taken for abandoned (no instance died), fires due meanwhile are run
    or recorded MISSED, health says NOT_SERVING while the database is away and SERVING soon
    after it is back."""
    cluster.start(3, f"--max-running={max(4, jobs // 10)}")  # runs spread over all three
    await asyncio.to_thread(cluster.create_jobs, jobs, seconds=0.3, retries=True)
    await asyncio.to_thread(
        cluster.create_jobs, 3, seconds=run_seconds, retries=True, prefix="long"
    )
    await asyncio.sleep(4)
    await asyncio.to_thread(cluster.pg.halt)
    stopped = time.monotonic()
    await asyncio.sleep(cluster.timings.heartbeat * 3)
    down = [cluster.health(s) for s in cluster.alive()]
    await asyncio.sleep(max(0.0, outage - (time.monotonic() - stopped)))
    await asyncio.to_thread(cluster.pg.resume)
    back = time.monotonic()
    serving_after = await _all_serving(cluster, within=10)
    case = Case("database_outage", Counts())
    case.seen = {
        "health_during": sorted(set(down)),
        "serving_again_s": None if serving_after is None else round(serving_after, 2),
        "resumed_after_s": round(time.monotonic() - back, 2),
    }
    return await _finish(
        cluster,
        case,
        settle=cluster.timings.instance_timeout * 2 + run_seconds + 2,
        run_seconds=run_seconds,
    )


async def _all_serving(cluster: Cluster, within: float) -> float | None:
    """Seconds until every live instance's health says SERVING again."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            if all(
                cluster.health(s) == health_pb2.HealthCheckResponse.SERVING for s in cluster.alive()
            ):
                return time.monotonic() - started
        except grpc.RpcError:
            pass
        await asyncio.sleep(0.05)
    return None


async def leader_session_terminated(
    cluster: Cluster, *, jobs: int = 40, terminations: int = 20
) -> Case:
    """The leader's pooled sessions terminated while they write, again and again: every
    write is retried, no fire is lost, none runs twice."""
    cluster.start(3)
    await asyncio.to_thread(cluster.create_jobs, jobs, seconds=0.2, retries=True)
    await asyncio.sleep(3)
    leader = cluster.leader()
    leader_id = cluster.instance_ids()[leader.address]
    ended = 0
    deadline = time.monotonic() + 120
    conn = await asyncpg.connect(cluster.pg.dsn_for(cluster.database), timeout=5)
    try:
        while ended < terminations and time.monotonic() < deadline:
            backend = await cluster.fenced_writer(leader_id, conn)
            if backend is None:
                continue
            if await conn.fetchval("SELECT pg_terminate_backend($1)", backend):
                ended += 1
                await asyncio.sleep(0.5)  # one incident at a time
    finally:
        await conn.close()
    case = Case("leader_session_terminated", Counts())
    case.seen = {"terminated": ended, "leader_kept": cluster.leader() is leader}
    return await _finish(cluster, case, settle=3.0, run_seconds=0.2)


async def leader_paused_mid_write(cluster: Cluster, *, jobs: int = 40, pause: float = 12.0) -> Case:
    """SIGSTOP of the leader inside a fenced write (it holds the leadership row FOR KEY
    SHARE): a follower leads within the bound anyway; once resumed, the old leader writes
    nothing as leader, stops the runs it had (they were ABANDONED), and follows."""
    cluster.start(3)
    await asyncio.to_thread(cluster.create_jobs, jobs, seconds=0.2, retries=False)
    await asyncio.sleep(3)
    leader = cluster.leader()
    epoch = await cluster.epoch()
    await cluster.pause_inside(leader, cluster.fenced_writer)
    failover = await cluster.wait_epoch_past(epoch, within=cluster.timings.failover_bound + 10)
    await asyncio.sleep(max(0.0, pause - failover))
    cluster.resume(leader)
    case = Case("leader_paused_mid_write", Counts(), failover=failover)
    written = await cluster.sql(
        "SELECT count(*) FROM executions WHERE epoch = $1 AND create_time > now() - "
        "make_interval(secs => $2)",
        epoch,
        pause - failover,
    )
    case.seen = {"old_leader_wrote_as_leader": int(written)}
    return await _finish(
        cluster, case, settle=cluster.timings.instance_timeout + 3, run_seconds=0.2
    )


async def follower_paused_between_append_and_commit(
    cluster: Cluster, *, jobs: int = 40, pause: float = 12.0
) -> Case:
    """SIGSTOP of a follower after it appended events and before it committed: the rest of
    the cluster goes on writing (a TriggerJob through another instance answers at once, the
    leader keeps its leadership), and what the follower held is released once its session
    idles out."""
    # Little room each: the leader runs a few of the fires itself, the followers claim the
    # rest (and write their outcomes).
    cluster.start(3, f"--max-running={max(3, jobs // 10)}")
    await asyncio.to_thread(cluster.create_jobs, jobs, seconds=0.2, retries=False)
    stub = cluster.stub()
    manual = cluster.job("manual", 0.0, datetime.now(UTC), retries=False)
    manual.max_concurrent, manual.paused = 100, True  # run only when triggered
    stub.CreateJob(pb.CreateJobRequest(job=manual))
    await asyncio.sleep(3)
    leader = cluster.leader()
    follower = next(s for s in cluster.alive() if s is not leader)
    epoch = await cluster.epoch()
    await cluster.pause_inside(follower, cluster.event_writer)
    paused_at = time.monotonic()
    other = next(s for s in cluster.alive() if s not in (leader, follower))
    latencies = []
    while time.monotonic() - paused_at < pause:
        started = time.monotonic()
        other.stub().TriggerJob(pb.TriggerJobRequest(id="manual"), timeout=30)
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.25)
    cluster.resume(follower)
    case = Case("follower_paused_between_append_and_commit", Counts())
    case.seen = {
        "trigger_max_s": round(max(latencies), 3),
        "leader_kept": await cluster.epoch() == epoch,
    }
    cluster.jobs.pop("manual", None)
    return await _finish(
        cluster, case, settle=cluster.timings.instance_timeout + 3, run_seconds=0.2
    )


async def leader_killed(cluster: Cluster, *, jobs: int = 40) -> Case:
    """kill -9 of the leader while it writes and runs: a follower leads within the bound,
    the dead leader's runs are ABANDONED, no fire is lost."""
    cluster.start(3)
    await asyncio.to_thread(cluster.create_jobs, jobs, seconds=0.3, retries=False)
    await asyncio.sleep(3)
    leader = cluster.leader()
    epoch = await cluster.epoch()
    cluster.kill(leader)
    failover = await cluster.wait_epoch_past(epoch, within=cluster.timings.failover_bound + 10)
    case = Case("leader_killed", Counts(), failover=failover)
    return await _finish(
        cluster, case, settle=cluster.timings.instance_timeout + 4, run_seconds=0.3
    )


CASES: dict[str, Callable[..., Coroutine[Any, Any, Case]]] = {
    "sigterm_during_long_runs": sigterm_during_long_runs,
    "database_outage": database_outage,
    "leader_session_terminated": leader_session_terminated,
    "leader_paused_mid_write": leader_paused_mid_write,
    "follower_paused_between_append_and_commit": follower_paused_between_append_and_commit,
    "leader_killed": leader_killed,
}
