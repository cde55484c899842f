"""The watch history, read: events after a cursor up to the watermark below which every
cursor is decided (changes.py), snapshots consistent with a point of it, and its purge."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.models import (
    Event,
    EventWindow,
    Execution,
    Job,
    SnapshotPoint,
)
from chronoplane.server.storage.abc import (
    EventStore,
)
from chronoplane.server.storage.sqlalchemy.rows import (
    EVENT_COLUMNS,
    UNFINISHED_STATES,
    event_from_row,
    execution_from_row,
    job_from_row,
)
from chronoplane.server.storage.sqlalchemy.session import Session, translate_errors
from chronoplane.server.storage.tables import (
    event_log,
    events,
    executions,
    jobs,
)

_PG_WATERMARK = sa.text("SELECT last_cursor, writers FROM chronoplane_event_watermark()")


# How long a reader that needs the watermark as of now waits for the writers in flight (a
# writer stopped inside its transaction is ended by idle_in_transaction_session_timeout).
SETTLE_SECONDS = 30.0


class SqlEventStore(Session, EventStore):
    """Reads and purges the events that every writing transaction appends (session.py)."""

    @translate_errors
    async def events_after(
        self, cursor: int, *, limit: int, job_ids: Sequence[str] = ()
    ) -> tuple[list[Event], EventWindow]:
        async with self._begin() as conn:
            newest = await self._decided(conn)
            rows = (
                (await conn.execute(self._events_query(cursor, newest, limit, job_ids))).all()
                if newest > cursor
                else []
            )
            # Read after the events: a purge that committed before them is seen here.
            purged = await self._purged_through(conn)
        return [event_from_row(row) for row in rows], EventWindow(
            purged_through=purged, newest=newest
        )

    @translate_errors
    async def newest_events(self, cursor: int, *, limit: int) -> list[Event]:
        async with self._engine.connect() as conn:  # statements that need no transaction
            newest = await self._decided(conn)
            if newest <= cursor:
                return []
            rows = (await conn.execute(self._events_query(cursor, newest, limit, ()))).all()
        return [event_from_row(row) for row in rows]

    def _events_query(self, cursor: int, newest: int, limit: int, job_ids: Sequence[str]) -> Any:
        query = sa.select(*EVENT_COLUMNS).where(events.c.cursor > cursor, events.c.cursor <= newest)
        if job_ids:
            query = query.where(self._among(events.c.job_id, job_ids))
        return query.order_by(events.c.cursor).limit(limit)

    @property
    def events_behind(self) -> bool:
        """Whether cursors were handed out past the last watermark read by writers still in
        flight then (PostgreSQL): a reader should look again soon."""
        return self._watermark.behind

    async def _decided(self, conn: AsyncConnection, *, settle: bool = False) -> int:
        """The cursor up to which every event is committed or gone for good (storage/
        events.py). With ``settle``, as of now: waits for the writers in flight (ms)."""
        if self._dialect != "postgresql":
            return int(
                (
                    await conn.execute(
                        sa.select(event_log.c.last_cursor).where(event_log.c.id == 1)
                    )
                ).scalar_one()
            )
        row = (await conn.execute(_PG_WATERMARK)).one()
        decided = self._watermark.observe(row.last_cursor, row.writers)
        target = int(row.last_cursor)
        deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
        while settle and decided < target and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
            row = (await conn.execute(_PG_WATERMARK)).one()
            decided = self._watermark.observe(row.last_cursor, row.writers)
        return decided

    @translate_errors
    async def event_window(self) -> EventWindow:
        async with self._engine.connect() as conn:
            newest = await self._decided(conn, settle=True)
            return EventWindow(purged_through=await self._purged_through(conn), newest=newest)

    @staticmethod
    async def _purged_through(conn: AsyncConnection) -> int:
        query = sa.select(event_log.c.purged_through).where(event_log.c.id == 1)
        return int((await conn.execute(query)).scalar_one())

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[tuple[AsyncConnection, SnapshotPoint]]:
        """A read transaction that sees one instant, and the point of the event history it
        is consistent with. On PostgreSQL REPEATABLE READ, after a watermark settled before
        it began (every event up to it is in the snapshot), with the events past it that
        the snapshot shows too; on SQLite the writers' turn, so that nothing commits between
        its statements."""
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
                conn = await stack.enter_async_context(self._engine.begin())
                yield conn, SnapshotPoint(cursor=await self._decided(conn))
                return
            plain = await stack.enter_async_context(self._engine.connect())
            decided = await self._decided(plain, settle=True)
            await plain.commit()
            conn = await plain.execution_options(isolation_level="REPEATABLE READ")
            await stack.enter_async_context(conn.begin())
            shown = await conn.execute(sa.select(events.c.cursor).where(events.c.cursor > decided))
            yield conn, SnapshotPoint(cursor=decided, included=frozenset(shown.scalars()))

    @translate_errors
    async def snapshot_executions(
        self, job_ids: Sequence[str] = ()
    ) -> tuple[SnapshotPoint, list[tuple[Execution, dict[str, str]]]]:
        query = (
            sa.select(executions, jobs.c.labels.label("job_labels"))
            .join(jobs, jobs.c.id == executions.c.job_id)
            .where(executions.c.state.in_(UNFINISHED_STATES))
            .order_by(executions.c.id)
        )
        if job_ids:
            query = query.where(self._among(executions.c.job_id, job_ids))
        async with self._snapshot() as (conn, point):
            rows = (await conn.execute(query)).all()
        return point, [(execution_from_row(row), row.job_labels or {}) for row in rows]

    @translate_errors
    async def snapshot_jobs(self, job_ids: Sequence[str] = ()) -> tuple[SnapshotPoint, list[Job]]:
        query = sa.select(jobs).order_by(jobs.c.id)
        if job_ids:
            query = query.where(self._among(jobs.c.id, job_ids))
        async with self._snapshot() as (conn, point):
            rows = (await conn.execute(query)).all()
        return point, [job_from_row(row) for row in rows]

    @translate_errors
    async def purge_events(self, *, before: datetime) -> int:
        async with self._write() as conn:
            through = (
                await conn.execute(
                    sa.select(sa.func.max(events.c.cursor)).where(events.c.create_time < before)
                )
            ).scalar()
            if through is None:
                return 0
            result = await conn.execute(events.delete().where(events.c.cursor <= through))
            # Last, so that the event_log row is locked only for the commit.
            await conn.execute(
                event_log.update()
                .where(event_log.c.id == 1, event_log.c.purged_through < through)
                .values(purged_through=through)
            )
            return int(result.rowcount)
