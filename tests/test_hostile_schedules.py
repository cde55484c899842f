"""Hostile schedules are rejected as INVALID_ARGUMENT naming the field, by the engine and by
the API on both databases, and none becomes a job. How fast: bench/hostile_schedules.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from conftest import InProcessServer
from google.protobuf import duration_pb2, timestamp_pb2
from harness import violations
from hostile_corpus import ACCEPTED_TIME_ZONES, CORPUS, Hostile

from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.errors import InvalidArgument
from chronoplane.server.models import CronTrigger, DayMatch, IntervalTrigger, Trigger
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def _duration(value: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def to_proto(trigger: Trigger) -> jpb.Trigger:
    jitter = _duration(trigger.jitter) if trigger.jitter else None
    if isinstance(trigger, CronTrigger):
        return jpb.Trigger(
            cron=jpb.CronTrigger(
                expression=trigger.expression,
                time_zone=trigger.time_zone,
                start_time=_timestamp(trigger.start_time),
                end_time=_timestamp(trigger.end_time),
                day_match=jpb.DAY_MATCH_ALL
                if trigger.day_match == DayMatch.ALL
                else jpb.DAY_MATCH_UNSPECIFIED,
            ),
            jitter=jitter,
        )
    assert isinstance(trigger, IntervalTrigger)
    return jpb.Trigger(
        interval=jpb.IntervalTrigger(
            every=_duration(trigger.every),
            start_time=_timestamp(trigger.start_time),
            end_time=_timestamp(trigger.end_time),
        ),
        jitter=jitter,
    )


def test_corpus_is_large_and_unique() -> None:
    assert len(CORPUS) >= 40
    assert len({entry.id for entry in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("entry", CORPUS, ids=[entry.id for entry in CORPUS])
def test_engine_rejects_naming_the_field(entry: Hostile) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ApschedulerEngine().check(entry.trigger, now=NOW)
    assert [v.field for v in caught.value.violations] == [entry.field], caught.value


def test_an_interval_without_start_is_judged_from_now() -> None:
    """Anchored one period after ``now``, as the service stores it, not after the wall clock."""
    engine = ApschedulerEngine()
    hourly = IntervalTrigger(every=timedelta(hours=1), end_time=NOW + timedelta(hours=2))
    engine.check(hourly, now=NOW)
    too_short = IntervalTrigger(every=timedelta(hours=1), end_time=NOW + timedelta(minutes=30))
    with pytest.raises(InvalidArgument) as caught:
        engine.check(too_short, now=NOW)
    assert [v.field for v in caught.value.violations] == ["interval.end_time"]


@pytest.mark.parametrize("time_zone", ACCEPTED_TIME_ZONES)
def test_listed_time_zones_are_accepted(time_zone: str) -> None:
    ApschedulerEngine().check(CronTrigger(expression="0 0 * * *", time_zone=time_zone), now=NOW)


async def _rejection(call: object) -> dict[str, str] | str:
    """The violations of a call that failed as INVALID_ARGUMENT, or what happened instead."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            return f"{error.code().name}: {error.details()}"
        return violations(error)
    return "succeeded"


async def test_api_rejects_every_hostile_schedule(server: InProcessServer) -> None:
    """One server per database for the whole corpus; every mismatch is reported at once."""
    wrong: list[str] = []
    for number, entry in enumerate(CORPUS):
        trigger = to_proto(entry.trigger)
        job = jpb.Job(id=f"hostile-{number}", task="chronoplane.echo", trigger=trigger)
        calls = {
            f"job.trigger.{entry.field}": server.stub.CreateJob(pb.CreateJobRequest(job=job)),
            f"trigger.{entry.field}": server.stub.PreviewTrigger(
                pb.PreviewTriggerRequest(trigger=trigger, count=3)
            ),
        }
        for field, call in calls.items():
            found = await _rejection(call)
            if not isinstance(found, dict) or field not in found:
                wrong.append(f"{entry.id}: wanted {field}, got {found}")
    assert not wrong, "\n".join(wrong)
    listed = await server.stub.ListJobs(pb.ListJobsRequest())
    assert [job.id for job in listed.jobs] == []
