"""The leader's census for the metrics (metrics.py): every few seconds it reads the queue's
depth (PENDING and RUNNING counts, and how long the longest-due PENDING execution has been
due) and counts the Celery executions that ended since its last read, which ended on the
workers, in other processes. Only the leader reads; the others export 0 for the gauges.
Reads come from indexes, in time proportional to the queue (or to the last seconds' ends),
never to the history."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from chronoplane.server import metrics
from chronoplane.server.models import ExecutorKind
from chronoplane.server.storage.abc import Store

__all__ = ["Census"]

log = logging.getLogger(__name__)

EVERY_SECONDS = 5.0
# Ends are counted this far behind: an end is written with the time it happened, which may
# be a little before its transaction commits (a Celery worker's retry, a slow commit).
SETTLE = timedelta(seconds=10)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Census:
    def __init__(
        self,
        store: Store,
        *,
        leading: Callable[[], bool],
        every: float = EVERY_SECONDS,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._leading = leading
        self._every = every
        self._clock = clock
        # The end of the span of Celery ends counted so far (None: not leading).
        self._counted: datetime | None = None

    async def run_forever(self) -> None:
        while True:
            try:
                await self.read()
            except Exception as error:
                log.warning("reading the queue's depth for the metrics failed: %s", error)
            await asyncio.sleep(self._every)

    async def read(self) -> None:
        if not self._leading():
            self._counted = None
            for gauge in (
                metrics.EXECUTIONS_PENDING,
                metrics.EXECUTIONS_RUNNING,
                metrics.OLDEST_PENDING_AGE,
            ):
                gauge.set(0)
            return
        now = self._clock()
        depth = await self._store.queue_depth(now=now)
        metrics.EXECUTIONS_PENDING.set(depth.pending)
        metrics.EXECUTIONS_RUNNING.set(depth.running)
        age = (now - depth.oldest_due).total_seconds() if depth.oldest_due else 0.0
        metrics.OLDEST_PENDING_AGE.set(max(0.0, age))
        await self._count_celery_ends(now - SETTLE)

    async def _count_celery_ends(self, until: datetime) -> None:
        """Counts the Celery executions that ended since the last read (a new leader starts
        from its first read: what ended before was its predecessor's to count)."""
        after = self._counted
        if after is not None:
            ended = await self._store.count_ended(
                executor=ExecutorKind.CELERY, after=after, until=until
            )
        self._counted = until
        if after is None:
            return
        for count in ended:
            metrics.scheduling.ended(count.task, count.state.value, "celery", count.count)
