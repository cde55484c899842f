"""chronoplane.v1 messages to the SDK's dataclasses (and the SDK's enums to proto values)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from chronoplane.client.models import (
    AuditEvent,
    BackfillResult,
    CeleryOptions,
    CronTrigger,
    DateTrigger,
    DayMatch,
    Execution,
    ExecutionSource,
    ExecutionState,
    ExecutionSummary,
    Executor,
    Instance,
    IntervalTrigger,
    Job,
    MisfirePolicy,
    MissedFires,
    OverlapPolicy,
    RetryPolicy,
    Task,
    Trigger,
    WatchEvent,
    WatchEventKind,
    _ProtoEnum,
)
from chronoplane.v1 import audit_pb2, execution_pb2, instance_pb2, job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = [
    "audit_event",
    "backfill_result",
    "each",
    "enum_value",
    "execution",
    "execution_event",
    "instance",
    "job",
    "job_event",
    "task",
    "trigger",
    "value",
]

E = TypeVar("E", bound=_ProtoEnum)

# The most an int is exact in a double (a Struct number): beyond it, keep the float.
_EXACT = 2**53


def enum_value(kind: type[_ProtoEnum], given: _ProtoEnum | str | int, proto: Any) -> int:
    """The proto value of an SDK enum given as a member, a name or a proto value."""
    if isinstance(given, int):
        return given
    try:
        member = kind(given)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ValueError(f"{given!r} is not a {kind.__name__}; one of: {choices}") from None
    return int(proto.Value(kind.proto_prefix() + member.name))


def _enum(kind: type[E], number: int, proto: Any) -> E | None:
    """The SDK member of a proto value; None for UNSPECIFIED (and values newer than us)."""
    try:
        name = proto.Name(number).removeprefix(kind.proto_prefix())
    except ValueError:
        return None
    return kind.__members__.get(name)


def _time(message: Message, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=UTC)


def _duration(message: Message, name: str) -> timedelta | None:
    if not message.HasField(name):
        return None
    span: duration_pb2.Duration = getattr(message, name)
    return span.ToTimedelta()


def value(message: struct_pb2.Value) -> Any:
    """A Value as a JSON value; a number with no fraction is an int."""
    kind = message.WhichOneof("kind")
    if kind == "number_value":
        number = message.number_value
        return int(number) if number.is_integer() and abs(number) <= _EXACT else number
    if kind == "struct_value":
        return _struct(message.struct_value)
    if kind == "list_value":
        return [value(item) for item in message.list_value.values]
    if kind in ("string_value", "bool_value"):
        return getattr(message, kind)
    return None


def _struct(message: struct_pb2.Struct) -> dict[str, Any]:
    # A Struct is a map: its keys come in no order on the wire (it varies from process to
    # process), so they are sorted here and the same job always reads back the same way.
    return {key: value(message.fields[key]) for key in sorted(message.fields)}


def trigger(message: job_pb2.Trigger) -> Trigger | None:
    jitter = _duration(message, "jitter")
    kind = message.WhichOneof("kind")
    if kind == "cron":
        spec = message.cron
        return CronTrigger(
            expression=spec.expression,
            time_zone=spec.time_zone,
            start_time=_time(spec, "start_time"),
            end_time=_time(spec, "end_time"),
            jitter=jitter,
            day_match=_enum(DayMatch, spec.day_match, job_pb2.DayMatch) or DayMatch.ANY,
        )
    if kind == "interval":
        return IntervalTrigger(
            every=message.interval.every.ToTimedelta(),
            start_time=_time(message.interval, "start_time"),
            end_time=_time(message.interval, "end_time"),
            jitter=jitter,
        )
    if kind == "date":
        date = message.date
        local = datetime.fromisoformat(date.local_time) if date.local_time else None
        return DateTrigger(
            run_time=_time(date, "run_time"),
            local_time=local,
            time_zone=date.time_zone,
            jitter=jitter,
        )
    return None


def _retry(message: job_pb2.Job) -> RetryPolicy | None:
    if not message.HasField("retry"):
        return None
    retry = message.retry
    return RetryPolicy(
        max_attempts=retry.max_attempts,
        initial_backoff=_duration(retry, "initial_backoff"),
        backoff_multiplier=retry.backoff_multiplier,
        max_backoff=_duration(retry, "max_backoff"),
        retry_on=tuple(retry.retry_on),
    )


def _celery(message: job_pb2.Job) -> CeleryOptions | None:
    if not message.HasField("celery"):
        return None
    celery = message.celery
    priority = celery.priority if celery.HasField("priority") else None
    return CeleryOptions(queue=celery.queue, routing_key=celery.routing_key, priority=priority)


def _summary(message: job_pb2.Job) -> ExecutionSummary | None:
    if not message.HasField("last_execution"):
        return None
    last = message.last_execution
    return ExecutionSummary(
        id=last.id,
        state=_enum(ExecutionState, last.state, execution_pb2.ExecutionState),
        source=_enum(ExecutionSource, last.source, execution_pb2.ExecutionSource),
        scheduled_time=_time(last, "scheduled_time"),
        start_time=_time(last, "start_time"),
        end_time=_time(last, "end_time"),
        attempt=last.attempt,
    )


def job(message: job_pb2.Job) -> Job:
    return Job(
        id=message.id,
        task=message.task,
        trigger=trigger(message.trigger) if message.HasField("trigger") else None,
        args=_struct(message.args),
        display_name=message.display_name,
        description=message.description,
        paused=message.paused,
        misfire_grace=_duration(message, "misfire_grace"),
        max_concurrent=message.max_concurrent,
        labels=dict(message.labels),
        misfire_policy=_enum(MisfirePolicy, message.misfire_policy, job_pb2.MisfirePolicy),
        catchup_window=_duration(message, "catchup_window"),
        catchup_limit=message.catchup_limit,
        overlap_policy=_enum(OverlapPolicy, message.overlap_policy, job_pb2.OverlapPolicy),
        retry=_retry(message),
        timeout=_duration(message, "timeout"),
        history_limit=message.history_limit,
        executor=_enum(Executor, message.executor, execution_pb2.Executor),
        celery=_celery(message),
        etag=message.etag,
        create_time=_time(message, "create_time"),
        update_time=_time(message, "update_time"),
        next_run_time=_time(message, "next_run_time"),
        last_execution=_summary(message),
        created_by=message.created_by,
        updated_by=message.updated_by,
    )


def _missed(message: execution_pb2.Execution) -> MissedFires | None:
    if not message.HasField("missed"):
        return None
    missed = message.missed
    return MissedFires(
        count=missed.count,
        count_is_lower_bound=missed.count_is_lower_bound,
        first_time=_time(missed, "first_time"),
        last_time=_time(missed, "last_time"),
    )


def execution(message: execution_pb2.Execution) -> Execution:
    return Execution(
        id=message.id,
        job_id=message.job_id,
        state=_enum(ExecutionState, message.state, execution_pb2.ExecutionState),
        source=_enum(ExecutionSource, message.source, execution_pb2.ExecutionSource),
        task=message.task,
        args=_struct(message.args),
        result=value(message.result) if message.HasField("result") else None,
        scheduled_time=_time(message, "scheduled_time"),
        create_time=_time(message, "create_time"),
        dispatch_time=_time(message, "dispatch_time"),
        start_time=_time(message, "start_time"),
        end_time=_time(message, "end_time"),
        duration=_duration(message, "duration"),
        error_type=message.error_type,
        error_message=message.error_message,
        error_traceback=message.error_traceback,
        attempt=message.attempt,
        first_execution_id=message.first_execution_id,
        missed=_missed(message),
        note=message.note,
        pending_reason=message.pending_reason,
        request_id=message.request_id,
        instance_id=message.instance_id,
        executor=_enum(Executor, message.executor, execution_pb2.Executor),
        celery_task_id=message.celery_task_id,
        worker=message.worker,
        triggered_by=message.triggered_by,
        cancelled_by=message.cancelled_by,
    )


def backfill_result(message: pb.BackfillJobResponse) -> BackfillResult:
    return BackfillResult(
        executions=[execution(e) for e in message.executions],
        already_backfilled=message.already_backfilled,
    )


def instance(message: instance_pb2.Instance) -> Instance:
    return Instance(
        id=message.id,
        name=message.name,
        host=message.host,
        pid=message.pid,
        version=message.version,
        address=message.address,
        start_time=_time(message, "start_time"),
        last_seen_time=_time(message, "last_seen_time"),
        leader=message.leader,
        epoch=message.epoch,
        insecure=message.insecure,
        draining=message.draining,
        max_running=message.max_running,
        running=message.running,
    )


def task(message: job_pb2.Task) -> Task:
    return Task(name=message.name, description=message.description)


def audit_event(message: audit_pb2.AuditEvent) -> AuditEvent:
    return AuditEvent(
        id=message.id,
        time=_time(message, "time"),
        principal=message.principal,
        role=message.role,
        rpc=message.rpc,
        code=message.code,
        message=message.message,
        job_id=message.job_id,
        execution_id=message.execution_id,
        request=_struct(message.request),
        instance_id=message.instance_id,
        peer=message.peer,
    )


def _kind(number: int) -> WatchEventKind:
    found = _enum(WatchEventKind, number, pb.WatchEventKind)
    # An event kind newer than this client reads as PROGRESS: it carries a cursor, no item.
    return found or WatchEventKind.PROGRESS


def execution_event(message: pb.WatchExecutionsResponse) -> WatchEvent[Execution]:
    item = execution(message.execution) if message.HasField("execution") else None
    return WatchEvent(cursor=message.cursor, kind=_kind(message.kind), item=item)


def job_event(message: pb.WatchJobsResponse) -> WatchEvent[Job]:
    item = job(message.job) if message.HasField("job") else None
    return WatchEvent(cursor=message.cursor, kind=_kind(message.kind), item=item)


A = TypeVar("A")
B = TypeVar("B")


def each(convert: Callable[[A], B]) -> Callable[[Iterable[A]], list[B]]:
    """``convert`` applied to every item of a list."""
    return lambda items: [convert(item) for item in items]
