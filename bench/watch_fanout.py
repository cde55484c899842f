"""Watch fan-out: 1,000 watchers of one job each plus 10 of everything, on a real server.

First the peers, trivial grpc.aio servers (this file, ``--trivial-server``, each in its own
process), read by the same client: the ceiling, a message the size of a real watch event
streamed to as many streams as fast as it can; and the paced peer (``--paced-rate``) at each
of the first rates (``--peer-rates``): the same events at the same rate to the same 1,000
one-job and 10 firehose streams, each event encoded once, taken up every 5 ms, with nothing
else to do (no database, no filter). Then a real ``chronoplane serve`` on PostgreSQL
with 1,000 jobs of ``chronoplane.echo`` whose intervals give each phase's execution rate
(200/s first, then more), watched by 1,000 streams each filtered to one job and 10 streams
of everything. Each execution is two events (ADDED as it starts, MODIFIED when it ends), and
each event goes to 11 streams.

Two layouts: ``one`` server that runs the executions and serves the watchers, and ``split``,
a cluster of two where the watchers are on the instance that does not run them; and, on
request (``--layouts none``), one server with no watcher at all, to see what running the
executions alone costs (only server_cpu_percent, at the first rate).

Figures, one JSON line each (``"bench": "watch_fanout"``): ``ceiling_msgs_per_s`` and
``ceiling_cpu_us_per_msg``; per peer rate, ``peer_delivered_per_s`` and
``peer_cpu_us_per_msg`` (the paced peer's CPU per message delivered); then per
layout and phase (``"rate"``: executions/s asked): delivered_per_s (messages received by
all watchers), expected_per_s (11 x 2 x executions/s), latency_p50_ms / latency_p99_ms
(from the event's commit, the time the server stamps on the event row just before it
commits, to its receipt), server_cpu_percent (of one core, the watchers' server),
runner_cpu_percent (split: the server running the executions), server_rss_mb, behind
(true once delivery fell behind: less than 90% of what was asked delivered, or p99 over
1 s), server_cpu_us_per_msg (the watchers' server's CPU per message delivered) and
cpu_to_peer (that over the paced peer's at the same rate),
client_cpu_percent (this process, reading all streams) and machine_cpu_percent (every
process, in % of one core: 200 is a full 2-core machine). The last phase not behind is the
saturation point: ``saturation_delivered_per_s`` and its ratio to the ceiling; and
``cpu_efficiency_to_ceiling``, the trivial server's CPU per message (``ceiling_cpu_us_per_msg``)
over the watchers' server's at saturation: an estimate (not measured here) of the ratio the
fan-out would reach on a machine where the executions, PostgreSQL and the client did not
share its cores.

Run it::

    .venv/bin/python bench/watch_fanout.py
    .venv/bin/python bench/watch_fanout.py --rates 200 --seconds 10   # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from fire_throughput import (
    _maintenance_dsn,
    _timestamp,
    _utcnow,
    create_jobs,
    note,
    percentile,
    postgres_database,
    run_concurrently,
    running_server,
)
from google.protobuf import duration_pb2, field_mask_pb2

from chronoplane.v1 import execution_pb2, job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb
from chronoplane.v1 import scheduler_service_pb2_grpc as pb_grpc

BENCH = "watch_fanout"
JOBS = 1_000
EVERYTHING = 10
WARM_SECONDS = 10.0
CHANGES = (pb.WATCH_EVENT_KIND_ADDED, pb.WATCH_EVENT_KIND_MODIFIED)


def emit(figure: str, value: Any, unit: str, **extra: Any) -> None:
    if isinstance(value, float):
        value = round(value, 3)
    line = {"bench": BENCH, **extra, "figure": figure, "value": value, "unit": unit}
    print(json.dumps(line), flush=True)


def sample_event() -> pb.WatchExecutionsResponse:
    """A watch event as the real server sends it for an echo execution."""
    execution = execution_pb2.Execution(
        id="01a2315a94aa45775a29403bdf53",
        job_id="j00042",
        state=execution_pb2.EXECUTION_STATE_SUCCEEDED,
        source=execution_pb2.EXECUTION_SOURCE_SCHEDULE,
        instance_id="inst-1d3ab1e4662b",
        task="chronoplane.echo",
        attempt=1,
    )
    for field in ("scheduled_time", "create_time", "start_time", "end_time"):
        getattr(execution, field).GetCurrentTime()
    return pb.WatchExecutionsResponse(
        cursor=123456, kind=pb.WATCH_EVENT_KIND_MODIFIED, execution=execution
    )


# -- the ceiling: a trivial streaming server --------------------------------------------------


async def _trivial_stream(request: Any, context: Any) -> Any:
    """Streams for ever, as fast as the transport takes them, a new message each time (as
    perf-baseline.md measured it), the size of a real event."""
    sample = sample_event()
    cursor = 0
    while True:
        cursor += 1
        yield pb.WatchExecutionsResponse(
            cursor=cursor, kind=sample.kind, execution=sample.execution
        )


async def _serve(port: int, stream: Any, *, serializer: Any) -> None:
    """A grpc.aio server whose WatchExecutions is ``stream`` (``serializer`` None: it
    yields the wire bytes)."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "chronoplane.v1.SchedulerService",
        {
            "WatchExecutions": grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=pb.WatchExecutionsRequest.FromString,
                response_serializer=serializer,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def job_id(n: int) -> str:
    """The bench's n-th job (the paced peer names its events' jobs the same way)."""
    return f"j{n:05d}"


@contextlib.asynccontextmanager
async def trivial_server(*options: str) -> AsyncIterator[tuple[grpc.aio.Channel, int]]:
    """This file's ``--trivial-server`` in a process of its own (with ``options``): a channel
    to it and its pid, once it serves."""
    port = _free_port()
    command = [sys.executable, __file__, "--trivial-server", str(port), *options]
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, process.pid
    finally:
        process.kill()
        await process.wait()


async def ceiling(streams: int, seconds: float) -> tuple[float, float]:
    """Messages/s the trivial server streams, and its CPU per message (us)."""
    async with trivial_server() as (channel, pid):
        stub = pb_grpc.SchedulerServiceStub(channel)
        counts = [0] * streams
        counting = False

        async def read(k: int) -> None:
            async for _ in stub.WatchExecutions(pb.WatchExecutionsRequest()):
                if counting:
                    counts[k] += 1

        readers = [asyncio.create_task(read(k)) for k in range(streams)]
        await asyncio.sleep(WARM_SECONDS)
        counting = True
        cpu0, began = _cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        counting = False
        cpu, elapsed = _cpu_seconds(pid) - cpu0, time.monotonic() - began
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return sum(counts) / elapsed, cpu / max(1, sum(counts)) * 1e6


# -- the peer at the same rate: a trivial server fanning events out as the watches do --------


async def _serve_paced(port: int, jobs: int, rate: float) -> None:
    """A trivial server that makes 2 x ``rate`` events a second (an execution's two, for one
    of ``jobs`` jobs in turn), takes up every 5 ms what is due (as the watch hub reads a
    batch of events), and hands each, encoded once, to the streams that want it: those of
    its job (a request's ``job_ids``) and those of everything. No database, no filter, no
    cursor: what delivering the same messages to the same streams at the same rate costs
    grpc.aio and asyncio alone."""
    execution = sample_event().execution
    by_job: dict[str, set[asyncio.Queue[bytes]]] = {}
    everything: set[asyncio.Queue[bytes]] = set()

    async def make_events() -> None:
        began, made = time.monotonic(), 0
        while True:
            await asyncio.sleep(0.005)
            due = int((time.monotonic() - began) * 2 * rate)
            for cursor in range(made + 1, due + 1):
                message = pb.WatchExecutionsResponse(
                    cursor=cursor, kind=pb.WATCH_EVENT_KIND_MODIFIED, execution=execution
                ).SerializeToString()
                for queue in everything | by_job.get(job_id(cursor // 2 % jobs), set()):
                    queue.put_nowait(message)
            made = max(made, due)

    async def stream(request: Any, context: Any) -> Any:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        groups = [by_job.setdefault(job_id, set()) for job_id in request.job_ids]
        for group in groups or [everything]:
            group.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            for group in groups or [everything]:
                group.discard(queue)

    maker = asyncio.create_task(make_events())
    await _serve(port, stream, serializer=None)
    maker.cancel()


async def paced_peer(jobs: int, rate: float, seconds: float) -> tuple[float, float | None]:
    """The paced trivial server's delivered messages/s to 1,000 one-job and 10 firehose
    streams (the watches' shape), and its CPU per message (us)."""
    options = ("--paced-rate", f"{rate:g}", "--jobs", str(jobs))
    async with trivial_server(*options) as (channel, pid):
        job_ids = [job_id(n) for n in range(jobs)]
        watchers = Watchers(pb_grpc.SchedulerServiceStub(channel), job_ids, EVERYTHING)
        await asyncio.sleep(WARM_SECONDS)
        watchers.recording = True
        cpu0, began = _cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        watchers.recording = False
        cpu, elapsed = _cpu_seconds(pid) - cpu0, time.monotonic() - began
        delivered = len(watchers.received)
        await watchers.close()
    return delivered / elapsed, cpu / delivered * 1e6 if delivered else None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the real server --------------------------------------------------------------------------


class Watchers:
    """1,000 streams of one job each and 10 of everything; what each received, and when."""

    def __init__(self, stub: Any, job_ids: list[str], everything: int) -> None:
        self.received: list[tuple[int, float]] = []
        self.recording = False
        self.errors: list[str] = []
        requests = [pb.WatchExecutionsRequest(job_ids=[j]) for j in job_ids]
        requests += [pb.WatchExecutionsRequest() for _ in range(everything)]
        self._tasks = [asyncio.create_task(self._read(stub, r)) for r in requests]

    async def _read(self, stub: Any, request: pb.WatchExecutionsRequest) -> None:
        try:
            async for event in stub.WatchExecutions(request):
                if self.recording and event.kind in CHANGES:
                    self.received.append((event.cursor, time.time()))
        except grpc.aio.AioRpcError as error:
            self.errors.append(f"{error.code()}: {error.details()}")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[int, int]:
    """The machine's busy and total CPU ticks so far (all cores), from /proc/stat."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def _busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How busy the whole machine was between two samples, in % of one core."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / max(1, total) * 100 * (os.cpu_count() or 1)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def commit_times(url: str, first: int, last: int) -> dict[int, float]:
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT cursor, create_time FROM events WHERE cursor BETWEEN $1 AND $2", first, last
        )
    finally:
        await conn.close()
    return {row["cursor"]: row["create_time"].timestamp() for row in rows}


async def set_rate(stub: Any, job_ids: list[str], rate: float) -> None:
    """Every job fires every len(jobs)/rate seconds, their phases spread evenly."""
    every = len(job_ids) / rate
    start = _utcnow() + timedelta(seconds=2)

    async def update(n_job: tuple[int, str]) -> None:
        n, job_id = n_job
        first = start + timedelta(seconds=every * n / len(job_ids))
        trigger = job_pb2.Trigger(
            interval=job_pb2.IntervalTrigger(
                every=duration_pb2.Duration(seconds=int(every), nanos=int(every % 1 * 1e9)),
                start_time=_timestamp(first),
            )
        )
        await stub.UpdateJob(
            pb.UpdateJobRequest(
                job=job_pb2.Job(id=job_id, trigger=trigger, paused=False),
                update_mask=field_mask_pb2.FieldMask(paths=["trigger"]),
            ),
            timeout=60,
        )
        await stub.ResumeJob(pb.ResumeJobRequest(id=job_id), timeout=60)

    await run_concurrently(list(enumerate(job_ids)), update, 32)


async def phase(
    servers: list[Any],
    url: str,
    stub: Any,
    watchers: Watchers,
    job_ids: list[str],
    rate: float,
    seconds: float,
    layout: str,
) -> tuple[float, bool, float | None]:
    """One execution rate: the jobs are set through the first server, the watchers are on
    the last (the same one, or another instance of the cluster)."""
    await set_rate(stub, job_ids, rate)
    await asyncio.sleep(2 + WARM_SECONDS)
    pids = [server.process.pid for server in servers]
    cpu0, began = [_cpu_seconds(pid) for pid in pids], time.monotonic()
    machine0, client0 = _machine_busy(), time.process_time()
    watchers.received.clear()
    watchers.recording = True
    await asyncio.sleep(seconds)
    watchers.recording = False
    elapsed = time.monotonic() - began
    cpu = [(_cpu_seconds(pid) - c0) / elapsed * 100 for pid, c0 in zip(pids, cpu0, strict=True)]
    client = (time.process_time() - client0) / elapsed * 100
    machine = _busy_percent(machine0, _machine_busy())
    tags = {"layout": layout, "rate": rate}
    if layout == "none":
        emit("server_cpu_percent", cpu[0], "%", **tags)  # what running the executions costs
        return 0.0, False, None
    received = list(watchers.received)
    delivered = len(received) / elapsed
    expected = 11 * 2 * rate
    latency: list[float] = []
    if received:
        cursors = [c for c, _ in received]
        stamps = await commit_times(url, min(cursors), max(cursors))
        latency = sorted((at - stamps[c]) * 1000 for c, at in received if c in stamps)
    p99 = percentile(latency, 0.99) if latency else None
    behind = delivered < 0.9 * expected or p99 is None or p99 > 1000
    emit("delivered_per_s", delivered, "1/s", **tags)
    emit("expected_per_s", expected, "1/s", **tags)
    emit("latency_p50_ms", percentile(latency, 0.5) if latency else None, "ms", **tags)
    emit("latency_p99_ms", p99, "ms", **tags)
    emit("server_cpu_percent", cpu[-1], "%", **tags)  # the one the watchers are on
    if len(cpu) > 1:
        emit("runner_cpu_percent", cpu[0], "%", **tags)  # the one running the executions
    cost = cpu[-1] / 100 / delivered * 1e6 if received else None
    if cost is not None:
        # CPU of the watchers' server per message it delivered, to compare with the trivial
        # server's: what the fan-out costs, whatever else shares the machine.
        emit("server_cpu_us_per_msg", cost, "us", **tags)
    emit("client_cpu_percent", client, "%", **tags)  # this process: 1,010 streams reading
    emit("machine_cpu_percent", machine, "%", cores=os.cpu_count(), **tags)
    emit("server_rss_mb", _rss_mb(pids[-1]), "MB", **tags)
    emit("behind", behind, "bool", **tags)
    return delivered, behind, cost


async def run_layout(
    options: argparse.Namespace,
    workdir: Path,
    layout: str,
    top: float,
    top_cost: float,
    peers: dict[float, float | None],
) -> None:
    """``one``: the watchers on the server that runs the executions; ``split``: on a second
    instance of the cluster, which runs none (the leader's share of --max-running holds
    them all)."""
    streams = options.jobs + EVERYTHING
    saturation: float | None = None
    saturation_cost: float | None = None
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(
            postgres_database(_maintenance_dsn(options.postgres_url))
        )
        servers = [
            await stack.enter_async_context(
                running_server(url, workdir / f"{layout}-{k}.log", f"--max-watchers={streams + 10}")
            )
            for k in range(2 if layout == "split" else 1)
        ]
        runner = grpc.aio.insecure_channel(servers[0].address)
        stack.push_async_callback(runner.close)
        watched = grpc.aio.insecure_channel(servers[-1].address)
        stack.push_async_callback(watched.close)
        stub = pb_grpc.SchedulerServiceStub(runner)
        job_ids = [job_id(n) for n in range(options.jobs)]
        far = _timestamp(_utcnow() + timedelta(days=365))
        jobs = [
            job_pb2.Job(
                id=j,
                task="chronoplane.echo",
                paused=True,
                trigger=job_pb2.Trigger(date=job_pb2.DateTrigger(run_time=far)),
                misfire_grace=duration_pb2.Duration(seconds=60),
            )
            for j in job_ids
        ]
        await create_jobs(stub, jobs, 32, say=False)
        note(f"[{layout}] {len(jobs)} jobs; opening {streams} watch streams")
        watching = layout != "none"
        watchers = Watchers(
            pb_grpc.SchedulerServiceStub(watched),
            job_ids if watching else [],
            EVERYTHING if watching else 0,
        )
        await asyncio.sleep(3)
        for rate in options.rates if watching else options.rates[:1]:
            note(f"[{layout}] phase: {rate} executions/s")
            delivered, behind, cost = await phase(
                servers, url, stub, watchers, job_ids, rate, options.seconds, layout
            )
            peer = peers.get(rate)
            if cost is not None and peer:
                emit("cpu_to_peer", cost / peer, "ratio", layout=layout, rate=rate)
            if behind:
                break
            saturation, saturation_cost = delivered, cost
        if watchers.errors:
            note(f"stream errors: {watchers.errors[:3]} ({len(watchers.errors)})")
        emit("stream_errors", len(watchers.errors), "count", layout=layout)
        await watchers.close()
    if layout == "none":
        return
    emit("saturation_delivered_per_s", saturation, "1/s", layout=layout)
    ratio = saturation / top if saturation and top else None
    emit("saturation_to_ceiling", ratio, "ratio", layout=layout)
    # The trivial server's CPU per message over ours at saturation: an estimate of the ratio
    # the fan-out would reach where the executions and the client had cores of their own.
    efficiency = top_cost / saturation_cost if saturation_cost else None
    emit("cpu_efficiency_to_ceiling", efficiency, "ratio", layout=layout)


async def _main(options: argparse.Namespace) -> int:
    streams = options.jobs + EVERYTHING
    note(f"ceiling: a trivial grpc.aio server streaming to {streams} streams")
    top, top_cost = await ceiling(streams, options.seconds)
    emit("ceiling_msgs_per_s", top, "1/s", streams=streams)
    emit("ceiling_cpu_us_per_msg", top_cost, "us", streams=streams)
    peers: dict[float, float | None] = {}
    for rate in options.peer_rates or options.rates[:3]:
        note(f"peer: the paced trivial server, {rate:g} executions/s to the watches' streams")
        delivered, cost = await paced_peer(options.jobs, rate, options.seconds)
        emit("peer_delivered_per_s", delivered, "1/s", rate=rate, expected=22 * rate)
        emit("peer_cpu_us_per_msg", cost, "us", rate=rate)
        peers[rate] = cost
    workdir = Path(tempfile.mkdtemp(prefix="chronoplane-bench-watch-"))
    for layout in options.layouts:
        await run_layout(options, workdir, layout, top, top_cost, peers)
    note(f"server logs in {workdir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[200, 250, 300, 350, 400, 500, 600, 700, 800, 1000],
    )
    parser.add_argument("--postgres-url")
    parser.add_argument(
        "--layouts", nargs="+", choices=["one", "split", "none"], default=["one", "split"]
    )
    parser.add_argument(
        "--peer-rates",
        type=float,
        nargs="+",
        help="rates the paced trivial server is measured at (default: the first three)",
    )
    parser.add_argument("--trivial-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paced-rate", type=float, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.trivial_server and options.paced_rate:
        asyncio.run(_serve_paced(options.trivial_server, options.jobs, options.paced_rate))
        return 0
    if options.trivial_server:
        serializer = pb.WatchExecutionsResponse.SerializeToString
        asyncio.run(_serve(options.trivial_server, _trivial_stream, serializer=serializer))
        return 0
    return asyncio.run(_main(options))


if __name__ == "__main__":
    sys.exit(main())
