"""A trigger's stored form: JSON in ``jobs.trigger``, one key naming its kind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from chronoplane.server.models import CronTrigger, DateTrigger, DayMatch, IntervalTrigger, Trigger

__all__ = ["trigger_from_json", "trigger_to_json"]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def trigger_to_json(trigger: Trigger) -> dict[str, Any]:
    """The stored form; jitter is written only when set, so older rows read the same."""
    spec: dict[str, Any]
    if isinstance(trigger, CronTrigger):
        kind = "cron"
        spec = {
            "expression": trigger.expression,
            "time_zone": trigger.time_zone,
            "day_match": trigger.day_match.value,
        }
        if trigger.start_time or trigger.end_time:
            spec |= {"start_time": _iso(trigger.start_time), "end_time": _iso(trigger.end_time)}
    elif isinstance(trigger, IntervalTrigger):
        kind = "interval"
        spec = {
            "every_seconds": trigger.every.total_seconds(),
            "start_time": _iso(trigger.start_time),
            "end_time": _iso(trigger.end_time),
        }
    else:
        kind = "date"
        spec = {"run_time": _iso(trigger.run_time)}
        if trigger.local_time is not None:
            spec |= {"local_time": trigger.local_time.isoformat(), "time_zone": trigger.time_zone}
    if trigger.jitter:
        spec["jitter_seconds"] = trigger.jitter.total_seconds()
    return {kind: spec}


def trigger_from_json(data: dict[str, Any]) -> Trigger:
    kind, spec = next(iter(data.items()))
    jitter = timedelta(seconds=spec.get("jitter_seconds", 0))
    if kind == "cron":
        return CronTrigger(
            expression=spec["expression"],
            time_zone=spec["time_zone"],
            # Rows written before migration 0014 (or by an older server) had both day fields
            # match.
            day_match=DayMatch(spec.get("day_match", DayMatch.ALL.value)),
            start_time=_parse(spec.get("start_time")),
            end_time=_parse(spec.get("end_time")),
            jitter=jitter,
        )
    if kind == "interval":
        return IntervalTrigger(
            every=timedelta(seconds=spec["every_seconds"]),
            start_time=_parse(spec["start_time"]),
            end_time=_parse(spec["end_time"]),
            jitter=jitter,
        )
    run_time = _parse(spec["run_time"])
    assert run_time is not None
    local = spec.get("local_time")
    return DateTrigger(
        run_time=run_time,
        jitter=jitter,
        local_time=datetime.fromisoformat(local) if local else None,
        time_zone=spec.get("time_zone", ""),
    )
