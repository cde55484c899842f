"""Job creation rate: BatchCreateJobs in batches of 1,000 against CreateJob one call at a time.

Each backend gets a fresh ``chronoplane serve`` process on a fresh database (a SQLite file, or
a throwaway database on a PostgreSQL server). Three ways of creating ``--jobs`` jobs (cron
jobs that do not fire during the bench), each into the same server:

* ``batch``: ``--jobs`` jobs with BatchCreateJobs, 1,000 a call, one call after another;
* ``single``: ``--single-jobs`` jobs with CreateJob, one call after another;
* ``single_concurrent``: as many again, ``--concurrency`` calls in flight.

Output: one JSON object per line on stdout per figure (jobs_per_s, and the longest batch call
in ms); the server's log is checked for event loop stalls (logged as warnings), which are
counted in server_log_warnings.

    .venv/bin/python bench/batch_create.py --backend postgres --jobs 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from fire_throughput import (
    _maintenance_dsn,
    _problem_lines,
    note,
    postgres_database,
    run_concurrently,
    running_server,
    sqlite_database,
)

from chronoplane.v1 import job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

BENCH = "batch_create"
BATCH = 1_000
RPC_TIMEOUT = 120.0


def emit(backend: str, scenario: str, figure: str, value: float | int, unit: str) -> None:
    line = {"bench": BENCH, "backend": backend, "scenario": scenario, "figure": figure}
    print(json.dumps(line | {"value": round(value, 3), "unit": unit}), flush=True)


def jobs(prefix: str, count: int) -> list[job_pb2.Job]:
    trigger = job_pb2.Trigger(cron=job_pb2.CronTrigger(expression="0 3 * * *"))
    return [
        job_pb2.Job(id=f"{prefix}-{n:06d}", task="chronoplane.echo", trigger=trigger)
        for n in range(count)
    ]


async def single(stub: Any, new: Sequence[job_pb2.Job], concurrency: int) -> float:
    async def create(job: job_pb2.Job) -> None:
        await stub.CreateJob(pb.CreateJobRequest(job=job), timeout=RPC_TIMEOUT)

    began = time.monotonic()
    await run_concurrently(new, create, concurrency)
    return time.monotonic() - began


async def batches(stub: Any, new: Sequence[job_pb2.Job]) -> tuple[float, float]:
    """Seconds in all, and the longest call's."""
    began, longest = time.monotonic(), 0.0
    for start in range(0, len(new), BATCH):
        requests = [pb.CreateJobRequest(job=job) for job in new[start : start + BATCH]]
        call_began = time.monotonic()
        await stub.BatchCreateJobs(
            pb.BatchCreateJobsRequest(requests=requests), timeout=RPC_TIMEOUT
        )
        longest = max(longest, time.monotonic() - call_began)
    return time.monotonic() - began, longest


async def compare(backend: str, stub: Any, singles: int, concurrency: int) -> None:
    seconds = await single(stub, jobs("one", singles), 1)
    emit(backend, "single", "jobs_per_s", singles / seconds, "1/s")
    note(f"{backend}: {singles} jobs one call at a time in {seconds:.2f} s")
    seconds = await single(stub, jobs("many", singles), concurrency)
    emit(backend, "single_concurrent", "jobs_per_s", singles / seconds, "1/s")
    note(f"{backend}: {singles} jobs, {concurrency} calls at a time, in {seconds:.2f} s")


async def measure(
    backend: str, url: str, workdir: Path, count: int, singles: int, concurrency: int
) -> None:
    async with running_server(url, workdir / f"{backend}.log") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.SchedulerServiceStub(channel)
            seconds, longest = await batches(stub, jobs("batch", count))
            emit(backend, "batch", "jobs_per_s", count / seconds, "1/s")
            emit(backend, "batch", "longest_call_ms", longest * 1000, "ms")
            note(f"{backend}: {count} jobs in batches of {BATCH} in {seconds:.2f} s")
            if singles:
                await compare(backend, stub, singles, concurrency)
        problems = _problem_lines(server.log)
        emit(backend, "all", "server_log_warnings", len(problems), "lines")
        for line in problems[:10]:
            note(f"server: {line[:200]}")


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], action="append")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument(
        "--single-jobs", type=int, default=2_000, help="jobs created with CreateJob (0: none)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--postgres-url")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chronoplane-bench-") as tmp:
        workdir = Path(tmp)
        sizes = (args.jobs, args.single_jobs, args.concurrency)
        for backend in args.backend or ["sqlite", "postgres"]:
            if backend == "sqlite":
                async with sqlite_database(workdir, "batch") as url:
                    await measure(backend, url, workdir, *sizes)
            else:
                async with postgres_database(_maintenance_dsn(args.postgres_url)) as url:
                    await measure(backend, url, workdir, *sizes)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
