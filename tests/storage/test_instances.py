"""Instances, fences and what the dead leave (storage/abc/instances.py), on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from storage.helpers import T0, TASK, a_job, an_execution, an_instance, beat, claimed_ids, finish

from chronoplane.server.models import (
    ExecutionState,
)
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore


async def test_executions_of_a_silent_instance_are_abandoned_and_their_slots_freed(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(max_concurrent=2), request_id=None)
    rows = [an_execution(scheduled_time=T0 + timedelta(seconds=n)) for n in range(3)]
    await store.insert_executions(rows)
    assert len(await claimed_ids(store, "inst-dead", limit=2)) == 2
    await store.record_progress([finish(rows[1], keeps_slot=True)])
    assert await store.execution_owners() == {"inst-dead"}
    abandoned = await store.abandon_instances(
        {"inst-dead": None}, message="abandoned", now=datetime.now(UTC)
    )
    assert [e.id for e in abandoned] == [rows[0].id]
    assert abandoned[0].state is ExecutionState.ABANDONED
    assert abandoned[0].error_message == "abandoned: instance inst-dead"
    assert await claimed_ids(store, "inst-b") == [rows[2].id]
    # Judged dead, it claims nothing more until it registers again.
    more = an_execution(scheduled_time=T0 + timedelta(seconds=9))
    await store.insert_executions([more])
    claim = await store.claim_executions(instance_id="inst-dead", limit=5, tasks=[TASK])
    assert claim.fenced and not claim.executions


async def test_an_instance_is_fenced_only_while_as_silent_as_observed(
    store: SqlAlchemyStore,
) -> None:
    """The judge fences an instance whose heartbeat is still the one it watched; one that
    heartbeat meanwhile is left alone. A fenced instance's heartbeat says so (0), and it may
    claim again once it has registered again."""
    await store.create_job(a_job(max_concurrent=0), request_id=None)
    await store.register_instance(an_instance("inst-x"))
    seen = (await store.instance_heartbeats())["inst-x"]
    await store.insert_executions([an_execution()])
    assert len(await claimed_ids(store, "inst-x")) == 1
    # It heartbeats after the judge looked: the stale observation fences nothing.
    await asyncio.sleep(0.01)
    assert await beat(store, "inst-x") == 1
    now = datetime.now(UTC)
    assert await store.abandon_instances({"inst-x": seen}, message="gone", now=now) == []
    # Silent since the judge's last look: fenced, its run abandoned.
    seen = (await store.instance_heartbeats())["inst-x"]
    abandoned = await store.abandon_instances({"inst-x": seen}, message="gone", now=now)
    assert [e.state for e in abandoned] == [ExecutionState.ABANDONED]
    assert "inst-x" not in await store.instance_heartbeats()
    assert await beat(store, "inst-x") == 0
    await store.insert_executions([an_execution(scheduled_time=T0 + timedelta(seconds=1))])
    assert await claimed_ids(store, "inst-x") == []
    await store.register_instance(an_instance("inst-x"))
    assert len(await claimed_ids(store, "inst-x")) == 1
    assert await beat(store, "inst-x") == 1
