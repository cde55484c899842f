"""The engine's timer (engine/apscheduler.py) on APScheduler 3, with the real clock."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from chronoplane.server.engine.abc import Fire
from chronoplane.server.engine.apscheduler import DUE_PER_TURN, ApschedulerEngine
from chronoplane.server.models import DateTrigger, Job

DUE = 2_000


async def test_thousands_due_at_once_are_handed_over_in_turns_of_the_loop() -> None:
    """Jobs due on the same second (hourly cron jobs at :00) reach the runner a slice at a
    time, the loop free between slices for heartbeats and calls; each fire once."""
    engine = ApschedulerEngine()
    turns = 0
    per_turn: Counter[int] = Counter()
    delivered: list[Fire] = []
    all_delivered = asyncio.Event()

    def handler(fires: Sequence[Fire]) -> None:
        delivered.extend(fires)
        per_turn[turns] += len(fires)
        if len(delivered) >= DUE:
            all_delivered.set()

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_work())
    await engine.start(handler)
    try:
        due = datetime.now(UTC) - timedelta(seconds=1)
        for n in range(DUE):
            trigger = DateTrigger(run_time=due)
            job = Job(id=f"j{n:05d}", task="chronoplane.echo", trigger=trigger, next_run_time=due)
            engine.schedule(job, reschedule=True)
        await asyncio.wait_for(all_delivered.wait(), 30)
    finally:
        ticker.cancel()
        await engine.shutdown()
    assert sorted(fire.job.id for fire in delivered) == [f"j{n:05d}" for n in range(DUE)]
    assert max(per_turn.values()) <= DUE_PER_TURN
    assert len(per_turn) >= DUE // DUE_PER_TURN
