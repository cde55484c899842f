"""Celery dispatch against real brokers and real workers: Redis (local, or a redis-server of
the test's own) and RabbitMQ, prefork and gevent pools, the server in-process on PostgreSQL
(and SQLite), the workers as ``celery worker`` processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from brokers import Worker, amqp_url, ledger_lines, redis_url, start_redis, start_worker
from conftest import InProcessServer, serving
from dbproxy import Gate
from google.protobuf import duration_pb2, json_format, struct_pb2
from harness import BIN, error_reason, violations
from sqlalchemy.engine import make_url

from chronoplane.server.config import Settings
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

pytestmark = pytest.mark.timeout(180)

FINAL = {
    epb.EXECUTION_STATE_SUCCEEDED,
    epb.EXECUTION_STATE_FAILED,
    epb.EXECUTION_STATE_CANCELLED,
    epb.EXECUTION_STATE_TIMED_OUT,
    epb.EXECUTION_STATE_ABANDONED,
}


def settings(database_url: str, broker: str) -> Settings:
    return Settings(
        address="127.0.0.1:0",
        database_url=database_url,
        tasks=["testtasks"],
        shutdown_grace=1.0,
        celery_broker_url=broker,
        celery_send_timeout=2.0,
    )


def celery_job(job_id: str, task: str, queue: str, **fields: Any) -> jpb.Job:
    args = json_format.ParseDict(fields.pop("args", {}), struct_pb2.Struct())
    return jpb.Job(
        id=job_id,
        task=task,
        args=args,
        trigger=jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *")),
        executor=epb.EXECUTOR_CELERY,
        celery=jpb.CeleryOptions(queue=queue),
        **fields,
    )


async def wait_for(
    server: InProcessServer,
    execution_id: str,
    done: Callable[[epb.Execution], bool],
    within: float = 60,
) -> epb.Execution:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        execution: epb.Execution = (
            await server.stub.GetExecution(pb.GetExecutionRequest(id=execution_id))
        ).execution
        if done(execution):
            return execution
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting; the execution is now:\n{execution}")
        await asyncio.sleep(0.1)


def lines_now_end_with(path: Path, execution_id: str) -> bool:
    lines = ledger_lines(path)
    return lines[-2:] == [
        f"start {execution_id} {lines[-1].split()[2]}",
        f"end {execution_id} {lines[-1].split()[2]}",
    ]


def ended(execution: epb.Execution) -> bool:
    return execution.state in FINAL


async def until(condition: Callable[[], bool], within: float) -> None:
    """Waits, looking every 0.1 s, until ``condition`` holds or ``within`` seconds have
    passed; the caller asserts what it waited for."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 (a log file)
        await asyncio.sleep(0.1)


@pytest.fixture
def queue() -> str:
    return f"chronoplane-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


@pytest_asyncio.fixture
async def redis_server(postgres_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async with serving(settings(postgres_url, redis_url(tmp_path))) as server:
        yield server


# -- the bridge -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "pool"),
    [("redis", "prefork"), ("redis", "gevent"), ("rabbitmq", "prefork"), ("rabbitmq", "gevent")],
)
async def test_a_celery_job_runs_on_a_worker_and_its_story_reaches_watchers(
    postgres_url: str,
    tmp_path: Path,
    queue: str,
    workers: list[Worker],
    broker: str,
    pool: str,
) -> None:
    url = redis_url(tmp_path) if broker == "redis" else amqp_url()
    async with serving(settings(postgres_url, url)) as server:
        workers.append(
            start_worker(tmp_path, broker=url, database_url=postgres_url, queue=queue, pool=pool)
        )
        stub = server.stub
        job = celery_job("sum", "celery.add", queue, args={"a": 2, "b": 3})
        created = (await stub.CreateJob(pb.CreateJobRequest(job=job))).job
        assert created.executor == epb.EXECUTOR_CELERY and created.celery.queue == queue
        watch = stub.WatchExecutions(pb.WatchExecutionsRequest(job_ids=["sum"]))
        await asyncio.sleep(0.3)  # the stream is open
        triggered = (await stub.TriggerJob(pb.TriggerJobRequest(id="sum"))).execution
        assert triggered.executor == epb.EXECUTOR_CELERY
        done = await wait_for(server, triggered.id, ended)
        assert done.state == epb.EXECUTION_STATE_SUCCEEDED, done
        assert json_format.MessageToDict(done.result)["sum"] == 5
        assert done.celery_task_id == triggered.id
        assert done.worker.startswith("w1@")
        assert done.HasField("dispatch_time") and done.HasField("start_time")
        assert done.dispatch_time.ToDatetime() <= done.start_time.ToDatetime()
        states = []
        async for event in watch:
            states.append(event.execution.state)
            if event.execution.state in FINAL:
                break
        watch.cancel()
        assert states[0] == epb.EXECUTION_STATE_PENDING
        assert states[-2:] == [epb.EXECUTION_STATE_RUNNING, epb.EXECUTION_STATE_SUCCEEDED]

        # Async tasks, failures (with a retry), results that are not JSON.
        await stub.CreateJob(
            pb.CreateJobRequest(
                job=celery_job("async", "celery.async_add", queue, args={"a": 1, "b": 1})
            )
        )
        retry = jpb.RetryPolicy(max_attempts=2, initial_backoff=duration_pb2.Duration(nanos=10**8))
        await stub.CreateJob(
            pb.CreateJobRequest(job=celery_job("broken", "celery.fail", queue, retry=retry))
        )
        await stub.CreateJob(pb.CreateJobRequest(job=celery_job("odd", "celery.not_json", queue)))
        late = celery_job(
            "late",
            "celery.ledger",
            queue,
            args={"path": str(tmp_path / "late.txt"), "seconds": 10},
            timeout=duration_pb2.Duration(seconds=1),
        )
        await stub.CreateJob(pb.CreateJobRequest(job=late))
        runs = {
            job_id: (await stub.TriggerJob(pb.TriggerJobRequest(id=job_id))).execution.id
            for job_id in ("async", "broken", "odd", "late")
        }
        result = await wait_for(server, runs["async"], ended)
        assert (result.state, json_format.MessageToDict(result)["result"]) == (
            epb.EXECUTION_STATE_SUCCEEDED,
            2,
        )
        failed = await wait_for(server, runs["broken"], ended)
        assert failed.state == epb.EXECUTION_STATE_FAILED
        assert (failed.error_type, failed.error_message) == (
            "builtins.ValueError",
            "ValueError: boom",
        )
        assert "raise ValueError(message)" in failed.error_traceback
        odd = await wait_for(server, runs["odd"], ended)
        assert odd.state == epb.EXECUTION_STATE_FAILED and "not JSON" in odd.error_message
        timed_out = await wait_for(server, runs["late"], ended)
        assert timed_out.state == epb.EXECUTION_STATE_TIMED_OUT, timed_out
        assert timed_out.end_time.ToDatetime() - timed_out.start_time.ToDatetime() < timedelta(
            seconds=5
        )
        for _ in range(100):
            attempts = (
                await stub.ListExecutions(pb.ListExecutionsRequest(job_id="broken"))
            ).executions
            if len(attempts) == 2 and all(ended(a) for a in attempts):
                break
            await asyncio.sleep(0.1)
        second = attempts[0]
        assert (second.attempt, second.first_execution_id, second.source) == (
            2,
            runs["broken"],
            epb.EXECUTION_SOURCE_RETRY,
        )
        assert second.state == epb.EXECUTION_STATE_FAILED and second.executor == epb.EXECUTOR_CELERY

        # Many at once, beyond any slot limit: each sent once, each run once.
        many = celery_job(
            "many",
            "celery.add",
            queue,
            args={"a": 1, "b": 1},
            max_concurrent=0,
            overlap_policy=jpb.OVERLAP_POLICY_ALLOW,
        )
        await stub.CreateJob(pb.CreateJobRequest(job=many))
        ids = [
            (await stub.TriggerJob(pb.TriggerJobRequest(id="many"))).execution.id for _ in range(30)
        ]
        assert {(await wait_for(server, i, ended)).state for i in ids} == {
            epb.EXECUTION_STATE_SUCCEEDED
        }
        # Celery logs "succeeded in" once the task has returned, after its end is recorded.
        worker = workers[0]
        await until(lambda: worker.log.count("] received") == worker.log.count("succeeded in"), 10)
        assert "was started before" not in worker.log
        assert worker.log.count("] received") == worker.log.count("succeeded in")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_celery_on_sqlite_with_a_worker_on_the_same_host(
    database_url: str, tmp_path: Path, queue: str, workers: list[Worker]
) -> None:
    broker = redis_url(tmp_path)
    async with serving(settings(database_url, broker)) as server:
        workers.append(
            start_worker(tmp_path, broker=broker, database_url=database_url, queue=queue)
        )
        # Made with chronoctl this time.
        created = await asyncio.create_subprocess_exec(
            str(BIN / "chronoctl"),
            f"--address={server.app.address}",
            "jobs",
            "create",
            "sum",
            "--task=celery.add",
            "--cron=0 0 1 1 *",
            '--args={"a": 20, "b": 22}',
            "--celery",
            f"--queue={queue}",
            "--priority=3",
            stdout=asyncio.subprocess.PIPE,
        )
        shown, _ = await created.communicate()
        assert created.returncode == 0
        assert f"celery (queue {queue}, priority 3)" in shown.decode()
        triggered = (await server.stub.TriggerJob(pb.TriggerJobRequest(id="sum"))).execution
        done = await wait_for(server, triggered.id, ended)
        assert done.state == epb.EXECUTION_STATE_SUCCEEDED
        assert json_format.MessageToDict(done.result)["sum"] == 42
        # Scheduled fires take the same way.
        every = celery_job("often", "celery.add", queue, args={"a": 1, "b": 1})
        every.trigger.CopyFrom(
            jpb.Trigger(interval=jpb.IntervalTrigger(every=duration_pb2.Duration(seconds=1)))
        )
        await server.stub.CreateJob(pb.CreateJobRequest(job=every))
        for _ in range(100):
            runs = (
                await server.stub.ListExecutions(
                    pb.ListExecutionsRequest(job_id="often", states=[epb.EXECUTION_STATE_SUCCEEDED])
                )
            ).executions
            if runs:
                break
            await asyncio.sleep(0.1)
        assert runs and runs[0].source == epb.EXECUTION_SOURCE_SCHEDULE
        assert runs[0].triggered_by == "system:schedule" and runs[0].worker.startswith("w1@")


async def test_celery_jobs_are_checked_and_refused_without_a_broker(
    postgres_url: str, tmp_path: Path, queue: str
) -> None:
    plain = Settings(address="127.0.0.1:0", database_url=postgres_url, shutdown_grace=1.0)
    async with serving(plain) as server:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await server.stub.CreateJob(pb.CreateJobRequest(job=celery_job("c", "x.y", queue)))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(refused.value) == "CELERY_NOT_ENABLED"
    async with serving(settings(postgres_url, redis_url(tmp_path))) as server:
        bad = celery_job("c", "x.y", "q" * 300)
        bad.celery.priority = 10
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await server.stub.CreateJob(pb.CreateJobRequest(job=bad))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert {"job.celery.queue", "job.celery.priority"} <= set(violations(invalid.value))
        # A Celery task name is the workers' business: not in this server's ListTasks.
        created = await server.stub.CreateJob(
            pb.CreateJobRequest(job=celery_job("c", "x.y", queue))
        )
        assert created.job.task == "x.y"


# -- exactly one effective run -----------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
async def test_a_worker_killed_mid_task_leaves_one_run_abandoned_then_retried(
    postgres_url: str, tmp_path: Path, queue: str, workers: list[Worker], broker: str
) -> None:
    # A Redis of its own: the killed worker's unacknowledged message is not left in the
    # shared one.
    redis = start_redis(tmp_path) if broker == "redis" else None
    url = redis.url if redis else amqp_url()
    path = tmp_path / "ledger.txt"
    lease = {"CHRONOPLANE_TEST_LEASE": "3"}
    async with contextlib.AsyncExitStack() as stack:
        if redis is not None:
            stack.callback(redis.stop)
        server = await stack.enter_async_context(serving(settings(postgres_url, url)))
        first = start_worker(
            tmp_path, broker=url, database_url=postgres_url, queue=queue, env=lease, name="w1"
        )
        workers.append(first)
        retry = jpb.RetryPolicy(max_attempts=2, retry_on=["chronoplane.Abandoned"])
        job = celery_job(
            "slow", "celery.ledger", queue, args={"path": str(path), "seconds": 6}, retry=retry
        )
        await server.stub.CreateJob(pb.CreateJobRequest(job=job))
        triggered = (await server.stub.TriggerJob(pb.TriggerJobRequest(id="slow"))).execution
        await wait_for(server, triggered.id, lambda e: e.state == epb.EXECUTION_STATE_RUNNING)
        # RUNNING is recorded just before the task's body begins: killed in between, the
        # task would never have started (its ledger says so), which is not this case.
        started = f"start {triggered.id}"
        await until(lambda: any(line.startswith(started) for line in ledger_lines(path)), 30)
        first.kill()  # mid-task, message unacknowledged (acks_late)
        second = start_worker(
            tmp_path, broker=url, database_url=postgres_url, queue=queue, env=lease, name="w2"
        )
        workers.append(second)
        abandoned = await wait_for(server, triggered.id, ended)
        assert abandoned.state == epb.EXECUTION_STATE_ABANDONED, abandoned
        assert "w1@" in abandoned.error_message
        # The retry runs on the second worker, to its end.
        for _ in range(300):
            attempts = (
                await server.stub.ListExecutions(pb.ListExecutionsRequest(job_id="slow"))
            ).executions
            if len(attempts) == 2 and ended(attempts[0]):
                break
            await asyncio.sleep(0.1)
        assert attempts[0].state == epb.EXECUTION_STATE_SUCCEEDED, attempts[0]
        assert attempts[0].worker.startswith("w2@")
        # The first message comes back (acks_late: on RabbitMQ when the connection drops, on
        # Redis once its visibility timeout has passed), is recognised and dropped.
        recognised = f"execution {triggered.id} was started before"
        await until(lambda: recognised in second.log, 60)
        assert recognised in second.log, second.log
        lines = ledger_lines(path)
        starts = [line.split()[1] for line in lines if line.startswith("start")]
        assert starts == [triggered.id, attempts[0].id], lines


# -- cancellation ------------------------------------------------------------------------------


def one_process_worker(server: InProcessServer, tmp_path: Path, queue: str) -> Worker:
    """A worker on Redis with one process: while it runs a task, no other starts."""
    return start_worker(
        tmp_path,
        broker=redis_url(tmp_path),
        database_url=server.database_url,
        queue=queue,
        concurrency=1,
    )


async def test_cancel_revokes_the_running_task_and_a_queued_one_never_starts(
    redis_server: InProcessServer, tmp_path: Path, queue: str, workers: list[Worker]
) -> None:
    server = redis_server
    workers.append(one_process_worker(server, tmp_path, queue))
    path = tmp_path / "ledger.txt"
    job = celery_job(
        "slow",
        "celery.ledger",
        queue,
        args={"path": str(path), "seconds": 20},
        max_concurrent=2,
    )
    await server.stub.CreateJob(pb.CreateJobRequest(job=job))
    running = (await server.stub.TriggerJob(pb.TriggerJobRequest(id="slow"))).execution
    await wait_for(server, running.id, lambda e: e.state == epb.EXECUTION_STATE_RUNNING)
    # The worker is busy: the second waits in the broker, sent but not started.
    waiting = (await server.stub.TriggerJob(pb.TriggerJobRequest(id="slow"))).execution
    await wait_for(server, waiting.id, lambda e: e.HasField("dispatch_time"))
    for execution in (waiting, running):
        cancelled = (
            await server.stub.CancelExecution(pb.CancelExecutionRequest(id=execution.id))
        ).execution
        assert cancelled.state == epb.EXECUTION_STATE_CANCELLED
    await asyncio.sleep(4)
    lines = ledger_lines(path)
    assert lines == [lines[0]] and lines[0].startswith(f"start {running.id}"), lines
    # The worker is free again: a new run goes through.
    quick = (
        await server.stub.TriggerJob(
            pb.TriggerJobRequest(
                id="slow", args=json_format.ParseDict({"path": str(path)}, struct_pb2.Struct())
            )
        )
    ).execution
    done = await wait_for(server, quick.id, ended)
    assert done.state == epb.EXECUTION_STATE_SUCCEEDED
    # It ran long before the cancelled task's 20 s were up: that task was stopped.
    assert done.start_time.ToDatetime() - running.create_time.ToDatetime() < timedelta(seconds=15)
    assert lines_now_end_with(path, quick.id)
    still = (await server.stub.GetExecution(pb.GetExecutionRequest(id=running.id))).execution
    assert still.state == epb.EXECUTION_STATE_CANCELLED  # what the killed task did not say


async def test_cancel_running_stops_the_worker_run_it_displaces(
    redis_server: InProcessServer, tmp_path: Path, queue: str, workers: list[Worker]
) -> None:
    server = redis_server
    workers.append(one_process_worker(server, tmp_path, queue))
    path = tmp_path / "ledger.txt"
    job = celery_job(
        "latest",
        "celery.ledger",
        queue,
        args={"path": str(path), "seconds": 20},
        max_concurrent=1,
        overlap_policy=jpb.OVERLAP_POLICY_CANCEL_RUNNING,
    )
    await server.stub.CreateJob(pb.CreateJobRequest(job=job))
    older = (await server.stub.TriggerJob(pb.TriggerJobRequest(id="latest"))).execution
    await wait_for(server, older.id, lambda e: e.state == epb.EXECUTION_STATE_RUNNING)
    newer = (
        await server.stub.TriggerJob(
            pb.TriggerJobRequest(
                id="latest", args=json_format.ParseDict({"path": str(path)}, struct_pb2.Struct())
            )
        )
    ).execution
    # The only worker process was busy with the older run for 20 s: the newer one runs only
    # because that task was stopped.
    done = await wait_for(server, newer.id, ended, within=15)
    assert done.state == epb.EXECUTION_STATE_SUCCEEDED
    displaced = (await server.stub.GetExecution(pb.GetExecutionRequest(id=older.id))).execution
    assert displaced.state == epb.EXECUTION_STATE_CANCELLED
    assert "overlap policy cancel_running" in displaced.error_message
    assert displaced.end_time.ToDatetime() <= done.start_time.ToDatetime()
    lines = ledger_lines(path)
    assert [line.split()[:2] for line in lines] == [
        ["start", older.id],
        ["start", newer.id],
        ["end", newer.id],
    ], lines


# -- the broker away -----------------------------------------------------------------------------


async def test_a_broker_outage_loses_no_fire_and_the_server_keeps_serving(
    postgres_url: str,
    tmp_path: Path,
    queue: str,
    workers: list[Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chronoplane.server.dispatch")
    redis = start_redis(tmp_path)
    try:
        async with serving(settings(postgres_url, redis.url)) as server:
            job = celery_job("sum", "celery.add", queue, args={"a": 1, "b": 2}, max_concurrent=20)
            await server.stub.CreateJob(pb.CreateJobRequest(job=job))
            redis.stop()
            ids = [
                (await server.stub.TriggerJob(pb.TriggerJobRequest(id="sum"))).execution.id
                for _ in range(10)
            ]
            first = await wait_for(server, ids[0], lambda e: bool(e.pending_reason), within=20)
            assert first.state == epb.EXECUTION_STATE_PENDING
            assert "broker did not take it" in first.pending_reason
            # Still serving, and quickly.
            listed = await server.stub.ListJobs(pb.ListJobsRequest(), timeout=2)
            assert [j.id for j in listed.jobs] == ["sum"]
            redis.start()
            workers.append(
                start_worker(tmp_path, broker=redis.url, database_url=postgres_url, queue=queue)
            )
            done = [await wait_for(server, i, ended, within=90) for i in ids]
            assert {e.state for e in done} == {epb.EXECUTION_STATE_SUCCEEDED}
            assert all(e.pending_reason == "" for e in done)
            everything = (
                await server.stub.ListExecutions(pb.ListExecutionsRequest(job_id="sum"))
            ).executions
            assert sorted(e.id for e in everything) == sorted(ids)
    finally:
        redis.stop()
    # The operator reads the outage in two lines, without a traceback.
    said = [r for r in caplog.records if r.name == "chronoplane.server.dispatch"]
    down = [r for r in said if r.getMessage().startswith("Celery broker down")]
    up = [r for r in said if r.getMessage().startswith("Celery broker back up")]
    assert len(down) == 1 and down[0].levelno == logging.WARNING, said
    assert len(up) == 1 and up[0].levelno == logging.INFO, said
    assert not [r for r in said if r.exc_info], said


# -- the database away from a worker -----------------------------------------------------------


async def test_a_database_away_at_a_worker_s_start_and_end_loses_no_run(
    redis_server: InProcessServer, tmp_path: Path, queue: str, workers: list[Worker]
) -> None:
    """A start the database did not take gives the message back to the broker, and it runs
    once the database answers; an end it did not take is tried again until it does. One run,
    recorded SUCCEEDED, nothing left PENDING."""
    url = make_url(redis_server.database_url)
    gate = Gate((url.host or "127.0.0.1", url.port or 5432))
    through_gate = url.set(port=gate.port).render_as_string(hide_password=False)
    worker = start_worker(
        tmp_path, broker=redis_url(tmp_path), database_url=through_gate, queue=queue
    )
    workers.append(worker)
    path = tmp_path / "ledger.txt"
    job = celery_job("slow", "celery.ledger", queue, args={"path": str(path), "seconds": 2})
    await redis_server.stub.CreateJob(pb.CreateJobRequest(job=job))
    execution = (await redis_server.stub.TriggerJob(pb.TriggerJobRequest(id="slow"))).execution
    try:
        given_back = f"could not start execution {execution.id}"
        # Delivered again, given back again.
        await until(lambda: worker.log.count(given_back) >= 2, 30)
        assert worker.log.count(given_back) >= 2, worker.log
        pending = await wait_for(redis_server, execution.id, lambda e: True)
        assert pending.state == epb.EXECUTION_STATE_PENDING and ledger_lines(path) == []

        await gate.open()
        await wait_for(redis_server, execution.id, lambda e: e.state == epb.EXECUTION_STATE_RUNNING)
        await gate.close()  # while the task runs: its end finds the database away
        await until(lambda: len(ledger_lines(path)) == 2, 10)
        retried = f"could not record the end of execution {execution.id}"
        await until(lambda: retried in worker.log, 10)
        assert retried in worker.log, worker.log
        await gate.open()
        done = await wait_for(redis_server, execution.id, ended)
    finally:
        await gate.close()
    assert done.state == epb.EXECUTION_STATE_SUCCEEDED, done
    assert [line.split()[:2] for line in ledger_lines(path)] == [
        ["start", execution.id],
        ["end", execution.id],
    ]
    # One line each from the worker (and Celery's own for the Reject), no chained traceback.
    assert "The above exception was the direct cause" not in worker.log
