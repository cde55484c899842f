"""Compare: Chronoplane and its peers on the same work, in one run on one machine.

Each scenario runs Chronoplane through its own bench (as a subprocess, its JSON lines parsed)
or its own code here, then the peers on the same work, one after the other (never two heavy
runs at once):

* ``unary``: a trivial grpc.aio unary server (``bench/api.py --echo-server``: a GetJob that
  answers with the id it was asked) against a real ``chronoplane serve`` (``--require-auth``,
  as bench/api.py runs it, on a fresh PostgreSQL database of 2,000 jobs and 20,000
  executions): GetJob of a random job, and TriggerJob of 512 jobs made for it, at 64 calls in
  flight. Figures: calls_per_s, latency_p50_ms, latency_p99_ms, server_cpu_us_per_call.
* ``stream``: trivial grpc.aio streaming servers of bench/watch_fanout.py against
  Chronoplane's watches, all measured by ``bench/watch_fanout.py`` (a subprocess): 1,000
  one-job watchers and 10 of everything, layouts ``one`` and ``split``, at each execution rate
  asked (``--watch-rates``). The peer (``grpc_trivial_stream``) is the paced trivial server:
  the same messages to the same streams at the same rate, with nothing else to do
  (``peer_cpu_us_per_msg``, ``peer_delivered_per_s``); beside it, at the first rate, the same
  server streaming as fast as it can (``grpc_trivial_stream_saturated``:
  ``ceiling_cpu_us_per_msg`` and ``ceiling_msgs_per_s``). Chronoplane's, per layout and rate:
  ``server_cpu_us_per_msg`` (the watchers' server), ``delivered_per_s``, ``expected_per_s``,
  ``latency_p50_ms``, ``latency_p99_ms`` and ``behind``; named here cpu_us_per_event and
  events_per_s.
* ``burst``: 10,000 jobs due at one instant T; ``steady_aligned`` and ``steady_staggered``:
  1,000 jobs every second for 30 s (31 fires each), all on the same instant or spread over
  the second. Chronoplane: ``bench/fire_throughput.py --backend postgres`` (events and audit
  on, as the server's defaults have them). Peers: APScheduler 3.11 with its
  ``SQLAlchemyJobStore`` on a throwaway database of the same PostgreSQL (psycopg 3,
  ``postgresql+psycopg://``), and with its ``MemoryJobStore`` (no persistence), each in a
  process of its own (this file, ``--apscheduler-peer``). The peer is an
  ``AsyncIOScheduler`` running an ``async def`` no-op: Chronoplane's own timer is an
  AsyncIOScheduler and its inline runner runs the no-op on its event loop, so this is the
  same machinery without the control plane around it (and what the issue's reference figures,
  shared/research/peers/aps3_bench.py, measured); a ThreadPoolExecutor would add ten threads
  fighting for the GIL on two cores. Job defaults: ``misfire_grace_time`` 60 s as the
  Chronoplane jobs have it, and the library's ``coalesce=True`` and ``max_instances=1``, which
  are Chronoplane's defaults too (misfire policy run-once, overlap skip). The job function
  returns the time it started; a listener takes it with the fire's scheduled time from
  APScheduler's executed events. Figures of all three: executions_per_s = executed / (last
  start - T), lateness_p50_ms / lateness_p99_ms (start - scheduled), executed, expected,
  run_fraction (executed / expected), missed (past the grace), other (Chronoplane: skipped
  because the job's previous run was still running, failed or interrupted; APScheduler:
  dropped as "maximum number of running instances reached", or failed), duplicates. A fire
  counted in none of executed, missed and other was coalesced with a later one (both run late
  fires of one job once) or, for Chronoplane, never recorded.
* ``celery``: ``bench/celery_dispatch.py --burst N`` (TriggerJob of a Celery job, 32 in
  flight, one worker of 2 prefork processes) against a bare Celery app
  (``bench/celery_peer.py``) on the same Redis broker with the same worker settings (2
  prefork processes, acks_late, reject on worker lost, prefetch 1, the same transport
  options) and a Redis result backend: N ``send_task`` calls, then every result read.
  Figures: executions_per_s = succeeded / (last task end - first send, or first execution
  created), dispatch_to_start_p50_ms / p99 (the task's start - when it was sent to the
  broker), executions, succeeded.

Output: one JSON line per figure on stdout, for example::

    {"bench": "compare", "scenario": "burst", "system": "chronoplane",
     "figure": "executions_per_s", "value": 2444.1, "unit": "1/s",
     "peer": "apscheduler_sqlalchemy", "ratio": 1.62}

A peer's figures carry no ratio; a Chronoplane figure compared with a peer carries the peer's
name and ``ratio`` = Chronoplane's value / the peer's (above 1: more calls, executions or
events per second, or more latency or CPU: read it with the figure). A figure compared with
two peers (burst, steady) is printed once per peer. A table of every Chronoplane figure
beside its peer's goes to stderr at the end, with the subprocesses' progress before it.

Run it (PostgreSQL: the local server, trust auth, or ``--postgres-url`` /
CHRONOPLANE_BENCH_POSTGRES_URL naming a maintenance database of a role that may CREATE
DATABASE; Redis on 127.0.0.1:6379 or ``--redis-url``)::

    .venv/bin/python bench/compare.py                      # the issue's sizes (about 12 min)
    .venv/bin/python bench/compare.py --quick              # small sizes (about 4 min)
    .venv/bin/python bench/compare.py --only burst,steady
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import api
import grpc
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
)
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from brokers import Worker
from celery import Celery
from fire_throughput import (
    MISFIRE_GRACE_SECONDS,
    _maintenance_dsn,
    _server_command,
    _whole_second_after,
    note,
    percentile,
    postgres_database,
    run_concurrently,
)
from google.protobuf import duration_pb2
from sqlalchemy.engine import make_url

from chronoplane.v1 import job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

BENCH = "compare"
BENCH_DIR = Path(__file__).resolve().parent
IN_FLIGHT = 64
RPC_TIMEOUT = 60.0
UNARY_JOBS = 2_000
UNARY_EXECUTIONS = 20_000
TRIGGER_JOBS = 512
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# APScheduler: jobs added to measure the adding rate, before T is chosen; how long after the
# last due fire to wait for runs; how long a quiet spell ends the wait.
PILOT_JOBS = 200
PEER_TIMEOUT = 300.0
QUIET_SECONDS = 1.0

UNITS = {
    "executions_per_s": "1/s",
    "lateness_p50_ms": "ms",
    "lateness_p99_ms": "ms",
    "run_fraction": "ratio",
    "executed": "count",
    "expected": "count",
    "missed": "count",
    "other": "count",
    "duplicates": "count",
    "executions": "count",
    "succeeded": "count",
    "dispatch_to_start_p50_ms": "ms",
    "dispatch_to_start_p99_ms": "ms",
}
FIRE_COMPARED = ("executions_per_s", "lateness_p50_ms", "lateness_p99_ms", "run_fraction")
FIRE_FIGURES = (*FIRE_COMPARED, "executed", "expected", "missed", "other", "duplicates")
# Steady: executions/s is only the rate the fires fall due at, the same for all.
STEADY_COMPARED = FIRE_COMPARED[1:]
CELERY_COMPARED = ("executions_per_s", "dispatch_to_start_p50_ms", "dispatch_to_start_p99_ms")
CELERY_FIGURES = (*CELERY_COMPARED, "executions", "succeeded")
UNARY_COMPARED = ("calls_per_s", "latency_p50_ms", "latency_p99_ms", "server_cpu_us_per_call")
STREAM_COMPARED = ("cpu_us_per_event",)


@dataclass(frozen=True)
class Sizes:
    burst: int = 10_000
    steady: int = 1_000
    steady_seconds: int = 30
    celery: int = 2_000
    unary_seconds: float = 5.0
    watch_seconds: float = 10.0
    watch_rates: tuple[float, ...] = (200.0, 400.0)
    layouts: tuple[str, ...] = ("one", "split")


QUICK = Sizes(
    burst=2_000,
    steady=200,
    steady_seconds=10,
    celery=300,
    unary_seconds=2.0,
    watch_seconds=5.0,
    watch_rates=(200.0,),
    layouts=("split",),
)


@dataclass(frozen=True)
class Context:
    sizes: Sizes
    maintenance_dsn: str
    postgres_args: tuple[str, ...]
    redis_url: str
    workdir: Path


# -- output ---------------------------------------------------------------------------------------


@dataclass
class Result:
    """One system's figures in a scenario: name -> (value, unit)."""

    system: str
    figures: dict[str, tuple[Any, str]]
    extra: dict[str, Any] = field(default_factory=dict)

    def value(self, figure: str) -> Any:
        return self.figures.get(figure, (None, ""))[0]


TABLES: list[tuple[str, list[tuple[str, ...]]]] = []


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def emit(scenario: str, result: Result, figure: str, **more: Any) -> None:
    value, unit = result.figures[figure]
    line = {"bench": BENCH, "scenario": scenario, "system": result.system, **result.extra}
    line.update(figure=figure, value=_rounded(value), unit=unit, **more)
    print(json.dumps(line), flush=True)


def ratio(ours: Any, theirs: Any) -> float | None:
    numbers = (int, float)
    if isinstance(ours, bool) or not isinstance(ours, numbers) or not isinstance(theirs, numbers):
        return None
    return ours / theirs if theirs else None


def _text(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    elif isinstance(value, int) and not isinstance(value, bool):
        value = f"{value:,}"
    return f"{value} {unit}".strip() if unit not in ("", "count", "ratio", "bool") else str(value)


def _label(key: str, value: Any) -> str:
    if key == "rate":
        return f"{value:g} executions/s"
    if key == "in_flight":
        return f"{value} in flight"
    return str(value)


def report(
    scenario: str, ours: Sequence[Result], peers: Sequence[Result], compared: Sequence[str]
) -> None:
    """The peers' lines, then Chronoplane's, each compared figure once per peer with its
    ratio; a table of every Chronoplane figure, each peer's beside it."""
    for peer in peers:
        for figure in peer.figures:
            emit(scenario, peer, figure)
    table = [("", "figure", "chronoplane", *(c for p in peers for c in (p.system, "ratio")))]
    for result in ours:
        what = ", ".join(_label(key, value) for key, value in result.extra.items())
        for figure, (value, unit) in result.figures.items():
            row = [what, figure, _text(value, unit)]
            for peer in peers:
                theirs = peer.value(figure)
                share = ratio(value, theirs) if figure in compared else None
                if figure in compared:
                    emit(scenario, result, figure, peer=peer.system, ratio=_rounded(share))
                row += [_text(theirs, unit), "" if share is None else f"{share:.2f}"]
            if figure not in compared or not peers:
                emit(scenario, result, figure)
            table.append(tuple(row))
    TABLES.append((scenario, table))


def print_table(failed: Sequence[str]) -> None:
    print("\nratio = Chronoplane / peer, measured in this run", file=sys.stderr)
    for scenario, rows in TABLES:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print(f"\n{scenario}", file=sys.stderr)
        for row in rows:
            cells = [
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            print("  " + "  ".join(cells).rstrip(), file=sys.stderr)
    for name in failed:
        print(f"\n{name}: FAILED (see above)", file=sys.stderr)


# -- subprocesses ---------------------------------------------------------------------------------


async def run_lines(command: Sequence[str]) -> list[dict[str, Any]]:
    """Runs a bench; its JSON lines (stdout). Its stderr (progress) passes through."""
    note(f"running {Path(command[1]).name} {' '.join(command[2:])}")
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    try:
        out, _ = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{command[1]} exited with {process.returncode}")
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]


async def bench_lines(script: str, *arguments: str) -> list[dict[str, Any]]:
    return await run_lines([sys.executable, str(BENCH_DIR / script), *arguments])


def picked(system: str, lines: list[dict[str, Any]], names: Sequence[str], **where: Any) -> Result:
    """A Result of the figures ``names`` among the lines that match ``where``."""
    found = {
        line["figure"]: (line["value"], line["unit"])
        for line in lines
        if all(line.get(k) == v for k, v in where.items())
    }
    return Result(
        system,
        {
            name: (found[name][0], UNITS.get(name, found[name][1]))
            for name in names
            if name in found
        },
    )


# -- unary ----------------------------------------------------------------------------------------


def call_figures(run: api.Run) -> dict[str, tuple[Any, str]]:
    cpu = run.cpu / run.calls * 1e6 if run.calls and run.cpu else None
    return {
        "calls_per_s": (run.rate, "1/s"),
        "latency_p50_ms": (run.p(0.5), "ms"),
        "latency_p99_ms": (run.p(0.99), "ms"),
        "server_cpu_us_per_call": (cpu, "us"),
    }


async def trigger_targets(stub: Any, metadata: Any) -> list[str]:
    """Jobs for TriggerJob, made as bench/api.py makes them (hourly, chronoplane.echo)."""
    every = job_pb2.Trigger(
        interval=job_pb2.IntervalTrigger(every=duration_pb2.Duration(seconds=3600))
    )
    ids = [f"t{n:05d}" for n in range(TRIGGER_JOBS)]

    async def create(job_id: str) -> None:
        job = job_pb2.Job(id=job_id, task="chronoplane.echo", trigger=every)
        await stub.CreateJob(pb.CreateJobRequest(job=job), metadata=metadata, timeout=RPC_TIMEOUT)

    await run_concurrently(ids, create, IN_FLIGHT)
    return ids


async def unary_runs(
    world: api.World, chrono: api.Process, echo: api.Process, seconds: float
) -> dict[str, api.Run]:
    """The echo server's GetJob, then Chronoplane's GetJob and TriggerJob, 64 in flight."""
    meta = api._metadata(world)
    ids = [f"j{n:06d}" for n in range(world.jobs)]
    runs: dict[str, api.Run] = {}
    async with (
        grpc.aio.insecure_channel(chrono.address) as chrono_channel,
        grpc.aio.insecure_channel(echo.address) as echo_channel,
    ):
        real = pb_grpc.SchedulerServiceStub(chrono_channel)
        trivial = pb_grpc.SchedulerServiceStub(echo_channel)
        targets = await trigger_targets(real, meta)

        def get_job(stub: Any) -> Callable[[int], Awaitable[object]]:
            async def call(_: int) -> None:
                request = pb.GetJobRequest(id=random.choice(ids))
                await stub.GetJob(request, metadata=meta, timeout=RPC_TIMEOUT)

            return call

        async def trigger_job(n: int) -> None:
            request = pb.TriggerJobRequest(id=targets[n % len(targets)])
            await real.TriggerJob(request, metadata=meta, timeout=RPC_TIMEOUT)

        for name, call, server in (
            ("echo", get_job(trivial), echo),
            ("GetJob", get_job(real), chrono),
            ("TriggerJob", trigger_job, chrono),
        ):
            note(f"unary: {name}, {IN_FLIGHT} in flight, {seconds:g} s")
            runs[name] = await api.load(call, in_flight=IN_FLIGHT, seconds=seconds, server=server)
    return runs


async def unary(ctx: Context) -> None:
    async with postgres_database(ctx.maintenance_dsn) as url:
        size = argparse.Namespace(jobs=UNARY_JOBS, executions=UNARY_EXECUTIONS)
        world = await api._prepare(size, url, keep=False)
        echo_command = [sys.executable, str(BENCH_DIR / "api.py"), "--echo-server"]
        server_command = [*_server_command(), *api._serve_arguments(url)]
        async with (
            api.started(echo_command, ctx.workdir / "unary-echo.log") as echo,
            api.started(server_command, ctx.workdir / "unary-server.log") as chrono,
        ):
            runs = await unary_runs(world, chrono, echo, ctx.sizes.unary_seconds)
    tags = {"in_flight": IN_FLIGHT}
    peer = Result("grpc_echo", call_figures(runs.pop("echo")), {"rpc": "GetJob", **tags})
    ours = [Result("chronoplane", call_figures(r), {"rpc": k, **tags}) for k, r in runs.items()]
    report("unary", ours, [peer], UNARY_COMPARED)


# -- stream ---------------------------------------------------------------------------------------

STREAM_NAMES = {
    "server_cpu_us_per_msg": "cpu_us_per_event",
    "delivered_per_s": "events_per_s",
    "expected_per_s": "expected_per_s",
    "latency_p50_ms": "latency_p50_ms",
    "latency_p99_ms": "latency_p99_ms",
    "behind": "behind",
}


async def stream(ctx: Context) -> None:
    sizes = ctx.sizes
    lines = await bench_lines(
        "watch_fanout.py",
        "--seconds",
        f"{sizes.watch_seconds:g}",
        "--rates",
        *(f"{rate:g}" for rate in sizes.watch_rates),
        "--layouts",
        *sizes.layouts,
        *ctx.postgres_args,
    )
    ceiling = {line["figure"]: line for line in lines if line["figure"].startswith("ceiling_")}
    saturated = Result(
        "grpc_trivial_stream_saturated",
        {
            "cpu_us_per_event": (ceiling["ceiling_cpu_us_per_msg"]["value"], "us"),
            "events_per_s": (ceiling["ceiling_msgs_per_s"]["value"], "1/s"),
        },
        {"streams": ceiling["ceiling_msgs_per_s"].get("streams")},
    )
    for rate in sizes.watch_rates:
        mine = [x for x in lines if x.get("rate") == rate and "layout" not in x]
        paced = {x["figure"]: (x["value"], x["unit"]) for x in mine}
        peer = Result(
            "grpc_trivial_stream",
            {
                "cpu_us_per_event": paced.get("peer_cpu_us_per_msg", (None, "us")),
                "events_per_s": paced.get("peer_delivered_per_s", (None, "1/s")),
            },
            {"rate": rate},
        )
        ours = []
        for layout in sizes.layouts:
            phase = [x for x in lines if x.get("layout") == layout and x.get("rate") == rate]
            found = {x["figure"]: (x["value"], x["unit"]) for x in phase}
            if found:  # watch_fanout stops at the first rate it falls behind at
                names = STREAM_NAMES.items()
                figures = {ours: found[theirs] for theirs, ours in names if theirs in found}
                ours.append(Result("chronoplane", figures, {"layout": layout, "rate": rate}))
        peers = [peer, saturated] if rate == sizes.watch_rates[0] else [peer]
        report("stream", ours, peers, STREAM_COMPARED)


# -- burst and steady: Chronoplane --------------------------------------------------------------


def fire_result(system: str, lines: list[dict[str, Any]], scenario: str) -> Result:
    result = picked(system, lines, FIRE_FIGURES, scenario=scenario)
    executed, expected = result.value("executed"), result.value("expected")
    result.figures["run_fraction"] = (executed / expected if expected else None, "ratio")
    result.figures = {name: result.figures[name] for name in FIRE_FIGURES if name in result.figures}
    return result


async def chronoplane_fires(ctx: Context, scenario: str, *arguments: str) -> Result:
    lines = await bench_lines(
        "fire_throughput.py", "--backend", "postgres", *arguments, *ctx.postgres_args
    )
    return fire_result("chronoplane", lines, scenario)


async def apscheduler(ctx: Context, store: str, spec: dict[str, Any]) -> Result:
    """APScheduler 3 with ``store`` on the work ``spec`` says, in a process of its own."""
    async with contextlib.AsyncExitStack() as stack:
        if store == "sqlalchemy":
            url = await stack.enter_async_context(postgres_database(ctx.maintenance_dsn))
            psycopg = make_url(url).set(drivername="postgresql+psycopg")
            spec = {**spec, "url": psycopg.render_as_string(hide_password=False)}
        argument = json.dumps({**spec, "store": store})
        lines = await run_lines([sys.executable, __file__, "--apscheduler-peer", argument])
    figures = lines[-1]
    return Result(f"apscheduler_{store}", {k: (v, UNITS[k]) for k, v in figures.items()})


async def burst(ctx: Context) -> None:
    count = ctx.sizes.burst
    ours = await chronoplane_fires(ctx, "burst", "--scenario", "burst", "--jobs", str(count))
    spec = {"kind": "burst", "jobs": count, "seconds": 0, "phase": ""}
    peers = [await apscheduler(ctx, store, spec) for store in ("sqlalchemy", "memory")]
    report("burst", [ours], peers, FIRE_COMPARED)


async def steady(ctx: Context) -> None:
    count, seconds = ctx.sizes.steady, ctx.sizes.steady_seconds
    for phase in ("aligned", "staggered"):
        scenario = f"steady_{phase}"
        ours = await chronoplane_fires(
            ctx,
            scenario,
            *("--scenario", "steady", "--jobs", str(count), "--seconds", str(seconds)),
            *("--phase", phase),
        )
        spec = {"kind": "steady", "jobs": count, "seconds": seconds, "phase": phase}
        peers = [await apscheduler(ctx, store, spec) for store in ("sqlalchemy", "memory")]
        report(scenario, [ours], peers, STEADY_COMPARED)


# -- burst and steady: the APScheduler peer (runs in its own process) ---------------------------


async def _aps_noop() -> float:
    """The job: notes when it started (APScheduler hands the value to the listener)."""
    return time.time()


@dataclass
class ApsRecord:
    """What APScheduler's events say: runs (job id, scheduled, started), misses, skips."""

    runs: list[tuple[str, float, float]] = field(default_factory=list)
    missed: int = 0
    skipped: int = 0
    errors: int = 0

    @property
    def count(self) -> int:
        return len(self.runs) + self.missed + self.skipped + self.errors

    def on_event(self, event: Any) -> None:
        if event.code == EVENT_JOB_EXECUTED:
            self.runs.append((event.job_id, event.scheduled_run_time.timestamp(), event.retval))
        elif event.code == EVENT_JOB_MISSED:
            self.missed += 1
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            self.skipped += len(event.scheduled_run_times)
        else:
            self.errors += 1


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


async def aps_start_time(scheduler: Any, jobs: int) -> datetime:
    """A first fire by which adding ``jobs`` will surely have finished (as fire_throughput.py
    chooses Chronoplane's): the adding rate measured on PILOT_JOBS, doubled, plus 3 s."""
    far = datetime.now(UTC) + timedelta(days=1)
    began = time.perf_counter()
    for n in range(PILOT_JOBS):
        scheduler.add_job(_aps_noop, "date", run_date=far, id=f"pilot-{n}")
    rate = PILOT_JOBS / (time.perf_counter() - began)
    scheduler.remove_all_jobs()
    lead = 2.0 * jobs / rate + 3.0
    start = _whole_second_after(datetime.now(UTC) + timedelta(seconds=lead))
    note(f"APScheduler adds ~{rate:.0f} jobs/s; first fire at {start:%H:%M:%S} ({lead:.1f} s)")
    return start


async def aps_add_jobs(scheduler: Any, spec: dict[str, Any], start: datetime) -> set[Any]:
    """Adds the jobs; returns the fires expected, as (job id, scheduled ms)."""
    count, seconds = spec["jobs"], spec["seconds"]
    expected: set[tuple[str, int]] = set()
    for n in range(count):
        job_id = f"{spec['kind']}-{n:05d}"
        if spec["kind"] == "burst":
            scheduler.add_job(_aps_noop, "date", run_date=start, id=job_id)
            expected.add((job_id, _ms(start)))
        else:
            # Staggered: job n fires n/count of a second after the whole second, in whole ms.
            stagger = (1000 * n) // count if spec["phase"] == "staggered" else 0
            first = start + timedelta(milliseconds=stagger)
            last = first + timedelta(seconds=seconds)
            scheduler.add_job(
                _aps_noop, "interval", seconds=1, start_date=first, end_date=last, id=job_id
            )
            fires = (first + timedelta(seconds=k) for k in range(seconds + 1))
            expected.update((job_id, _ms(fire)) for fire in fires)
        if n % 1000 == 999:
            await asyncio.sleep(0)
    return expected


async def aps_drain(store: Any, record: ApsRecord, deadline: float) -> None:
    """Waits until no job is left to fire (date jobs go once submitted, interval jobs after
    their end), then until no event came for QUIET_SECONDS."""
    while time.time() < deadline:
        if store.get_next_run_time() is None:
            break
        await asyncio.sleep(0.2)
    seen = -1
    while record.count != seen and time.time() < deadline:
        seen = record.count
        await asyncio.sleep(QUIET_SECONDS)


def aps_figures(record: ApsRecord, expected: set[Any], first_due: float) -> dict[str, Any]:
    per_fire = Counter((job_id, round(scheduled * 1000)) for job_id, scheduled, _ in record.runs)
    lateness = sorted((started - scheduled) * 1000 for _, scheduled, started in record.runs)
    executed = sum(1 for key in per_fire if key in expected)
    last = max((started for _, _, started in record.runs), default=None)
    return {
        "executions_per_s": executed / (last - first_due) if last and last > first_due else None,
        "lateness_p50_ms": percentile(lateness, 0.5),
        "lateness_p99_ms": percentile(lateness, 0.99),
        "run_fraction": executed / len(expected) if expected else None,
        "executed": executed,
        "expected": len(expected),
        "missed": record.missed,
        "other": record.skipped + record.errors,
        "duplicates": sum(count - 1 for count in per_fire.values()),
    }


async def aps_run(spec: dict[str, Any]) -> dict[str, Any]:
    store: Any = MemoryJobStore() if spec["store"] == "memory" else SQLAlchemyJobStore(spec["url"])
    scheduler = AsyncIOScheduler(
        jobstores={"default": store},
        timezone=UTC,
        job_defaults={"misfire_grace_time": MISFIRE_GRACE_SECONDS},
    )
    record = ApsRecord()
    events = EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES
    scheduler.add_listener(record.on_event, events)
    scheduler.start(paused=True)
    try:
        start = await aps_start_time(scheduler, spec["jobs"])
        began = time.monotonic()
        expected = await aps_add_jobs(scheduler, spec, start)
        margin = start.timestamp() - time.time()
        note(
            f"APScheduler ({spec['store']}): {spec['jobs']} jobs added in "
            f"{time.monotonic() - began:.1f} s, {margin:.1f} s before the first fire"
            + ("; WARNING: late, the first fires will be" if margin < 0.5 else "")
        )
        scheduler.resume()
        await aps_drain(store, record, start.timestamp() + spec["seconds"] + PEER_TIMEOUT)
    finally:
        scheduler.shutdown(wait=False)
    return aps_figures(record, expected, start.timestamp())


def aps_main(argument: str) -> int:
    # Misses and skips are counted from events; their WARNING lines would flood stderr.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    print(json.dumps(asyncio.run(aps_run(json.loads(argument)))), flush=True)
    return 0


# -- celery ---------------------------------------------------------------------------------------


def peer_worker(redis_url: str, queue: str, workdir: Path) -> Worker:
    """``celery worker`` of the bare app, started as tests/brokers.py starts Chronoplane's."""
    log_path = workdir / f"celery-peer-{queue}.log"
    environment = dict(
        os.environ,
        PYTHONPATH=str(BENCH_DIR),
        CELERY_BROKER_URL=redis_url,
        CELERY_RESULT_BACKEND=redis_url,
    )
    command = [str(Path(sys.executable).parent / "celery"), "-A", "celery_peer", "worker"]
    command += ["--pool=prefork", "--concurrency=2", f"--queues={queue}", "--hostname=peer@%h"]
    command += ["--loglevel=INFO", "--without-mingle", "--without-gossip"]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(process, log_path, "peer")
    worker.wait_ready()
    note(f"bare celery worker pid {process.pid}, 2 prefork processes, queue {queue}")
    return worker


def send_and_read(client: Celery, queue: str, count: int) -> tuple[list[float], list[Any]]:
    """Sends ``count`` tasks, then reads every result: when each was sent, and what it said."""
    sent: list[float] = []
    handles = []
    for _ in range(count):
        sent.append(time.time())
        handles.append(client.send_task("peer.add", args=(1, 2), queue=queue))
    return sent, [handle.get(timeout=600) for handle in handles]


def bare_celery(redis_url: str, count: int, workdir: Path) -> Result:
    queue = f"compare-peer-{uuid.uuid4().hex[:8]}"
    worker = peer_worker(redis_url, queue, workdir)
    client = Celery("compare", broker=redis_url, backend=redis_url)
    try:
        send_and_read(client, queue, 20)  # warm up, as celery_dispatch.py does
        note(f"bare celery: {count} tasks sent, then their results read")
        sent, results = send_and_read(client, queue, count)
    finally:
        client.close()
        worker.stop()
    dispatch = sorted((r["start"] - at) * 1000 for at, r in zip(sent, results, strict=True))
    span = max(r["end"] for r in results) - min(sent)
    return Result(
        "celery_bare",
        {
            "executions_per_s": (len(results) / span if span > 0 else None, "1/s"),
            "dispatch_to_start_p50_ms": (percentile(dispatch, 0.5), "ms"),
            "dispatch_to_start_p99_ms": (percentile(dispatch, 0.99), "ms"),
            "executions": (count, "count"),
            "succeeded": (sum(1 for r in results if r.get("sum") == 3), "count"),
        },
    )


async def celery(ctx: Context) -> None:
    count = ctx.sizes.celery
    lines = await bench_lines(
        "celery_dispatch.py",
        *("--burst", str(count), "--seconds", "0", "--broker-url", ctx.redis_url),
        *ctx.postgres_args,
    )
    ours = picked("chronoplane", lines, CELERY_FIGURES, scenario="burst")
    peer = await asyncio.to_thread(bare_celery, ctx.redis_url, count, ctx.workdir)
    report("celery", [ours], [peer], CELERY_COMPARED)


# -- main -----------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Context], Awaitable[None]]] = {
    "unary": unary,
    "stream": stream,
    "burst": burst,
    "steady": steady,
    "celery": celery,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs")
    parser.add_argument("--postgres-url", help="a maintenance database (CREATE DATABASE)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="the Celery broker")
    parser.add_argument("--burst", type=int, help="jobs due at once (default 10,000)")
    parser.add_argument("--steady", type=int, help="jobs firing every second (default 1,000)")
    parser.add_argument("--steady-seconds", type=int, help="how long they fire (default 30)")
    parser.add_argument("--celery", type=int, help="Celery tasks (default 2,000)")
    parser.add_argument("--watch-rates", type=float, nargs="+", help="default 200 400")
    return parser


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    chosen = {
        "burst": args.burst,
        "steady": args.steady,
        "steady_seconds": args.steady_seconds,
        "celery": args.celery,
        "watch_rates": tuple(args.watch_rates) if args.watch_rates else None,
    }
    return replace(sizes, **{k: v for k, v in chosen.items() if v is not None})


async def _main(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"compare: unknown scenarios {sorted(unknown)}; know {list(SCENARIOS)}")
    failed: list[str] = []
    ctx = Context(
        sizes=_sizes(args),
        maintenance_dsn=_maintenance_dsn(args.postgres_url),
        postgres_args=("--postgres-url", args.postgres_url) if args.postgres_url else (),
        redis_url=args.redis_url,
        workdir=Path(tempfile.mkdtemp(prefix="chronoplane-bench-compare-")),
    )
    for name in names:
        note(f"=== {name} ===")
        try:
            await SCENARIOS[name](ctx)
        except Exception:
            failed.append(name)
            note(f"{name} failed:\n{traceback.format_exc()}")
    note(f"logs of the servers and workers started here: {ctx.workdir}")
    print_table(failed)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--apscheduler-peer"]:
        return aps_main(argv[1])
    return asyncio.run(_main(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
