"""The watch history (storage/abc/events.py): every change an event, read in cursor order,
and never past a cursor that a writer still running may yet commit; on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest
from storage.helpers import a_job

from chronoplane.server.models import EventKind, EventResource
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore
from chronoplane.server.storage.sqlalchemy.changes import EVENT_WRITERS_KEY


async def test_changes_are_read_in_cursor_order_from_any_cursor(store: SqlAlchemyStore) -> None:
    for job_id in ("a", "b", "c"):
        await store.create_job(a_job(job_id), request_id=None)
    await store.delete_job("b", expected_version=None)
    read = await store.newest_events(0, limit=100)
    assert [(e.job_id, e.kind) for e in read] == [
        ("a", EventKind.ADDED),
        ("b", EventKind.ADDED),
        ("c", EventKind.ADDED),
        ("b", EventKind.DELETED),
    ]
    assert all(e.resource is EventResource.JOB for e in read)
    assert [e.cursor for e in read] == sorted({e.cursor for e in read})
    after, window = await store.events_after(read[1].cursor, limit=100, job_ids=["b"])
    assert [(e.job_id, e.kind) for e in after] == [("b", EventKind.DELETED)]
    assert window.newest == read[-1].cursor == (await store.event_window()).newest
    assert await store.newest_events(read[-1].cursor, limit=100) == []


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_reader_waits_for_a_smaller_cursor_still_being_written(
    store: SqlAlchemyStore, database_url: str
) -> None:
    """Writers take cursors without waiting for each other, so a larger cursor may commit
    first; a reader must not move past the smaller one, or it would never see it."""
    writer = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await writer.execute("BEGIN")
        await writer.execute("SELECT pg_advisory_xact_lock_shared($1)", EVENT_WRITERS_KEY)
        early = await writer.fetchval(
            "INSERT INTO events (cursor, resource, kind, job_id, body, labels, create_time) "
            "VALUES (nextval('events_cursor_seq'), 'job', 'modified', 'x', '{}', '{}', now()) "
            "RETURNING cursor"
        )
        await store.create_job(a_job("late"), request_id=None)  # a larger cursor, committed
        assert await store.newest_events(0, limit=100) == []
        assert store.events_behind
        await writer.execute("COMMIT")
    finally:
        await writer.close()
    read = await store.newest_events(0, limit=100)
    assert [e.job_id for e in read] == ["x", "late"]
    assert read[0].cursor == early
    assert not store.events_behind
