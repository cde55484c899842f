"""OpenTelemetry traces, with ``pip install 'chronoplane[otel]'``: a span per RPC (the
official grpc instrumentation) and a span per execution, the child of the RPC that asked
for it (TriggerJob, BackfillJob), across instances and Celery workers.

The link crosses processes as a W3C ``traceparent`` string: kept with the execution in the
database (``executions.trace_parent``, whichever instance runs it) and sent in the Celery
message's headers (``chronoplane.celery`` starts the worker's span from it). A scheduled
fire has no parent: its execution's span is the root of a trace of its own.

Off unless ``--otel-endpoint`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``/``_TRACES_ENDPOINT``, or
``OTEL_TRACES_EXPORTER``) is set. Off, nothing here imports OpenTelemetry and every
function costs a check of one flag. The rest of OpenTelemetry's ``OTEL_*`` variables
(service name, resource attributes, sampler, headers) apply as the SDK reads them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from chronoplane.server.config import ConfigError
from chronoplane.server.models import Execution, ExecutionState

__all__ = [
    "configure",
    "current_parent",
    "enabled",
    "execution_span",
    "grpc_interceptor",
    "install",
    "install_if_available",
    "shutdown",
    "wanted",
]

_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")

# The outcomes of an execution that mark its span as an error.
_ERRORS = frozenset(
    {
        ExecutionState.FAILED,
        ExecutionState.TIMED_OUT,
        ExecutionState.ABANDONED,
        ExecutionState.INTERRUPTED,
    }
)

_tracer: Any = None
_provider: Any = None
_owned = False


def wanted(endpoint: str) -> bool:
    """Whether traces are asked for: the flag, or OpenTelemetry's own variables."""
    return bool(endpoint) or any(os.environ.get(name) for name in _ENV)


def configure(endpoint: str) -> None:
    """Sets up the SDK with an OTLP/gRPC exporter (``endpoint`` or the ``OTEL_*``
    variables) and turns spans on."""
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as missing:
        raise ConfigError(
            f"otel_endpoint: traces need OpenTelemetry ({missing.name} is not installed): "
            "pip install 'chronoplane[otel]'"
        ) from None
    service = {"service.name": os.environ.get("OTEL_SERVICE_NAME", "chronoplane")}
    provider = TracerProvider(resource=Resource.create(service))
    exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    install(provider, owned=True)


def install(provider: Any = None, *, owned: bool = False) -> None:
    """Turns spans on, through ``provider`` (default: the global one, which may be set
    later). ``owned``: ``shutdown`` shuts the provider down too."""
    global _tracer, _provider, _owned
    from opentelemetry import trace

    _provider = provider or trace.get_tracer_provider()
    _tracer = _provider.get_tracer("chronoplane")
    _owned = owned


def install_if_available() -> None:
    """Turns spans on where OpenTelemetry's API is installed (a Celery worker): they go to
    the tracer provider the process sets up, and cost next to nothing until it does."""
    try:
        install()
    except ImportError:
        pass


def shutdown() -> None:
    """Turns spans off; sends the spans still buffered by a provider of ``configure``'s."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if _owned and provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def grpc_interceptor() -> Any:
    """The official grpc.aio server interceptor: a span per RPC, the caller's trace context
    (``traceparent`` metadata) continued."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor(tracer_provider=_provider)  # type: ignore[no-untyped-call]


def current_parent() -> str:
    """The current span as a W3C ``traceparent``, or empty (no span, or traces are off)."""
    if _tracer is None:
        return ""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


@contextlib.contextmanager
def execution_span(execution: Execution, *, executor: str, worker: str = "") -> Iterator[Any]:
    """The span of one execution's run, current while it runs (so the task's own spans are
    its children); the child of the span its ``trace_parent`` names. Yields a function that
    records the outcome: ``outcome(state, error_message)``."""
    if _tracer is None:
        yield _no_outcome
        return
    from opentelemetry import trace

    attributes = {
        "chronoplane.job_id": execution.job_id,
        "chronoplane.execution_id": execution.id,
        "chronoplane.task": execution.task,
        "chronoplane.attempt": execution.attempt,
        "chronoplane.source": execution.source.value,
        "chronoplane.scheduled_time": execution.scheduled_time.isoformat(),
        "chronoplane.executor": executor,
    }
    if worker:
        attributes["chronoplane.worker"] = worker
    with _tracer.start_as_current_span(
        f"execution {execution.task}",
        context=_parent_context(execution.trace_parent),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:

        def outcome(state: ExecutionState, error_message: str = "") -> None:
            span.set_attribute("chronoplane.outcome", state.value)
            if state in _ERRORS:
                span.set_status(trace.Status(trace.StatusCode.ERROR, error_message or None))

        yield outcome


def _parent_context(trace_parent: str) -> Any:
    """The context an execution's span starts in: the span ``trace_parent`` names, or a
    span of that trace current already (OpenTelemetry's Celery instrumentation in the worker
    starts one from the message's headers); a root span without one."""
    from opentelemetry import context, propagate, trace

    if not trace_parent:
        return context.Context()
    current = trace.get_current_span().get_span_context()
    parent = propagate.extract({"traceparent": trace_parent})
    wanted = trace.get_current_span(parent).get_span_context()
    if current.is_valid and current.trace_id == wanted.trace_id:
        return None
    return parent


def _no_outcome(state: ExecutionState, error_message: str = "") -> None:
    pass
