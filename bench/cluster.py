"""Cluster mode: 1, 2 and 3 ``chronoplane serve`` processes on one PostgreSQL database.

For each cluster size, on a fresh database: 2,000 jobs fire every 10 s (phases spread over
the 10 s) for 2 minutes, running the no-op ``chronoplane.echo``. With two or more instances,
the leader is killed with SIGKILL halfway through, and the failover time is how long until
another instance is listed as leader (polled every 50 ms through ListInstances).

Figures, one JSON line each (``"bench": "cluster"``, ``"instances": n``): expected,
executed, missed, abandoned (held by the killed leader: recorded, not run again), unrecorded
(expected fires with no execution), duplicates (executions of one (job, scheduled time)
beyond the first; must be 0), executions_per_s (executed over the run), lateness_p50_ms and
lateness_p99_ms (start_time - scheduled_time, over every fire that ran; the fires around the
failover are in it), failover_s, and run_share_max (the largest fraction of the runs that one
instance ran: 1.0 means one instance ran everything).

Run it (PostgreSQL: the local server with trust auth, or ``--postgres-url`` naming a
maintenance database of a role that may CREATE DATABASE)::

    .venv/bin/python bench/cluster.py
    .venv/bin/python bench/cluster.py --instances 3 --jobs 200 --seconds 30   # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from fire_throughput import (
    CONCURRENCY,
    _job,
    _maintenance_dsn,
    _seconds,
    _sleep_until,
    _timestamp,
    _utcnow,
    _whole_second_after,
    create_jobs,
    list_executions,
    note,
    percentile,
    postgres_database,
    running_server,
)
from google.protobuf import duration_pb2

from chronoplane.v1 import execution_pb2, job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1.scheduler_service_pb2_grpc import SchedulerServiceStub

BENCH = "cluster"
EVERY_SECONDS = 10
SETTLE_SECONDS = 15


def emit(instances: int, figure: str, value: float | int | None, unit: str) -> None:
    if isinstance(value, float):
        value = round(value, 3)
    line = {"bench": BENCH, "instances": instances, "figure": figure, "value": value}
    print(json.dumps(line | {"unit": unit}), flush=True)


async def leader_address(stub: Any) -> str | None:
    response = await stub.ListInstances(pb.ListInstancesRequest(), timeout=5)
    return next((i.address for i in response.instances if i.leader), None)


async def run(size: int, options: argparse.Namespace, workdir: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(
            postgres_database(_maintenance_dsn(options.postgres_url))
        )
        servers = [
            await stack.enter_async_context(running_server(url, workdir / f"n{size}-{k}.log"))
            for k in range(size)
        ]
        channels = [grpc.aio.insecure_channel(s.address) for s in servers]
        for channel in channels:
            stack.push_async_callback(channel.close)
        stubs = [SchedulerServiceStub(c) for c in channels]
        start = _whole_second_after(_utcnow() + timedelta(seconds=5 + options.jobs / 400))
        end = start + timedelta(seconds=options.seconds)
        jobs = [
            _job(
                f"c{n:05d}",
                job_pb2.Trigger(
                    interval=job_pb2.IntervalTrigger(
                        every=duration_pb2.Duration(seconds=EVERY_SECONDS),
                        start_time=_timestamp(
                            start + timedelta(seconds=EVERY_SECONDS * n / options.jobs)
                        ),
                        end_time=_timestamp(end - timedelta(microseconds=1)),
                    )
                ),
            )
            for n in range(options.jobs)
        ]
        # Spread the writes over every instance: changes reach the leader by NOTIFY.
        per = -(-len(jobs) // size)
        await asyncio.gather(
            *(
                create_jobs(stubs[k], jobs[k * per : (k + 1) * per], CONCURRENCY // size)
                for k in range(size)
            )
        )
        failover: float | None = None
        if size > 1:
            await _sleep_until(start + (end - start) / 2, say_every=15, what=f"{size} instances")
            address = await leader_address(stubs[0])
            victim = next(k for k, s in enumerate(servers) if s.address == address)
            servers[victim].process.kill()
            killed = time.monotonic()
            survivor = stubs[(victim + 1) % size]
            while (now := await leader_address(survivor)) in (None, address):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            failover = time.monotonic() - killed
            note(f"killed the leader {address}; {now} leads after {failover:.2f} s")
            stubs = [s for k, s in enumerate(stubs) if k != victim]
        await _sleep_until(end + timedelta(seconds=SETTLE_SECONDS), say_every=15, what="run")
        found = await list_executions(stubs[0], start)
    expected = {
        (j.id, round(_seconds(j.trigger.interval.start_time) + k * EVERY_SECONDS, 3))
        for j in jobs
        for k in range(options.seconds // EVERY_SECONDS)
        if _seconds(j.trigger.interval.start_time) + k * EVERY_SECONDS < end.timestamp()
    }
    keys = Counter((e.job_id, round(_seconds(e.scheduled_time), 3)) for e in found)
    ran = [e for e in found if e.HasField("start_time")]
    lateness = sorted((_seconds(e.start_time) - _seconds(e.scheduled_time)) * 1000 for e in ran)
    succeeded = sum(e.state == execution_pb2.EXECUTION_STATE_SUCCEEDED for e in found)
    emit(size, "expected", len(expected), "executions")
    emit(size, "executed", succeeded, "executions")
    emit(
        size,
        "missed",
        sum(e.state == execution_pb2.EXECUTION_STATE_MISSED for e in found),
        "executions",
    )
    abandoned = sum(e.state == execution_pb2.EXECUTION_STATE_ABANDONED for e in found)
    emit(size, "abandoned", abandoned, "executions")
    emit(size, "unrecorded", len(expected - set(keys)), "fires")
    emit(size, "duplicates", sum(n - 1 for n in keys.values()), "executions")
    emit(size, "executions_per_s", succeeded / options.seconds, "1/s")
    emit(size, "lateness_p50_ms", percentile(lateness, 0.5), "ms")
    emit(size, "lateness_p99_ms", percentile(lateness, 0.99), "ms")
    emit(size, "failover_s", failover, "s")
    by_instance = Counter(e.instance_id for e in ran)
    emit(size, "run_share_max", max(by_instance.values()) / len(ran) if ran else None, "fraction")


async def _main(options: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="chronoplane-bench-cluster-"))
    for size in options.instances:
        note(f"--- {size} instance(s): {options.jobs} jobs every {EVERY_SECONDS} s")
        await run(size, options, workdir)
    note(f"server logs in {workdir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2_000)
    parser.add_argument("--seconds", type=int, default=120, help="multiple of 10")
    parser.add_argument("--postgres-url")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
