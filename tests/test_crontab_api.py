"""Issue 19 through the API, chronoctl and the Python client: macros stored and listed as
written, the day rule of a job, and a one-shot wall time in a zone with cron's DST rules."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from conftest import InProcessServer
from google.protobuf import timestamp_pb2
from harness import violations

from chronoplane.client import AsyncClient, CronTrigger, DateTrigger, DayMatch, at, cron
from chronoplane.client._convert import trigger_message
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

CHRONOCTL = str(Path(sys.executable).parent / "chronoctl")
NEW_YORK = "America/New_York"
# 02:30 on 2027-03-14 does not exist in New York: the gap ends at 03:00 EDT, 07:00 UTC.
GAP_END = datetime(2027, 3, 14, 7, tzinfo=UTC)


def _stamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _job(job_id: str, trigger: jpb.Trigger) -> pb.CreateJobRequest:
    return pb.CreateJobRequest(job=jpb.Job(id=job_id, task="chronoplane.echo", trigger=trigger))


async def test_macros_and_day_match_are_kept_as_written(server: InProcessServer) -> None:
    stub = server.stub
    await stub.CreateJob(_job("hourly", jpb.Trigger(cron=jpb.CronTrigger(expression="@hourly"))))
    old_rule = jpb.CronTrigger(expression="0 0 1,15 * 1", day_match=jpb.DAY_MATCH_ALL)
    await stub.CreateJob(_job("both", jpb.Trigger(cron=old_rule)))
    listed = {job.id: job.trigger.cron for job in (await stub.ListJobs(pb.ListJobsRequest())).jobs}
    assert listed["hourly"].expression == "@hourly"
    assert listed["hourly"].day_match == jpb.DAY_MATCH_ANY
    assert listed["both"].day_match == jpb.DAY_MATCH_ALL
    start = datetime(2026, 6, 1, 0, 30, tzinfo=UTC)
    preview = await stub.PreviewTrigger(
        pb.PreviewTriggerRequest(
            trigger=jpb.Trigger(cron=jpb.CronTrigger(expression="@hourly")),
            count=2,
            start_time=_stamp(start),
        )
    )
    assert [t.ToDatetime(tzinfo=UTC).hour for t in preview.fire_times] == [1, 2]


async def test_a_wall_time_in_a_gap_fires_at_its_end(server: InProcessServer) -> None:
    local = jpb.DateTrigger(local_time="2027-03-14T02:30:00", time_zone=NEW_YORK)
    created = (await server.stub.CreateJob(_job("gap", jpb.Trigger(date=local)))).job
    assert created.trigger.date.run_time.ToDatetime(tzinfo=UTC) == GAP_END
    assert created.next_run_time.ToDatetime(tzinfo=UTC) == GAP_END
    assert (created.trigger.date.local_time, created.trigger.date.time_zone) == (
        "2027-03-14T02:30:00",
        NEW_YORK,
    )
    # 01:30 on 2027-11-07 happens twice: the first is EDT, 05:30 UTC.
    repeated = jpb.DateTrigger(local_time="2027-11-07T01:30:00", time_zone=NEW_YORK)
    fires = await server.stub.PreviewTrigger(
        pb.PreviewTriggerRequest(trigger=jpb.Trigger(date=repeated), count=1)
    )
    assert fires.fire_times[0].ToDatetime(tzinfo=UTC) == datetime(2027, 11, 7, 5, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("date", "field", "words"),
    [
        (jpb.DateTrigger(local_time="2027-03-14T02:30:00"), "time_zone", "required"),
        (jpb.DateTrigger(time_zone=NEW_YORK), "local_time", "required"),
        (
            jpb.DateTrigger(local_time="2027-03-14T02:30:00-05:00", time_zone=NEW_YORK),
            "local_time",
            "offset",
        ),
        (jpb.DateTrigger(local_time="14/03/2027", time_zone=NEW_YORK), "local_time", "ISO 8601"),
        (
            jpb.DateTrigger(local_time="2027-03-14T02:30:00", time_zone="Mars/Base"),
            "time_zone",
            "IANA",
        ),
        (
            jpb.DateTrigger(
                local_time="2027-03-14T02:30:00",
                time_zone=NEW_YORK,
                run_time=_stamp(datetime(2027, 3, 14, 6, 30, tzinfo=UTC)),
            ),
            "run_time",
            "give one of them",
        ),
    ],
)
async def test_bad_wall_times_are_refused_naming_the_field(
    server: InProcessServer, date: jpb.DateTrigger, field: str, words: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.CreateJob(_job("bad", jpb.Trigger(date=date)))
    found = violations(caught.value)
    assert words in found[f"job.trigger.date.{field}"], found


async def _chronoctl(*args: str, zone: str) -> str:
    env = {**os.environ, "TZ": zone}
    process = await asyncio.create_subprocess_exec(
        CHRONOCTL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_chronoctl_and_the_client_send_the_wall_time(server: InProcessServer) -> None:
    """The same wall time three ways lands at the gap's end, never an hour early."""
    address = f"--address={server.app.address}"
    create = ["jobs", "create", "--task", "chronoplane.echo", "--at", "2027-03-14T02:30:00"]
    await _chronoctl(address, *create, "--tz", NEW_YORK, "--", "given", zone="UTC")
    await _chronoctl(address, *create, "--", "local", zone=NEW_YORK)
    assert server.app.address is not None
    async with AsyncClient(server.app.address, timeout=10) as client:
        wall = datetime(2027, 3, 14, 2, 30, tzinfo=ZoneInfo(NEW_YORK))
        created = await client.create_job("client", task="chronoplane.echo", trigger=at(wall))
        # Read back as given, with the instant it resolved to.
        assert created.trigger == DateTrigger(
            run_time=GAP_END, local_time=datetime(2027, 3, 14, 2, 30), time_zone=NEW_YORK
        )
        both = cron("0 0 1,15 * 1", "Europe/Berlin", day_match="all")
        strict = await client.create_job("strict", task="chronoplane.echo", trigger=both)
        assert isinstance(strict.trigger, CronTrigger)
        assert strict.trigger.day_match is DayMatch.ALL
        await client.delete_job("strict")
    jobs = (await server.stub.ListJobs(pb.ListJobsRequest())).jobs
    assert {job.id: job.next_run_time.ToDatetime(tzinfo=UTC) for job in jobs} == dict.fromkeys(
        ["client", "given", "local"], GAP_END
    )
    shown = await _chronoctl(address, "jobs", "get", "local", zone="UTC")
    assert f"at 2027-03-14T02:30:00 {NEW_YORK} (" in shown


def test_the_clients_at_sends_wall_times_by_zone_name() -> None:
    new_york = ZoneInfo(NEW_YORK)
    wall = trigger_message(at(datetime(2027, 3, 14, 2, 30, tzinfo=new_york))).date
    assert (wall.local_time, wall.time_zone, wall.HasField("run_time")) == (
        "2027-03-14T02:30:00",
        NEW_YORK,
        False,
    )
    naive = trigger_message(at(datetime(2027, 3, 14, 2, 30), time_zone=NEW_YORK)).date
    assert (naive.local_time, naive.time_zone) == ("2027-03-14T02:30:00", NEW_YORK)
    # fold=1 names the second 01:30 of a fall-back (EST): an instant, sent as one.
    second = trigger_message(at(datetime(2027, 11, 7, 1, 30, fold=1, tzinfo=new_york))).date
    assert second.run_time.ToDatetime(tzinfo=UTC) == datetime(2027, 11, 7, 6, 30, tzinfo=UTC)
    assert not second.local_time
    with pytest.raises(ValueError, match="naive"):
        at(datetime(2027, 3, 14, 2, 30, tzinfo=UTC), time_zone=NEW_YORK)
    with pytest.raises(ValueError, match="time_zone"):
        at(datetime(2027, 3, 14, 2, 30))


def test_chronoctl_finds_the_machines_zone_without_tzlocal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client distribution does without tzlocal: TZ, then /etc/localtime's link."""
    from chronoplane.client.cli.args import local_zone_name

    monkeypatch.setitem(sys.modules, "tzlocal", None)  # import tzlocal raises ImportError
    monkeypatch.setenv("TZ", ":America/New_York")
    assert local_zone_name() == NEW_YORK
    monkeypatch.delenv("TZ")
    link = os.path.realpath("/etc/localtime")
    if "/zoneinfo/" in link:
        assert local_zone_name() == link.split("/zoneinfo/", 1)[1]
