"""Protobuf messages to domain types and back. Every field a client sends is checked here or
in the service; a field that cannot even be decoded becomes a named violation."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from chronoplane.server import walltime
from chronoplane.server.errors import InvalidArgument
from chronoplane.server.models import (
    DEFAULT_CATCHUP_LIMIT,
    DEFAULT_MISFIRE_GRACE,
    AuditEvent,
    CeleryOptions,
    CronTrigger,
    DateTrigger,
    DayMatch,
    Execution,
    ExecutionSource,
    ExecutionState,
    ExecutionSummary,
    ExecutorKind,
    Instance,
    IntervalTrigger,
    Job,
    JSONObject,
    MisfirePolicy,
    MissedFires,
    OverlapPolicy,
    RetryPolicy,
    Trigger,
)
from chronoplane.server.tasks import TaskDefinition
from chronoplane.server.validation import Violations
from chronoplane.v1 import audit_pb2, execution_pb2, instance_pb2, job_pb2

__all__ = [
    "audit_event_to_proto",
    "duration_from_proto",
    "execution_to_proto",
    "instance_to_proto",
    "job_fields_from_proto",
    "job_to_proto",
    "overlap_from_proto",
    "state_from_proto",
    "struct_from_proto",
    "task_to_proto",
    "timestamp_from_proto",
    "timestamp_to_proto",
    "trigger_from_proto",
]

_MAX_JSON_DEPTH = 32


class _Undecodable(ValueError):
    pass


# -- well-known types -----------------------------------------------------------------------------


def timestamp_from_proto(message: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return message.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument.field(field, "is not a valid timestamp") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_to_proto(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """As ``Timestamp.FromDatetime`` (a naive time is UTC), in a fifth of its time: a page
    of executions has 500 timestamps."""
    if value is None:
        return None
    since = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )


def duration_from_proto(message: duration_pb2.Duration, field: str) -> timedelta:
    if not -315_576_000_000 <= message.seconds <= 315_576_000_000 or not (
        -999_999_999 <= message.nanos <= 999_999_999
    ):
        raise InvalidArgument.field(field, "is not a valid duration")
    try:
        return message.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidArgument.field(field, "is out of range") from None


def _duration_to_proto(value: timedelta) -> duration_pb2.Duration:
    """As ``Duration.FromTimedelta``, without its detour through nanoseconds."""
    seconds = value.days * 86_400 + value.seconds
    nanos = value.microseconds * 1000
    if seconds < 0 and nanos:  # seconds and nanos have the same sign
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _from_value(value: struct_pb2.Value, depth: int) -> Any:
    if depth > _MAX_JSON_DEPTH:
        raise _Undecodable(f"nests deeper than {_MAX_JSON_DEPTH} levels")
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _from_value(v, depth + 1) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_from_value(v, depth + 1) for v in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise _Undecodable("holds a number that is not finite")
        # JSON has one number type; give tasks the integer a user wrote as an integer.
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_from_proto(message: struct_pb2.Struct, field: str) -> JSONObject:
    try:
        return {k: _from_value(v, 1) for k, v in message.fields.items()}
    except _Undecodable as error:
        raise InvalidArgument.field(field, str(error)) from None
    except RecursionError:
        raise InvalidArgument.field(field, "nests too deep") from None


def _struct_to_proto(value: JSONObject) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def _value_to_proto(value: Any) -> struct_pb2.Value:
    """Any JSON value; ``{}`` and ``[]`` too (``struct_value.update({})`` would leave the
    Value empty, which grpcurl cannot print: "nil Value")."""
    return json_format.ParseDict(value, struct_pb2.Value())


# -- triggers -------------------------------------------------------------------------------------


def _optional_time(message: Any, name: str, field: str) -> datetime | None:
    if not message.HasField(name):
        return None
    return timestamp_from_proto(getattr(message, name), f"{field}.{name}")


def _optional_duration(message: Any, name: str, field: str) -> timedelta | None:
    if not message.HasField(name):
        return None
    return duration_from_proto(getattr(message, name), field)


def trigger_from_proto(message: job_pb2.Trigger, field: str) -> Trigger | None:
    """The domain trigger, or None when no kind is set."""
    kind = message.WhichOneof("kind")
    jitter = _optional_duration(message, "jitter", f"{field}.jitter") or timedelta(0)
    if kind == "cron":
        spec = message.cron
        return CronTrigger(
            expression=spec.expression,
            time_zone=spec.time_zone or "UTC",
            day_match=_DAY_MATCH.get(spec.day_match, DayMatch.ANY),
            start_time=_optional_time(spec, "start_time", f"{field}.cron"),
            end_time=_optional_time(spec, "end_time", f"{field}.cron"),
            jitter=jitter,
        )
    if kind == "interval":
        spec_i = message.interval
        return IntervalTrigger(
            every=duration_from_proto(spec_i.every, f"{field}.interval.every"),
            start_time=_optional_time(spec_i, "start_time", f"{field}.interval"),
            end_time=_optional_time(spec_i, "end_time", f"{field}.interval"),
            jitter=jitter,
        )
    if kind == "date":
        return _date_trigger(message.date, f"{field}.date", jitter)
    return None


def _date_trigger(spec: job_pb2.DateTrigger, field: str, jitter: timedelta) -> DateTrigger:
    run_time = _optional_time(spec, "run_time", field)
    if not spec.local_time and not spec.time_zone:
        if run_time is None:
            raise InvalidArgument.field(f"{field}.run_time", "is required")
        return DateTrigger(run_time=run_time, jitter=jitter)
    if not spec.local_time:
        raise InvalidArgument.field(f"{field}.local_time", "is required with time_zone")
    wall, instant = walltime.local_time(spec.local_time, spec.time_zone, field)
    if run_time is not None and run_time != instant:
        raise InvalidArgument.field(
            f"{field}.run_time",
            f"is {run_time.isoformat()}, but local_time {spec.local_time} in "
            f"{spec.time_zone} is {instant.isoformat()}: give one of them",
        )
    return DateTrigger(run_time=instant, local_time=wall, time_zone=spec.time_zone, jitter=jitter)


def _trigger_to_proto(trigger: Trigger) -> job_pb2.Trigger:
    jitter = _duration_to_proto(trigger.jitter) if trigger.jitter else None
    if isinstance(trigger, CronTrigger):
        return job_pb2.Trigger(
            cron=job_pb2.CronTrigger(
                expression=trigger.expression,
                time_zone=trigger.time_zone,
                start_time=timestamp_to_proto(trigger.start_time),
                end_time=timestamp_to_proto(trigger.end_time),
                day_match=_DAY_MATCH_PROTO[trigger.day_match],
            ),
            jitter=jitter,
        )
    if isinstance(trigger, IntervalTrigger):
        return job_pb2.Trigger(
            interval=job_pb2.IntervalTrigger(
                every=_duration_to_proto(trigger.every),
                start_time=timestamp_to_proto(trigger.start_time),
                end_time=timestamp_to_proto(trigger.end_time),
            ),
            jitter=jitter,
        )
    date = job_pb2.DateTrigger(
        run_time=timestamp_to_proto(trigger.run_time),
        local_time=trigger.local_time.isoformat() if trigger.local_time else "",
        time_zone=trigger.time_zone,
    )
    return job_pb2.Trigger(date=date, jitter=jitter)


_DAY_MATCH = {job_pb2.DAY_MATCH_ANY: DayMatch.ANY, job_pb2.DAY_MATCH_ALL: DayMatch.ALL}
_DAY_MATCH_PROTO = {value: key for key, value in _DAY_MATCH.items()}


# -- policies -------------------------------------------------------------------------------------

_MISFIRE = {
    job_pb2.MISFIRE_POLICY_SKIP: MisfirePolicy.SKIP,
    job_pb2.MISFIRE_POLICY_RUN_ONCE: MisfirePolicy.RUN_ONCE,
    job_pb2.MISFIRE_POLICY_RUN_ALL: MisfirePolicy.RUN_ALL,
}
_OVERLAP = {
    job_pb2.OVERLAP_POLICY_SKIP: OverlapPolicy.SKIP,
    job_pb2.OVERLAP_POLICY_ALLOW: OverlapPolicy.ALLOW,
    job_pb2.OVERLAP_POLICY_BUFFER_ONE: OverlapPolicy.BUFFER_ONE,
    job_pb2.OVERLAP_POLICY_BUFFER_ALL: OverlapPolicy.BUFFER_ALL,
    job_pb2.OVERLAP_POLICY_CANCEL_RUNNING: OverlapPolicy.CANCEL_RUNNING,
}


_MISFIRE_TO_PROTO = {policy: number for number, policy in _MISFIRE.items()}


_OVERLAP_TO_PROTO = {policy: number for number, policy in _OVERLAP.items()}


def _enum(value: int, table: dict[Any, Any], field: str) -> Any:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument.field(field, f"{value} is not a known value") from None


def _misfire_from_proto(message: job_pb2.Job) -> MisfirePolicy:
    if message.misfire_policy == job_pb2.MISFIRE_POLICY_UNSPECIFIED:
        # The deprecated coalesce field: false asked for every missed fire to run.
        if message.HasField("coalesce") and not message.coalesce:
            return MisfirePolicy.RUN_ALL
        return MisfirePolicy.RUN_ONCE
    return _enum(message.misfire_policy, _MISFIRE, "job.misfire_policy")  # type: ignore[no-any-return]


def overlap_from_proto(value: int, field: str) -> OverlapPolicy | None:
    """The policy, or None when unspecified."""
    if value == job_pb2.OVERLAP_POLICY_UNSPECIFIED:
        return None
    return _enum(value, _OVERLAP, field)  # type: ignore[no-any-return]


def _retry_from_proto(message: job_pb2.Job) -> RetryPolicy:
    if not message.HasField("retry"):
        return RetryPolicy()
    spec = message.retry
    default = RetryPolicy()
    return RetryPolicy(
        max_attempts=spec.max_attempts or 1,
        initial_backoff=_optional_duration(spec, "initial_backoff", "job.retry.initial_backoff")
        or default.initial_backoff,
        multiplier=spec.backoff_multiplier or default.multiplier,
        max_backoff=_optional_duration(spec, "max_backoff", "job.retry.max_backoff")
        or default.max_backoff,
        retry_on=tuple(spec.retry_on),
    )


def _retry_to_proto(retry: RetryPolicy) -> job_pb2.RetryPolicy | None:
    if retry.max_attempts <= 1:
        return None
    return job_pb2.RetryPolicy(
        max_attempts=retry.max_attempts,
        initial_backoff=_duration_to_proto(retry.initial_backoff),
        backoff_multiplier=retry.multiplier,
        max_backoff=_duration_to_proto(retry.max_backoff),
        retry_on=retry.retry_on,
    )


# -- jobs -----------------------------------------------------------------------------------------


def job_fields_from_proto(message: job_pb2.Job, names: set[str]) -> dict[str, Any]:
    """The named updatable fields of ``message`` as domain values (a missing trigger is None);
    unknown names map to None so that the service can name them."""
    violations = Violations()
    values: dict[str, Any] = {}
    decoders: dict[str, Callable[[], Any]] = {
        "display_name": lambda: message.display_name,
        "description": lambda: message.description,
        "task": lambda: message.task,
        "args": lambda: struct_from_proto(message.args, "job.args"),
        "trigger": lambda: trigger_from_proto(message.trigger, "job.trigger"),
        "misfire_grace": lambda: (
            duration_from_proto(message.misfire_grace, "job.misfire_grace")
            if message.HasField("misfire_grace")
            and (message.misfire_grace.seconds or message.misfire_grace.nanos)
            else DEFAULT_MISFIRE_GRACE
        ),
        "max_concurrent": lambda: message.max_concurrent,
        "labels": lambda: dict(message.labels),
        "misfire_policy": lambda: _misfire_from_proto(message),
        "catchup_window": lambda: _optional_duration(
            message, "catchup_window", "job.catchup_window"
        ),
        "catchup_limit": lambda: message.catchup_limit or DEFAULT_CATCHUP_LIMIT,
        "overlap_policy": lambda: (
            overlap_from_proto(message.overlap_policy, "job.overlap_policy") or OverlapPolicy.SKIP
        ),
        "retry": lambda: _retry_from_proto(message),
        "timeout": lambda: _optional_duration(message, "timeout", "job.timeout"),
        "history_limit": lambda: message.history_limit,
        "executor": lambda: _executor_from_proto(message.executor, "job.executor"),
        "celery": lambda: CeleryOptions(
            queue=message.celery.queue,
            routing_key=message.celery.routing_key,
            priority=message.celery.priority if message.celery.HasField("priority") else None,
        ),
    }
    for name in names:
        decode = decoders.get(name)
        try:
            values[name] = decode() if decode else None
        except InvalidArgument as error:
            violations.extend(error, "")
    violations.raise_if_any()
    return values


_EXECUTORS: dict[int, ExecutorKind] = {
    execution_pb2.EXECUTOR_UNSPECIFIED: ExecutorKind.INLINE,
    execution_pb2.EXECUTOR_INLINE: ExecutorKind.INLINE,
    execution_pb2.EXECUTOR_CELERY: ExecutorKind.CELERY,
}


def _executor_from_proto(value: int, field: str) -> ExecutorKind:
    executor = _EXECUTORS.get(value)
    if executor is None:
        raise InvalidArgument.field(field, f"{value} is not an executor")
    return executor


_EXECUTORS_TO_PROTO = {
    kind: execution_pb2.Executor.Value("EXECUTOR_" + kind.name) for kind in ExecutorKind
}


def _executor_to_proto(executor: ExecutorKind) -> execution_pb2.Executor.ValueType:
    return _EXECUTORS_TO_PROTO[executor]


def _celery_to_proto(options: CeleryOptions) -> job_pb2.CeleryOptions:
    return job_pb2.CeleryOptions(
        queue=options.queue, routing_key=options.routing_key, priority=options.priority
    )


def _summary_to_proto(summary: ExecutionSummary) -> execution_pb2.ExecutionSummary:
    return execution_pb2.ExecutionSummary(
        id=summary.id,
        state=_state_to_proto(summary.state),
        source=_source_to_proto(summary.source),
        scheduled_time=timestamp_to_proto(summary.scheduled_time),
        start_time=timestamp_to_proto(summary.start_time),
        end_time=timestamp_to_proto(summary.end_time),
        attempt=summary.attempt,
    )


def job_to_proto(job: Job) -> job_pb2.Job:
    return job_pb2.Job(
        id=job.id,
        display_name=job.display_name,
        description=job.description,
        task=job.task,
        args=_struct_to_proto(job.args),
        trigger=_trigger_to_proto(job.trigger),
        paused=job.paused,
        misfire_grace=_duration_to_proto(job.misfire_grace),
        coalesce=job.coalesce,
        max_concurrent=job.max_concurrent,
        labels=job.labels,
        create_time=timestamp_to_proto(job.create_time),
        update_time=timestamp_to_proto(job.update_time),
        etag=job.etag,
        next_run_time=timestamp_to_proto(job.next_run_time),
        last_execution=_summary_to_proto(job.last_execution) if job.last_execution else None,
        misfire_policy=_MISFIRE_TO_PROTO[job.misfire_policy],
        catchup_window=_duration_to_proto(job.catchup_window) if job.catchup_window else None,
        catchup_limit=job.catchup_limit,
        overlap_policy=_OVERLAP_TO_PROTO[job.overlap_policy],
        retry=_retry_to_proto(job.retry),
        timeout=_duration_to_proto(job.timeout) if job.timeout else None,
        history_limit=job.history_limit,
        created_by=job.created_by,
        updated_by=job.updated_by,
        executor=_executor_to_proto(job.executor),
        celery=_celery_to_proto(job.celery) if job.executor is ExecutorKind.CELERY else None,
    )


# -- executions -----------------------------------------------------------------------------------

_STATE_PREFIX = "EXECUTION_STATE_"


_STATES_TO_PROTO = {
    state: execution_pb2.ExecutionState.Value(_STATE_PREFIX + state.name)
    for state in ExecutionState
}


def _state_to_proto(state: ExecutionState) -> execution_pb2.ExecutionState.ValueType:
    return _STATES_TO_PROTO[state]


def state_from_proto(value: int, field: str) -> ExecutionState:
    name = execution_pb2.ExecutionState.Name(value) if value in _STATE_NUMBERS else ""  # type: ignore[arg-type]
    if not name or value == execution_pb2.EXECUTION_STATE_UNSPECIFIED:
        raise InvalidArgument.field(field, f"{value} is not an execution state")
    return ExecutionState[name.removeprefix(_STATE_PREFIX)]


_STATE_NUMBERS = frozenset(execution_pb2.ExecutionState.values())


_SOURCES_TO_PROTO = {
    source: execution_pb2.ExecutionSource.Value("EXECUTION_SOURCE_" + source.name)
    for source in ExecutionSource
}


def _source_to_proto(source: ExecutionSource) -> execution_pb2.ExecutionSource.ValueType:
    return _SOURCES_TO_PROTO[source]


def execution_to_proto(execution: Execution) -> execution_pb2.Execution:
    duration = execution.duration
    return execution_pb2.Execution(
        id=execution.id,
        job_id=execution.job_id,
        state=_state_to_proto(execution.state),
        source=_source_to_proto(execution.source),
        scheduled_time=timestamp_to_proto(execution.scheduled_time),
        create_time=timestamp_to_proto(execution.create_time),
        start_time=timestamp_to_proto(execution.start_time),
        end_time=timestamp_to_proto(execution.end_time),
        duration=_duration_to_proto(duration) if duration is not None else None,
        result=_value_to_proto(execution.result) if execution.result is not None else None,
        error_message=execution.error_message,
        error_traceback=execution.error_traceback,
        instance_id=execution.instance_id,
        task=execution.task,
        args=_struct_to_proto(execution.args),
        request_id=execution.request_id,
        attempt=execution.attempt,
        first_execution_id=execution.first_execution_id,
        error_type=execution.error_type,
        missed=_missed_to_proto(execution.missed) if execution.missed else None,
        note=execution.note,
        triggered_by=execution.triggered_by,
        cancelled_by=execution.cancelled_by,
        executor=_executor_to_proto(execution.executor),
        celery_task_id=execution.celery_task_id,
        worker=execution.worker,
        pending_reason=execution.pending_reason,
        dispatch_time=timestamp_to_proto(execution.dispatch_time),
    )


def _missed_to_proto(missed: MissedFires) -> execution_pb2.MissedFires:
    return execution_pb2.MissedFires(
        count=missed.count,
        count_is_lower_bound=missed.count_is_lower_bound,
        first_time=timestamp_to_proto(missed.first_time),
        last_time=timestamp_to_proto(missed.last_time),
    )


def task_to_proto(task: TaskDefinition) -> job_pb2.Task:
    return job_pb2.Task(name=task.name, description=task.description)


def instance_to_proto(instance: Instance) -> instance_pb2.Instance:
    return instance_pb2.Instance(
        id=instance.id,
        name=instance.name,
        host=instance.host,
        pid=instance.pid,
        version=instance.version,
        start_time=timestamp_to_proto(instance.start_time),
        last_seen_time=timestamp_to_proto(instance.last_seen_time),
        leader=instance.leader,
        insecure=instance.insecure,
        address=instance.address,
        max_running=instance.max_running,
        running=instance.running,
        draining=instance.draining,
        epoch=instance.epoch,
    )


def audit_event_to_proto(event: AuditEvent) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(
        id=event.id,
        time=timestamp_to_proto(event.time),
        principal=event.principal,
        role=event.role,
        rpc=event.rpc,
        job_id=event.job_id,
        execution_id=event.execution_id,
        code=event.code,
        message=event.message,
        request=_struct_to_proto(event.request),
        instance_id=event.instance_id,
        peer=event.peer,
    )
