"""API calls: how fast a real ``chronoplane serve`` answers reads and writes, against a
trivial grpc.aio server measured in the same run.

A fresh PostgreSQL database is migrated (``chronoplane migrate``) and filled directly with
SQL (generate_series): N paused jobs (``--jobs``, default 100,000) and M finished executions
(``--executions``, default 1,000,000) spread over the last 25 days, a tenth of them one job's
(``j000000``, for deep pages within one job), the others spread over every job; states mostly
SUCCEEDED, then FAILED, MISSED, SKIPPED, INTERRUPTED and a few TIMED_OUT. Then, in their own
processes, a Chronoplane server (``--require-auth``: every call carries an admin bearer token,
so the authentication, audit and error interceptors all run) and a trivial echo server (this
file, ``--echo-server``: a unary GetJob that answers with the id it was asked, no work).

Figures, one JSON line each on stdout (``"bench": "api"``), a table on stderr:

* ``calls_per_s``, ``latency_p50_ms``, ``latency_p99_ms`` of GetJob (a random job each call)
  and of the echo server, at 64 calls in flight and at 1; ``ratio_to_echo`` (calls/s of
  GetJob over the echo server's at the same number in flight); ``server_cpu_us_per_call``
  (the server process's CPU time, from /proc, over the calls it answered).
* ``interceptor_cpu_share``: GetJob's server CPU per call with every interceptor, and with
  none (a second server process started with ``--bare-server``, where grpc.aio.server is
  given no interceptors); the share is (with - without) / with.
* ``latency_p50_ms`` / ``latency_p99_ms`` of pages of 100 of ListJobs and of ListExecutions
  per filter (``"list"``, ``"filter"``), one call at a time, from the first page to pages
  deep in the list (page tokens minted with the server's key, at positions spread over the
  whole result).
* ``calls_per_s`` and ``ratio_to_echo`` of CreateJob, UpdateJob, PauseJob, TriggerJob and
  DeleteJob at 64 in flight (on jobs the bench creates).

Run it (PostgreSQL: the local server, trust auth, or ``--postgres-url`` /
CHRONOPLANE_BENCH_POSTGRES_URL naming a maintenance database of a role that may CREATE
DATABASE)::

    .venv/bin/python bench/api.py
    .venv/bin/python bench/api.py --quick          # 2,000 jobs, 20,000 executions, 2 s each
    .venv/bin/python bench/api.py --only bare --serve-arg=--metrics-address=127.0.0.1:0
                                                   # what the interceptors cost, metrics on
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from fire_throughput import (
    _maintenance_dsn,
    _server_command,
    _stop_process,
    _timestamp,
    _wait_serving,
    note,
    percentile,
    postgres_database,
)
from google.protobuf import duration_pb2, field_mask_pb2
from sqlalchemy.engine import make_url

from chronoplane.server.pagination import PageTokens
from chronoplane.server.security import hash_secret, new_token
from chronoplane.v1 import execution_pb2, job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

BENCH = "api"
CONCURRENCY = 64
PAGE = 100
HOT_JOB = "j000000"
SPAN = timedelta(days=25)
RPC_TIMEOUT = 60.0
WRITES = ("CreateJob", "UpdateJob", "PauseJob", "TriggerJob", "DeleteJob")


def emit(figure: str, value: Any, unit: str, **extra: Any) -> None:
    if isinstance(value, float):
        value = round(value, 4)
    line = {"bench": BENCH, **extra, "figure": figure, "value": value, "unit": unit}
    print(json.dumps(line), flush=True)


# -- the echo server --------------------------------------------------------------------------


async def _echo(request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
    return pb.GetJobResponse(job=job_pb2.Job(id=request.id))


async def _serve_echo() -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "chronoplane.v1.SchedulerService",
        {
            "GetJob": grpc.unary_unary_rpc_method_handler(
                _echo,
                request_deserializer=pb.GetJobRequest.FromString,
                response_serializer=pb.GetJobResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def _serve_bare(argv: list[str]) -> int:
    """``chronoplane serve`` with no interceptor at all (to measure what they cost)."""
    real = grpc.aio.server

    def bare(*args: Any, **kwargs: Any) -> Any:
        kwargs["interceptors"] = []
        return real(*args, **kwargs)

    grpc.aio.server = bare
    from chronoplane.server.cli import main

    return main(argv)


# -- processes --------------------------------------------------------------------------------


@dataclass
class Process:
    process: asyncio.subprocess.Process
    address: str

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def started(command: list[str], log_path: Path) -> AsyncIterator[Process]:
    with log_path.open("w") as log_file:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        address = await _wait_serving(process, log_path)
        note(f"pid {process.pid} serving on {address} ({log_path.name})")
        yield Process(process, address)
    finally:
        await _stop_process(process)


def _serve_arguments(database_url: str) -> list[str]:
    return [
        "serve",
        "--address",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--require-auth",
        "--history-max-age-days",
        "0",
        "--shutdown-grace",
        "2",
    ]


# -- the world --------------------------------------------------------------------------------

_JOBS_SQL = """
INSERT INTO jobs (id, display_name, description, task, args, trigger, paused,
    misfire_grace_seconds, max_concurrent, labels, misfire_policy, catchup_window_seconds,
    catchup_limit, overlap_policy, retry, timeout_seconds, history_limit, version, request_id,
    create_time, update_time, next_run_time, created_by, updated_by, executor, celery)
SELECT 'j' || lpad(g::text, 6, '0'), 'job ' || g, 'a job of the bench', 'chronoplane.echo',
    '{"n": 1}'::json,
    '{"interval": {"every_seconds": 3600.0, "start_time": null, "end_time": null}}'::json,
    true, 60, 1, json_build_object('team', 't' || (g % 10)), 'run_once', NULL, 10, 'skip',
    NULL, NULL, 0, 1, NULL, now() - interval '30 days', now() - interval '30 days', NULL,
    'bench', 'bench', 'inline', NULL
FROM generate_series(0, $1::int - 1) AS g
"""

# Execution g is made at start + g * step; every tenth is the hot job's.
_EXECUTIONS_SQL = """
INSERT INTO executions (id, job_id, state, source, dedupe_key, scheduled_time, create_time,
    start_time, end_time, task, args, result, error_message, error_traceback, instance_id,
    request_id, attempt, first_execution_id, error_type, missed, note, due_time, ready,
    holds_slot, force, cancel_reason, epoch, triggered_by, cancelled_by, executor,
    celery_task_id, worker, pending_reason, dispatch_time, lease_expire_time, created_late)
SELECT lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0')
        || lpad(to_hex(g::bigint), 16, '0'),
    CASE WHEN g % 10 = 0 THEN 'j000000'
        ELSE 'j' || lpad((1 + (g::bigint * 7919) % ($1::bigint - 1))::text, 6, '0') END,
    s, 'schedule', 's:' || g, t, t + interval '5 ms', t + interval '10 ms',
    t + interval '20 ms', 'chronoplane.echo', '{"n": 1}'::json,
    CASE WHEN s = 'succeeded' THEN '{"n": 1}'::json END,
    CASE WHEN s = 'failed' THEN 'boom' ELSE '' END, '', 'inst-bench', NULL, 1, NULL,
    CASE WHEN s = 'failed' THEN 'RuntimeError' ELSE '' END, NULL, '', t, false, false, false,
    NULL, NULL, 'system:schedule', '', 'inline', NULL, '', '', NULL, NULL, false
FROM (
    SELECT g, $2::timestamptz + (g * $3::double precision) * interval '1 second' AS t,
        CASE WHEN g % 1000 = 999 THEN 'timed_out' WHEN g % 100 = 99 THEN 'interrupted'
            WHEN g % 100 = 98 THEN 'skipped' WHEN g % 100 >= 95 THEN 'missed'
            WHEN g % 100 >= 85 THEN 'failed' ELSE 'succeeded' END AS s
    FROM generate_series($4::bigint, $5::bigint - 1) AS g
) AS x
"""


@dataclass
class World:
    dsn: str
    url: str
    jobs: int
    executions: int
    start: datetime
    token: str = ""
    key: bytes = b""

    def time_at(self, fraction: float) -> datetime:
        """The scheduled time ``fraction`` of the way through the history, whole seconds."""
        moment = self.start + SPAN * fraction
        return moment.replace(microsecond=0)


async def fill(world: World) -> None:
    conn: Any = await asyncpg.connect(world.dsn)
    try:
        began = time.monotonic()
        await conn.execute(_JOBS_SQL, world.jobs)
        step = SPAN.total_seconds() / max(1, world.executions)
        chunk = 200_000
        for first in range(0, world.executions, chunk):
            last = min(world.executions, first + chunk)
            await conn.execute(_EXECUTIONS_SQL, world.jobs, world.start, step, first, last)
            note(f"inserted {last:,}/{world.executions:,} executions")
        await conn.execute("VACUUM ANALYZE jobs")
        await conn.execute("VACUUM ANALYZE executions")
        note(
            f"filled {world.jobs:,} jobs, {world.executions:,} executions in "
            f"{time.monotonic() - began:.0f} s"
        )
        token_id, secret, world.token = new_token()
        await conn.execute(
            "INSERT INTO tokens (id, name, role, secret_hash, create_time) "
            "VALUES ($1, 'bench', 'admin', $2, now())",
            token_id,
            hash_secret(secret),
        )
    finally:
        await conn.close()


async def read_key(world: World) -> None:
    conn: Any = await asyncpg.connect(world.dsn)
    try:
        world.key = await conn.fetchval("SELECT value FROM secrets WHERE name = 'page_tokens'")
    finally:
        await conn.close()


# -- load -------------------------------------------------------------------------------------


@dataclass
class Run:
    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def p(self, fraction: float) -> float:
        return (percentile(sorted(self.latencies), fraction) or 0.0) * 1000


async def load(
    call: Callable[[int], Awaitable[object]],
    *,
    in_flight: int,
    seconds: float,
    server: Process | None = None,
    limit: int | None = None,
    warm: float = 0.5,
) -> Run:
    """Calls ``call(n)`` from ``in_flight`` tasks for ``seconds`` (after ``warm`` seconds
    not counted), or until ``limit`` calls were made."""
    run = Run()
    counter = iter(range(limit if limit is not None else 1 << 62))
    recording = False
    deadline = time.monotonic() + warm + seconds

    async def worker() -> None:
        for n in counter:
            if time.monotonic() >= deadline:
                return
            began = time.perf_counter()
            await call(n)
            if recording:
                run.latencies.append(time.perf_counter() - began)

    tasks = [asyncio.create_task(worker()) for _ in range(in_flight)]
    if warm:
        await asyncio.sleep(warm)
    recording = True
    cpu0 = server.cpu_seconds() if server else 0.0
    began = time.monotonic()
    await asyncio.gather(*tasks)
    run.seconds = time.monotonic() - began
    run.cpu = (server.cpu_seconds() - cpu0) if server else 0.0
    run.calls = len(run.latencies)
    return run


@dataclass
class Table:
    rows: list[tuple[str, ...]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append(tuple(f"{c:,.1f}" if isinstance(c, float) else str(c) for c in cells))

    def print(self) -> None:
        widths = [max(len(r[i]) for r in self.rows if len(r) > i) for i in range(len(self.rows[0]))]
        for row in self.rows:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)), file=sys.stderr)


def _report(rpc: str, in_flight: int, run: Run, echo: Run | None, table: Table) -> None:
    extra = {"rpc": rpc, "in_flight": in_flight}
    emit("calls_per_s", run.rate, "1/s", **extra)
    emit("latency_p50_ms", run.p(0.5), "ms", **extra)
    emit("latency_p99_ms", run.p(0.99), "ms", **extra)
    ratio = run.rate / echo.rate if echo and echo.rate else None
    if ratio is not None:
        emit("ratio_to_echo", ratio, "", **extra)
    cpu = run.cpu / run.calls * 1e6 if run.calls and run.cpu else None
    if cpu is not None:
        emit("server_cpu_us_per_call", cpu, "us", **extra)
    table.add(
        rpc,
        in_flight,
        run.rate,
        run.p(0.5),
        run.p(0.99),
        f"{ratio:.2f}" if ratio is not None else "-",
        f"{cpu:,.0f}" if cpu is not None else "-",
    )


def _metadata(world: World) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {world.token}"),)


async def unary_figures(
    world: World, chrono: Process, echo: Process, seconds: float, table: Table
) -> dict[int, Run]:
    """GetJob and echo at 64 and at 1 in flight, interleaved; returns the echo runs."""
    echoes: dict[int, Run] = {}
    meta = _metadata(world)
    async with (
        grpc.aio.insecure_channel(chrono.address) as chrono_channel,
        grpc.aio.insecure_channel(echo.address) as echo_channel,
    ):
        real = pb_grpc.SchedulerServiceStub(chrono_channel)
        trivial = pb_grpc.SchedulerServiceStub(echo_channel)
        ids = [f"j{n:06d}" for n in range(world.jobs)]

        async def get(_: int) -> None:
            await real.GetJob(pb.GetJobRequest(id=random.choice(ids)), metadata=meta)

        async def echo_call(_: int) -> None:
            await trivial.GetJob(pb.GetJobRequest(id=random.choice(ids)), metadata=meta)

        for in_flight in (CONCURRENCY, 1):
            echoes[in_flight] = await load(
                echo_call, in_flight=in_flight, seconds=seconds, server=echo
            )
            run = await load(get, in_flight=in_flight, seconds=seconds, server=chrono)
            _report("echo", in_flight, echoes[in_flight], None, table)
            _report("GetJob", in_flight, run, echoes[in_flight], table)
    return echoes


async def get_job_cpu(world: World, server: Process, seconds: float) -> Run:
    meta = _metadata(world)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.SchedulerServiceStub(channel)
        ids = [f"j{n:06d}" for n in range(world.jobs)]

        async def get(_: int) -> None:
            await stub.GetJob(pb.GetJobRequest(id=random.choice(ids)), metadata=meta)

        return await load(get, in_flight=CONCURRENCY, seconds=seconds, server=server)


# -- lists ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    name: str
    request: pb.ListExecutionsRequest | pb.ListJobsRequest
    where: str  # the same filter in SQL, to find positions deep in the list


def listings(world: World) -> list[Listing]:
    ex = execution_pb2
    recent, old = world.time_at(0.96), world.time_at(0.2)
    window = (world.time_at(0.5), world.time_at(0.54))
    some_job = f"j{world.jobs // 2:06d}"

    def times(after: datetime | None = None, before: datetime | None = None) -> dict[str, Any]:
        given: dict[str, Any] = {}
        if after is not None:
            given["scheduled_after"] = _timestamp(after)
        if before is not None:
            given["scheduled_before"] = _timestamp(before)
        return given

    def sql_time(after: datetime | None = None, before: datetime | None = None) -> str:
        parts = []
        if after is not None:
            parts.append(f"scheduled_time >= '{after.isoformat()}'")
        if before is not None:
            parts.append(f"scheduled_time < '{before.isoformat()}'")
        return " AND ".join(parts)

    def ls(name: str, where: str, **fields: Any) -> Listing:
        return Listing(name, pb.ListExecutionsRequest(page_size=PAGE, **fields), where)

    failed, timed_out = ex.EXECUTION_STATE_FAILED, ex.EXECUTION_STATE_TIMED_OUT
    running, succeeded = ex.EXECUTION_STATE_RUNNING, ex.EXECUTION_STATE_SUCCEEDED
    return [
        Listing("jobs", pb.ListJobsRequest(page_size=PAGE), "true"),
        ls("all", "true"),
        ls("job", f"job_id = '{some_job}'", job_id=some_job),
        ls("hot_job", f"job_id = '{HOT_JOB}'", job_id=HOT_JOB),
        ls("state_failed", "state = 'failed'", states=[failed]),
        ls("state_timed_out", "state = 'timed_out'", states=[timed_out]),
        ls("state_running", "state = 'running'", states=[running]),
        ls(
            "states_failed_timed_out",
            "state IN ('failed', 'timed_out')",
            states=[failed, timed_out],
        ),
        ls(
            "hot_job_failed",
            f"job_id = '{HOT_JOB}' AND state = 'failed'",
            job_id=HOT_JOB,
            states=[failed],
        ),
        ls(
            "hot_job_timed_out",
            f"job_id = '{HOT_JOB}' AND state = 'timed_out'",
            job_id=HOT_JOB,
            states=[timed_out],
        ),
        ls("after_recent", sql_time(after=recent), **times(after=recent)),
        ls("before_old", sql_time(before=old), **times(before=old)),
        ls("window", sql_time(*window), **times(*window)),
        ls(
            "hot_job_window",
            f"job_id = '{HOT_JOB}' AND {sql_time(*window)}",
            job_id=HOT_JOB,
            **times(*window),
        ),
        ls(
            "failed_window",
            f"state = 'failed' AND {sql_time(*window)}",
            states=[failed],
            **times(*window),
        ),
        ls(
            "succeeded_before_old",
            f"state = 'succeeded' AND {sql_time(before=old)}",
            states=[succeeded],
            **times(before=old),
        ),
    ]


def _fingerprint(request: pb.ListExecutionsRequest) -> list[Any]:
    """What the server signs into an executions page token (service.list_executions)."""
    states = sorted(
        execution_pb2.ExecutionState.Name(s).removeprefix("EXECUTION_STATE_").lower()
        for s in request.states
    )

    after = request.scheduled_after if request.HasField("scheduled_after") else None
    before = request.scheduled_before if request.HasField("scheduled_before") else None
    times = [
        t.ToDatetime(tzinfo=UTC).isoformat() if t is not None else None for t in (after, before)
    ]
    return [request.job_id or None, states, *times]


async def page_tokens(world: World, listing: Listing, count: int) -> list[str]:
    """Tokens of ``count`` pages spread over the whole list (the first page: "")."""
    table = "jobs" if listing.name == "jobs" else "executions"
    order = "id" if listing.name == "jobs" else "id DESC"
    conn: Any = await asyncpg.connect(world.dsn)
    try:
        total = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {listing.where}")
        offsets = sorted({int(total * k / count) for k in range(1, count)} - {0})
        positions = [
            await conn.fetchval(
                f"SELECT id FROM {table} WHERE {listing.where} ORDER BY {order} "
                f"OFFSET {offset - 1} LIMIT 1"
            )
            for offset in offsets
        ]
    finally:
        await conn.close()
    signer = PageTokens(world.key)
    if listing.name == "jobs":
        minted = [signer.encode("jobs", p, None) for p in positions if p]
    else:
        assert isinstance(listing.request, pb.ListExecutionsRequest)
        query = _fingerprint(listing.request)
        minted = [signer.encode("executions", p, query) for p in positions if p]
    return ["", *minted]


async def list_figures(
    world: World, chrono: Process, calls: int, table: Table, only: set[str] | None = None
) -> None:
    meta = _metadata(world)
    async with grpc.aio.insecure_channel(chrono.address) as channel:
        stub = pb_grpc.SchedulerServiceStub(channel)
        for listing in listings(world):
            if only and listing.name not in only:
                continue
            tokens = await page_tokens(world, listing, 20)
            method = stub.ListJobs if listing.name == "jobs" else stub.ListExecutions
            items = "jobs" if listing.name == "jobs" else "executions"
            sizes: list[int] = []

            async def page(
                n: int,
                tokens: list[str] = tokens,
                method: Any = method,
                listing: Listing = listing,
                sizes: list[int] = sizes,
                items: str = items,
            ) -> None:
                request: Any = type(listing.request)()
                request.MergeFrom(listing.request)
                request.page_token = tokens[n % len(tokens)]
                response = await method(request, metadata=meta, timeout=RPC_TIMEOUT)
                sizes.append(len(getattr(response, items)))

            run = await load(page, in_flight=1, seconds=3600, limit=calls, warm=0)
            extra = {
                "list": "ListJobs" if listing.name == "jobs" else "ListExecutions",
                "filter": listing.name,
                "pages": len(tokens),
            }
            emit("latency_p50_ms", run.p(0.5), "ms", **extra)
            emit("latency_p99_ms", run.p(0.99), "ms", **extra)
            emit("latency_max_ms", run.p(1.0), "ms", **extra)
            table.add(
                extra["list"],
                listing.name,
                len(tokens),
                run.p(0.5),
                run.p(0.99),
                run.p(1.0),
                f"{sum(sizes) / max(1, len(sizes)):.0f}",
            )


# -- writes -----------------------------------------------------------------------------------


async def write_figures(
    world: World, chrono: Process, echo: Run, seconds: float, table: Table
) -> None:
    meta = _metadata(world)
    tag = f"w{int(time.time()) % 100000}"
    async with grpc.aio.insecure_channel(chrono.address) as channel:
        stub = pb_grpc.SchedulerServiceStub(channel)
        trigger = job_pb2.Trigger(
            interval=job_pb2.IntervalTrigger(every=duration_pb2.Duration(seconds=3600))
        )

        async def create(n: int) -> None:
            job = job_pb2.Job(id=f"{tag}-{n:07d}", task="chronoplane.echo", trigger=trigger)
            await stub.CreateJob(pb.CreateJobRequest(job=job), metadata=meta)

        run = await load(create, in_flight=CONCURRENCY, seconds=seconds, server=chrono, warm=0)
        _report("CreateJob", CONCURRENCY, run, echo, table)
        made = [f"{tag}-{n:07d}" for n in range(run.calls)]
        mask = field_mask_pb2.FieldMask(paths=["description"])

        async def update(n: int) -> None:
            job = job_pb2.Job(id=made[n % len(made)], description=f"changed {n}")
            await stub.UpdateJob(pb.UpdateJobRequest(job=job, update_mask=mask), metadata=meta)

        async def pause(n: int) -> None:
            await stub.PauseJob(pb.PauseJobRequest(id=made[n]), metadata=meta)

        async def trigger_job(n: int) -> None:
            await stub.TriggerJob(pb.TriggerJobRequest(id=made[n % len(made)]), metadata=meta)

        async def delete(n: int) -> None:
            await stub.DeleteJob(pb.DeleteJobRequest(id=made[n]), metadata=meta)

        for name, call, limit in (
            ("UpdateJob", update, None),
            ("PauseJob", pause, len(made)),
            ("TriggerJob", trigger_job, None),
            ("DeleteJob", delete, len(made)),
        ):
            run = await load(
                call, in_flight=CONCURRENCY, seconds=seconds, server=chrono, limit=limit, warm=0
            )
            _report(name, CONCURRENCY, run, echo, table)


# -- main -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--executions", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput figure")
    parser.add_argument("--list-calls", type=int, default=100, help="pages per list filter")
    parser.add_argument("--quick", action="store_true", help="a small world, short runs")
    parser.add_argument("--postgres-url", help="maintenance database URL")
    parser.add_argument(
        "--database-url",
        help="use this database and keep it: filled unless an earlier run filled it",
    )
    parser.add_argument("--only", default="unary,bare,lists,writes", help="which parts")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="a flag for the measured server, e.g. --serve-arg=--metrics-address=127.0.0.1:0",
    )
    parser.add_argument("--filters", default="", help="comma-separated list filters to run")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    return parser


async def _measure(args: argparse.Namespace, world: World, workdir: Path) -> None:
    url = world.url
    parts = set(args.only.split(","))
    unary, lists = Table(), Table()
    unary.add("rpc", "in flight", "calls/s", "p50 ms", "p99 ms", "to echo", "server us/call")
    lists.add("list", "filter", "pages", "p50 ms", "p99 ms", "max ms", "items")
    echo_command = [sys.executable, __file__, "--echo-server"]
    async with (
        started(echo_command, workdir / "echo.log") as echo,
        started(
            [*_server_command(), *_serve_arguments(url), *args.serve_arg], workdir / "server.log"
        ) as chrono,
    ):
        await read_key(world)
        echoes: dict[int, Run] = {}
        if parts & {"unary", "writes"}:
            echoes = await unary_figures(world, chrono, echo, args.seconds, unary)
        if "bare" in parts:
            await interceptor_figures(world, chrono, url, workdir, args.seconds, unary)
        if "lists" in parts:
            only = set(filter(None, args.filters.split(","))) or None
            await list_figures(world, chrono, args.list_calls, lists, only)
        if "writes" in parts:
            await write_figures(world, chrono, echoes[CONCURRENCY], args.seconds, unary)
    print(file=sys.stderr)
    if len(unary.rows) > 1:
        unary.print()
        print(file=sys.stderr)
    if len(lists.rows) > 1:
        lists.print()


async def interceptor_figures(
    world: World, chrono: Process, url: str, workdir: Path, seconds: float, table: Table
) -> None:
    """GetJob's server CPU per call with every interceptor and with none: a second server
    (``--bare-server``) beside the first, measured in turns, three each."""
    bare = [sys.executable, __file__, "--bare-server", "--", *_serve_arguments(url)]
    with_all, without = Run(), Run()
    async with started(bare, workdir / "bare.log") as plain:
        for _ in range(3):
            for total, server in ((with_all, chrono), (without, plain)):
                run = await get_job_cpu(world, server, seconds / 2)
                total.calls += run.calls
                total.cpu += run.cpu
                total.seconds += run.seconds
                total.latencies += run.latencies
    cpu_with = with_all.cpu / max(1, with_all.calls) * 1e6
    cpu_without = without.cpu / max(1, without.calls) * 1e6
    share = (cpu_with - cpu_without) / cpu_with if cpu_with else 0.0
    emit("server_cpu_us_per_call", cpu_with, "us", rpc="GetJob", interceptors="all")
    emit("server_cpu_us_per_call", cpu_without, "us", rpc="GetJob", interceptors="none")
    emit("interceptor_cpu_share", share, "", rpc="GetJob")
    for name, run, cpu in (("all", with_all, cpu_with), ("no", without, cpu_without)):
        table.add(
            f"GetJob ({name} interceptors)",
            CONCURRENCY,
            run.rate,
            run.p(0.5),
            run.p(0.99),
            "-",
            f"{cpu:,.0f}",
        )
    table.add("interceptor share of GetJob CPU", "", "", "", "", "", f"{share:.0%}")


async def _main(args: argparse.Namespace) -> int:
    if args.quick:
        args.jobs, args.executions, args.seconds = 2_000, 20_000, 2.0
        args.list_calls = min(args.list_calls, 40)
    with tempfile.TemporaryDirectory(prefix="chronoplane-bench-api-") as tmp:
        workdir = Path(tmp)
        if args.database_url:
            await _measure(args, await _prepare(args, args.database_url, keep=True), workdir)
            return 0
        async with postgres_database(_maintenance_dsn(args.postgres_url)) as url:
            await _measure(args, await _prepare(args, url, keep=False), workdir)
    return 0


async def _prepare(args: argparse.Namespace, url: str, *, keep: bool) -> World:
    """Migrates and fills the database at ``url``; one filled before (``keep``) is reused."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
    start = (datetime.now(UTC) - SPAN - timedelta(hours=1)).replace(microsecond=0)
    world = World(dsn, url, args.jobs, args.executions, start)
    migrate = await asyncio.create_subprocess_exec(
        *_server_command(),
        "migrate",
        "--database-url",
        url,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if await migrate.wait() != 0:
        raise RuntimeError("chronoplane migrate failed")
    if keep and await _restore_world(world):
        note(f"reusing {world.jobs:,} jobs and {world.executions:,} executions")
    else:
        await fill(world)
    return world


async def _restore_world(world: World) -> bool:
    """A database filled by an earlier run: its size and times, and a fresh token."""
    conn: Any = await asyncpg.connect(world.dsn)
    try:
        jobs = await conn.fetchval("SELECT count(*) FROM jobs WHERE id LIKE 'j______'")
        if not jobs:
            return False
        world.jobs = jobs
        first = await conn.fetchval("SELECT min(scheduled_time) FROM executions")
        world.executions = await conn.fetchval("SELECT count(*) FROM executions")
        world.start = first.replace(microsecond=0)
        token_id, secret, world.token = new_token()
        await conn.execute(
            "INSERT INTO tokens (id, name, role, secret_hash, create_time) "
            "VALUES ($1, $2, 'admin', $3, now())",
            token_id,
            f"bench-{token_id}",
            hash_secret(secret),
        )
    finally:
        await conn.close()
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--echo-server"]:
        asyncio.run(_serve_echo())
        return 0
    if argv[:2] == ["--bare-server", "--"]:
        return _serve_bare(argv[2:])
    return asyncio.run(_main(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
