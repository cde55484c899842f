"""The Celery app the tests' workers run (``celery -A celery_tasks worker``): a few tasks
wrapped by chronoplane.celery. Broker and database come from the environment."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from typing import Any

from celery import Celery, current_task

from chronoplane.celery import Chronoplane

app = Celery("celery_tasks", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
# A message a dead worker held comes back after 5 s on Redis (RabbitMQ: at once), looked for
# every second (kombu's default: every 100 s). The bench, whose messages wait in the queue
# longer than that, sets a visibility timeout of an hour, Redis's default.
app.conf.broker_transport_options = {
    "visibility_timeout": float(os.environ.get("CHRONOPLANE_TEST_VISIBILITY", "5")),
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False


def _trace_to_file(path: str) -> None:
    """Exports this worker's spans as JSON lines to ``path`` (tests/test_tracing.py): the
    way a worker sets up OpenTelemetry itself, with a file for an exporter."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    def line(span: Any) -> str:
        return str(span.to_json(indent=None)) + "\n"

    provider = TracerProvider()
    exporter = ConsoleSpanExporter(out=open(path, "a", buffering=1), formatter=line)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


if os.environ.get("CHRONOPLANE_TEST_SPANS"):
    _trace_to_file(os.environ["CHRONOPLANE_TEST_SPANS"])

chronoplane = Chronoplane(
    app, lease=timedelta(seconds=float(os.environ.get("CHRONOPLANE_TEST_LEASE", "30")))
)


def _note(path: str, line: str) -> None:
    """Appends a line (one write: lines from several processes do not interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@chronoplane.task("celery.add")
def add(a: int, b: int) -> dict[str, Any]:
    return {"sum": a + b, "pid": os.getpid()}


@chronoplane.task("celery.async_add")
async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0.01)
    return a + b


@chronoplane.task("celery.fail")
def fail(message: str = "boom") -> None:
    raise ValueError(message)


@chronoplane.task("celery.ledger")
def ledger(path: str, seconds: float = 0.0) -> str:
    """Notes its start (with its execution, the Celery task id), sleeps, notes its end: what
    ran, and how often, is in the file."""
    execution_id = current_task.request.id
    _note(path, f"start {execution_id} {os.getpid()}")
    time.sleep(seconds)
    _note(path, f"end {execution_id} {os.getpid()}")
    return str(execution_id)


@chronoplane.task("celery.touch")
def touch(path: str) -> float:
    """Notes when it started (for the dispatch bench)."""
    now = time.time()
    _note(path, f"{now}")
    return now


@chronoplane.task("celery.not_json")
def not_json() -> object:
    return object()
