"""Crontab translation: where APScheduler 3's from_crontab differs from crontab, we follow
crontab, and APScheduler only ever sees the canonical form we write."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.engine.cron import parse_crontab
from chronoplane.server.errors import InvalidArgument
from chronoplane.server.models import CronTrigger

MONDAY = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("field", "names"),
    [
        ("0", "sun"),
        ("7", "sun"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("mon-fri", "mon,tue,wed,thu,fri"),
        ("*/2", "sun,tue,thu,sat"),
        ("5,0", "sun,fri"),
        ("sat,sun", "sun,sat"),
        ("*", "*"),
    ],
)
def test_day_of_week_counts_zero_as_sunday(field: str, names: str) -> None:
    assert parse_crontab(f"0 9 * * {field}").day_of_week == names


def test_six_fields_put_seconds_first() -> None:
    fields = parse_crontab("30 */5 * * * *")
    # Steps are expanded here, so that APScheduler's own grammar never decides anything.
    assert (fields.second, fields.minute, fields.hour) == (
        "30",
        ",".join(map(str, range(0, 60, 5))),
        "*",
    )


@pytest.mark.parametrize(
    ("expression", "day", "month"),
    [
        ("0 0 1-3,last * *", "1,2,3,last", "*"),
        ("0 0 */10 jan-mar/2 *", "1,11,21,31", "1,3"),
        ("0 0 1-31 1-12 *", "*", "*"),
        ("0 0 31 2,3 *", "31", "2,3"),
    ],
)
def test_days_and_months_are_canonical(expression: str, day: str, month: str) -> None:
    fields = parse_crontab(expression)
    assert (fields.day, fields.month) == (day, month)


def test_last_day_of_february() -> None:
    engine = ApschedulerEngine()
    fires = engine.preview(CronTrigger(expression="0 0 last 2 *"), start=MONDAY, count=2)
    assert fires == [datetime(2027, 2, 28, tzinfo=UTC), datetime(2028, 2, 29, tzinfo=UTC)]


def test_weekday_one_fires_on_mondays() -> None:
    engine = ApschedulerEngine()
    fires = engine.preview(CronTrigger(expression="0 9 * * 1"), start=MONDAY, count=2)
    assert [f.weekday() for f in fires] == [0, 0]


@pytest.mark.parametrize(
    "expression",
    ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 30,31 feb *", "0 0 31 2 1-5"],
)
def test_impossible_dates_are_rejected_as_never_firing(expression: str) -> None:
    engine = ApschedulerEngine()
    with pytest.raises(InvalidArgument) as caught:
        engine.check(CronTrigger(expression=expression), now=MONDAY)
    assert caught.value.violations[0].field == "cron.expression"
    assert "never fires" in caught.value.violations[0].description


def test_leap_day_is_possible() -> None:
    engine = ApschedulerEngine()
    engine.check(CronTrigger(expression="0 0 29 2 *"), now=MONDAY)
    [fire] = engine.preview(CronTrigger(expression="0 0 29 2 *"), start=MONDAY, count=1)
    assert fire == datetime(2028, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize(
    "expression",
    [
        "",
        "* * * *",
        "* * * * * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "*/0 * * * *",
        "5-1 * * * *",
        "x" * 300,
        "@reboot",
        "* * * * mon-",
    ],
)
def test_malformed_expressions_are_rejected(expression: str) -> None:
    with pytest.raises(InvalidArgument):
        ApschedulerEngine().check(CronTrigger(expression=expression), now=MONDAY)
