"""Scale: one ``chronoplane serve`` over a world of 100,000 jobs, against its peers in one run.

The world is built through the API, with BatchCreateJobs (batches of 1,000, 4 calls in
flight) on a fresh PostgreSQL database: six jobs in ten are cron jobs in ten time zones
(hourly, daily, on weekdays, monthly, at random minutes), three in ten intervals (5 min to a
day, random phases), one in ten a one-shot date within 30 days. Then:

* ``single``: CreateJob at 64 calls in flight (``--single`` jobs more);
* ``restart``: the server is stopped (SIGTERM) and started again: seconds from starting the
  process to serving, with every job due within the schedule horizon scheduled (the server
  serves once its schedule is loaded), and its resident memory;
* ``probe``: a job firing every second is created, and its runs' lateness (start -
  scheduled) measured over ``--probe-seconds`` while the world fires around it;
* ``reads``: GetJob at 64 calls in flight (a random job each call), and ListJobs pages of 100
  one at a time, from the first page to deep ones;
* peers, in the same run: a trivial grpc.aio server (``bench/api.py --echo-server``) at 64 in
  flight, and APScheduler 3's ``SQLAlchemyJobStore`` adding ``--aps-jobs`` date jobs to the
  same PostgreSQL (psycopg 3, a paused scheduler), with the ratios.

Throughout, the server's log is watched: ``lost_leaderships`` (must be 0) counts its
"stops leading" lines other than the one of its own stop; ``stalls`` its event-loop stall
warnings (and the longest).

Output: one JSON line per figure on stdout (``"bench": "scale"``), a table on stderr::

    .venv/bin/python bench/scale.py                      # 100,000 jobs
    .venv/bin/python bench/scale.py --jobs 1000000        # the big world (about 10 minutes)
    .venv/bin/python bench/scale.py --jobs 5000 --probe-seconds 10 --aps-jobs 500   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import api
import grpc
from fire_throughput import (
    _maintenance_dsn,
    _peak_rss_mb,
    _status_mb,
    _timestamp,
    note,
    percentile,
    postgres_database,
    run_concurrently,
    running_server,
)
from google.protobuf import duration_pb2
from sqlalchemy.engine import make_url

from chronoplane.v1 import job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

BENCH = "scale"
BATCH = 1_000
BATCHES_IN_FLIGHT = 4
IN_FLIGHT = 64
RPC_TIMEOUT = 120.0
ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Tokyo",
    "Australia/Sydney",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Europe/London",
    "America/Los_Angeles",
    "Africa/Johannesburg",
)
INTERVALS = (300, 900, 3600, 21_600, 86_400)
ROWS: list[tuple[str, str, str]] = []


def emit(scenario: str, figure: str, value: float | int | None, unit: str) -> None:
    if isinstance(value, float):
        value = round(value, 3)
    line = {"bench": BENCH, "scenario": scenario, "figure": figure, "value": value, "unit": unit}
    print(json.dumps(line), flush=True)
    ROWS.append((scenario, figure, f"{value} {unit}"))


# -- the world ------------------------------------------------------------------------------------


def _cron(n: int, rng: random.Random) -> job_pb2.Trigger:
    minute, hour = rng.randrange(60), rng.randrange(24)
    expression = (
        f"{minute} * * * *",
        f"{minute} {hour} * * *",
        f"{minute} {hour} * * 1-5",
        f"{minute} {hour} 1 * *",
    )[n % 4]
    return job_pb2.Trigger(
        cron=job_pb2.CronTrigger(expression=expression, time_zone=ZONES[n // 4 % len(ZONES)])
    )


def world_job(n: int, rng: random.Random, now: datetime) -> job_pb2.Job:
    kind = n % 10
    if kind < 6:
        trigger = _cron(n, rng)
    elif kind < 9:
        every = rng.choice(INTERVALS)
        trigger = job_pb2.Trigger(
            interval=job_pb2.IntervalTrigger(
                every=duration_pb2.Duration(seconds=every),
                start_time=_timestamp(now + timedelta(seconds=rng.uniform(60, every + 60))),
            )
        )
    else:
        when = now + timedelta(seconds=rng.uniform(3_600, 30 * 86_400))
        trigger = job_pb2.Trigger(date=job_pb2.DateTrigger(run_time=_timestamp(when)))
    return job_pb2.Job(id=f"w{n:07d}", task="chronoplane.echo", trigger=trigger)


async def build_world(stub: Any, count: int) -> float:
    """Creates the world with BatchCreateJobs; returns jobs/s."""
    rng, now = random.Random(15), datetime.now(UTC)
    batches = [range(start, min(start + BATCH, count)) for start in range(0, count, BATCH)]
    done = 0

    async def create(numbers: range) -> None:
        nonlocal done
        requests = [pb.CreateJobRequest(job=world_job(n, rng, now)) for n in numbers]
        await stub.BatchCreateJobs(
            pb.BatchCreateJobsRequest(requests=requests), timeout=RPC_TIMEOUT
        )
        done += len(numbers)
        if done % (BATCH * 20) == 0:
            note(f"created {done:,}/{count:,} jobs")

    began = time.monotonic()
    await run_concurrently(batches, create, BATCHES_IN_FLIGHT)
    return count / (time.monotonic() - began)


async def single_creates(stub: Any, count: int) -> float:
    far = _timestamp(datetime.now(UTC) + timedelta(days=2))
    trigger = job_pb2.Trigger(date=job_pb2.DateTrigger(run_time=far))

    async def create(n: int) -> None:
        job = job_pb2.Job(id=f"single-{n:06d}", task="chronoplane.echo", trigger=trigger)
        await stub.CreateJob(pb.CreateJobRequest(job=job), timeout=RPC_TIMEOUT)

    began = time.monotonic()
    await run_concurrently(range(count), create, IN_FLIGHT)
    return count / (time.monotonic() - began)


# -- peers ----------------------------------------------------------------------------------------


def _aps_noop() -> None:
    """The job function APScheduler stores (by reference); never called."""


def aps_add_rate(database_url: str, count: int) -> float:
    """APScheduler 3's SQLAlchemyJobStore on the same PostgreSQL: date jobs added per
    second to a paused scheduler (as in shared/research/perf-baseline.md)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    url = make_url(database_url).set(drivername="postgresql+psycopg")
    store = SQLAlchemyJobStore(url=url.render_as_string(hide_password=False))
    scheduler = BackgroundScheduler(jobstores={"default": store}, timezone=UTC)
    scheduler.start(paused=True)
    run_date = datetime.now(UTC) + timedelta(days=1)
    try:
        began = time.perf_counter()
        for n in range(count):
            scheduler.add_job(_aps_noop, "date", run_date=run_date, id=f"aps-{n}")
        return count / (time.perf_counter() - began)
    finally:
        scheduler.remove_all_jobs()
        scheduler.shutdown(wait=False)


async def echo_rate(workdir: Path, seconds: float) -> float:
    command = [sys.executable, str(Path(api.__file__)), "--echo-server"]
    async with api.started(command, workdir / "echo.log") as echo:
        stub = pb_grpc.SchedulerServiceStub(grpc.aio.insecure_channel(echo.address))
        run = await api.load(
            lambda n: stub.GetJob(pb.GetJobRequest(id=str(n))),
            in_flight=IN_FLIGHT,
            seconds=seconds,
        )
    return run.rate


# -- the restarted server -------------------------------------------------------------------------


def log_figures(scenario: str, log: str) -> int:
    """Lost leaderships and stalls in a server's log; returns the leaderships lost."""
    lost = [
        line
        for line in log.splitlines()
        if "stops leading" in line and "this instance is stopping" not in line
    ]
    stalls = [float(m) for m in re.findall(r"event loop stalled for (\d+) ms", log)]
    emit(scenario, "lost_leaderships", len(lost), "count")
    emit(scenario, "stalls", len(stalls), "count")
    emit(scenario, "longest_stall_ms", max(stalls, default=0.0), "ms")
    for line in lost[:5]:
        note(f"lost leadership: {line[:200]}")
    for stall in re.findall(r"event loop stalled for \d+ ms; it was running:\n(?:  .*\n?)+", log)[
        :3
    ]:
        note(f"{scenario}: {stall.strip()[-1500:]}")
    return len(lost)


async def probe(stub: Any, seconds: float) -> list[float]:
    """A job every second for ``seconds``: its runs' lateness, in ms."""
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    trigger = job_pb2.Trigger(
        interval=job_pb2.IntervalTrigger(
            every=duration_pb2.Duration(seconds=1), start_time=_timestamp(start)
        )
    )
    job = job_pb2.Job(id="probe", task="chronoplane.echo", trigger=trigger)
    await stub.CreateJob(pb.CreateJobRequest(job=job), timeout=RPC_TIMEOUT)
    await asyncio.sleep(2 + seconds)
    await stub.PauseJob(pb.PauseJobRequest(id="probe"), timeout=RPC_TIMEOUT)
    await asyncio.sleep(1)
    listed = await stub.ListExecutions(
        pb.ListExecutionsRequest(job_id="probe", page_size=1000), timeout=RPC_TIMEOUT
    )
    return [
        (e.start_time.ToDatetime() - e.scheduled_time.ToDatetime()).total_seconds() * 1000
        for e in listed.executions
        if e.HasField("start_time")
    ]


async def read_figures(stub: Any, jobs: int, seconds: float, pages: int) -> float:
    """GetJob at 64 in flight (returns calls/s), and ListJobs pages of 100."""
    rng = random.Random(7)
    ids = [f"w{rng.randrange(jobs):07d}" for _ in range(10_000)]
    run = await api.load(
        lambda n: stub.GetJob(pb.GetJobRequest(id=ids[n % len(ids)]), timeout=RPC_TIMEOUT),
        in_flight=IN_FLIGHT,
        seconds=seconds,
    )
    emit("reads", "get_job_calls_per_s", run.rate, "1/s")
    emit("reads", "get_job_p99_ms", run.p(0.99), "ms")
    latencies, token = [], ""
    for _ in range(pages):
        began = time.perf_counter()
        page = await stub.ListJobs(
            pb.ListJobsRequest(page_size=100, page_token=token), timeout=RPC_TIMEOUT
        )
        latencies.append((time.perf_counter() - began) * 1000)
        token = page.next_page_token
        if not token:
            break
    latencies.sort()
    emit("reads", "list_jobs_p50_ms", percentile(latencies, 0.5), "ms")
    emit("reads", "list_jobs_p99_ms", percentile(latencies, 0.99), "ms")
    return run.rate


async def restarted(url: str, workdir: Path, args: argparse.Namespace) -> float:
    """Starts the server over the world; returns GetJob calls/s."""
    began = time.monotonic()
    async with running_server(url, workdir / "restarted.log") as server:
        emit("restart", "seconds_to_serving", time.monotonic() - began, "s")
        loaded = re.search(r"leading \(epoch \d+\): (\d+) jobs due within", server.log)
        emit("restart", "jobs_scheduled", int(loaded.group(1)) if loaded else None, "jobs")
        emit("restart", "rss_mb", _status_mb(server.process.pid, "VmRSS"), "MiB")
        stub = pb_grpc.SchedulerServiceStub(grpc.aio.insecure_channel(server.address))
        late = sorted(await probe(stub, args.probe_seconds))
        emit("probe", "runs", len(late), "count")
        emit("probe", "lateness_p50_ms", percentile(late, 0.5), "ms")
        emit("probe", "lateness_p99_ms", percentile(late, 0.99), "ms")
        emit("probe", "lateness_max_ms", late[-1] if late else None, "ms")
        rate = await read_figures(stub, args.jobs, args.seconds, args.pages)
        emit("restart", "rss_mb_peak", _peak_rss_mb(server.process.pid), "MiB")
        log = server.log
    log_figures("restart", log)
    return rate


# -- the run --------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace, workdir: Path) -> None:
    echo = await echo_rate(workdir, args.seconds)
    emit("peers", "echo_calls_per_s", echo, "1/s")
    async with postgres_database(_maintenance_dsn(args.postgres_url)) as url:
        async with running_server(url, workdir / "builder.log") as server:
            stub = pb_grpc.SchedulerServiceStub(grpc.aio.insecure_channel(server.address))
            batch = await build_world(stub, args.jobs)
            emit("create", "batch_jobs_per_s", batch, "1/s")
            single = await single_creates(stub, args.single)
            emit("create", "single_jobs_per_s", single, "1/s")
            emit("create", "single_ratio_to_echo", single / echo, "ratio")
            log = server.log
        log_figures("build", log)
        get_rate = await restarted(url, workdir, args)
        emit("reads", "get_job_ratio_to_echo", get_rate / echo, "ratio")
        aps = await asyncio.to_thread(aps_add_rate, url, args.aps_jobs)
        emit("peers", "apscheduler_sqlalchemy_add_job_per_s", aps, "1/s")
        emit("create", "batch_ratio_to_apscheduler", batch / aps, "ratio")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the world")
    parser.add_argument("--single", type=int, default=2_000, help="CreateJob calls")
    parser.add_argument("--probe-seconds", type=float, default=60.0)
    parser.add_argument("--seconds", type=float, default=5.0, help="per read measurement")
    parser.add_argument("--pages", type=int, default=200, help="ListJobs pages")
    parser.add_argument("--aps-jobs", type=int, default=5_000, help="APScheduler add_job calls")
    parser.add_argument("--postgres-url", help="a maintenance database (CREATE DATABASE)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chronoplane-bench-scale-") as tmp:
        asyncio.run(_run(args, Path(tmp)))
    width = max(len(f"{s} {f}") for s, f, _ in ROWS)
    for scenario, figure, value in ROWS:
        print(f"{f'{scenario} {figure}':<{width}}  {value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
