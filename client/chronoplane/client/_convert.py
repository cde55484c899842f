"""The SDK's values to protobuf messages: triggers, policies, times, durations, arguments."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from chronoplane.client import models
from chronoplane.client._from_proto import enum_value
from chronoplane.client.models import (
    CeleryOptions,
    CronTrigger,
    DayMatch,
    ExecutionState,
    IntervalTrigger,
    MisfirePolicy,
    OverlapPolicy,
    RetryPolicy,
    Trigger,
)
from chronoplane.v1 import execution_pb2, job_pb2

__all__ = [
    "MISFIRE_POLICIES",
    "OVERLAP_POLICIES",
    "Misfire",
    "Overlap",
    "at",
    "celery_message",
    "cron",
    "duration",
    "every",
    "execution_states",
    "from_timestamp",
    "misfire_policy",
    "overlap_policy",
    "retry_message",
    "retry_policy",
    "struct",
    "timestamp",
    "trigger_message",
]

Misfire: TypeAlias = MisfirePolicy | str | job_pb2.MisfirePolicy.ValueType
"""A misfire policy: ``MisfirePolicy.RUN_ALL``, its name ``"run_all"``, or the proto value."""
Overlap: TypeAlias = OverlapPolicy | str | job_pb2.OverlapPolicy.ValueType
"""An overlap policy: ``OverlapPolicy.BUFFER_ALL``, its name ``"buffer_all"``, or the proto
value."""

# The policies by lowercase name: "skip", "run_once", "run_all"; "skip", "allow", ...
MISFIRE_POLICIES: dict[str, job_pb2.MisfirePolicy.ValueType] = {
    name.removeprefix("MISFIRE_POLICY_").lower(): value
    for name, value in job_pb2.MisfirePolicy.items()
    if value != job_pb2.MISFIRE_POLICY_UNSPECIFIED
}
OVERLAP_POLICIES: dict[str, job_pb2.OverlapPolicy.ValueType] = {
    name.removeprefix("OVERLAP_POLICY_").lower(): value
    for name, value in job_pb2.OverlapPolicy.items()
    if value != job_pb2.OVERLAP_POLICY_UNSPECIFIED
}


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp; a naive one is refused, as its zone is a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{value.isoformat()} has no time zone; give one, e.g. tzinfo=UTC")
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def from_timestamp(message: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware datetime in UTC."""
    return message.ToDatetime(tzinfo=UTC)


def duration(value: timedelta | float) -> duration_pb2.Duration:
    """A timedelta, or a number of seconds, as a Duration."""
    message = duration_pb2.Duration()
    message.FromTimedelta(value if isinstance(value, timedelta) else timedelta(seconds=value))
    return message


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A mapping of JSON values as a Struct."""
    message = struct_pb2.Struct()
    message.update(value)
    return message


def misfire_policy(value: Misfire) -> job_pb2.MisfirePolicy.ValueType:
    """A misfire policy given as a member, a name ("skip", "run_once", "run_all") or a value."""
    number = enum_value(MisfirePolicy, value, job_pb2.MisfirePolicy)
    return job_pb2.MisfirePolicy.ValueType(number)


def overlap_policy(value: Overlap) -> job_pb2.OverlapPolicy.ValueType:
    """An overlap policy given as a member, a name ("skip", "allow", "buffer_one",
    "buffer_all", "cancel_running") or a value."""
    number = enum_value(OverlapPolicy, value, job_pb2.OverlapPolicy)
    return job_pb2.OverlapPolicy.ValueType(number)


def execution_states(
    states: Iterable[ExecutionState | str | int],
) -> list[execution_pb2.ExecutionState.ValueType]:
    """Execution states given as members, names or proto values, as proto values."""
    return [
        execution_pb2.ExecutionState.ValueType(
            enum_value(ExecutionState, state, execution_pb2.ExecutionState)
        )
        for state in states
    ]


def _maybe(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    return timestamp(value) if value is not None else None


def _maybe_duration(value: timedelta | None) -> duration_pb2.Duration | None:
    return duration(value) if value else None


def trigger_message(trigger: Trigger | job_pb2.Trigger) -> job_pb2.Trigger:
    """A trigger (a CronTrigger, IntervalTrigger or DateTrigger) as a message."""
    if isinstance(trigger, job_pb2.Trigger):
        return trigger
    jitter = _maybe_duration(trigger.jitter)
    if isinstance(trigger, CronTrigger):
        spec = job_pb2.CronTrigger(
            expression=trigger.expression,
            time_zone=trigger.time_zone,
            start_time=_maybe(trigger.start_time),
            end_time=_maybe(trigger.end_time),
        )
        spec.day_match = job_pb2.DayMatch.ValueType(
            enum_value(DayMatch, trigger.day_match, job_pb2.DayMatch)
        )
        return job_pb2.Trigger(cron=spec, jitter=jitter)
    if isinstance(trigger, IntervalTrigger):
        interval = job_pb2.IntervalTrigger(
            every=duration(trigger.every),
            start_time=_maybe(trigger.start_time),
            end_time=_maybe(trigger.end_time),
        )
        return job_pb2.Trigger(interval=interval, jitter=jitter)
    date = job_pb2.DateTrigger(
        run_time=_maybe(trigger.run_time),
        local_time=trigger.local_time.isoformat() if trigger.local_time else "",
        time_zone=trigger.time_zone,
    )
    return job_pb2.Trigger(date=date, jitter=jitter)


def retry_message(retry: RetryPolicy | job_pb2.RetryPolicy) -> job_pb2.RetryPolicy:
    if isinstance(retry, job_pb2.RetryPolicy):
        return retry
    return job_pb2.RetryPolicy(
        max_attempts=retry.max_attempts,
        initial_backoff=_maybe_duration(retry.initial_backoff),
        backoff_multiplier=retry.backoff_multiplier,
        max_backoff=_maybe_duration(retry.max_backoff),
        retry_on=list(retry.retry_on),
    )


def celery_message(celery: CeleryOptions | job_pb2.CeleryOptions) -> job_pb2.CeleryOptions:
    if isinstance(celery, job_pb2.CeleryOptions):
        return celery
    return job_pb2.CeleryOptions(
        queue=celery.queue, routing_key=celery.routing_key, priority=celery.priority
    )


# The builders as messages, for chronoctl (the SDK takes the dataclasses).


def retry_policy(
    max_attempts: int,
    *,
    initial_backoff: timedelta | float | None = None,
    backoff_multiplier: float = 0.0,
    max_backoff: timedelta | float | None = None,
    retry_on: Iterable[str] = (),
) -> job_pb2.RetryPolicy:
    """:func:`chronoplane.client.retry_policy` as a message."""
    return retry_message(
        models.retry_policy(
            max_attempts,
            initial_backoff=initial_backoff,
            backoff_multiplier=backoff_multiplier,
            max_backoff=max_backoff,
            retry_on=retry_on,
        )
    )


def cron(
    expression: str,
    time_zone: str = "",
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    jitter: timedelta | float | None = None,
) -> job_pb2.Trigger:
    """:func:`chronoplane.client.cron` as a message."""
    return trigger_message(models.cron(expression, time_zone, start=start, end=end, jitter=jitter))


def every(
    period: timedelta | float,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    jitter: timedelta | float | None = None,
) -> job_pb2.Trigger:
    """:func:`chronoplane.client.every` as a message."""
    return trigger_message(models.every(period, start=start, end=end, jitter=jitter))


def at(
    when: datetime, *, time_zone: str = "", jitter: timedelta | float | None = None
) -> job_pb2.Trigger:
    """:func:`chronoplane.client.at` as a message."""
    return trigger_message(models.at(when, time_zone=time_zone, jitter=jitter))
