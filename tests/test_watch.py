"""WatchExecutions and WatchJobs through a real grpc.aio server, on SQLite and PostgreSQL:
the events, snapshots, resuming from a cursor, filters, limits, and a client that stops
reading. Cluster-wide behaviour with real processes is in test_watch_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from conftest import InProcessServer, serving
from harness import error_info, violations
from storage.helpers import a_job, an_execution
from test_api import create, fails, struct

from chronoplane.server.config import Settings
from chronoplane.server.models import EventResource
from chronoplane.server.storage.abc import Admission
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore
from chronoplane.server.watch import WatchFilter, WatchHub
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import scheduler_service_pb2 as pb

K = pb.WatchEventKind
BUFFER = 40
MAX_WATCHERS = 30


@pytest_asyncio.fixture
async def watch_server(database_url: str) -> AsyncIterator[InProcessServer]:
    """A server with small watch limits and frequent progress events."""
    settings = Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        tasks=["testtasks"],
        shutdown_grace=1.0,
        watch_buffer=BUFFER,
        max_watchers=MAX_WATCHERS,
        watch_progress_interval=0.5,
    )
    async with serving(settings) as running:
        yield running


class Collector:
    """Reads one stream in the background, keeping every message."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.items: list[Any] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for item in self.call:
                self.items.append(item)
        except grpc.aio.AioRpcError as error:
            self.error = error
        except asyncio.CancelledError:
            pass

    def changes(self) -> list[Any]:
        return [
            i
            for i in self.items
            if i.kind
            in (K.WATCH_EVENT_KIND_ADDED, K.WATCH_EVENT_KIND_MODIFIED, K.WATCH_EVENT_KIND_DELETED)
        ]

    async def until(self, predicate: Any, within: float = 15, what: str = "") -> None:
        deadline = asyncio.get_running_loop().time() + within
        while not predicate(self):
            if self.task.done():
                raise AssertionError(f"stream ended ({self.error}) before {what}: {self.items}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not within {within} s: {what}; got {self.items}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.call.cancel()
        await self.task


def finished(state: int) -> bool:
    return state in (epb.EXECUTION_STATE_SUCCEEDED, epb.EXECUTION_STATE_FAILED)


def states_of(events: list[Any], execution_id: str) -> list[int]:
    return [e.execution.state for e in events if e.execution.id == execution_id]


def error_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return dict(error_info(error).metadata)


async def trigger(server: InProcessServer, job_id: str, **args: Any) -> epb.Execution:
    request = pb.TriggerJobRequest(id=job_id, args=struct(**args) if args else None)
    response: pb.TriggerJobResponse = await server.stub.TriggerJob(request)
    return response.execution


async def registered(server: InProcessServer, count: int) -> None:
    """Waits until the server has ``count`` watchers: a stream "from now" sees only what
    commits after it is registered."""
    hub = server.app.hub
    assert hub is not None
    for _ in range(500):
        if hub.watchers == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{hub.watchers} watchers registered, not {count}")


def strictly_increasing(items: list[Any]) -> bool:
    """Each change has a cursor past the one before; a PROGRESS event may repeat the cursor
    of the item before it (nothing happened since: it says where to resume)."""
    seen = [i for i in items if i.kind != K.WATCH_EVENT_KIND_SNAPSHOT]
    return all(
        a.cursor < b.cursor or (a.cursor == b.cursor and b.kind == K.WATCH_EVENT_KIND_PROGRESS)
        for a, b in itertools.pairwise(seen)
    )


# -- what a stream says ------------------------------------------------------------------------


async def test_an_execution_is_streamed_from_creation_to_its_end(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    await create(server.stub, "echo", paused=True)
    watcher = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest()))
    await registered(server, 1)  # before the change
    execution = await trigger(server, "echo", n=7)
    await watcher.until(
        lambda c: any(finished(e.execution.state) for e in c.changes()), what="its end"
    )
    events = watcher.changes()
    assert [e.execution.id for e in events] == [execution.id] * len(events)
    assert events[0].kind == K.WATCH_EVENT_KIND_ADDED
    assert all(e.kind == K.WATCH_EVENT_KIND_MODIFIED for e in events[1:])
    last = events[-1].execution
    assert last.state == epb.EXECUTION_STATE_SUCCEEDED
    assert last.result.struct_value.fields["n"].number_value == 7
    # The resource as it is after each change, in order.
    assert states_of(events, execution.id)[-1] == epb.EXECUTION_STATE_SUCCEEDED
    assert strictly_increasing(events)
    await watcher.close()


@pytest.mark.parametrize("task", ["chronoplane.echo", "test.add"])
async def test_an_executions_start_time_is_the_same_in_the_reply_events_and_get(
    watch_server: InProcessServer, task: str
) -> None:
    """An async task, and a synchronous one that goes through the thread pool."""
    server = watch_server
    await create(server.stub, "timed", task=task, args=struct(a=1, b=2), paused=True)
    watcher = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest()))
    await registered(server, 1)
    execution = await trigger(server, "timed")
    assert execution.state == epb.EXECUTION_STATE_RUNNING and execution.HasField("start_time")
    await watcher.until(
        lambda c: any(finished(e.execution.state) for e in c.changes()), what="its end"
    )
    got = (await server.stub.GetExecution(pb.GetExecutionRequest(id=execution.id))).execution
    assert got.state == epb.EXECUTION_STATE_SUCCEEDED
    seen = [execution, *(e.execution for e in watcher.changes()), got]
    assert {e.start_time.ToJsonString() for e in seen} == {execution.start_time.ToJsonString()}
    assert got.end_time.ToDatetime() - got.start_time.ToDatetime() == got.duration.ToTimedelta()
    await watcher.close()


async def test_job_changes_are_streamed_with_the_job_as_it_is(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    watcher = Collector(server.stub.WatchJobs(pb.WatchJobsRequest()))
    await registered(server, 1)  # before the change
    created = await create(server.stub, "nightly", paused=True, labels={"team": "data"})
    resumed = (await server.stub.ResumeJob(pb.ResumeJobRequest(id="nightly"))).job
    await server.stub.DeleteJob(pb.DeleteJobRequest(id="nightly"))
    await watcher.until(lambda c: len(c.changes()) >= 3, what="three job events")
    added, modified, deleted = watcher.changes()
    assert added.kind == K.WATCH_EVENT_KIND_ADDED and added.job.etag == created.etag
    assert modified.kind == K.WATCH_EVENT_KIND_MODIFIED
    assert not modified.job.paused and modified.job.etag == resumed.etag
    assert deleted.kind == K.WATCH_EVENT_KIND_DELETED and deleted.job.id == "nightly"
    assert dict(deleted.job.labels) == {"team": "data"}
    assert added.cursor < modified.cursor < deleted.cursor
    await watcher.close()


async def test_a_server_nobody_watches_reads_no_events_and_a_first_watcher_starts_now(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    await create(server.stub, "echo", paused=True)
    reads: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "FROM events" in statement or "SELECT event_log." in statement:
            reads.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    hub = server.app.hub
    assert hub is not None
    try:
        unseen = [await trigger(server, "echo", n=n) for n in range(5)]
        for execution in unseen:
            await wait_finished(server, execution.id)
        # The hub has woken for every commit: two rounds of its loop since the last one.
        rounds = hub.rounds
        for _ in range(3000):
            if hub.rounds >= rounds + 2:
                break
            await asyncio.sleep(0.01)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    assert reads == []

    watcher = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest()))
    await registered(server, 1)  # before the change
    seen = await trigger(server, "echo", n=9)
    await watcher.until(
        lambda c: any(finished(e.execution.state) for e in c.changes()), what="its end"
    )
    await watcher.close()
    assert {e.execution.id for e in watcher.changes()} == {seen.id}


async def wait_finished(server: InProcessServer, execution_id: str) -> None:
    """Until the execution has ended, however slow the machine (within a minute)."""
    for _ in range(3000):
        response = await server.stub.GetExecution(pb.GetExecutionRequest(id=execution_id))
        if finished(response.execution.state):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{execution_id} did not finish: {response.execution}")


async def test_a_snapshot_comes_first_then_a_marker_then_live_events(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    await create(server.stub, "slow", task="test.block", paused=True, max_concurrent=3)
    await create(server.stub, "other", paused=True)
    running = await trigger(server, "slow", seconds=1.5)
    for _ in range(100):
        got = await server.stub.GetExecution(pb.GetExecutionRequest(id=running.id))
        if got.execution.state == epb.EXECUTION_STATE_RUNNING:
            break
        await asyncio.sleep(0.02)
    watcher = Collector(
        server.stub.WatchExecutions(pb.WatchExecutionsRequest(job_ids=["slow"], snapshot=True))
    )
    await watcher.until(
        lambda c: any(finished(e.execution.state) for e in c.changes()), what="the run's end"
    )
    first, marker = watcher.items[0], watcher.items[1]
    assert first.kind == K.WATCH_EVENT_KIND_SNAPSHOT and first.execution.id == running.id
    assert first.execution.state == epb.EXECUTION_STATE_RUNNING
    assert marker.kind == K.WATCH_EVENT_KIND_SNAPSHOT_END
    assert marker.cursor >= first.cursor
    live = watcher.changes()
    assert live and all(e.cursor > marker.cursor for e in live)
    assert live[-1].execution.state == epb.EXECUTION_STATE_SUCCEEDED
    await watcher.close()

    jobs = Collector(server.stub.WatchJobs(pb.WatchJobsRequest(snapshot=True)))
    await jobs.until(
        lambda c: any(i.kind == K.WATCH_EVENT_KIND_SNAPSHOT_END for i in c.items), what="marker"
    )
    assert [i.job.id for i in jobs.items[:2]] == ["other", "slow"]
    await jobs.close()


async def test_resuming_after_a_cursor_returns_exactly_what_followed(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    await create(server.stub, "echo", paused=True, max_concurrent=100)
    first = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest()))
    await registered(server, 1)  # before the change
    for n in range(5):
        await trigger(server, "echo", n=n)
    await first.until(lambda c: len(c.changes()) >= 10, what="five runs")
    await first.close()
    seen = first.changes()[-1].cursor
    # While no one watches: more changes, committed.
    away = [await trigger(server, "echo", n=n) for n in range(5, 10)]
    await asyncio.sleep(0.5)
    resumed = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest(after_cursor=seen)))
    everything = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest(after_cursor=0)))
    await resumed.until(lambda c: len(c.changes()) >= 10, what="the runs made while away")
    await everything.until(lambda c: len(c.changes()) >= 20, what="the whole history")
    after_seen = [e for e in everything.changes() if e.cursor > seen]
    assert [(e.cursor, e.kind, e.execution.state) for e in resumed.changes()] == [
        (e.cursor, e.kind, e.execution.state) for e in after_seen
    ]
    assert {e.execution.id for e in resumed.changes()} == {e.id for e in away}
    assert strictly_increasing(resumed.items) and strictly_increasing(everything.items)
    # The history from the start is the first stream's events, then the resumed ones.
    assert [e.cursor for e in everything.changes()] == [
        e.cursor for e in first.changes() + resumed.changes()
    ]
    await resumed.close()
    await everything.close()


async def test_filters_by_job_state_and_labels(watch_server: InProcessServer) -> None:
    server = watch_server
    await create(server.stub, "red", paused=True, labels={"color": "red"})
    await create(server.stub, "blue", paused=True, labels={"color": "blue"})
    by_job = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest(job_ids=["red"])))
    by_label = Collector(
        server.stub.WatchExecutions(pb.WatchExecutionsRequest(labels={"color": "blue"}))
    )
    by_state = Collector(
        server.stub.WatchExecutions(
            pb.WatchExecutionsRequest(states=[epb.EXECUTION_STATE_SUCCEEDED])
        )
    )
    await registered(server, 3)  # before the change
    red = await trigger(server, "red")
    blue = await trigger(server, "blue")
    await by_state.until(lambda c: len(c.changes()) >= 2, what="both successes")
    await by_job.until(lambda c: any(finished(e.execution.state) for e in c.changes()), what="red")
    await by_label.until(
        lambda c: any(finished(e.execution.state) for e in c.changes()), what="blue"
    )
    assert {e.execution.id for e in by_job.changes()} == {red.id}
    assert {e.execution.id for e in by_label.changes()} == {blue.id}
    assert {e.execution.state for e in by_state.changes()} == {epb.EXECUTION_STATE_SUCCEEDED}
    assert {e.execution.id for e in by_state.changes()} == {red.id, blue.id}
    for watcher in (by_job, by_label, by_state):
        await watcher.close()


async def test_an_idle_stream_gets_progress_with_a_cursor_to_resume_from(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    await create(server.stub, "quiet", paused=True)
    await create(server.stub, "busy", paused=True)
    watcher = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest(job_ids=["quiet"])))
    await registered(server, 1)  # before the change
    await trigger(server, "busy")
    await watcher.until(
        lambda c: (
            any(i.kind == K.WATCH_EVENT_KIND_PROGRESS for i in c.items) and c.items[-1].cursor > 0
        ),
        within=5,
        what="a progress event past busy's events",
    )
    progress = [i for i in watcher.items if i.kind == K.WATCH_EVENT_KIND_PROGRESS]
    assert not watcher.changes()
    assert not progress[-1].HasField("execution")
    await watcher.close()
    # Resuming from it gives nothing of busy's again.
    resumed = Collector(
        server.stub.WatchExecutions(pb.WatchExecutionsRequest(after_cursor=progress[-1].cursor))
    )
    await trigger(server, "quiet")
    await resumed.until(lambda c: len(c.changes()) >= 1, what="quiet's run")
    assert {e.execution.job_id for e in resumed.changes()} == {"quiet"}
    await resumed.close()


# -- what a stream refuses --------------------------------------------------------------------


async def test_bad_requests_are_invalid_argument_naming_the_field(
    watch_server: InProcessServer,
) -> None:
    stub = watch_server.stub
    cases = [
        (pb.WatchExecutionsRequest(after_cursor=3, snapshot=True), "snapshot"),
        (pb.WatchExecutionsRequest(after_cursor=-1), "after_cursor"),
        (pb.WatchExecutionsRequest(job_ids=["bad id!"]), "job_ids[0]"),
        (pb.WatchExecutionsRequest(job_ids=[f"j{n}" for n in range(101)]), "job_ids"),
        (pb.WatchExecutionsRequest(states=[99]), "states"),  # type: ignore[list-item]
        (pb.WatchExecutionsRequest(labels={"k": "v\x00"}), "labels['k']"),
    ]
    for request, field in cases:
        error = await fails(_first(stub.WatchExecutions(request)), grpc.StatusCode.INVALID_ARGUMENT)
        assert field in violations(error), (field, violations(error))
    error = await fails(
        _first(stub.WatchJobs(pb.WatchJobsRequest(after_cursor=-5))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "after_cursor" in violations(error)


async def _first(call: Any) -> Any:
    async for item in call:
        return item
    return None


async def test_a_cursor_outside_the_kept_history_is_out_of_range(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    await create(server.stub, "echo", paused=True)
    for _ in range(3):
        await trigger(server, "echo")
    await asyncio.sleep(0.5)
    store = SqlAlchemyStore.from_url(server.database_url)
    try:
        window = await store.event_window()
        purged = await store.purge_events(before=datetime.now(UTC) + timedelta(seconds=1))
        assert purged >= window.newest >= 4  # the job, and each trigger's events
    finally:
        await store.close()
    error = await fails(
        _first(server.stub.WatchExecutions(pb.WatchExecutionsRequest(after_cursor=1))),
        grpc.StatusCode.OUT_OF_RANGE,
    )
    assert error_metadata(error)["oldest_cursor"] == str(window.newest + 1)
    error = await fails(
        _first(
            server.stub.WatchExecutions(
                pb.WatchExecutionsRequest(after_cursor=window.newest + 1000)
            )
        ),
        grpc.StatusCode.OUT_OF_RANGE,
    )
    assert error_metadata(error)["newest_cursor"] == str(window.newest)
    # From the newest cursor purged, nothing is missing: allowed.
    resumed = Collector(
        server.stub.WatchExecutions(pb.WatchExecutionsRequest(after_cursor=window.newest))
    )
    await trigger(server, "echo")
    await resumed.until(lambda c: len(c.changes()) >= 1, what="the next run")
    await resumed.close()


async def test_watchers_beyond_the_cap_are_refused_and_unary_calls_still_work(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    watchers = [
        Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest()))
        for _ in range(MAX_WATCHERS)
    ]
    assert server.app.hub is not None
    await registered(server, MAX_WATCHERS)
    error = await fails(
        _first(server.stub.WatchJobs(pb.WatchJobsRequest())), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert "max_watchers" in error.details()
    assert error_metadata(error)["limit"] == "max_watchers"
    created = await create(server.stub, "still-served", paused=True)
    assert created.id == "still-served"
    for watcher in watchers:
        await watcher.close()
    await registered(server, 0)
    again = Collector(server.stub.WatchJobs(pb.WatchJobsRequest()))
    await registered(server, 1)
    await create(server.stub, "seen", paused=True)
    await again.until(lambda c: len(c.changes()) >= 1, what="a watcher accepted again")
    await again.close()


async def test_a_stream_that_never_reads_is_ended_and_others_keep_receiving(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    await create(server.stub, "echo", paused=True, max_concurrent=100)
    # A raw call nobody reads from: its messages pile up until the server ends it.
    stuck = server.stub.WatchExecutions(pb.WatchExecutionsRequest())
    reader = Collector(server.stub.WatchExecutions(pb.WatchExecutionsRequest()))
    assert server.app.hub is not None
    await registered(server, 2)
    # Two events each of some 16-32 kB: far more than the buffer and the transport's windows.
    runs, padding = 400, "x" * 16_000
    for start in range(0, runs, 50):
        await asyncio.gather(
            *(trigger(server, "echo", n=n, pad=padding) for n in range(start, start + 50))
        )
    await reader.until(
        lambda c: sum(finished(e.execution.state) for e in c.changes()) >= runs,
        within=60,
        what="every run's end",
    )
    assert strictly_increasing(reader.items)
    for _ in range(200):
        if server.app.hub.watchers == 1:
            break
        await asyncio.sleep(0.05)
    assert server.app.hub.watchers == 1, "the stuck stream was not ended"
    # What it holds: what the transport had taken before it was ended, then the status.
    received: list[Any] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in stuck:
            received.append(item)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "watch_buffer" in caught.value.details()
    told = int(error_metadata(caught.value)["cursor"])
    assert strictly_increasing(received)
    # The error names the last cursor the server knows it sent (a message whose write was
    # cut short may still have arrived); the client resumes from the last it has.
    resume_at = received[-1].cursor if received else told
    assert told <= resume_at
    assert len(received) < 2 * runs, "the stuck stream was not cut short"
    # Resuming loses nothing.
    resumed = Collector(
        server.stub.WatchExecutions(pb.WatchExecutionsRequest(after_cursor=resume_at))
    )
    expected = [e.cursor for e in reader.changes() if e.cursor > resume_at]
    await resumed.until(lambda c: len(c.changes()) >= len(expected), within=30, what="the rest")
    assert [e.cursor for e in resumed.changes()][: len(expected)] == expected
    await resumed.close()
    await reader.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_opening_and_cancelling_5000_watches_leaves_nothing_behind(
    watch_server: InProcessServer,
) -> None:
    server = watch_server
    assert server.app.hub is not None

    async def cycle(n: int) -> None:
        call = server.stub.WatchExecutions(pb.WatchExecutionsRequest(job_ids=["a"], after_cursor=0))
        # Cancelled at once, or once the server has set the stream up.
        await asyncio.sleep(0.002 if n % 2 else 0)
        call.cancel()
        try:
            await call.read()
        except asyncio.CancelledError:
            pass

    database = server.database_url.rsplit("/", 1)[-1]

    def fds() -> int:
        """Open descriptors other than the database's (the connection pool grows as it likes,
        up to its size): sockets, pipes, event fds."""
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum(database not in target for target in targets)

    def rss_kib() -> int:
        with open("/proc/self/status") as status:
            line = next(li for li in status if li.startswith("VmRSS:"))
        return int(line.split()[1])

    for n in range(1000):  # warm up caches, pools and the allocator
        await cycle(n)
    await asyncio.sleep(0.5)
    gc.collect()
    tasks, files, memory = len(asyncio.all_tasks()), fds(), rss_kib()
    for n in range(5000):
        await cycle(n)
    for _ in range(100):
        if server.app.hub.watchers == 0 and len(asyncio.all_tasks()) <= tasks:
            break
        await asyncio.sleep(0.05)
    gc.collect()
    assert server.app.hub.watchers == 0
    assert len(asyncio.all_tasks()) <= tasks
    assert fds() <= files + 2
    # Server and client share this process; 5,000 leaked streams would be far more.
    assert rss_kib() - memory < 20_000, (memory, rss_kib())


async def test_streams_catching_up_from_the_table_share_each_event(store: SqlAlchemyStore) -> None:
    """Two streams resuming from the same old cursor read the table, each for itself; each
    event they get is one object, decoded and encoded once for both (issue 16: an event is
    serialized once, not once per stream)."""
    hub = WatchHub(store, recent=4, page=10, poll_interval=0.05)
    await store.create_job(a_job("j1", max_concurrent=0), request_id=None)
    since = (await store.event_window()).newest
    scheduled = datetime(2026, 3, 8, 6, 30, tzinfo=UTC)
    await store.admit_executions(
        [
            Admission(
                execution=an_execution(scheduled_time=scheduled + timedelta(minutes=n)),
                due_time=scheduled,
                force=True,
            )
            for n in range(30)
        ]
    )
    await hub.start()
    try:
        executions = WatchFilter(resource=EventResource.EXECUTION)
        streams = [hub.watch(executions, after=since) for _ in range(2)]
        first, second = [], []
        for _ in range(30):  # side by side, as streams behind together read
            first.append(await anext(streams[0]))
            second.append(await anext(streams[1]))
        assert [e.cursor for e in first] == [e.cursor for e in second]
        assert len({e.cursor for e in first}) == 30
        assert all(a is b for a, b in zip(first, second, strict=True))
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]  # an async generator
    finally:
        await hub.stop()
