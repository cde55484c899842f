"""The store on SQLAlchemy 2 async Core: SQLite through aiosqlite, PostgreSQL through asyncpg.

One class per aggregate (the contracts of storage/abc/ have the same module names), all on
one ``Session`` (session.py: the engine, transactions, the events a write appends, error
translation), so that a use case spanning aggregates commits once:

==============  ==========================================================================
session.py      engine settings, transactions, fencing checks, errors, NOTIFY channels
rows.py         rows <-> domain objects, and the predicates queries share
slots.py        a job's slots: counting them, promoting queued executions when one frees
jobs.py         jobs
admission.py    executions, written: overlap policy against the slots, claimed in the insert
claims.py       executions, claimed from the queue; cancel requests
progress.py     executions, ended: final states, freed slots, next run times
history.py      executions, read and purged
dispatches.py   Celery dispatches and worker leases
instances.py    instances, heartbeats, fences, the leadership term
events.py       the watch history, read up to its watermark
changes.py      what a transaction changed (its events), and the watermark
access.py       tokens, audit, secrets
==============  ==========================================================================
"""

from __future__ import annotations

from chronoplane.server.storage.abc import Store
from chronoplane.server.storage.sqlalchemy.access import SqlAccessStore
from chronoplane.server.storage.sqlalchemy.changes import EVENTS_CHANNEL
from chronoplane.server.storage.sqlalchemy.dispatches import SqlDispatchStore
from chronoplane.server.storage.sqlalchemy.events import SqlEventStore
from chronoplane.server.storage.sqlalchemy.executions import SqlExecutionStore
from chronoplane.server.storage.sqlalchemy.instances import SqlInstanceStore
from chronoplane.server.storage.sqlalchemy.jobs import SqlJobStore
from chronoplane.server.storage.sqlalchemy.session import (
    CANCEL_CHANNEL,
    CONNECT_TIMEOUT,
    JOBS_CHANNEL,
    KEEPALIVES,
    WORK_CHANNEL,
    SessionLimits,
    create_engine,
)
from chronoplane.server.storage.sqlalchemy.triggers import trigger_from_json, trigger_to_json

__all__ = [
    "CANCEL_CHANNEL",
    "CONNECT_TIMEOUT",
    "EVENTS_CHANNEL",
    "JOBS_CHANNEL",
    "KEEPALIVES",
    "WORK_CHANNEL",
    "SessionLimits",
    "SqlAlchemyStore",
    "create_engine",
    "trigger_from_json",
    "trigger_to_json",
]


class SqlAlchemyStore(
    SqlJobStore,
    SqlExecutionStore,
    SqlDispatchStore,
    SqlInstanceStore,
    SqlEventStore,
    SqlAccessStore,
    Store,
):
    """Every aggregate, on one engine (``Session``)."""
