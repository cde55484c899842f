"""Celery dispatch: executions/s and dispatch-to-start latency with 2 worker processes.

A real ``chronoplane serve`` process on a throwaway PostgreSQL database sends to a broker
(the local Redis by default, or RabbitMQ with ``--broker amqp``); one ``celery worker``
process with a prefork pool of 2 (``--concurrency 2``) runs ``celery.add`` from
``tests/celery_tasks.py`` through chronoplane.celery (claim, run, record: on PostgreSQL the
claim is one statement and the record one transaction, on the worker process's engine).

* ``burst``: ``--burst`` TriggerJob calls (32 at a time) of a job with overlap ALLOW; the
  figure executions_per_s = executions / (last end - first create).
* ``steady``: ``--rate`` TriggerJob calls a second for ``--seconds``; latencies per
  execution: dispatch_to_start (start_time - dispatch_time: the broker and the worker's
  claim) and create_to_start (start_time - create_time: the dispatcher too).

Output: one JSON object per line, for example::

    {"bench": "celery_dispatch", "broker": "redis", "scenario": "steady",
     "figure": "dispatch_to_start_p99_ms", "value": 12.3, "unit": "ms"}

Run it::

    .venv/bin/python bench/celery_dispatch.py
    .venv/bin/python bench/celery_dispatch.py --broker amqp --burst 500 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from brokers import start_worker
from fire_throughput import (
    _maintenance_dsn,
    _seconds,
    note,
    percentile,
    postgres_database,
    run_concurrently,
    running_server,
)
from google.protobuf import json_format, struct_pb2

from chronoplane.v1 import execution_pb2, job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

BENCH = "celery_dispatch"
UNFINISHED = [execution_pb2.EXECUTION_STATE_PENDING, execution_pb2.EXECUTION_STATE_RUNNING]
BROKERS = {"redis": "redis://127.0.0.1:6379/0", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}
FINAL = {
    execution_pb2.EXECUTION_STATE_SUCCEEDED,
    execution_pb2.EXECUTION_STATE_FAILED,
    execution_pb2.EXECUTION_STATE_CANCELLED,
    execution_pb2.EXECUTION_STATE_ABANDONED,
}


def emit(broker: str, scenario: str, figure: str, value: Any, unit: str) -> None:
    line = {
        "bench": BENCH,
        "broker": broker,
        "scenario": scenario,
        "figure": figure,
        "value": value,
        "unit": unit,
    }
    print(json.dumps(line), flush=True)


@contextlib.contextmanager
def celery_worker(broker: str, database_url: str, queue: str, workdir: Path) -> Any:
    worker = start_worker(
        workdir,
        broker=broker,
        database_url=database_url,
        queue=queue,
        concurrency=2,
        # Redis's default: the backlog waits in the queue far longer than the tests' 5 s.
        env={"CHRONOPLANE_TEST_VISIBILITY": "3600"},
    )
    note(f"celery worker pid {worker.process.pid}, 2 prefork processes, queue {queue}")
    try:
        yield worker
    finally:
        worker.stop()


async def executions_of(stub: Any, job_id: str) -> list[execution_pb2.Execution]:
    found: list[execution_pb2.Execution] = []
    token = ""
    while True:
        page = await stub.ListExecutions(
            pb.ListExecutionsRequest(job_id=job_id, page_size=1000, page_token=token)
        )
        found += page.executions
        token = page.next_page_token
        if not token:
            return found


async def wait_all_ended(stub: Any, job_id: str, count: int, within: float) -> list[Any]:
    """Every execution of the job once ``count`` have ended. While any is pending or running
    it asks only for one of those (a page of one): listing thousands of executions every
    half second cost the server it measures more CPU than dispatching them."""
    deadline = time.monotonic() + within
    while True:
        if time.monotonic() < deadline and await any_unfinished(stub, job_id):
            await asyncio.sleep(0.2)
            continue
        executions = await executions_of(stub, job_id)
        done = [e for e in executions if e.state in FINAL]
        if len(done) >= count or time.monotonic() > deadline:
            return executions
        await asyncio.sleep(0.2)


async def any_unfinished(stub: Any, job_id: str) -> bool:
    page = await stub.ListExecutions(
        pb.ListExecutionsRequest(job_id=job_id, states=UNFINISHED, page_size=1)
    )
    return len(page.executions) > 0


def ms(values: list[float]) -> tuple[float | None, float | None]:
    ordered = sorted(values)
    p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
    return (
        None if p50 is None else round(p50 * 1000, 1),
        None if p99 is None else round(p99 * 1000, 1),
    )


def report(broker: str, scenario: str, executions: list[execution_pb2.Execution]) -> None:
    started = [e for e in executions if e.HasField("start_time")]
    succeeded = [e for e in executions if e.state == execution_pb2.EXECUTION_STATE_SUCCEEDED]
    emit(broker, scenario, "executions", len(executions), "1")
    emit(broker, scenario, "succeeded", len(succeeded), "1")
    dispatch = [
        _seconds(e.start_time) - _seconds(e.dispatch_time)
        for e in started
        if e.HasField("dispatch_time")
    ]
    create = [_seconds(e.start_time) - _seconds(e.create_time) for e in started]
    for name, values in (("dispatch_to_start", dispatch), ("create_to_start", create)):
        p50, p99 = ms(values)
        emit(broker, scenario, f"{name}_p50_ms", p50, "ms")
        emit(broker, scenario, f"{name}_p99_ms", p99, "ms")
    if succeeded:
        first = min(_seconds(e.create_time) for e in executions)
        last = max(_seconds(e.end_time) for e in succeeded)
        emit(
            broker,
            scenario,
            "executions_per_s",
            round(len(succeeded) / max(last - first, 1e-9), 1),
            "1/s",
        )


def celery_job(job_id: str, queue: str) -> job_pb2.Job:
    return job_pb2.Job(
        id=job_id,
        task="celery.add",
        args=json_format.ParseDict({"a": 1, "b": 2}, struct_pb2.Struct()),
        trigger=job_pb2.Trigger(cron=job_pb2.CronTrigger(expression="0 0 1 1 *")),
        executor=execution_pb2.EXECUTOR_CELERY,
        celery=job_pb2.CeleryOptions(queue=queue),
        overlap_policy=job_pb2.OVERLAP_POLICY_ALLOW,
        max_concurrent=0,
    )


async def bench(options: argparse.Namespace) -> None:
    broker = options.broker_url or BROKERS[options.broker]
    queue = f"chronoplane-bench-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="celery-dispatch-"))
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(
            postgres_database(_maintenance_dsn(options.postgres_url))
        )
        server = await stack.enter_async_context(
            running_server(url, workdir / "server.log", f"--celery-broker-url={broker}")
        )
        stack.enter_context(celery_worker(broker, url, queue, workdir))
        channel = grpc.aio.insecure_channel(server.address)
        stack.push_async_callback(channel.close)
        stub = pb_grpc.SchedulerServiceStub(channel)
        for job_id in ("burst", "steady", "warm"):
            await stub.CreateJob(pb.CreateJobRequest(job=celery_job(job_id, queue)))
        # Warm up: the worker's processes, the connections.
        for _ in range(20):
            await stub.TriggerJob(pb.TriggerJobRequest(id="warm"))
        await wait_all_ended(stub, "warm", 20, 60)

        note(f"burst: {options.burst} TriggerJob calls, 32 at a time")
        await run_concurrently(
            range(options.burst),
            lambda _: stub.TriggerJob(pb.TriggerJobRequest(id="burst")),
            32,
        )
        report(options.broker, "burst", await wait_all_ended(stub, "burst", options.burst, 600))

        total = int(options.rate * options.seconds)
        note(f"steady: {options.rate}/s for {options.seconds} s ({total} executions)")
        began = time.monotonic()
        calls = []
        for n in range(total):
            await asyncio.sleep(max(0.0, began + n / options.rate - time.monotonic()))
            calls.append(asyncio.ensure_future(stub.TriggerJob(pb.TriggerJobRequest(id="steady"))))
        await asyncio.gather(*calls)
        report(options.broker, "steady", await wait_all_ended(stub, "steady", total, 120))
    note(f"logs in {workdir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--broker-url", help="instead of the local one")
    parser.add_argument("--postgres-url", help="a maintenance database (default: local)")
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0, help="steady executions/s")
    parser.add_argument("--seconds", type=float, default=20.0)
    asyncio.run(bench(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
