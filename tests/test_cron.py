"""Crontab translation: where APScheduler 3's from_crontab differs from crontab, we follow
crontab, and APScheduler only ever sees the canonical form we write."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.errors import InvalidArgument
from chronoplane.server.models import CronTrigger, DayMatch

MONDAY = datetime(2026, 6, 1, tzinfo=UTC)


def _preview(expression: str, count: int, day_match: DayMatch = DayMatch.ANY) -> list[datetime]:
    trigger = CronTrigger(expression=expression, day_match=day_match)
    return ApschedulerEngine().preview(trigger, start=MONDAY, count=count)


def _days(fires: list[datetime]) -> list[str]:
    return [f"{fire:%a %Y-%m-%d}" for fire in fires]


@pytest.mark.parametrize(
    ("field", "weekdays"),
    [
        ("0", {6}),
        ("7", {6}),
        ("1-5", {0, 1, 2, 3, 4}),
        ("mon-fri", {0, 1, 2, 3, 4}),
        ("MON-Fri", {0, 1, 2, 3, 4}),
        ("*/2", {6, 1, 3, 5}),
        ("5,0", {6, 4}),
        ("sat,sun", {5, 6}),
        ("*", set(range(7))),
        ("?", set(range(7))),
    ],
)
def test_day_of_week_counts_zero_as_sunday(field: str, weekdays: set[int]) -> None:
    """Python's weekday(): Monday is 0, Sunday 6."""
    assert {fire.weekday() for fire in _preview(f"0 9 * * {field}", 14)} == weekdays


def test_six_fields_put_seconds_first() -> None:
    fires = _preview("30 */20 * * * *", 3)
    assert [f"{fire:%H:%M:%S}" for fire in fires] == ["00:00:30", "00:20:30", "00:40:30"]


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
    ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 30,31 feb *", "0 0 31 2 */2"],
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
        "* * * * mon-",
    ],
)
def test_malformed_expressions_are_rejected(expression: str) -> None:
    with pytest.raises(InvalidArgument):
        ApschedulerEngine().check(CronTrigger(expression=expression), now=MONDAY)


# -- issue 19: the day rule ------------------------------------------------------------------


def test_either_day_field_may_match_as_in_crontab() -> None:
    """``0 0 1,15 * 1`` fires on the 1st, the 15th and every Monday (cronie, Kubernetes)."""
    assert _days(_preview("0 0 1,15 * 1", 6)) == [
        "Mon 2026-06-01",
        "Mon 2026-06-08",
        "Mon 2026-06-15",
        "Mon 2026-06-22",
        "Mon 2026-06-29",
        "Wed 2026-07-01",
    ]


def test_day_match_all_keeps_both_fields_matching() -> None:
    """The rule before migration 0014: 4 fires in 9 months."""
    end = datetime(2027, 2, 28, tzinfo=UTC)
    trigger = CronTrigger(expression="0 0 1,15 * 1", day_match=DayMatch.ALL)
    fires = ApschedulerEngine().fires_between(trigger, start=MONDAY, end=end, limit=10)
    assert _days(fires) == ["Mon 2026-06-01", "Mon 2026-06-15", "Mon 2027-02-01", "Mon 2027-02-15"]


def test_a_leap_day_monday() -> None:
    assert _days(_preview("0 0 29 2 1", 3, DayMatch.ALL)) == [
        "Mon 2044-02-29",
        "Mon 2072-02-29",
        "Mon 2112-02-29",
    ]
    # Any Monday of February, and the 29th whatever its weekday.
    assert _days(_preview("0 0 29 2 1", 9))[-2:] == ["Mon 2028-02-28", "Tue 2028-02-29"]


def test_february_31st_or_a_monday_fires_on_mondays() -> None:
    assert _days(_preview("0 0 31 2 1", 2)) == ["Mon 2027-02-01", "Mon 2027-02-08"]
    with pytest.raises(InvalidArgument, match="never fires"):
        ApschedulerEngine().check(
            CronTrigger(expression="0 0 31 2 1", day_match=DayMatch.ALL), now=MONDAY
        )


def test_a_day_field_starting_with_a_star_is_not_restricted() -> None:
    """cronie's test (the field's first character): ``*/2`` with Monday means odd days that
    are Mondays. Kubernetes would fire on odd days and on Mondays (README, the differences)."""
    assert _days(_preview("0 0 */2 * 1", 3)) == [
        "Mon 2026-06-01",
        "Mon 2026-06-15",
        "Mon 2026-06-29",
    ]


# -- macros ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("macro", "fields"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
    ],
)
def test_macros_fire_as_their_fields(macro: str, fields: str) -> None:
    assert _preview(macro, 5) == _preview(fields, 5)


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("@reboot", ["@reboot is not supported", "trigger the job", "date trigger"]),
        ("@every 5m", ["interval trigger"]),
        ("@fortnightly", ["'@fortnightly' is not a macro", "@hourly ('0 * * * *')"]),
    ],
)
def test_other_macros_are_refused_saying_what_to_use(expression: str, words: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ApschedulerEngine().check(CronTrigger(expression=expression), now=MONDAY)
    description = caught.value.violations[0].description
    assert all(word in description for word in words), description


# -- extensions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "days"),
    [
        ("0 0 L * *", ["Tue 2026-06-30", "Fri 2026-07-31", "Mon 2026-08-31"]),
        ("0 0 l 2 *", ["Sun 2027-02-28", "Tue 2028-02-29"]),
        ("0 0 LW 10-12 *", ["Fri 2026-10-30", "Mon 2026-11-30", "Thu 2026-12-31"]),
        # The 15th of Aug 2026 is a Saturday, of Nov a Sunday.
        ("0 0 15W 8,11 *", ["Fri 2026-08-14", "Mon 2026-11-16"]),
        # Never across the month's ends: Aug 1st 2026 is a Saturday, Jan 31st 2027 a Sunday.
        ("0 0 1W 8 *", ["Mon 2026-08-03"]),
        ("0 0 31W 1 *", ["Fri 2027-01-29", "Mon 2028-01-31"]),
        ("0 0 * * 5L", ["Fri 2026-06-26", "Fri 2026-07-31"]),
        ("0 0 * * FRIL", ["Fri 2026-06-26", "Fri 2026-07-31"]),
        ("0 0 * * 1#2", ["Mon 2026-06-08", "Mon 2026-07-13"]),
        ("0 0 * * Mon#5", ["Mon 2026-06-29", "Mon 2026-08-31"]),
        ("0 0 ? * 0#1", ["Sun 2026-06-07", "Sun 2026-07-05"]),
        ("0 0 L * 1#1", ["Mon 2026-06-01", "Tue 2026-06-30", "Mon 2026-07-06"]),
    ],
)
def test_quartz_extensions(expression: str, days: list[str]) -> None:
    assert _days(_preview(expression, len(days))) == days


def test_dst_rules_hold_for_extensions() -> None:
    """The last Sunday of March at 02:30 in Berlin is in the gap: it fires at its end (03:00
    CEST); the last Sunday of October's 02:30 happens twice: it fires at the first."""
    engine = ApschedulerEngine()
    spring = CronTrigger(expression="30 2 * 3 0L", time_zone="Europe/Berlin")
    autumn = CronTrigger(expression="30 2 * 10 SUNL", time_zone="Europe/Berlin")
    assert engine.preview(spring, start=MONDAY, count=1) == [datetime(2027, 3, 28, 1, tzinfo=UTC)]
    assert engine.preview(autumn, start=MONDAY, count=1) == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    ]


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("0 0 L-3 * *", "day of month: 'L-3': 'L-n' (n days before the last) is not supported"),
        ("0 0 1-5W * *", "day of month: '1-5W': 'W' (nearest weekday) takes a single day"),
        ("0 0 * * 1W", "day of week: '1W': 'W' (nearest weekday) is only supported in day of"),
        ("0 0 1#2 * *", "day of month: '1#2': '#' (the nth weekday of the month) is only"),
        ("0 0 * * FRI#6", "day of week: 'FRI#6': 6 is outside 1-5"),
        ("0 0 * * L", "day of week: 'L': 'L' alone (Quartz's Saturday) is not supported"),
        ("5L * * * *", "minute: '5L': 'L' (last) is only supported in day of month"),
        ("0 0 * ? *", "month: '?' (no specific value) is only allowed in the day fields"),
        ("0 0 ?,1 * *", "day of month: '?' (no specific value) must be the whole field"),
        ("0 0 * * 1-5#2", "day of week: '1-5#2': '#' takes one weekday and a count from 1 to 5"),
        ("H 0 * * *", "minute: 'H': 'H' (Jenkins' hashed value) is not supported"),
        ("0 0 * * Fooday", "day of week: 'Fooday' is not a number or a name"),
        ("0 0 1 1 * 2027", "'2027' looks like a year field: a year field is not supported"),
        ("0 0 12 1 1 ? 2027", "'2027' looks like a year field: a year field is not supported"),
    ],
)
def test_unsupported_features_are_named_and_quoted_as_written(expression: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ApschedulerEngine().check(CronTrigger(expression=expression), now=MONDAY)
    assert words in caught.value.violations[0].description
