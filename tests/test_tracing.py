"""OpenTelemetry traces: a span per RPC, a span per execution that is the child of the RPC
that asked for it, in this process and on a real Celery worker (its spans written to a file
by the worker's own SDK set-up, tests/celery_tasks.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from brokers import Worker, redis_url, start_worker
from conftest import serving
from harness import start_server
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from test_celery import celery_job, ended, settings, wait_for
from test_process import wait_for as wait_for_process

from chronoplane.server import tracing
from chronoplane.server.config import Settings
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

pytestmark = pytest.mark.timeout(120)

TRIGGER_RPC = "/chronoplane.v1.SchedulerService/TriggerJob"
NEVER = jpb.Trigger(cron=jpb.CronTrigger(expression="0 0 1 1 *"))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Traces on, into memory, for the servers this test starts in-process."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.name == name]


async def until_span(spans: InMemorySpanExporter, name: str, count: int = 1) -> list[Any]:
    for _ in range(100):
        found = named(spans, name)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no span {name!r}: {[s.name for s in spans.get_finished_spans()]}")


async def test_a_manual_run_is_the_child_of_the_rpc_that_asked_for_it(
    database_url: str, spans: InMemorySpanExporter
) -> None:
    config = Settings(address="127.0.0.1:0", database_url=database_url, tasks=["testtasks"])
    async with serving(config) as server:
        stub = server.stub
        await stub.CreateJob(
            pb.CreateJobRequest(job=jpb.Job(id="echo", task="chronoplane.echo", trigger=NEVER))
        )
        run = (await stub.TriggerJob(pb.TriggerJobRequest(id="echo"))).execution
        [span] = await until_span(spans, "execution chronoplane.echo")
        [rpc] = named(spans, TRIGGER_RPC)
        assert span.parent is not None and span.parent.span_id == rpc.context.span_id
        assert span.context.trace_id == rpc.context.trace_id
        assert span.attributes is not None
        assert span.attributes["chronoplane.execution_id"] == run.id
        assert span.attributes["chronoplane.job_id"] == "echo"
        assert span.attributes["chronoplane.attempt"] == 1
        assert span.attributes["chronoplane.outcome"] == "succeeded"
        assert span.attributes["chronoplane.executor"] == "inline"
        assert span.attributes["chronoplane.scheduled_time"].startswith(
            run.scheduled_time.ToDatetime().isoformat()[:19]
        )
        assert span.status.status_code is not StatusCode.ERROR
        # An RPC that fails has its span too, with its status code (a client's error such as
        # NOT_FOUND is not the server's: the span's status stays unset, as the conventions say).
        with pytest.raises(Exception, match="NOT_FOUND"):
            await stub.GetJob(pb.GetJobRequest(id="nobody"))
        [missing] = await until_span(spans, "/chronoplane.v1.SchedulerService/GetJob")
        assert missing.attributes is not None
        assert missing.attributes["rpc.grpc.status_code"] == 5


async def test_without_traces_no_span_and_no_trace_parent(database_url: str) -> None:
    exporter = InMemorySpanExporter()
    config = Settings(address="127.0.0.1:0", database_url=database_url, tasks=["testtasks"])
    assert not tracing.enabled()
    async with serving(config) as server:
        await server.stub.CreateJob(
            pb.CreateJobRequest(job=jpb.Job(id="echo", task="chronoplane.echo", trigger=NEVER))
        )
        run = (await server.stub.TriggerJob(pb.TriggerJobRequest(id="echo"))).execution
        store = SqlAlchemyStore.from_url(database_url)
        try:
            assert (await store.get_execution(run.id)).trace_parent == ""
        finally:
            await store.close()
    assert exporter.get_finished_spans() == ()


def worker_spans(path: Path, name: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [span for span in found if span["name"] == name]


async def test_a_celery_workers_span_joins_the_trace_of_the_rpc(
    postgres_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    queue = f"chronoplane-trace-{tmp_path.name[-12:]}"
    url = redis_url(tmp_path)
    spans_file = tmp_path / "worker-spans.jsonl"
    workers: list[Worker] = []
    async with serving(settings(postgres_url, url)) as server:
        try:
            workers.append(
                start_worker(
                    tmp_path,
                    broker=url,
                    database_url=postgres_url,
                    queue=queue,
                    env={"CHRONOPLANE_TEST_SPANS": str(spans_file)},
                )
            )
            stub = server.stub
            job = celery_job("sum", "celery.add", queue, args={"a": 2, "b": 3})
            await stub.CreateJob(pb.CreateJobRequest(job=job))
            triggered = (await stub.TriggerJob(pb.TriggerJobRequest(id="sum"))).execution
            done = await wait_for(server, triggered.id, ended)
            assert done.state == epb.EXECUTION_STATE_SUCCEEDED, done
            [rpc] = named(spans, TRIGGER_RPC)
            for _ in range(50):
                ran = worker_spans(spans_file, "execution celery.add")
                if ran:
                    break
                await asyncio.sleep(0.1)
            [span] = ran
            assert span["context"]["trace_id"] == f"0x{rpc.context.trace_id:032x}"
            assert span["parent_id"] == f"0x{rpc.context.span_id:016x}"
            assert span["attributes"]["chronoplane.execution_id"] == triggered.id
            assert span["attributes"]["chronoplane.executor"] == "celery"
            assert span["attributes"]["chronoplane.worker"].startswith("w1@")
            assert span["attributes"]["chronoplane.outcome"] == "succeeded"
        finally:
            for worker in workers:
                worker.stop()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: what a collector is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otel_endpoint_sends_the_spans_of_a_served_process_to_a_collector(
    database_url: str, tmp_path: Path
) -> None:
    """``chronoplane serve --otel-endpoint``: the caller's trace (``traceparent`` metadata)
    goes on in the RPC's span and the run's; a stopping server sends what it buffered."""
    collector = Collector()
    receiver = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)  # type: ignore[no-untyped-call]
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    trace_id, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    server = start_server(database_url, tmp_path, f"--otel-endpoint=http://127.0.0.1:{port}")
    try:
        stub = server.stub()
        stub.CreateJob(
            pb.CreateJobRequest(job=jpb.Job(id="echo", task="chronoplane.echo", trigger=NEVER))
        )
        metadata = (("traceparent", f"00-{trace_id}-{caller}-01"),)
        run = stub.TriggerJob(pb.TriggerJobRequest(id="echo"), metadata=metadata).execution
        wait_for_process(
            stub, "echo", lambda ex: ex and ex[0].state == epb.EXECUTION_STATE_SUCCEEDED
        )
    finally:
        assert server.stop() == 0
        receiver.stop(None)
    by_name = {span.name: span for span in collector.spans}
    rpc, execution = by_name[TRIGGER_RPC], by_name["execution chronoplane.echo"]
    assert rpc.trace_id.hex() == trace_id and rpc.parent_span_id.hex() == caller
    assert execution.trace_id.hex() == trace_id
    assert execution.parent_span_id == rpc.span_id
    attributes = {a.key: a.value for a in execution.attributes}
    assert attributes["chronoplane.execution_id"].string_value == run.id
