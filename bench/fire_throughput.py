"""Fire throughput: how fast a real ``chronoplane serve`` process turns due fires into runs.

Two scenarios, each against a fresh server process on a fresh database (SQLite file in a
temporary directory, or a throwaway database on a PostgreSQL server):

* ``burst``: 10,000 jobs with a DateTrigger all due at the same instant T (chosen after
  measuring how fast jobs are created, so that every job exists before T). The bench waits
  until every execution is final and reports executions/s = executed / (last start - T).
* ``steady``: 1,000 jobs with a 1 s IntervalTrigger from S to S + 30 s (the end is inclusive,
  so 31 fires per job). Every fire should run. ``--phase staggered`` (the default) spreads the
  jobs' phases over the second, as in the APScheduler baseline the target comes from (its
  MemoryJobStore alone: p99 6 ms staggered, 86 ms aligned); ``--phase aligned`` puts all
  1,000 on the same instant. The figures' scenario reads ``steady_staggered`` or
  ``steady_aligned``.

The no-op task is the built-in ``chronoplane.echo`` with empty args. Every job gets a misfire
grace of 60 s, so that late fires still run and their lateness is measured rather than hidden
as MISSED. Lateness is ``start_time - scheduled_time`` of each execution that started.

Targets:

* burst on PostgreSQL: >= 6,000 executions/s and lateness p99 <= 2 s (issue 16);
* steady: every fire runs (executed == expected, nothing missed), lateness p99 <= 50 ms
  with the phases aligned, <= 20 ms staggered;
* both: no duplicate executions of one (job, scheduled time).

Output: one JSON object per line on stdout, per figure, for example::

    {"bench": "fire_throughput", "backend": "postgres", "scenario": "burst",
     "figure": "executions_per_s", "value": 1234.5, "unit": "1/s"}

Figures: expected, executed (SUCCEEDED), missed, unfinished (still PENDING or RUNNING when the
bench stopped waiting), other (FAILED, SKIPPED, INTERRUPTED), unrecorded (expected fires without
an execution), duplicates, executions_per_s, lateness_p50_ms, lateness_p99_ms, lateness_max_ms,
record_lateness_p50_ms, record_lateness_p99_ms, record_lateness_max_ms (create_time -
scheduled_time: when the runner took the fire up, before its row was written; a diagnostic of
the timer alone), create_jobs_per_s (by BatchCreateJobs), server_rss_mb_peak (VmHWM of the
server process), server_log_warnings (WARNING or worse lines, and tracebacks, in its log) and
server_exit_code (after SIGTERM; 0 is a clean stop).

Progress, a verdict against the targets and the server's warnings go to stderr; the server
logs are kept in a temporary directory named at the end.

Run it (PostgreSQL: the local server, trust auth, or ``--postgres-url`` /
CHRONOPLANE_BENCH_POSTGRES_URL naming a maintenance database of a role that may CREATE
DATABASE)::

    .venv/bin/python bench/fire_throughput.py --backend postgres
    .venv/bin/python bench/fire_throughput.py                        # both backends, both
    .venv/bin/python bench/fire_throughput.py --jobs 500 --seconds 5 # a quick smoke run

``--history N`` (PostgreSQL) first writes N SUCCEEDED executions of a paused job and
ANALYZEs the database: the planner's statistics are then those of an installation that has
run for a while, older than the burst, as they always are (decision 0031).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO, TypeVar

import asyncpg
import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from sqlalchemy.engine import make_url

from chronoplane.v1 import execution_pb2, job_pb2, scheduler_service_pb2_grpc
from chronoplane.v1 import scheduler_service_pb2 as pb

BENCH = "fire_throughput"
BURST_JOBS = 10_000
STEADY_JOBS = 1_000
STEADY_SECONDS = 30
CONCURRENCY = 64
# Jobs are created with BatchCreateJobs: this many a call, at most this many calls at once.
BATCH = 1_000
BATCHES_IN_FLIGHT = 4
MISFIRE_GRACE_SECONDS = 60
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POSTGRES_URL_ENV = "CHRONOPLANE_BENCH_POSTGRES_URL"
# Jobs created (and deleted again) to measure the creation rate before T is chosen.
CALIBRATION_JOBS = 256
PAGE_SIZE = 1_000
# While waiting for executions: list them all this often, give up when nothing moves this long.
LISTING_EVERY = 15.0
STALL_SECONDS = 60.0
RPC_TIMEOUT = 60.0
SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 30.0
SHUTDOWN_GRACE = 5

TARGET_BURST_RATE = 6_000.0
TARGET_BURST_P99_MS = 2_000.0
TARGET_STEADY_P99_MS = {"aligned": 50.0, "staggered": 20.0}

_FINAL_STATES = {
    execution_pb2.EXECUTION_STATE_SUCCEEDED,
    execution_pb2.EXECUTION_STATE_FAILED,
    execution_pb2.EXECUTION_STATE_MISSED,
    execution_pb2.EXECUTION_STATE_SKIPPED,
    execution_pb2.EXECUTION_STATE_INTERRUPTED,
}
_UNFINISHED_STATES = [execution_pb2.EXECUTION_STATE_PENDING, execution_pb2.EXECUTION_STATE_RUNNING]

T = TypeVar("T")
_STARTED = time.monotonic()


# -- output ---------------------------------------------------------------------------------------


def note(message: str) -> None:
    """Human progress, on stderr."""
    print(f"[{time.monotonic() - _STARTED:8.1f}s] {message}", file=sys.stderr, flush=True)


def emit(backend: str, scenario: str, figure: str, value: float | int | None, unit: str) -> None:
    """One figure, as one JSON line on stdout."""
    if isinstance(value, float):
        value = round(value, 3)
    line = {
        "bench": BENCH,
        "backend": backend,
        "scenario": scenario,
        "figure": figure,
        "value": value,
        "unit": unit,
    }
    print(json.dumps(line), flush=True)


# -- time -----------------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def _seconds(message: timestamp_pb2.Timestamp) -> float:
    return message.seconds + message.nanos * 1e-9


def _whole_second_after(moment: datetime) -> datetime:
    return moment.replace(microsecond=0) + timedelta(seconds=1)


async def _sleep_until(moment: datetime, *, say_every: float = 0.0, what: str = "") -> None:
    last_said = time.monotonic()
    while (left := (moment - _utcnow()).total_seconds()) > 0:
        await asyncio.sleep(min(left, 1.0))
        if say_every and time.monotonic() - last_said >= say_every:
            last_said = time.monotonic()
            note(f"{what}: {max(0.0, (moment - _utcnow()).total_seconds()):.0f} s to go")


# -- the server process ---------------------------------------------------------------------------


def _server_command() -> list[str]:
    script = Path(sys.executable).parent / "chronoplane"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "chronoplane.server.cli"]


def _open_log(path: Path) -> TextIO:
    return path.open("w")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    return _status_mb(pid, "VmHWM")


def _status_mb(pid: int, field: str) -> float | None:
    """A memory field of a live process's /proc status (VmRSS, VmHWM), in MiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _problem_lines(log: str) -> list[str]:
    marks = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
    return [line for line in log.splitlines() if any(mark in line for mark in marks)]


def _read_from(path: Path, offset: int) -> tuple[str, int]:
    """What was appended to ``path`` since ``offset``, and the new offset."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read()
    except FileNotFoundError:
        return "", offset
    return data.decode(errors="replace"), offset + len(data)


@dataclass
class Server:
    process: asyncio.subprocess.Process
    address: str
    log_path: Path
    _log_offset: int = 0

    @property
    def log(self) -> str:
        return _read_text(self.log_path)

    def failure(self) -> str | None:
        """Why the server cannot make progress any more (it exited, or logged CRITICAL)."""
        if self.process.returncode is not None:
            stopping = [line for line in self.log.splitlines() if "shutting down" in line]
            return (
                f"the server exited with {self.process.returncode} without the bench asking it "
                f"to ({stopping[-1][:120] if stopping else 'no shutdown line in its log'}); "
                "did something else signal it?"
            )
        appended, self._log_offset = _read_from(self.log_path, self._log_offset)
        for line in appended.splitlines():
            if " CRITICAL " in line:
                return f"the server logged: {line[:300]}"
        return None


async def _wait_serving(process: asyncio.subprocess.Process, log_path: Path) -> str:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        match = re.search(r"serving on ([^\s,]+)", _read_text(log_path))
        if match:
            return match.group(1)
        if process.returncode is not None:
            raise RuntimeError(
                f"the server exited with {process.returncode} before serving:\n"
                + _read_text(log_path)[-4000:]
            )
        await asyncio.sleep(0.05)
    raise RuntimeError(
        f"the server did not serve within {SERVER_START_TIMEOUT:.0f} s:\n"
        + _read_text(log_path)[-4000:]
    )


async def _stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after SERVER_STOP_TIMEOUT seconds."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    began = time.monotonic()
    try:
        await asyncio.wait_for(process.wait(), SERVER_STOP_TIMEOUT)
    except TimeoutError:
        note(f"server pid {process.pid} ignored SIGTERM for {SERVER_STOP_TIMEOUT:.0f} s; killing")
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    note(
        f"server pid {process.pid} exited with {process.returncode} "
        f"{time.monotonic() - began:.1f} s after SIGTERM"
    )


@contextlib.asynccontextmanager
async def running_server(database_url: str, log_path: Path, *extra: str) -> AsyncIterator[Server]:
    command = [
        *_server_command(),
        "serve",
        "--address",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--shutdown-grace",
        str(SHUTDOWN_GRACE),
        *extra,
    ]
    log_file = _open_log(log_path)
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Our signal handling decides when it stops, not the terminal's Ctrl-C.
            start_new_session=True,
        )
    finally:
        log_file.close()
    try:
        address = await _wait_serving(process, log_path)
        note(f"server pid {process.pid} serving on {address} (log {log_path})")
        yield Server(process, address, log_path)
    finally:
        await _stop_process(process)


# -- databases ------------------------------------------------------------------------------------


def _maintenance_dsn(option: str | None) -> str:
    raw = option or os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    return make_url(raw).set(drivername="postgresql").render_as_string(hide_password=False)


def _remove_sqlite_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()


@contextlib.asynccontextmanager
async def sqlite_database(workdir: Path, name: str) -> AsyncIterator[str]:
    path = workdir / f"{name}.db"
    try:
        yield f"sqlite+aiosqlite:///{path}"
    finally:
        _remove_sqlite_files(path)


@contextlib.asynccontextmanager
async def postgres_database(maintenance_dsn: str) -> AsyncIterator[str]:
    name = f"chronoplane_bench_{secrets.token_hex(4)}"
    conn: Any = await asyncpg.connect(maintenance_dsn, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    note(f"created PostgreSQL database {name}")
    try:
        url = make_url(maintenance_dsn).set(drivername="postgresql+asyncpg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(maintenance_dsn, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        note(f"dropped PostgreSQL database {name}")


async def write_history(url: str, job_id: str, count: int) -> None:
    """``count`` SUCCEEDED executions of the existing job ``job_id``, written directly (quick),
    then ANALYZE: statistics in which almost every execution is final."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn: Any = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(
            "INSERT INTO executions (id, job_id, state, source, scheduled_time, create_time, "
            "start_time, end_time, due_time, task, args, error_message, error_traceback, "
            "error_type, note, instance_id, attempt, ready, holds_slot, force, executor) "
            "SELECT 'history-' || n, $1, 'succeeded', 'schedule', now(), now(), now(), now(), "
            "now(), 'bench.noop', '{}', '', '', '', '', '', 1, false, false, false, 'inline' "
            "FROM generate_series(1, $2) AS n",
            job_id,
            count,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    note(f"wrote {count} finished executions of {job_id} and analyzed")


# -- the API --------------------------------------------------------------------------------------


async def run_concurrently(
    items: Iterable[T], call: Callable[[T], Awaitable[object]], concurrency: int
) -> None:
    """Calls ``call`` on every item, ``concurrency`` at a time; the first error stops all."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await call(item)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())


def _job(job_id: str, trigger: job_pb2.Trigger) -> job_pb2.Job:
    return job_pb2.Job(
        id=job_id,
        task="chronoplane.echo",
        trigger=trigger,
        misfire_grace=duration_pb2.Duration(seconds=MISFIRE_GRACE_SECONDS),
    )


async def create_jobs(
    stub: Any, jobs: Sequence[job_pb2.Job], concurrency: int, *, say: bool = True
) -> float:
    """Creates ``jobs`` with BatchCreateJobs, ``BATCH`` a call, at most ``concurrency``
    (and ``BATCHES_IN_FLIGHT``) calls in flight; returns how many seconds it took."""
    created = 0
    step = max(BATCH, len(jobs) // 10)
    batches = [jobs[n : n + BATCH] for n in range(0, len(jobs), BATCH)]

    async def create(batch: Sequence[job_pb2.Job]) -> None:
        nonlocal created
        requests = [pb.CreateJobRequest(job=job) for job in batch]
        await stub.BatchCreateJobs(
            pb.BatchCreateJobsRequest(requests=requests), timeout=RPC_TIMEOUT
        )
        before, created = created, created + len(batch)
        if say and created // step > before // step:
            note(f"created {created}/{len(jobs)} jobs")

    began = time.monotonic()
    await run_concurrently(batches, create, min(concurrency, BATCHES_IN_FLIGHT))
    return time.monotonic() - began


async def creation_rate(stub: Any, count: int, concurrency: int) -> float:
    """Jobs/s: creates ``count`` throwaway jobs due tomorrow, then deletes them."""
    far = _timestamp(_utcnow() + timedelta(days=1))
    jobs = [
        _job(f"calibrate-{i:05d}", job_pb2.Trigger(date=job_pb2.DateTrigger(run_time=far)))
        for i in range(count)
    ]
    seconds = await create_jobs(stub, jobs, concurrency, say=False)

    async def delete(job: job_pb2.Job) -> None:
        await stub.DeleteJob(pb.DeleteJobRequest(id=job.id), timeout=RPC_TIMEOUT)

    await run_concurrently(jobs, delete, concurrency)
    return count / max(seconds, 1e-6)


async def list_executions(stub: Any, scheduled_after: datetime) -> list[execution_pb2.Execution]:
    """Every execution scheduled at or after ``scheduled_after``."""
    found: list[execution_pb2.Execution] = []
    token = ""
    while True:
        response = await stub.ListExecutions(
            pb.ListExecutionsRequest(
                scheduled_after=_timestamp(scheduled_after), page_size=PAGE_SIZE, page_token=token
            ),
            timeout=RPC_TIMEOUT,
        )
        found.extend(response.executions)
        token = str(response.next_page_token)
        if not token:
            return found


async def any_unfinished(stub: Any, scheduled_after: datetime) -> bool:
    response = await stub.ListExecutions(
        pb.ListExecutionsRequest(
            states=_UNFINISHED_STATES, scheduled_after=_timestamp(scheduled_after), page_size=1
        ),
        timeout=RPC_TIMEOUT,
    )
    return len(response.executions) > 0


async def settled_listing(stub: Any, scheduled_after: datetime) -> list[execution_pb2.Execution]:
    """Lists executions until their number stops changing (fires may still be being written),
    for at most STALL_SECONDS."""
    found = await list_executions(stub, scheduled_after)
    give_up = time.monotonic() + STALL_SECONDS
    while time.monotonic() < give_up:
        await asyncio.sleep(2.0)
        again = await list_executions(stub, scheduled_after)
        if len(again) == len(found):
            return again
        found = again
    return found


async def wait_for_executions(
    stub: Any, server: Server, scheduled_after: datetime, expected: int, deadline: datetime
) -> list[execution_pb2.Execution]:
    """Waits until ``expected`` executions are final; returns what was recorded by then.

    Once a second it asks cheaply whether any execution is pending or running; it lists them
    all only when none is, or every LISTING_EVERY seconds to see progress. It gives up at the
    deadline, when the final count has not moved for STALL_SECONDS, or when the server logs
    CRITICAL (a dead runner loop never recovers).
    """
    final_before = -1
    moved = time.monotonic()
    next_listing = time.monotonic() + LISTING_EVERY
    while True:
        failure = server.failure()
        if failure is not None:
            if server.process.returncode is not None:
                raise RuntimeError(failure)
            note(f"{failure}; not waiting for executions to finish any longer")
            return await settled_listing(stub, scheduled_after)
        past_deadline = _utcnow() >= deadline
        unfinished = await any_unfinished(stub, scheduled_after)
        if past_deadline or not unfinished or time.monotonic() >= next_listing:
            next_listing = time.monotonic() + LISTING_EVERY
            found = await list_executions(stub, scheduled_after)
            final = sum(1 for e in found if e.state in _FINAL_STATES)
            if final >= expected:
                return found
            if past_deadline:
                note(f"timed out with {final}/{expected} executions final ({len(found)} recorded)")
                return found
            if final != final_before:
                final_before, moved = final, time.monotonic()
            elif time.monotonic() - moved >= STALL_SECONDS:
                note(
                    f"no progress for {STALL_SECONDS:.0f} s at {final}/{expected} final; giving up"
                )
                return found
            idle = "" if unfinished else ", none pending or running"
            note(f"{final}/{expected} executions final, {len(found)} recorded{idle}")
        await asyncio.sleep(1.0)


# -- figures --------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Figures:
    expected: int
    executed: int
    missed: int
    unfinished: int
    other: int
    unrecorded: int
    duplicates: int
    executions_per_s: float | None
    lateness_p50_ms: float | None
    lateness_p99_ms: float | None
    lateness_max_ms: float | None
    record_lateness_p50_ms: float | None
    record_lateness_p99_ms: float | None
    record_lateness_max_ms: float | None
    states: Counter[str]


def _key(execution: execution_pb2.Execution) -> tuple[str, int, int]:
    scheduled = execution.scheduled_time
    return (execution.job_id, scheduled.seconds, scheduled.nanos)


def figures(
    executions: Sequence[execution_pb2.Execution],
    expected_keys: set[tuple[str, int, int]],
    first_due: datetime,
) -> Figures:
    scheduled = [e for e in executions if e.source == execution_pb2.EXECUTION_SOURCE_SCHEDULE]
    per_key = Counter(_key(e) for e in scheduled)
    duplicates = sum(count - 1 for count in per_key.values() if count > 1)
    unexpected = set(per_key) - expected_keys
    if unexpected:
        note(
            f"{len(unexpected)} executions for fires the bench did not expect, e.g. "
            f"{sorted(unexpected)[:3]}"
        )
    states = Counter(execution_pb2.ExecutionState.Name(e.state) for e in scheduled)
    started = [e for e in scheduled if e.HasField("start_time")]
    lateness = sorted((_seconds(e.start_time) - _seconds(e.scheduled_time)) * 1000 for e in started)
    # create_time is taken when the runner starts writing the fire's batch: it times the timer
    # and the hand-over to the runner, whatever happens to the execution afterwards.
    recording = sorted(
        (_seconds(e.create_time) - _seconds(e.scheduled_time)) * 1000
        for e in scheduled
        if e.HasField("create_time")
    )
    executed = states["EXECUTION_STATE_SUCCEEDED"]
    missed = states["EXECUTION_STATE_MISSED"]
    unfinished = states["EXECUTION_STATE_PENDING"] + states["EXECUTION_STATE_RUNNING"]
    rate: float | None = None
    if started:
        span = max(_seconds(e.start_time) for e in started) - first_due.timestamp()
        rate = executed / span if span > 0 else None
    return Figures(
        expected=len(expected_keys),
        executed=executed,
        missed=missed,
        unfinished=unfinished,
        other=len(scheduled) - executed - missed - unfinished,
        unrecorded=len(expected_keys - set(per_key)),
        duplicates=duplicates,
        executions_per_s=rate,
        lateness_p50_ms=percentile(lateness, 0.50),
        lateness_p99_ms=percentile(lateness, 0.99),
        lateness_max_ms=lateness[-1] if lateness else None,
        record_lateness_p50_ms=percentile(recording, 0.50),
        record_lateness_p99_ms=percentile(recording, 0.99),
        record_lateness_max_ms=recording[-1] if recording else None,
        states=states,
    )


def report(
    backend: str,
    scenario: str,
    result: Figures,
    create_rate: float,
    rss_mb: float | None,
    server: Server,
) -> None:
    emit(backend, scenario, "expected", result.expected, "count")
    emit(backend, scenario, "executed", result.executed, "count")
    emit(backend, scenario, "missed", result.missed, "count")
    emit(backend, scenario, "unfinished", result.unfinished, "count")
    emit(backend, scenario, "other", result.other, "count")
    emit(backend, scenario, "unrecorded", result.unrecorded, "count")
    emit(backend, scenario, "duplicates", result.duplicates, "count")
    emit(backend, scenario, "executions_per_s", result.executions_per_s, "1/s")
    emit(backend, scenario, "lateness_p50_ms", result.lateness_p50_ms, "ms")
    emit(backend, scenario, "lateness_p99_ms", result.lateness_p99_ms, "ms")
    emit(backend, scenario, "lateness_max_ms", result.lateness_max_ms, "ms")
    emit(backend, scenario, "record_lateness_p50_ms", result.record_lateness_p50_ms, "ms")
    emit(backend, scenario, "record_lateness_p99_ms", result.record_lateness_p99_ms, "ms")
    emit(backend, scenario, "record_lateness_max_ms", result.record_lateness_max_ms, "ms")
    emit(backend, scenario, "create_jobs_per_s", create_rate, "1/s")
    emit(backend, scenario, "server_rss_mb_peak", rss_mb, "MB")
    problems = _problem_lines(server.log)
    emit(backend, scenario, "server_log_warnings", len(problems), "count")
    emit(backend, scenario, "server_exit_code", server.process.returncode, "code")

    note(f"{backend}/{scenario}: states {dict(result.states)}")
    for line in problems[:20]:
        note(f"server log: {line[:300]}")
    if len(problems) > 20:
        note(f"server log: ... and {len(problems) - 20} more WARNING/ERROR lines")
    note(f"{backend}/{scenario}: " + "; ".join(verdict(backend, scenario, result)))


def verdict(backend: str, scenario: str, result: Figures) -> list[str]:
    def mark(ok: bool, what: str) -> str:
        return f"{'ok' if ok else 'MISSED TARGET'}: {what}"

    p99 = result.lateness_p99_ms
    rate = result.executions_per_s
    p99_text = "none" if p99 is None else f"{p99:.1f}"
    rate_text = "none" if rate is None else f"{rate:.0f}"
    checks = [mark(result.duplicates == 0, f"duplicates {result.duplicates} == 0")]
    if scenario == "burst":
        if backend == "postgres":
            checks.append(
                mark(
                    rate is not None and rate >= TARGET_BURST_RATE,
                    f"executions/s {rate_text} >= {TARGET_BURST_RATE:g}",
                )
            )
            checks.append(
                mark(
                    p99 is not None and p99 <= TARGET_BURST_P99_MS,
                    f"lateness p99 {p99_text} ms <= {TARGET_BURST_P99_MS:g} ms",
                )
            )
        checks.append(
            mark(
                result.executed == result.expected,
                f"executed {result.executed} == {result.expected}",
            )
        )
    else:
        target = TARGET_STEADY_P99_MS[scenario.removeprefix("steady_")]
        checks.append(
            mark(
                result.executed == result.expected,
                f"every fire ran: {result.executed} of {result.expected}",
            )
        )
        checks.append(
            mark(
                p99 is not None and p99 <= target,
                f"lateness p99 {p99_text} ms <= {target:g} ms",
            )
        )
    return checks


# -- scenarios ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    burst_jobs: int
    steady_jobs: int
    steady_seconds: int
    concurrency: int
    timeout: float
    phase: str
    serve_args: tuple[str, ...] = ()
    history: int = 0


async def _choose_start(stub: Any, jobs: int, options: Options) -> tuple[datetime, float]:
    """A start time by which ``jobs`` creations will surely have finished, and the measured
    creation rate."""
    rate = await creation_rate(stub, min(CALIBRATION_JOBS, jobs), options.concurrency)
    lead = 2.0 * jobs / rate + 3.0
    start = _whole_second_after(_utcnow() + timedelta(seconds=lead))
    note(f"creation runs at ~{rate:.0f} jobs/s; first fire at {start:%H:%M:%S} ({lead:.1f} s)")
    return start, rate


def _check_created_in_time(finished: datetime, first_due: datetime) -> None:
    margin = (first_due - finished).total_seconds()
    if margin < 0.5:
        note(
            f"WARNING: job creation ended only {margin:.2f} s before the first fire; "
            "jobs created after it never fire (see 'unrecorded')"
        )
    else:
        note(f"all jobs created {margin:.1f} s before the first fire")


async def burst(stub: Any, server: Server, options: Options) -> tuple[Figures, float]:
    count = options.burst_jobs
    due, _ = await _choose_start(stub, count, options)
    trigger = job_pb2.Trigger(date=job_pb2.DateTrigger(run_time=_timestamp(due)))
    jobs = [_job(f"burst-{i:05d}", trigger) for i in range(count)]
    seconds = await create_jobs(stub, jobs, options.concurrency)
    _check_created_in_time(_utcnow(), due)
    note(f"created {count} jobs in {seconds:.1f} s ({count / seconds:.0f}/s)")
    await _sleep_until(due + timedelta(seconds=1), say_every=10, what="waiting for T")
    executions = await wait_for_executions(
        stub, server, due, count, deadline=due + timedelta(seconds=options.timeout)
    )
    due_stamp = _timestamp(due)
    keys = {(job.id, int(due_stamp.seconds), int(due_stamp.nanos)) for job in jobs}
    return figures(executions, keys, due), count / seconds


def _interval_trigger(start: datetime, end: datetime) -> Any:
    return job_pb2.Trigger(
        interval=job_pb2.IntervalTrigger(
            every=duration_pb2.Duration(seconds=1),
            start_time=_timestamp(start),
            end_time=_timestamp(end),
        )
    )


def _shifted(fire: tuple[int, int], offset: timedelta) -> tuple[int, int]:
    total = fire[0] * 1_000_000_000 + fire[1] + offset // timedelta(microseconds=1) * 1_000
    return total // 1_000_000_000, total % 1_000_000_000


async def steady(stub: Any, server: Server, options: Options) -> tuple[Figures, float]:
    count = options.steady_jobs
    start, _ = await _choose_start(stub, count, options)
    end = start + timedelta(seconds=options.steady_seconds)
    preview = await stub.PreviewTrigger(
        pb.PreviewTriggerRequest(
            trigger=_interval_trigger(start, end),
            count=min(1_000, options.steady_seconds + 2),
            start_time=_timestamp(start),
        ),
        timeout=RPC_TIMEOUT,
    )
    fire_times = [(int(t.seconds), int(t.nanos)) for t in preview.fire_times]
    note(
        f"each job fires {len(fire_times)} times, {start:%H:%M:%S} to {end:%H:%M:%S}, "
        f"phases {options.phase}"
    )
    # Staggered: job i fires i/count of a second after the whole second, whole milliseconds.
    offsets = [
        timedelta(milliseconds=(1000 * i) // count if options.phase == "staggered" else 0)
        for i in range(count)
    ]
    jobs = [
        _job(f"steady-{i:05d}", _interval_trigger(start + offset, end + offset))
        for i, offset in enumerate(offsets)
    ]
    seconds = await create_jobs(stub, jobs, options.concurrency)
    _check_created_in_time(_utcnow(), start)
    note(f"created {count} jobs in {seconds:.1f} s ({count / seconds:.0f}/s)")
    # No API calls while the fires run: they would compete with the server's own work.
    await _sleep_until(end + timedelta(seconds=2), say_every=10, what="steady fires")
    keys = {
        (job.id, *_shifted(fire, offset))
        for job, offset in zip(jobs, offsets, strict=True)
        for fire in fire_times
    }
    executions = await wait_for_executions(
        stub, server, start, len(keys), deadline=end + timedelta(seconds=options.timeout)
    )
    return figures(executions, keys, start), count / seconds


SCENARIOS: dict[str, Callable[[Any, Server, Options], Awaitable[tuple[Figures, float]]]] = {
    "burst": burst,
    "steady": steady,
}


async def run_scenario(
    backend: str, scenario: str, workdir: Path, options: Options, maintenance_dsn: str
) -> None:
    note(f"=== {backend} / {scenario} ===")
    database = (
        sqlite_database(workdir, f"{scenario}")
        if backend == "sqlite"
        else postgres_database(maintenance_dsn)
    )
    async with database as url:
        log_path = workdir / f"server-{backend}-{scenario}.log"
        async with running_server(url, log_path, *options.serve_args) as server:
            channel: Any = grpc.aio.insecure_channel(server.address)
            try:
                stub: Any = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
                if options.history and backend == "postgres":
                    daily = job_pb2.IntervalTrigger(every=duration_pb2.Duration(seconds=86_400))
                    history = _job("history", job_pb2.Trigger(interval=daily))
                    history.paused = True
                    await stub.CreateJob(pb.CreateJobRequest(job=history))
                    await write_history(url, "history", options.history)
                result, create_rate = await SCENARIOS[scenario](stub, server, options)
            except Exception as error:
                await asyncio.sleep(0.5)  # let a dying server's exit be noticed
                if server.process.returncode is not None:
                    first = error.exceptions[0] if isinstance(error, ExceptionGroup) else error
                    raise RuntimeError(
                        f"{server.failure()}\n(the bench's call failed with {first!r:.300})"
                    ) from None
                raise
            finally:
                await channel.close()
            rss_mb = _peak_rss_mb(server.process.pid)
        # After the server stopped, so that its shutdown lines are in the log too.
        label = f"steady_{options.phase}" if scenario == "steady" else scenario
        report(backend, label, result, create_rate, rss_mb, server)


# -- main -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--scenario", choices=["burst", "steady", "both"], default="both")
    parser.add_argument(
        "--jobs",
        type=int,
        help=f"jobs in every scenario (default {BURST_JOBS} for burst, {STEADY_JOBS} for steady)",
    )
    parser.add_argument(
        "--seconds",
        type=int,
        default=STEADY_SECONDS,
        help=f"how long the steady jobs fire (default {STEADY_SECONDS})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help=f"calls in flight (default {CONCURRENCY}; BatchCreateJobs: {BATCHES_IN_FLIGHT})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds after the last due fire to wait for executions (default 300)",
    )
    parser.add_argument(
        "--phase",
        choices=["staggered", "aligned"],
        default="staggered",
        help="steady jobs' phases: spread over the second (default, as in the APScheduler "
        "baseline the target comes from) or all on the same instant (the hard case)",
    )
    parser.add_argument(
        "--postgres-url",
        help=f"maintenance database DSN (env {POSTGRES_URL_ENV}; default {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="PostgreSQL: finished executions written (and analyzed) before the scenario",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="a flag for the measured server, e.g. --serve-arg=--celery-broker-url=redis://…",
    )
    return parser


def _describe(error: BaseException) -> str:
    """The traceback of an error; of a group (concurrent calls), its first member's and a count."""
    if isinstance(error, BaseExceptionGroup) and error.exceptions:
        first = error.exceptions[0]
        return f"{len(error.exceptions)} concurrent calls failed; the first:\n" + _describe(first)
    return "".join(traceback.format_exception(error))


def _tidy_workdir(workdir: Path) -> None:
    """Keeps the server logs (and says where); removes the directory if there are none."""
    if any(workdir.glob("*.log")):
        note(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


async def _main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)

    options = Options(
        burst_jobs=args.jobs or BURST_JOBS,
        steady_jobs=args.jobs or STEADY_JOBS,
        steady_seconds=args.seconds,
        concurrency=args.concurrency,
        timeout=args.timeout,
        phase=args.phase,
        serve_args=tuple(args.serve_arg),
        history=args.history,
    )
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    scenarios = ["burst", "steady"] if args.scenario == "both" else [args.scenario]
    maintenance_dsn = _maintenance_dsn(args.postgres_url)
    workdir = Path(tempfile.mkdtemp(prefix="chronoplane-bench-"))
    failures = 0
    try:
        for backend in backends:
            for scenario in scenarios:
                try:
                    await run_scenario(backend, scenario, workdir, options, maintenance_dsn)
                except Exception as error:
                    failures += 1
                    note(f"{backend}/{scenario} failed:\n{_describe(error)}")
    finally:
        _tidy_workdir(workdir)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.jobs is not None and args.jobs < 1) or args.seconds < 1 or args.concurrency < 1:
        print("fire_throughput: --jobs, --seconds and --concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        note("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
