"""Worker writes: how many executions/s Celery workers can record in PostgreSQL, by the
number of worker processes writing at once.

Each Celery execution costs its worker two writes of its own, outside any server: the
conditional start (``start_dispatched``) and the end (``record_progress``), each a
transaction that appends an event and notifies the watchers' channel. Here ``--processes``
processes each play a worker: its own store (the one ``chronoplane.celery`` keeps per
process), starting and ending executions of its own job as fast as the database lets it,
with no broker and no task in between, so that what is measured is the database's side of
a worker at 1, 4 and 16 processes (what a cluster of many workers puts on it).

A fresh PostgreSQL database is migrated, and ``--executions`` PENDING Celery executions are
admitted per process before the clock starts (a job each, overlap ALLOW, no limit on how many
run at once, as bench/celery_dispatch.py's job). Set beside bench/celery_dispatch.py's
executions/s, it says how much of a Celery execution's cost is the worker's writes.

``--history N`` first writes N SUCCEEDED executions of another job and ANALYZEs the
database: PostgreSQL's statistics then are those of an installation that has run for a
while (almost every execution final), and the burst is newer than they are, as a burst
always is. Its plans are the ones such an installation gets (decision 0031).

Figures, one JSON line each (``"bench": "worker_writes"``), per ``processes``:
``executions_per_s`` (started and ended, all processes together: two commits each) and
``lost`` (executions not SUCCEEDED at the end: must be 0).

Run it::

    .venv/bin/python bench/worker_writes.py
    .venv/bin/python bench/worker_writes.py --processes 1 4 16 --executions 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from fire_throughput import _maintenance_dsn, note, postgres_database, write_history
from sqlalchemy.engine import make_url

from chronoplane.server.ids import new_execution_id
from chronoplane.server.models import (
    Execution,
    ExecutionSource,
    ExecutionState,
    ExecutorKind,
    IntervalTrigger,
    Job,
    OverlapPolicy,
)
from chronoplane.server.storage.abc import Admission, ExecutionFinish
from chronoplane.server.storage.migrate import upgrade
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

BENCH = "worker_writes"


def emit(figure: str, value: Any, unit: str, **extra: Any) -> None:
    if isinstance(value, float):
        value = round(value, 3)
    line = {"bench": BENCH, **extra, "figure": figure, "value": value, "unit": unit}
    print(json.dumps(line), flush=True)


async def prepare(url: str, job_id: str, count: int) -> list[str]:
    """A Celery job and ``count`` PENDING executions of it, as the dispatcher leaves them."""
    store = SqlAlchemyStore.from_url(url)
    try:
        now = datetime.now(UTC)
        job = Job(
            id=job_id,
            task="bench.noop",
            trigger=IntervalTrigger(every=timedelta(days=1)),
            executor=ExecutorKind.CELERY,
            overlap_policy=OverlapPolicy.ALLOW,
            max_concurrent=0,  # as many at once as come: none waits for a slot
            next_run_time=now + timedelta(days=1),
        )
        await store.create_job(job, request_id=None)
        ids: list[str] = []
        for first in range(0, count, 500):
            admissions = []
            for n in range(first, min(count, first + 500)):
                execution = Execution(
                    id=new_execution_id(),
                    job_id=job_id,
                    state=ExecutionState.PENDING,
                    source=ExecutionSource.MANUAL,
                    scheduled_time=now - timedelta(microseconds=n),
                    create_time=now,
                    task="bench.noop",
                    args={},
                    instance_id="",
                    executor=ExecutorKind.CELERY,
                )
                admissions.append(Admission(execution=execution, due_time=now))
                ids.append(execution.id)
            await store.admit_executions(admissions)
        return ids
    finally:
        await store.close()


async def work(url: str, job_id: str, ids: list[str]) -> None:
    """What a worker process writes for each of its executions: the start, then the end."""
    store = SqlAlchemyStore.from_url(url)
    try:
        worker = f"bench/{job_id}"
        for execution_id in ids:
            until = datetime.now(UTC) + timedelta(seconds=30)
            started = await store.start_dispatched(execution_id, worker=worker, lease_until=until)
            assert started is not None, execution_id
            execution, _ = started
            end = ExecutionFinish(
                id=execution_id,
                job_id=job_id,
                state=ExecutionState.SUCCEEDED,
                start_time=execution.start_time,
                end_time=datetime.now(UTC),
                result=None,
            )
            await store.record_progress([end])
    finally:
        await store.close()


def _process(url: str, job_id: str, ids: list[str], ready: Any, go: Any, done: Any) -> None:
    # Connected before the clock starts: a worker's store outlives its tasks.
    async def main() -> None:
        warm = SqlAlchemyStore.from_url(url)
        await warm.event_window()
        await warm.close()
        ready.release()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        await work(url, job_id, ids)

    asyncio.run(main())
    done.release()


async def run(url: str, processes: int, executions: int, history: int) -> None:
    jobs = [f"w{processes:02d}-{k:02d}" for k in range(processes)]
    shares = [await prepare(url, job_id, executions) for job_id in jobs]
    context = multiprocessing.get_context("spawn")
    ready, done, go = context.Semaphore(0), context.Semaphore(0), context.Event()
    children = [
        context.Process(target=_process, args=(url, job_id, ids, ready, go, done))
        for job_id, ids in zip(jobs, shares, strict=True)
    ]
    for child in children:
        child.start()
    for _ in children:
        await asyncio.to_thread(ready.acquire)
    began = time.monotonic()
    go.set()
    for _ in children:
        await asyncio.to_thread(done.acquire)
    elapsed = time.monotonic() - began
    for child in children:
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"a writer process exited with {child.exitcode}")
    total = processes * executions
    ended = await _succeeded(url, jobs)
    note(f"{processes} processes: {total} executions in {elapsed:.1f} s")
    emit("executions_per_s", total / elapsed, "1/s", processes=processes, history=history)
    emit("lost", total - ended, "count", processes=processes, history=history)


async def _succeeded(url: str, jobs: list[str]) -> int:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM executions WHERE job_id = ANY($1) AND state = 'succeeded'",
            jobs,
        )
        return count
    finally:
        await conn.close()


async def _main(options: argparse.Namespace) -> int:
    async with postgres_database(_maintenance_dsn(options.postgres_url)) as url:
        await upgrade(url)
        if options.history:
            await prepare(url, "history", 0)
            await write_history(url, "history", options.history)
        for processes in options.processes:
            await run(url, processes, options.executions, options.history)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--executions", type=int, default=500, help="per process")
    parser.add_argument(
        "--history", type=int, default=0, help="finished executions written (and analyzed) first"
    )
    parser.add_argument("--postgres-url")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
