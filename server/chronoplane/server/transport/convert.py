"""Protobuf messages to domain types and back. Every field a client sends is checked here or
in the service; a field that cannot even be decoded becomes a named violation."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from chronoplane.server.errors import InvalidArgument
from chronoplane.server.models import (
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MISFIRE_GRACE,
    CronTrigger,
    DateTrigger,
    Execution,
    ExecutionSource,
    ExecutionState,
    ExecutionSummary,
    IntervalTrigger,
    Job,
    JSONObject,
    Trigger,
)
from chronoplane.server.tasks import TaskDefinition
from chronoplane.server.validation import Violations
from chronoplane.v1 import execution_pb2, job_pb2

__all__ = [
    "execution_to_proto",
    "job_fields_from_proto",
    "job_to_proto",
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


def timestamp_to_proto(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def _duration_from_proto(message: duration_pb2.Duration, field: str) -> timedelta:
    if not -315_576_000_000 <= message.seconds <= 315_576_000_000 or not (
        -999_999_999 <= message.nanos <= 999_999_999
    ):
        raise InvalidArgument.field(field, "is not a valid duration")
    try:
        return message.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidArgument.field(field, "is out of range") from None


def _duration_to_proto(value: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


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
    message = struct_pb2.Value()
    if value is None:
        message.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, int | float):
        message.number_value = value
    elif isinstance(value, str):
        message.string_value = value
    elif isinstance(value, dict):
        message.struct_value.update(value)
    else:
        message.list_value.extend(value)
    return message


# -- triggers -------------------------------------------------------------------------------------


def trigger_from_proto(message: job_pb2.Trigger, field: str) -> Trigger | None:
    """The domain trigger, or None when no kind is set."""
    kind = message.WhichOneof("kind")
    if kind == "cron":
        return CronTrigger(
            expression=message.cron.expression, time_zone=message.cron.time_zone or "UTC"
        )
    if kind == "interval":
        spec = message.interval
        return IntervalTrigger(
            every=_duration_from_proto(spec.every, f"{field}.interval.every"),
            start_time=timestamp_from_proto(spec.start_time, f"{field}.interval.start_time")
            if spec.HasField("start_time")
            else None,
            end_time=timestamp_from_proto(spec.end_time, f"{field}.interval.end_time")
            if spec.HasField("end_time")
            else None,
        )
    if kind == "date":
        if not message.date.HasField("run_time"):
            raise InvalidArgument.field(f"{field}.date.run_time", "is required")
        return DateTrigger(run_time=timestamp_from_proto(message.date.run_time, field))
    return None


def _trigger_to_proto(trigger: Trigger) -> job_pb2.Trigger:
    if isinstance(trigger, CronTrigger):
        return job_pb2.Trigger(
            cron=job_pb2.CronTrigger(expression=trigger.expression, time_zone=trigger.time_zone)
        )
    if isinstance(trigger, IntervalTrigger):
        return job_pb2.Trigger(
            interval=job_pb2.IntervalTrigger(
                every=_duration_to_proto(trigger.every),
                start_time=timestamp_to_proto(trigger.start_time),
                end_time=timestamp_to_proto(trigger.end_time),
            )
        )
    return job_pb2.Trigger(date=job_pb2.DateTrigger(run_time=timestamp_to_proto(trigger.run_time)))


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
            _duration_from_proto(message.misfire_grace, "job.misfire_grace")
            if message.HasField("misfire_grace")
            and (message.misfire_grace.seconds or message.misfire_grace.nanos)
            else DEFAULT_MISFIRE_GRACE
        ),
        "coalesce": lambda: message.coalesce if message.HasField("coalesce") else True,
        "max_concurrent": lambda: message.max_concurrent or DEFAULT_MAX_CONCURRENT,
        "labels": lambda: dict(message.labels),
    }
    for name in names:
        decode = decoders.get(name)
        try:
            values[name] = decode() if decode else None
        except InvalidArgument as error:
            violations.extend(error, "")
    violations.raise_if_any()
    return values


def _summary_to_proto(summary: ExecutionSummary) -> execution_pb2.ExecutionSummary:
    return execution_pb2.ExecutionSummary(
        id=summary.id,
        state=_state_to_proto(summary.state),
        source=_source_to_proto(summary.source),
        scheduled_time=timestamp_to_proto(summary.scheduled_time),
        start_time=timestamp_to_proto(summary.start_time),
        end_time=timestamp_to_proto(summary.end_time),
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
    )


# -- executions -----------------------------------------------------------------------------------

_STATE_PREFIX = "EXECUTION_STATE_"


def _state_to_proto(state: ExecutionState) -> execution_pb2.ExecutionState.ValueType:
    return execution_pb2.ExecutionState.Value(_STATE_PREFIX + state.name)


def state_from_proto(value: int, field: str) -> ExecutionState:
    name = execution_pb2.ExecutionState.Name(value) if value in _STATE_NUMBERS else ""  # type: ignore[arg-type]
    if not name or value == execution_pb2.EXECUTION_STATE_UNSPECIFIED:
        raise InvalidArgument.field(field, f"{value} is not an execution state")
    return ExecutionState[name.removeprefix(_STATE_PREFIX)]


_STATE_NUMBERS = frozenset(execution_pb2.ExecutionState.values())


def _source_to_proto(source: ExecutionSource) -> execution_pb2.ExecutionSource.ValueType:
    return execution_pb2.ExecutionSource.Value("EXECUTION_SOURCE_" + source.name)


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
    )


def task_to_proto(task: TaskDefinition) -> job_pb2.Task:
    return job_pb2.Task(name=task.name, description=task.description)
