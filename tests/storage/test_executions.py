"""Executions written and read back: the store contract (storage/abc/executions.py:
admission and history), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from storage.helpers import T0, a_job, an_execution, claimed_ids, finish

from chronoplane.server.models import (
    Execution,
    ExecutionQuery,
    ExecutionSource,
    ExecutionState,
    OverlapPolicy,
)
from chronoplane.server.storage.abc import Admission
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore


async def test_one_execution_per_scheduled_fire_and_per_request_id(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)
    first, duplicate = an_execution(), an_execution()
    assert await store.insert_executions([first]) == {first.id}
    assert await store.insert_executions([duplicate]) == set()
    manual = [
        an_execution(source=ExecutionSource.MANUAL, request_id="r1"),
        an_execution(source=ExecutionSource.MANUAL, request_id="r1"),
        an_execution(source=ExecutionSource.MANUAL),
        an_execution(source=ExecutionSource.MANUAL),
    ]
    inserted = await store.insert_executions(manual)
    assert inserted == {manual[0].id, manual[2].id, manual[3].id}
    found = await store.get_execution_by_request_id("j1", "r1")
    assert found is not None and found.id == manual[0].id


async def test_concurrent_inserts_of_the_same_fire_leave_one(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job(), request_id=None)
    results = await asyncio.gather(*(store.insert_executions([an_execution()]) for _ in range(8)))
    assert sum(len(r) for r in results) == 1


async def test_executions_of_a_deleted_job_are_dropped(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job("kept"), request_id=None)
    kept, orphan = an_execution("kept"), an_execution("deleted")
    assert await store.insert_executions([kept, orphan]) == {kept.id}


async def test_list_executions_filters_and_orders_newest_first(store: SqlAlchemyStore) -> None:
    for job_id in ("a", "b"):
        await store.create_job(a_job(job_id), request_id=None)
    rows = []
    for n in range(6):
        rows.append(
            an_execution(
                "a" if n % 2 else "b",
                scheduled_time=T0 + timedelta(minutes=n),
                state=ExecutionState.FAILED if n == 3 else ExecutionState.PENDING,
            )
        )
        await asyncio.sleep(0.002)  # distinct milliseconds in the ids
    await store.insert_executions(rows)
    everything = await store.list_executions(ExecutionQuery(), before=None, limit=100)
    assert [e.id for e in everything.executions] == [r.id for r in reversed(rows)]
    only_a = await store.list_executions(ExecutionQuery(job_id="a"), before=None, limit=2)
    assert [e.id for e in only_a.executions] == [rows[5].id, rows[3].id]
    rest = await store.list_executions(
        ExecutionQuery(job_id="a"), before=only_a.next_before, limit=2
    )
    assert [e.id for e in rest.executions] == [rows[1].id] and rest.next_before is None
    failed = await store.list_executions(
        ExecutionQuery(states=frozenset({ExecutionState.FAILED})), before=None, limit=10
    )
    assert [e.id for e in failed.executions] == [rows[3].id]
    window = await store.list_executions(
        ExecutionQuery(
            scheduled_after=T0 + timedelta(minutes=2), scheduled_before=T0 + timedelta(minutes=4)
        ),
        before=None,
        limit=10,
    )
    assert [e.id for e in window.executions] == [rows[3].id, rows[2].id]


async def test_admission_applies_the_overlap_policy_to_what_the_database_holds(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)

    async def admit(policy: OverlapPolicy, *, force: bool = False) -> Execution:
        execution = an_execution(source=ExecutionSource.MANUAL, scheduled_time=datetime.now(UTC))
        admitted = await store.admit_executions(
            [Admission(execution=execution, policy=policy, force=force)]
        )
        [written] = admitted.inserted
        return written

    first = await admit(OverlapPolicy.SKIP)
    assert first.state is ExecutionState.PENDING
    skipped = await admit(OverlapPolicy.SKIP)
    assert skipped.state is ExecutionState.SKIPPED
    assert skipped.error_message == "max_concurrent (1) executions were running"
    assert await claimed_ids(store) == [first.id]
    buffered = await admit(OverlapPolicy.BUFFER_ONE)
    assert buffered.state is ExecutionState.PENDING
    second_buffer = await admit(OverlapPolicy.BUFFER_ONE)
    assert second_buffer.state is ExecutionState.SKIPPED
    assert "already waiting" in second_buffer.error_message
    forced = await admit(OverlapPolicy.ALLOW, force=True)
    assert forced.state is ExecutionState.PENDING
    assert await claimed_ids(store) == [forced.id], "forced runs need no slot"
    newer = await store.admit_executions(
        [
            Admission(
                execution=an_execution(source=ExecutionSource.MANUAL),
                policy=OverlapPolicy.CANCEL_RUNNING,
            )
        ]
    )
    assert newer.displace == ["j1"]
    assert newer.inserted[0].state is ExecutionState.PENDING
    assert [e.id for e in await store.displace_oldest(newer.displace, now=T0)] == [first.id]
    assert [e.id for e in await store.displace_oldest(newer.displace, now=T0)] == [forced.id], (
        "the next oldest"
    )
    assert await store.cancel_requests([first.id, forced.id, buffered.id]) == {
        first.id: "cancelled for a newer run (overlap policy cancel_running)",
        forced.id: "cancelled for a newer run (overlap policy cancel_running)",
    }
    # Both stop: the newer one gets the slot.
    await store.record_progress([finish(first), finish(forced)])
    assert await claimed_ids(store) == [newer.inserted[0].id]


async def test_time_range_pages_hold_late_and_early_executions_in_id_order(
    store: SqlAlchemyStore,
) -> None:
    """Past the first window (1,000), a range's page walks ids back from the range's end and
    adds the executions created late (backfills, catch-ups): every page, through to the
    last, is what sorting the whole range by id gives, with ids on both sides of the bound."""
    for job_id in ("a", "b"):
        await store.create_job(a_job(job_id), request_id=None)
    start = 1_800_000_000_000  # milliseconds
    made: list[Execution] = []

    def add(n: int, scheduled_ms: int, created_ms: int) -> None:
        state = ExecutionState.FAILED if n % 3 == 0 else ExecutionState.SUCCEEDED
        made.append(
            an_execution(
                "ab"[n % 2],
                id=f"{created_ms:012x}{n:016x}",
                scheduled_time=datetime.fromtimestamp(scheduled_ms / 1000, UTC),
                state=state,
            )
        )

    for n in range(2_400):  # one a second, created 0-5.5 s after (late past 5 s), or before
        add(n, start + n * 1000, start + n * 1000 + (n * 37) % 5_500 - (300 if n % 11 else 0))
    for n in range(2_400, 2_700):  # a backfill of the whole range, an hour later
        add(n, start + (n - 2_400) * 8_000 + 500, start + 3_600_000 + n)
    for offset in range(0, len(made), 500):
        await store.insert_executions(made[offset : offset + 500])

    def second(s: float) -> datetime:
        return datetime.fromtimestamp(start / 1000 + s, UTC)

    queries = [
        ExecutionQuery(scheduled_before=second(1_900.25)),
        ExecutionQuery(scheduled_after=second(100), scheduled_before=second(1_700)),
        ExecutionQuery(job_id="a", scheduled_before=second(2_100)),
        ExecutionQuery(states=frozenset({ExecutionState.FAILED}), scheduled_before=second(2_300)),
    ]
    for query in queries:
        expected = sorted(
            (
                e.id
                for e in made
                if (query.scheduled_after is None or e.scheduled_time >= query.scheduled_after)
                and (query.scheduled_before is None or e.scheduled_time < query.scheduled_before)
                and query.job_id in (None, e.job_id)
                and (not query.states or e.state in query.states)
            ),
            reverse=True,
        )
        listed: list[str] = []
        before = None
        while True:
            page = await store.list_executions(query, before=before, limit=100)
            listed += [e.id for e in page.executions]
            if page.next_before is None:
                break
            before = page.next_before
        assert listed == expected, query
