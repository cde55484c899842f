"""Cron fire times across daylight saving transitions, pinned to the UTC instant.

The rule (engine/wallclock.py): a wall time in a spring-forward gap fires once, at the end of
the gap; an ambiguous wall time in a fall-back overlap fires once, at its first occurrence.
Checked through the engine's arithmetic, the PreviewTrigger RPC, and APScheduler's own timer
loop, and against a brute-force model on random schedules around transitions.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import apscheduler.schedulers.base
import pytest
from apscheduler.triggers.cron import CronTrigger as ApsCronTrigger
from conftest import InProcessServer
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from chronoplane.server.engine.abc import Fire
from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.engine.wallclock import WallClockCronTrigger
from chronoplane.server.models import CronTrigger, Job, MisfirePolicy
from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

NEW_YORK = (
    "America/New_York"  # 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST
)
BERLIN = "Europe/Berlin"  # 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(frozen=True)
class Pinned:
    zone: str
    expression: str
    start: datetime
    end: datetime
    fires: list[datetime]

    @property
    def trigger(self) -> CronTrigger:
        return CronTrigger(expression=self.expression, time_zone=self.zone)

    def __str__(self) -> str:
        return f"{self.zone} {self.expression!r} {self.start:%Y-%m-%d}"


def pinned(zone: str, expression: str, start: str, end: str, fires: list[str]) -> Pinned:
    return Pinned(zone, expression, utc(start), utc(end), [utc(fire) for fire in fires])


PINNED = [
    # Daily 02:30. New York: 02:30 does not exist on 03-08 (fires at 03:00 EDT, 07:00Z), and
    # is not repeated on 11-01 (01:00-02:00 is). Berlin: missing on 03-29 (fires at 03:00
    # CEST, 01:00Z), repeated on 10-25 (fires at 02:30 CEST, 00:30Z, not again at 01:30Z).
    pinned(
        NEW_YORK,
        "30 2 * * *",
        "2026-03-07T00:00",
        "2026-03-09T12:00",
        ["2026-03-07T07:30", "2026-03-08T07:00", "2026-03-09T06:30"],
    ),
    pinned(
        NEW_YORK,
        "30 2 * * *",
        "2026-10-31T00:00",
        "2026-11-02T12:00",
        ["2026-10-31T06:30", "2026-11-01T07:30", "2026-11-02T07:30"],
    ),
    pinned(
        BERLIN,
        "30 2 * * *",
        "2026-03-28T00:00",
        "2026-03-30T12:00",
        ["2026-03-28T01:30", "2026-03-29T01:00", "2026-03-30T00:30"],
    ),
    pinned(
        BERLIN,
        "30 2 * * *",
        "2026-10-24T00:00",
        "2026-10-26T12:00",
        ["2026-10-24T00:30", "2026-10-25T00:30", "2026-10-26T01:30"],
    ),
    # Hourly on the hour. Spring: the missing 02:00 and the real 03:00 are one fire at the
    # transition. Fall: the repeated 01:00 (New York) or 02:00 (Berlin) fires once, first.
    pinned(
        NEW_YORK,
        "0 * * * *",
        "2026-03-08T04:15",
        "2026-03-08T09:00",
        [
            "2026-03-08T05:00",
            "2026-03-08T06:00",
            "2026-03-08T07:00",
            "2026-03-08T08:00",
            "2026-03-08T09:00",
        ],
    ),
    pinned(
        NEW_YORK,
        "0 * * * *",
        "2026-11-01T04:15",
        "2026-11-01T09:00",
        ["2026-11-01T05:00", "2026-11-01T07:00", "2026-11-01T08:00", "2026-11-01T09:00"],
    ),
    pinned(
        BERLIN,
        "0 * * * *",
        "2026-03-28T23:15",
        "2026-03-29T03:00",
        ["2026-03-29T00:00", "2026-03-29T01:00", "2026-03-29T02:00", "2026-03-29T03:00"],
    ),
    pinned(
        BERLIN,
        "0 * * * *",
        "2026-10-24T23:15",
        "2026-10-25T03:00",
        ["2026-10-25T00:00", "2026-10-25T02:00", "2026-10-25T03:00"],
    ),
    # Hourly at :30. Spring: the missing :30 fires at the transition, then the next :30 half an
    # hour later. Fall: the repeated :30 fires once, first.
    pinned(
        NEW_YORK,
        "30 * * * *",
        "2026-03-08T04:15",
        "2026-03-08T09:00",
        [
            "2026-03-08T04:30",
            "2026-03-08T05:30",
            "2026-03-08T06:30",
            "2026-03-08T07:00",
            "2026-03-08T07:30",
            "2026-03-08T08:30",
        ],
    ),
    pinned(
        NEW_YORK,
        "30 * * * *",
        "2026-11-01T04:15",
        "2026-11-01T09:00",
        ["2026-11-01T04:30", "2026-11-01T05:30", "2026-11-01T07:30", "2026-11-01T08:30"],
    ),
    pinned(
        BERLIN,
        "30 * * * *",
        "2026-03-28T23:15",
        "2026-03-29T03:00",
        [
            "2026-03-28T23:30",
            "2026-03-29T00:30",
            "2026-03-29T01:00",
            "2026-03-29T01:30",
            "2026-03-29T02:30",
        ],
    ),
    pinned(
        BERLIN,
        "30 * * * *",
        "2026-10-24T23:15",
        "2026-10-25T03:00",
        ["2026-10-24T23:30", "2026-10-25T00:30", "2026-10-25T02:30"],
    ),
]


def walls(pin: Pinned, fires: list[datetime]) -> list[datetime]:
    zone = ZoneInfo(pin.zone)
    return [fire.astimezone(zone).replace(tzinfo=None) for fire in fires]


# -- the engine's arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize("pin", PINNED, ids=str)
def test_preview_and_fires_between_pin_the_instants(pin: Pinned) -> None:
    engine = ApschedulerEngine()
    assert engine.preview(pin.trigger, start=pin.start, count=len(pin.fires)) == pin.fires
    between = engine.fires_between(pin.trigger, start=pin.start, end=pin.end, limit=100)
    assert between == pin.fires
    assert (
        engine.fires_between(pin.trigger, start=pin.start, end=pin.end, limit=2) == (pin.fires[:2])
    )
    # Both ends are inclusive.
    assert (
        engine.fires_between(pin.trigger, start=pin.fires[1], end=pin.fires[-1], limit=100)
        == (pin.fires[1:])
    )


def test_apscheduler_cron_trigger_still_gets_dst_wrong() -> None:
    """Why engine/wallclock.py exists; when an APScheduler upgrade fixes this, reconsider."""
    new_york = ApsCronTrigger(hour=2, minute=30, timezone=ZoneInfo(NEW_YORK))
    missing = new_york.get_next_fire_time(None, utc("2026-03-08T00:00"))
    assert missing.astimezone(UTC) == utc("2026-03-08T07:30")  # 03:30 EDT, not 03:00
    berlin = ApsCronTrigger(hour=2, minute=30, timezone=ZoneInfo(BERLIN))
    first = berlin.get_next_fire_time(None, utc("2026-10-25T00:00"))
    assert first.astimezone(UTC) == utc("2026-10-25T00:30")
    again = berlin.get_next_fire_time(first, first)
    assert again.astimezone(UTC) == utc("2026-10-25T01:30")  # 02:30 CET: a second fire


def test_fires_between_asks_the_trigger_at_most_limit_plus_one_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    original = WallClockCronTrigger.get_next_fire_time

    def counted(self: WallClockCronTrigger, previous: datetime | None, now: datetime) -> object:
        nonlocal calls
        calls += 1
        return original(self, previous, now)

    monkeypatch.setattr(WallClockCronTrigger, "get_next_fire_time", counted)
    engine = ApschedulerEngine()
    every_second = CronTrigger(expression="* * * * * *")
    start = utc("2026-01-01T00:00")
    fires = engine.fires_between(every_second, start=start, end=utc("2027-01-01T00:00"), limit=5)
    assert fires == [start + timedelta(seconds=s) for s in range(5)]
    assert calls <= 6
    assert engine.fires_between(every_second, start=start, end=start, limit=0) == []


# -- bounds ---------------------------------------------------------------------------------------


def test_start_and_end_bound_the_fires_inclusively() -> None:
    trigger = CronTrigger(
        expression="0 * * * *",
        time_zone=BERLIN,
        start_time=utc("2026-10-25T00:30"),
        end_time=utc("2026-10-25T03:00"),
    )
    engine = ApschedulerEngine()
    engine.check(trigger, now=utc("2026-10-01T00:00"))
    # 01:00Z is 02:00 CET, the repeated hour: not fired again.
    expected = [utc("2026-10-25T02:00"), utc("2026-10-25T03:00")]
    assert engine.preview(trigger, start=utc("2026-10-24T00:00"), count=10) == expected
    assert engine.fires_between(
        trigger, start=utc("2026-10-01T00:00"), end=utc("2026-12-01T00:00"), limit=10
    ) == (expected)
    assert engine.next_fire_time(trigger, after=utc("2026-10-25T03:00")) == expected[-1]


def test_a_start_at_the_end_of_a_gap_includes_the_gap_fire() -> None:
    engine = ApschedulerEngine()
    at_transition = CronTrigger(
        expression="30 * * * *", time_zone=NEW_YORK, start_time=utc("2026-03-08T07:00")
    )
    # 02:30 EST does not exist; it fires at the transition, which is the start.
    assert engine.next_fire_time(at_transition, after=utc("2026-03-01T00:00")) == utc(
        "2026-03-08T07:00"
    )
    just_after = CronTrigger(
        expression="30 * * * *", time_zone=NEW_YORK, start_time=utc("2026-03-08T07:00:01")
    )
    assert engine.next_fire_time(just_after, after=utc("2026-03-01T00:00")) == utc(
        "2026-03-08T07:30"
    )


def test_from_inside_the_repeated_hour_the_next_fire_is_after_it() -> None:
    engine = ApschedulerEngine()
    quarterly = CronTrigger(expression="*/15 * * * *", time_zone=NEW_YORK)
    # 06:20Z is 01:20 EST, the second 01:20; 01:30-01:45 fired during the first pass.
    assert engine.next_fire_time(quarterly, after=utc("2026-11-01T06:20")) == utc(
        "2026-11-01T07:00"
    )


def test_a_trigger_without_future_fires_has_no_next_fire_time() -> None:
    engine = ApschedulerEngine()
    ended = CronTrigger(expression="0 * * * *", end_time=utc("2026-11-01T06:00"))
    assert engine.next_fire_time(ended, after=utc("2026-11-01T06:00")) == utc("2026-11-01T06:00")
    assert engine.next_fire_time(ended, after=utc("2026-11-01T06:00:01")) is None
    assert engine.preview(ended, start=utc("2026-11-01T06:00:01"), count=5) == []


def test_trigger_keeps_apschedulers_contract() -> None:
    """With a previous fire, the next is strictly after it whatever ``now`` says (APScheduler
    passes the wake-up time); without one, at or after ``now``; always aware UTC."""
    zone = ZoneInfo(BERLIN)
    trigger = WallClockCronTrigger("0 * * * *", zone)
    later = utc("2030-01-01T00:00")
    assert trigger.get_next_fire_time(utc("2026-10-25T00:00"), later) == utc("2026-10-25T02:00")
    fire = trigger.get_next_fire_time(None, datetime(2026, 10, 25, 2, 0, tzinfo=zone, fold=1))
    assert fire == utc("2026-10-25T02:00")
    assert fire is not None and fire.tzinfo is UTC
    assert "Europe/Berlin" in str(trigger) and "Europe/Berlin" in repr(trigger)


# -- the PreviewTrigger RPC -----------------------------------------------------------------------


async def test_preview_rpc_pins_the_instants(server: InProcessServer) -> None:
    for pin in PINNED:
        start = timestamp_pb2.Timestamp()
        start.FromDatetime(pin.start)
        request = pb.PreviewTriggerRequest(
            trigger=jpb.Trigger(
                cron=jpb.CronTrigger(expression=pin.expression, time_zone=pin.zone)
            ),
            start_time=start,
            count=len(pin.fires),
        )
        response = await server.stub.PreviewTrigger(request)
        assert [t.ToDatetime(tzinfo=UTC) for t in response.fire_times] == pin.fires, pin


# -- APScheduler's timer loop ---------------------------------------------------------------------


class FrozenClock:
    """Stands in for ``datetime`` in APScheduler's scheduler module, whose only use of it is
    ``datetime.now(tz)``: the scheduler then wakes at the time the test says."""

    def __init__(self) -> None:
        self.current = datetime(2000, 1, 1, tzinfo=UTC)

    def now(self, tz: tzinfo | None = None) -> datetime:
        return self.current.astimezone(tz)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FrozenClock:
    frozen = FrozenClock()
    monkeypatch.setattr(apscheduler.schedulers.base, "datetime", frozen)
    return frozen


async def _delivered(pin: Pinned, clock: FrozenClock, *, on_time: bool) -> list[Fire]:
    """What a started engine hands to the runner between the pin's start and end, waking at
    each next run time (``on_time``) or once at the end, as after downtime."""
    engine = ApschedulerEngine()
    delivered: list[Fire] = []
    clock.current = pin.start
    await engine.start(delivered.extend)
    try:
        job = Job(
            id="dst",
            task="chronoplane.echo",
            trigger=pin.trigger,
            misfire_policy=MisfirePolicy.RUN_ALL,  # after downtime, every fire is handed over
            next_run_time=engine.next_fire_time(pin.trigger, after=pin.start),
        )
        engine.schedule(job, reschedule=True)
        for _ in range(len(pin.fires) + 2 if on_time else 1):
            aps_job = engine._scheduler.get_job("dst")
            clock.current = aps_job.next_run_time if on_time else pin.end
            if clock.current > pin.end:
                break
            engine._scheduler.wakeup()
            await asyncio.sleep(0)
    finally:
        await engine.shutdown()
        await asyncio.sleep(0)
    return delivered


@pytest.mark.parametrize("on_time", [True, False], ids=["on-time", "after-downtime"])
@pytest.mark.parametrize("pin", PINNED, ids=str)
async def test_apscheduler_delivers_each_wall_time_once(
    pin: Pinned, on_time: bool, clock: FrozenClock
) -> None:
    delivered = await _delivered(pin, clock, on_time=on_time)
    scheduled = [fire.scheduled_time for fire in delivered]
    assert scheduled == pin.fires
    assert len(set(walls(pin, scheduled))) == len(scheduled)
    following = [fire.next_run_time for fire in delivered]
    if on_time:
        assert following[:-1] == scheduled[1:]
    assert following[-1] is not None and following[-1] > pin.end


def test_apschedulers_run_times_chain_the_trigger() -> None:
    """``Job._get_run_times(now)`` is how APScheduler lists what is due; it chains
    ``get_next_fire_time(previous, now)``."""
    for pin in PINNED:
        engine = ApschedulerEngine()
        job = Job(
            id="dst",
            task="chronoplane.echo",
            trigger=pin.trigger,
            next_run_time=engine.next_fire_time(pin.trigger, after=pin.start),
        )
        engine.schedule(job, reschedule=True)
        assert engine._scheduler.get_job("dst")._get_run_times(pin.end) == pin.fires, pin


# -- against a brute-force model ------------------------------------------------------------------

MODEL_ZONES = [
    NEW_YORK,
    BERLIN,
    "Australia/Lord_Howe",  # 30-minute shifts
    "Pacific/Chatham",  # +12:45/+13:45
    "America/Havana",  # transitions at midnight
    "Europe/Dublin",  # negative DST in tzdata
    "America/Santiago",
]


def _transitions(zone: ZoneInfo, year: int) -> list[datetime]:
    """The instants (to the minute) where the zone's UTC offset changes in ``year``."""
    found = []
    hour = datetime(year, 1, 1, tzinfo=UTC)
    while hour.year == year:
        following = hour + timedelta(hours=1)
        if hour.astimezone(zone).utcoffset() != following.astimezone(zone).utcoffset():
            minute = hour
            while minute.astimezone(zone).utcoffset() == hour.astimezone(zone).utcoffset():
                minute += timedelta(minutes=1)
            found.append(minute)
        hour = following
    return found


TRANSITIONS = [
    (name, moment) for name in MODEL_ZONES for moment in _transitions(ZoneInfo(name), 2026)
]


def model_fires(
    zone: ZoneInfo, minutes: set[int], hours: set[int], start: datetime, end: datetime
) -> list[datetime]:
    """The rule as a definition: a matched wall time fires at the first instant whose wall
    time has reached it. Walks every minute; all these offsets are whole minutes."""
    step = timedelta(minutes=1)

    def wall(instant: datetime) -> datetime:
        return instant.astimezone(zone).replace(tzinfo=None)

    reached = max(wall(start - step * n) for n in range(1, 60 * 27))
    fires = []
    instant = start
    while instant <= end:
        now_wall = wall(instant)
        candidate = reached + step
        while candidate <= now_wall:
            if candidate.minute in minutes and candidate.hour in hours:
                fires.append(instant)
                break
            candidate += step
        reached = max(reached, now_wall)
        instant += step
    return fires


def _field(values: set[int] | None) -> str:
    return "*" if values is None else ",".join(map(str, sorted(values)))


@settings(max_examples=60, deadline=None, database=None)
@given(
    transition=st.sampled_from(TRANSITIONS),
    minutes=st.none() | st.sets(st.integers(0, 59), min_size=1, max_size=4),
    hours=st.none() | st.sets(st.integers(0, 23), min_size=1, max_size=4),
    offset=st.integers(-26 * 60, 2 * 60),
)
def test_matches_the_model_around_random_transitions(
    transition: tuple[str, datetime],
    minutes: set[int] | None,
    hours: set[int] | None,
    offset: int,
) -> None:
    name, moment = transition
    zone = ZoneInfo(name)
    start = moment + timedelta(minutes=offset)
    end = start + timedelta(hours=28)
    trigger = CronTrigger(expression=f"{_field(minutes)} {_field(hours)} * * *", time_zone=name)
    fires = ApschedulerEngine().fires_between(trigger, start=start, end=end, limit=10_000)
    expected = model_fires(zone, minutes or set(range(60)), hours or set(range(24)), start, end)
    assert fires == expected
    assert all(a < b for a, b in itertools.pairwise(fires))
