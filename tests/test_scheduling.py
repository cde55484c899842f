"""The misfire, jitter and overlap rules as pure functions (the API and process tests show
them live)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from chronoplane.server.models import (
    CronTrigger,
    Job,
    MisfirePolicy,
    MissedFires,
    OverlapPolicy,
    RetryPolicy,
)
from chronoplane.server.scheduling import admit, jitter_delay, plan_fires

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
# One fire a minute over the last ten minutes, and one 10 s ago (on time).
LATE = [NOW - timedelta(minutes=m) for m in range(10, 0, -1)]
ON_TIME = NOW - timedelta(seconds=10)


def job(policy: MisfirePolicy, **fields: object) -> Job:
    return Job(
        id="j",
        task="t",
        trigger=CronTrigger(expression="* * * * *"),
        misfire_grace=timedelta(seconds=30),
        misfire_policy=policy,
        **fields,  # type: ignore[arg-type]
    )


def test_skip_runs_only_fires_on_time_and_counts_the_rest_in_one_record() -> None:
    plan = plan_fires(job(MisfirePolicy.SKIP), [*LATE, ON_TIME], now=NOW)
    assert plan.run == [ON_TIME]
    assert plan.missed == MissedFires(count=10, first_time=LATE[0], last_time=LATE[-1])


def test_run_once_runs_the_latest_missed_fire_unless_one_is_on_time() -> None:
    plan = plan_fires(job(MisfirePolicy.RUN_ONCE), LATE, now=NOW)
    assert plan.run == [LATE[-1]]
    assert plan.missed == MissedFires(count=9, first_time=LATE[0], last_time=LATE[-2])
    plan = plan_fires(job(MisfirePolicy.RUN_ONCE), [*LATE, ON_TIME], now=NOW)
    assert plan.run == [ON_TIME]
    assert plan.missed is not None and plan.missed.count == 10


def test_run_all_runs_the_latest_up_to_the_limit_oldest_first() -> None:
    plan = plan_fires(job(MisfirePolicy.RUN_ALL, catchup_limit=3), [*LATE, ON_TIME], now=NOW)
    assert plan.run == [*LATE[-3:], ON_TIME]
    assert plan.missed == MissedFires(count=7, first_time=LATE[0], last_time=LATE[6])
    plan = plan_fires(job(MisfirePolicy.RUN_ALL, catchup_limit=100), LATE, now=NOW)
    assert plan.run == LATE and plan.missed is None


def test_the_catch_up_window_limits_what_runs_but_not_what_is_counted() -> None:
    window = timedelta(minutes=3, seconds=30)
    plan = plan_fires(
        job(MisfirePolicy.RUN_ALL, catchup_limit=100, catchup_window=window), LATE, now=NOW
    )
    assert plan.run == LATE[-3:]
    assert plan.missed == MissedFires(count=7, first_time=LATE[0], last_time=LATE[6])
    plan = plan_fires(
        job(MisfirePolicy.RUN_ONCE, catchup_window=timedelta(seconds=45)), LATE, now=NOW
    )
    assert plan.run == [] and plan.missed is not None and plan.missed.count == 10


def test_a_backlog_too_long_to_walk_is_counted_as_a_lower_bound() -> None:
    first = NOW - timedelta(days=400)
    plan = plan_fires(
        job(MisfirePolicy.SKIP), LATE, now=NOW, uncounted=10_000, first_uncounted=first
    )
    assert plan.run == []
    assert plan.missed == MissedFires(
        count=10_010, count_is_lower_bound=True, first_time=first, last_time=LATE[-1]
    )


def test_nothing_missed_means_no_record() -> None:
    assert plan_fires(job(MisfirePolicy.SKIP), [ON_TIME], now=NOW).missed is None
    assert plan_fires(job(MisfirePolicy.SKIP), [], now=NOW).run == []


def test_jitter_is_deterministic_bounded_and_spread() -> None:
    jitter = timedelta(seconds=30)
    delays = [jitter_delay("job", NOW + timedelta(minutes=m), jitter) for m in range(200)]
    assert delays == [jitter_delay("job", NOW + timedelta(minutes=m), jitter) for m in range(200)]
    assert all(timedelta(0) <= d < jitter for d in delays)
    assert max(delays) - min(delays) > timedelta(seconds=25), "spread over the range"
    assert jitter_delay("other", NOW, jitter) != jitter_delay("job", NOW, jitter)
    assert jitter_delay("job", NOW, timedelta(0)) == timedelta(0)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 1.0), (2, 3.0), (3, 9.0), (4, 20.0), (10, 20.0)],
)
def test_backoff_grows_by_the_multiplier_up_to_the_maximum(attempt: int, expected: float) -> None:
    policy = RetryPolicy(
        max_attempts=20,
        initial_backoff=timedelta(seconds=1),
        multiplier=3.0,
        max_backoff=timedelta(seconds=20),
    )
    assert policy.backoff(attempt) == timedelta(seconds=expected)


def test_retry_on_matches_simple_and_qualified_names_of_the_class_and_its_bases() -> None:
    names = ("builtins.ConnectionRefusedError", "builtins.ConnectionError", "builtins.OSError")
    assert RetryPolicy(max_attempts=3).retries(1, names)
    assert RetryPolicy(max_attempts=3, retry_on=("OSError",)).retries(2, names)
    assert RetryPolicy(max_attempts=3, retry_on=("builtins.ConnectionError",)).retries(1, names)
    assert not RetryPolicy(max_attempts=3, retry_on=("ValueError",)).retries(1, names)
    assert not RetryPolicy(max_attempts=3).retries(3, names), "attempts stop at the maximum"


@pytest.mark.parametrize(
    ("policy", "running", "waiting", "waits", "cancels"),
    [
        # A free slot: every policy queues it.
        *((p, 1, 0, True, False) for p in OverlapPolicy),
        # max_concurrent 2 reached by a running and a waiting execution.
        (OverlapPolicy.SKIP, 1, 1, False, False),
        (OverlapPolicy.ALLOW, 2, 0, False, False),
        (OverlapPolicy.BUFFER_ONE, 2, 0, True, False),
        (OverlapPolicy.BUFFER_ONE, 2, 1, False, False),
        (OverlapPolicy.BUFFER_ALL, 2, 40, True, False),
        (OverlapPolicy.CANCEL_RUNNING, 2, 0, True, True),
        # Nothing running to cancel: the newer one just waits its turn.
        (OverlapPolicy.CANCEL_RUNNING, 0, 2, True, False),
    ],
)
def test_admission_by_overlap_policy(
    policy: OverlapPolicy, running: int, waiting: int, waits: bool, cancels: bool
) -> None:
    decision = admit(policy, 2, running=running, waiting=waiting)
    assert (decision.waits, decision.cancel_oldest) == (waits, cancels)
    assert bool(decision.reason) == (not waits)


def test_no_limit_admits_everything() -> None:
    for policy in OverlapPolicy:
        assert admit(policy, 0, running=1000, waiting=1000).waits
