"""What a transaction changed, the events it appends for watchers, and how far a reader may
read them (decisions 0011 and 0015).

A write transaction notes the executions and jobs it changes; just before it commits, the
store reads them as they now are and appends one event each.

*Cursors.* On SQLite, whose writers take turns, they come from the ``event_log`` row, so a
cursor is visible only once every smaller one is. On PostgreSQL they come from a sequence,
with no lock any other writer waits for: a writer holds the shared advisory lock
``EVENT_WRITERS_KEY`` from before it takes its cursors until it commits, and a cursor may be
visible while a smaller one, taken by a transaction still running, is not. A reader therefore
reads only up to the *watermark*: the last cursor handed out at some moment, once every
transaction that held the lock at that moment has ended (``Watermark``). Everything up to it
is then committed or rolled back for good, and a reader that has read up to it has missed
nothing.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from chronoplane.server.models import EventKind, EventResource
from chronoplane.server.storage.tables import UtcDateTime, executions

__all__ = [
    "EVENTS_CHANNEL",
    "EVENT_WRITERS_KEY",
    "PG_APPEND_EVENTS",
    "PG_NOTIFY_APPENDED",
    "Changes",
    "Watermark",
    "decode_body",
    "encode_row",
    "encode_values",
    "pg_modified_executions",
]

# The advisory lock event writers hold, shared, from before they take cursors until they
# commit (transaction-scoped; docs/decisions/0002-advisory-lock-keys.md, key 3). Nobody takes
# it exclusively: no writer ever waits for it.
EVENT_WRITERS_KEY = (0x43504C4E << 32) | 3

# Events were appended (payload: the last cursor); every instance's watch hub reads them.
EVENTS_CHANNEL = "chronoplane_events"


def _pg_appending(rows: str, values: str, *, only_if_any: str = "") -> str:
    """The CTEs ``writer`` and ``appended`` of a statement that appends one event per row of
    ``rows`` (a FROM item), with ``values`` (resource, kind, job_id, body, labels,
    create_time), as every writer on PostgreSQL must: the writers' lock, shared and held to
    the commit, taken before any cursor (each row's nextval comes after it: no row exists
    before the lock's), the cursors from the sequence. With ``only_if_any`` (a CTE of the
    changed rows) the lock is taken only if there are some. The statement's select list
    ends with ``PG_NOTIFY_APPENDED``."""
    guard = f" WHERE EXISTS (SELECT FROM {only_if_any})" if only_if_any else ""
    return (
        f"writer AS (SELECT pg_advisory_xact_lock_shared({EVENT_WRITERS_KEY}){guard}), "
        "appended AS (INSERT INTO events (cursor, resource, kind, job_id, body, labels, "
        f"create_time) SELECT nextval('events_cursor_seq'), {values} FROM writer, {rows} "
        "RETURNING 1)"
    )


# The notification of a statement built with _pg_appending: once, after its rows.
PG_NOTIFY_APPENDED = (
    f"(SELECT pg_notify('{EVENTS_CHANNEL}', '') FROM (SELECT count(*) FROM appended) AS done)"
)

# One round trip: the lock, the cursors, the rows given (labels given as null are the
# job's, read here), and the notification.
PG_APPEND_EVENTS = sa.text(
    "WITH "
    + _pg_appending(
        "unnest(CAST(:resources AS varchar[]), CAST(:kinds AS varchar[]), "
        "CAST(:job_ids AS varchar[]), CAST(:bodies AS text[]), CAST(:labels AS text[])) "
        "AS e(resource, kind, job_id, body, labels)",
        "e.resource, e.kind, e.job_id, CAST(e.body AS json), "
        "COALESCE(CAST(NULLIF(e.labels, 'null') AS json), "
        "(SELECT j.labels FROM jobs AS j WHERE j.id = e.job_id), CAST('{}' AS json)), :now",
    )
    + f" SELECT {PG_NOTIFY_APPENDED}"
).bindparams(sa.bindparam("now", type_=UtcDateTime()))

# Columns of a row that are times: ISO text in the JSON body.
_TIMES = frozenset(
    {
        "scheduled_time",
        "create_time",
        "start_time",
        "end_time",
        "update_time",
        "next_run_time",
        "dispatch_time",
    }
)
# Execution columns that are the queue's bookkeeping, not the resource.
_INTERNAL = frozenset(
    {
        "dedupe_key",
        "due_time",
        "ready",
        "holds_slot",
        "force",
        "cancel_reason",
        "epoch",
        "lease_expire_time",
        "created_late",
        "trace_parent",
    }
)


# Columns of the execution's job that a statement returned beside it (not the resource).
_JOINED = frozenset({"job_labels", "job_timeout_seconds", "job_retry"})


def _pg_body(table: sa.Table, alias: str) -> str:
    """SQL for a row's event body as ``encode_values`` makes it in Python: every column but
    the internal ones, times as ISO text in UTC (microseconds always written; ``decode_body``
    reads both forms)."""
    fields = []
    for column in table.c:
        if column.name in _INTERNAL:
            continue
        value = f"{alias}.{column.name}"
        if isinstance(column.type, UtcDateTime):
            value = f"""to_char({value} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""
        fields.append(f"'{column.name}', {value}")
    return f"json_build_object({', '.join(fields)})"


def pg_modified_executions(changed: str) -> str:
    """``_pg_appending`` for a statement that changed executions by itself: a MODIFIED event
    for each row of the CTE ``changed`` (``executions.*`` as they now are), its body built in
    SQL, its labels its job's. For asyncpg's raw SQL only: the body's time format holds
    colons that ``sa.text`` would take for parameters."""
    values = (
        f"'execution', 'modified', changed.job_id, {_pg_body(executions, 'changed')}, "
        "COALESCE((SELECT j.labels FROM jobs AS j WHERE j.id = changed.job_id), "
        "CAST('{}' AS json)), now()"
    )
    return _pg_appending(f"{changed} AS changed", values, only_if_any=changed)


class Changes:
    """The resources one transaction changed, in the order it changed them."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[EventResource, str], EventKind] = {}
        # Deleted jobs, as they were: nothing is left to read at commit.
        self.deleted: dict[str, dict[str, Any]] = {}
        # Executions whose row as written is known (an insert's values, an UPDATE's
        # RETURNING): no need to read them again at commit.
        self.known: dict[str, dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def note(self, resource: EventResource, ids: Any, kind: EventKind) -> None:
        for resource_id in ids:
            key = (resource, resource_id)
            if resource is EventResource.EXECUTION:
                self.known.pop(resource_id, None)  # changed since: read it at commit
            # Created and then changed in one transaction is still an addition.
            if self.kinds.get(key) is not EventKind.ADDED:
                self.kinds[key] = kind

    def note_rows(self, rows: Any, kind: EventKind) -> None:
        """Executions changed, with their rows as they now are (mappings of every column)."""
        for row in rows:
            self.note(EventResource.EXECUTION, [row["id"]], kind)
            self.known[row["id"]] = encode_values(row)

    def ids(self, resource: EventResource) -> list[str]:
        return [
            rid
            for (res, rid), kind in self.kinds.items()
            if res == resource and kind is not EventKind.DELETED
        ]


def encode_row(row: Any) -> dict[str, Any]:
    """A job or execution row as a JSON-safe dict (what ``decode_body`` reads back)."""
    return encode_values(row._mapping)


def encode_values(values: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name, value in values.items():
        if name in _INTERNAL or name in _JOINED:
            continue
        body[name] = value.isoformat() if isinstance(value, datetime) else value
    return body


def decode_body(body: dict[str, Any]) -> Any:
    """An object with the row's attributes, for the store's ``_job_from_row`` and
    ``_execution_from_row``."""
    values = {
        name: datetime.fromisoformat(value) if name in _TIMES and value is not None else value
        for name, value in body.items()
    }
    return SimpleNamespace(**values)


class Watermark:
    """How far every event cursor is decided (PostgreSQL), from readings of the sequence's
    last value ``last`` taken *before* the set ``writers`` of transactions then holding the
    event writers' lock.

    A transaction that took a cursor up to ``last`` held the lock before ``last`` was read,
    so it is among ``writers`` if it had not ended by then. Once none of them holds the lock
    any more, every cursor up to ``last`` is committed or gone for good. Readings that cannot
    be settled yet wait, in order, for later ones to show their writers gone.
    """

    MAX_PENDING = 1000

    def __init__(self) -> None:
        self.value = 0
        self._pending: list[tuple[int, frozenset[str]]] = []

    @property
    def behind(self) -> bool:
        """Whether cursors were handed out past the watermark by writers not yet ended."""
        return bool(self._pending)

    def observe(self, last: int, writers: Collection[str]) -> int:
        """Takes a reading; returns the watermark."""
        holding = frozenset(writers)
        settled = [p for p in self._pending if not p[1] & holding]
        if settled:
            self.value = max(self.value, *(p[0] for p in settled))
        self._pending = [p for p in self._pending if p[1] & holding and p[0] > self.value]
        if not holding:
            self.value = max(self.value, last)
        elif last > self.value:
            self._pending.append((last, holding))
            del self._pending[: -self.MAX_PENDING]
        return self.value
