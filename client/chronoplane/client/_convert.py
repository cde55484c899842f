"""Plain Python values to protobuf messages: triggers, times, durations, arguments."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from chronoplane.v1 import job_pb2

__all__ = ["at", "cron", "duration", "every", "from_timestamp", "struct", "timestamp"]


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


def cron(expression: str, time_zone: str = "") -> job_pb2.Trigger:
    """Fires when the cron expression matches, in the time zone (UTC when empty)."""
    return job_pb2.Trigger(cron=job_pb2.CronTrigger(expression=expression, time_zone=time_zone))


def every(
    period: timedelta | float, *, start: datetime | None = None, end: datetime | None = None
) -> job_pb2.Trigger:
    """Fires every period (a timedelta or seconds), from start (or one period on) until end."""
    interval = job_pb2.IntervalTrigger(
        every=duration(period),
        start_time=timestamp(start) if start else None,
        end_time=timestamp(end) if end else None,
    )
    return job_pb2.Trigger(interval=interval)


def at(when: datetime) -> job_pb2.Trigger:
    """Fires once, at an aware datetime."""
    return job_pb2.Trigger(date=job_pb2.DateTrigger(run_time=timestamp(when)))
