"""Plain Python values to protobuf messages: triggers, policies, times, durations, arguments."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from chronoplane.v1 import job_pb2

__all__ = [
    "MISFIRE_POLICIES",
    "OVERLAP_POLICIES",
    "Misfire",
    "Overlap",
    "at",
    "cron",
    "duration",
    "every",
    "from_timestamp",
    "misfire_policy",
    "overlap_policy",
    "retry_policy",
    "struct",
    "timestamp",
]

Misfire: TypeAlias = job_pb2.MisfirePolicy.ValueType | str
"""A misfire policy: ``job_pb2.MISFIRE_POLICY_RUN_ALL``, or its name, ``"run_all"``."""
Overlap: TypeAlias = job_pb2.OverlapPolicy.ValueType | str
"""An overlap policy: ``job_pb2.OVERLAP_POLICY_BUFFER_ALL``, or its name, ``"buffer_all"``."""

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


def _policy(value: int | str, names: Mapping[str, int], kind: str) -> int:
    if isinstance(value, str):
        try:
            return names[value.lower().replace("-", "_")]
        except KeyError:
            choices = ", ".join(names)
            raise ValueError(f"{value!r} is not a {kind} policy; one of: {choices}") from None
    return value


def misfire_policy(value: Misfire) -> job_pb2.MisfirePolicy.ValueType:
    """A misfire policy given as an enum value or a name ("skip", "run_once", "run_all")."""
    return job_pb2.MisfirePolicy.ValueType(_policy(value, MISFIRE_POLICIES, "misfire"))


def overlap_policy(value: Overlap) -> job_pb2.OverlapPolicy.ValueType:
    """An overlap policy given as an enum value or a name ("skip", "allow", "buffer_one",
    "buffer_all", "cancel_running")."""
    return job_pb2.OverlapPolicy.ValueType(_policy(value, OVERLAP_POLICIES, "overlap"))


def retry_policy(
    max_attempts: int,
    *,
    initial_backoff: timedelta | float | None = None,
    backoff_multiplier: float = 0.0,
    max_backoff: timedelta | float | None = None,
    retry_on: Iterable[str] = (),
) -> job_pb2.RetryPolicy:
    """Tries a failed or timed-out run again, up to ``max_attempts`` runs in all.

    The first retry waits ``initial_backoff`` (default 1 s), each further one
    ``backoff_multiplier`` (default 2) times longer, at most ``max_backoff`` (default 10 min).
    ``retry_on`` limits retries to failures raising these exception classes ("ConnectionError",
    "builtins.ConnectionError"; a timeout counts as "TimeoutError"); empty means any failure.
    """
    return job_pb2.RetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=duration(initial_backoff) if initial_backoff is not None else None,
        backoff_multiplier=backoff_multiplier,
        max_backoff=duration(max_backoff) if max_backoff is not None else None,
        retry_on=list(retry_on),
    )


def _jitter(jitter: timedelta | float | None) -> duration_pb2.Duration | None:
    return duration(jitter) if jitter else None


def cron(
    expression: str,
    time_zone: str = "",
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    jitter: timedelta | float | None = None,
) -> job_pb2.Trigger:
    """Fires when the cron expression matches, in the time zone (UTC when empty), never before
    start nor after end; each run starts up to ``jitter`` (a timedelta or seconds) late."""
    spec = job_pb2.CronTrigger(
        expression=expression,
        time_zone=time_zone,
        start_time=timestamp(start) if start else None,
        end_time=timestamp(end) if end else None,
    )
    return job_pb2.Trigger(cron=spec, jitter=_jitter(jitter))


def every(
    period: timedelta | float,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    jitter: timedelta | float | None = None,
) -> job_pb2.Trigger:
    """Fires every period (a timedelta or seconds), from start (or one period on) until end;
    each run starts up to ``jitter`` late (less than the period)."""
    interval = job_pb2.IntervalTrigger(
        every=duration(period),
        start_time=timestamp(start) if start else None,
        end_time=timestamp(end) if end else None,
    )
    return job_pb2.Trigger(interval=interval, jitter=_jitter(jitter))


def at(
    when: datetime, *, time_zone: str = "", jitter: timedelta | float | None = None
) -> job_pb2.Trigger:
    """Fires once (up to ``jitter`` later): at an aware datetime, or at a wall time in a
    zone, a naive ``when`` with ``time_zone`` or a ``when`` whose tzinfo is a ZoneInfo. The
    server reads a wall time as cron does: one in a spring-forward gap fires at the gap's
    end, one that happens twice at its first occurrence (``fold=1`` names the second)."""
    key = getattr(when.tzinfo, "key", None)
    if time_zone and when.tzinfo is not None:
        raise ValueError("with time_zone, give a naive datetime (a wall time in that zone)")
    if key is not None and not when.fold:
        time_zone, when = key, when.replace(tzinfo=None)
    if time_zone:
        date = job_pb2.DateTrigger(local_time=when.isoformat(), time_zone=time_zone)
    else:
        date = job_pb2.DateTrigger(run_time=timestamp(when))
    return job_pb2.Trigger(date=date, jitter=_jitter(jitter))
