"""The session every aggregate shares: the engine and its settings, transactions (a write
appends the events of what it changed before it commits, so a use case spanning aggregates
commits once), the fencing checks, NOTIFY, and the translation of driver errors to domain
errors, once, at this edge (with retries of transactions that lost to another)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import greenlet_spawn

from chronoplane.server.aio import in_turns
from chronoplane.server.errors import (
    NotLeader,
    StorageConflict,
    StorageUnavailable,
)
from chronoplane.server.models import (
    EventKind,
    EventResource,
)
from chronoplane.server.storage.sqlalchemy.changes import (
    PG_APPEND_EVENTS,
    Changes,
    Watermark,
    encode_row,
)
from chronoplane.server.storage.sqlalchemy.rows import named
from chronoplane.server.storage.tables import (
    UtcDateTime,
    event_log,
    events,
    executions,
    instances,
    jobs,
    leadership,
)

# NOTIFY channels (PostgreSQL): job changes (the writing instance's id, a space, the job id);
# executions made ready, so claimers look again (the writing instance's id); a RUNNING
# execution asked to stop (its id).
JOBS_CHANNEL = "chronoplane_jobs"


WORK_CHANNEL = "chronoplane_work"


CANCEL_CHANNEL = "chronoplane_cancel"


P = ParamSpec("P")


R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class SessionLimits:
    """What bounds every pooled PostgreSQL session (docs/decisions/0015-faults.md): a
    transaction waits for a lock at most ``lock_timeout`` and may idle between statements at
    most ``idle_in_transaction`` (the server then ends the session and its locks: a stopped
    or cut-off writer holds no one up for longer), a statement runs at most ``statement``,
    and keepalives tell the server within seconds that a client's host has vanished. Times in
    seconds."""

    lock_timeout: float = 5.0
    idle_in_transaction: float = 5.0
    statement: float = 60.0

    def server_settings(self) -> dict[str, str]:
        return {
            "lock_timeout": str(int(self.lock_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(int(self.idle_in_transaction * 1000)),
            "statement_timeout": str(int(self.statement * 1000)),
            **KEEPALIVES,
        }


# TCP keepalives, server side: a vanished client's session (and its locks) ends in ~11 s.
KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}


# Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5.0


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    application_name: str = "chronoplane",
    limits: SessionLimits | None = None,
) -> AsyncEngine:
    """An engine with the settings each database needs: WAL and busy timeout on SQLite; on
    PostgreSQL the session limits, and ``application_name`` (a server's ends with its instance
    id, so that a new leader can end the sessions of a stale one)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            for pragma in (
                "journal_mode=WAL",
                "synchronous=NORMAL",
                "busy_timeout=10000",
                "foreign_keys=ON",
            ):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        return engine
    limits = limits or SessionLimits()
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=5,
        pool_pre_ping=True,
        connect_args={
            "server_settings": {"application_name": application_name[:63]}
            | limits.server_settings(),
            "timeout": CONNECT_TIMEOUT,
            # The client's own bound, should the server not answer at all (a partition).
            "command_timeout": limits.statement + 10,
        },
    )
    # An instance attribute: this engine's dialect only (pool_pre_ping calls it).
    setattr(engine.dialect, "do_ping", _ping_outside_transaction)  # noqa: B010
    return engine


# Set while a read takes its connection from the pool: no pre-ping then (a read that finds
# its connection dead runs again, once, on a pinged one; ``Session._read``). A context
# variable, so that only this task's checkout skips it, whatever other tasks check out
# meanwhile.
_UNPINGED: ContextVar[bool] = ContextVar("chronoplane_unpinged", default=False)


def _ping_outside_transaction(dbapi_connection: Any) -> bool:
    """The pre-ping of a pooled connection, as one round trip. SQLAlchemy's asyncpg adapter
    pings inside BEGIN ... ROLLBACK (for pgbouncer's transaction mode, which Chronoplane
    cannot be used through: its advisory locks belong to sessions), three round trips before
    every transaction; half of a GetJob's. Errors go to the pool as before (a disconnect
    invalidates the pool, anything else is raised). Skipped for a read's first attempt."""
    if _UNPINGED.get():
        return True
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        dbapi_connection.ping()
    finally:
        dbapi_connection.autocommit = autocommit
    return True


# SQLSTATEs of a transaction that the database rolled back because of another one: nothing
# was written, and the whole transaction may simply run again.
_CONFLICTS = {
    "40001": "a serialization failure",
    "40P01": "a deadlock",
    "55P03": "a lock not granted within lock_timeout",
}


# Classes of SQLSTATE that say the database, not the request, is the trouble: 08 connection
# exception, 53 insufficient resources (too many connections), 57 operator intervention
# (shutting down, starting up, session terminated, statement_timeout), and 25P03, a session
# ended for idling in a transaction.
_UNAVAILABLE_CLASSES = ("08", "53", "57")


CONFLICT_ATTEMPTS = 4


def _disconnected(error: Exception) -> bool:
    """Whether a driver error (asyncpg's, not yet SQLAlchemy's) says the connection is gone:
    a socket error, or class 08 (connection exception), or the server ending the session
    (57P01-57P03: terminated, shutting down, starting up)."""
    state = str(getattr(error, "sqlstate", "") or "")
    return (
        isinstance(error, OSError)
        or type(error).__name__ == "ConnectionDoesNotExistError"
        or state[:2] == "08"
        or state in ("57P01", "57P02", "57P03")
    )


def _sqlstate(error: exc.DBAPIError) -> str:
    return str(getattr(error.orig, "sqlstate", "") or "")


def _said(error: Exception) -> str:
    """What the driver said, in a line: not the statement or its parameters (a job's args)
    that SQLAlchemy's message goes on with."""
    said = error.orig if isinstance(error, exc.DBAPIError) and error.orig else error
    text = str(said).strip().splitlines()
    return f"{type(said).__name__}: {text[0] if text else ''}"


def _unavailable(error: Exception) -> StorageUnavailable | None:
    """The domain error for a driver error that means the database cannot be used now."""
    if isinstance(error, exc.PendingRollbackError):
        # The connection died inside a transaction (SQLAlchemy says so on its next use).
        return StorageUnavailable(f"database connection lost in a transaction: {_said(error)}")
    if isinstance(error, exc.TimeoutError):
        return StorageUnavailable(f"no database connection free in time: {_said(error)}")
    if isinstance(error, exc.OperationalError | exc.InterfaceError | OSError):
        return StorageUnavailable(f"database unavailable: {_said(error)}")
    if isinstance(error, exc.DBAPIError):
        state = _sqlstate(error)
        if error.connection_invalidated:
            return StorageUnavailable(f"database connection lost: {_said(error)}")
        if state[:2] in _UNAVAILABLE_CLASSES or state == "25P03":
            return StorageUnavailable(f"database unavailable: {_said(error)}")
    return None


def translate_errors(
    func: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Driver errors become domain errors here, once, at the storage edge. A transaction the
    database rolled back for another's sake (deadlock, lock timeout, serialization failure)
    is run again a few times first: each method is one transaction, or several that each
    stand alone, and side effects (wake-ups) happen only after a commit."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return await func(*args, **kwargs)
            except exc.DBAPIError as error:
                state = _sqlstate(error)
                if state not in _CONFLICTS or error.connection_invalidated:
                    translated = _unavailable(error)
                    if translated is None:
                        raise
                    raise translated from error
                if attempt == CONFLICT_ATTEMPTS:
                    raise StorageConflict(
                        f"the database rolled the transaction back after {_CONFLICTS[state]} "
                        f"({attempt} attempts); nothing was written: {_said(error)}"
                    ) from error
                await asyncio.sleep(random.uniform(0.005, 0.02) * 2**attempt)
            except (exc.SQLAlchemyError, OSError) as error:
                translated = _unavailable(error)
                if translated is None:
                    raise
                raise translated from error
        raise AssertionError("unreachable")

    return wrapper


def named_rows(result: sa.CursorResult[Any]) -> list[Any]:
    """A result's rows as named tuples (``rows.named``)."""
    return named(result, tuple(result.keys()))


class PgStatement:
    """A statement compiled once for asyncpg (``Session._fetch``): its text, and its
    parameters in order, given by name or left at the values bound in the statement. Values
    go to asyncpg as they are, without the column types' bind processing: strings, numbers,
    aware datetimes."""

    def __init__(self, statement: sa.ClauseElement) -> None:
        compiled = statement.compile(dialect=postgresql.asyncpg.dialect())  # type: ignore[no-untyped-call]
        assert isinstance(compiled, sa.sql.compiler.SQLCompiler)
        self.sql = str(compiled)
        self._names = list(compiled.positiontup or ())
        self._bound = compiled.params

    def args(self, **values: Any) -> list[Any]:
        return [values[name] if name in values else self._bound[name] for name in self._names]


# Per changed resource: its job id, its body (the resource as JSON), its job's labels.
_Bodies = dict[tuple[EventResource, str], tuple[str, dict[str, Any], Any]]


class Session:
    """An engine and the transactions on it. The aggregates' stores are subclasses: one
    ``Session`` serves them all."""

    def __init__(self, engine: AsyncEngine, *, instance_id: str = "") -> None:
        self._engine = engine
        # The same pool; each connection in autocommit while it is checked out from here.
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._dialect = engine.dialect.name
        # Sent with work notifications, so that this instance's listener can ignore its own.
        self._instance_id = instance_id
        # SQLite has one writer at a time, and a transaction that read before another one
        # wrote cannot write (SQLITE_BUSY, not waited for). One process uses the file (the
        # file lock), so its write transactions take turns here instead.
        self._write_lock = asyncio.Lock() if self._dialect == "sqlite" else None
        # Called after a transaction that appended events commits (the watch hub's wake-up).
        self.on_events: Callable[[], None] | None = None
        self._watermark = Watermark()

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(create_engine(url))

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    def pool_usage(self) -> tuple[int, int]:
        """The pool's connections checked out, and the callers waiting for one; safe to read
        from another thread (it only reads). The waiting ones are those parked on the pool's
        asyncio queue, which SQLAlchemy does not expose: 0 if it is not where it was."""
        pool: Any = self._engine.sync_engine.pool
        checkedout = getattr(pool, "checkedout", None)
        in_use = int(checkedout()) if checkedout is not None else 0
        # Not made yet (memoized on first use, on the loop's thread): nobody waited.
        queue = getattr(pool, "_pool", None)
        waiters = getattr(vars(queue).get("_queue"), "_getters", ()) if queue is not None else ()
        return in_use, sum(1 for waiter in list(waiters) if not waiter.done())

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction."""
        async with self._engine.begin() as conn:
            yield conn

    async def _read(self, work: Callable[[AsyncConnection], Awaitable[R]]) -> R:
        """``work`` on a connection in autocommit: no BEGIN and COMMIT around it, two round
        trips fewer on PostgreSQL (a single statement sees one snapshot anyway; a read of
        several statements that must agree uses ``_begin``). The connection is taken without
        the pool's pre-ping, one round trip fewer again: should it turn out dead (the
        database restarted, the session was terminated), it is dropped and ``work`` runs
        once more on a fresh one, pinged. Reads change nothing, so a second run is safe."""
        for pinged in (False, True):
            unpinged = _UNPINGED.set(not pinged)
            try:
                async with self._reader.connect() as conn:
                    return await work(conn)
            except exc.DBAPIError as error:
                # SQLAlchemy invalidated the connection (and the pool's older ones) already.
                if pinged or not error.connection_invalidated:
                    raise
            finally:
                _UNPINGED.reset(unpinged)
        raise AssertionError("unreachable")

    async def _rows(
        self, statement: sa.Executable, params: dict[str, Any] | None = None
    ) -> Sequence[sa.Row[Any]]:
        """The rows of one read statement (``_read``), as named tuples (``rows.named``)."""

        async def rows(conn: AsyncConnection) -> Sequence[sa.Row[Any]]:
            return named_rows(await conn.execute(statement, params))

        return await self._read(rows)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """PostgreSQL only: one read statement on the driver's own connection (asyncpg
        records), without SQLAlchemy's execution and result layers: half the CPU of a GetJob
        went there. As ``_read``: autocommit (the pooled connection is in no transaction),
        no pre-ping, once more on a pinged connection if this one was dead. Driver errors
        are raised as SQLAlchemy's, so that ``translate_errors`` sees what it always does.
        A write given here must be safe to run twice (it may have committed unseen)."""
        for pinged in (False, True):
            unpinged = _UNPINGED.set(not pinged)
            try:
                pooled = await self._engine.raw_connection()
            finally:
                _UNPINGED.reset(unpinged)
            driver: Any = pooled.driver_connection
            try:
                records: list[Any] = await driver.fetch(sql, *args)
                return records
            except asyncio.CancelledError:
                # Mid-statement: not a connection to hand to the next reader.
                await greenlet_spawn(pooled.invalidate)
                raise
            except Exception as error:
                dead = driver.is_closed() or _disconnected(error)
                if dead:
                    await greenlet_spawn(pooled.invalidate, error)
                if pinged or not dead:
                    raise exc.DBAPIError.instance(
                        sql,
                        args,
                        error,
                        Exception,
                        connection_invalidated=dead,
                        dialect=self._engine.dialect,
                    ) from error
            finally:
                await greenlet_spawn(pooled.close)
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; what it noted as changed (``_changed``) becomes events."""
        appended = False
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            conn = await stack.enter_async_context(self._engine.begin())
            # The dict itself, kept: on a connection that died, conn.info would raise
            # PendingRollbackError and hide the error that killed it.
            info = conn.info
            changes = info["chronoplane_changes"] = Changes()
            try:
                yield conn
                if changes:
                    await self._append_events(conn, changes)
                    appended = True
            finally:
                info.pop("chronoplane_changes", None)
        if appended and self.on_events is not None:
            self.on_events()

    @staticmethod
    def _changed(
        conn: AsyncConnection, resource: EventResource, ids: Iterable[str], kind: EventKind
    ) -> None:
        changes: Changes | None = conn.info.get("chronoplane_changes")
        if changes is not None:
            changes.note(resource, ids, kind)

    @staticmethod
    def _changed_rows(conn: AsyncConnection, rows: Iterable[Any], kind: EventKind) -> None:
        changes: Changes | None = conn.info.get("chronoplane_changes")
        if changes is not None:
            changes.note_rows(rows, kind)

    async def _append_events(self, conn: AsyncConnection, changes: Changes) -> None:
        """One event per resource changed, as it now is, with the next cursors (changes.py:
        from the sequence on PostgreSQL, from the ``event_log`` row, which stays locked
        until the commit, on SQLite)."""
        bodies = await self._known_bodies(conn, changes)
        bodies |= await self._read_bodies(conn, changes)
        for job_id, body in changes.deleted.items():
            bodies[(EventResource.JOB, job_id)] = (job_id, body, body.get("labels") or {})
        ordered = [(key, kind) for key, kind in changes.kinds.items() if key in bodies]
        if ordered:
            await self._insert_events(conn, ordered, bodies)

    async def _known_bodies(self, conn: AsyncConnection, changes: Changes) -> _Bodies:
        """Events of executions whose rows are known as written: only their labels are read
        (on PostgreSQL by the statement appending the events: None here)."""
        job_of = {i: body["job_id"] for i, body in changes.known.items()}
        labels = None
        if job_of and self._dialect != "postgresql":
            query = sa.select(jobs.c.id, jobs.c.labels).where(
                self._among(jobs.c.id, job_of.values())
            )
            labels = dict((await conn.execute(query)).all())
        return {
            (EventResource.EXECUTION, execution_id): (
                job_of[execution_id],
                body,
                None if labels is None else labels.get(job_of[execution_id]) or {},
            )
            for execution_id, body in changes.known.items()
        }

    async def _read_bodies(self, conn: AsyncConnection, changes: Changes) -> _Bodies:
        """The events of the other executions and jobs changed, read as they now are."""
        bodies: _Bodies = {}
        execution_ids = [i for i in changes.ids(EventResource.EXECUTION) if i not in changes.known]
        if execution_ids:
            query = (
                sa.select(executions, jobs.c.labels.label("job_labels"))
                .outerjoin(jobs, jobs.c.id == executions.c.job_id)
                .where(self._among(executions.c.id, execution_ids))
            )
            async for row in in_turns(await conn.execute(query)):
                body = (row.job_id, encode_row(row), row.job_labels or {})
                bodies[(EventResource.EXECUTION, row.id)] = body
        job_ids = changes.ids(EventResource.JOB)
        if job_ids:
            query = sa.select(jobs).where(self._among(jobs.c.id, job_ids))
            async for row in in_turns(await conn.execute(query)):
                bodies[(EventResource.JOB, row.id)] = (row.id, encode_row(row), row.labels or {})
        return bodies

    async def _insert_events(
        self,
        conn: AsyncConnection,
        ordered: list[tuple[tuple[EventResource, str], EventKind]],
        bodies: _Bodies,
    ) -> None:
        now = datetime.now(UTC)
        if self._dialect == "postgresql":
            await conn.execute(
                PG_APPEND_EVENTS,
                {
                    "resources": [resource for (resource, _), _ in ordered],
                    "kinds": [kind.value for _, kind in ordered],
                    "job_ids": [bodies[key][0] for key, _ in ordered],
                    "bodies": [json.dumps(bodies[key][1]) for key, _ in ordered],
                    "labels": [json.dumps(bodies[key][2]) for key, _ in ordered],
                    "now": now,
                },
            )
            return
        last = (
            await conn.execute(
                event_log.update()
                .where(event_log.c.id == 1)
                .values(last_cursor=event_log.c.last_cursor + len(ordered))
                .returning(event_log.c.last_cursor)
            )
        ).scalar_one()
        first = last - len(ordered) + 1
        rows = [
            {
                "cursor": first + n,
                "resource": resource,
                "kind": kind.value,
                "job_id": bodies[(resource, rid)][0],
                "body": bodies[(resource, rid)][1],
                "labels": bodies[(resource, rid)][2],
                "create_time": now,
            }
            for n, ((resource, rid), kind) in enumerate(ordered)
        ]
        await conn.execute(events.insert(), rows)

    def _among(self, column: sa.ColumnElement[str], values: Iterable[str]) -> Any:
        """``column IN values``; on PostgreSQL ``= ANY(array)``, one statement for any number
        of values (asyncpg prepares each distinct text: a list of n parameters would be a new
        statement for every n, and the statement cache would churn)."""
        listed = list(values)
        if self._dialect == "postgresql":
            return column == sa.any_(sa.bindparam(None, listed, type_=postgresql.ARRAY(sa.String)))
        return column.in_(listed)

    def _insert(self, table: sa.Table) -> Any:
        module = postgresql if self._dialect == "postgresql" else sqlite
        return module.insert(table)

    async def _notify(self, conn: AsyncConnection, channel: str, payload: str) -> None:
        """Delivered at commit, only if it commits: a hint to read the table now; the table
        is the truth. PostgreSQL only (SQLite serves one process, which knows)."""
        if self._dialect == "postgresql":
            await conn.execute(sa.select(sa.func.pg_notify(channel, payload)))

    async def _check_epoch(self, conn: AsyncConnection, epoch: int) -> None:
        """Fencing: the leadership row is read FOR KEY SHARE, so a new leader's bump (which
        locks it FOR UPDATE first) waits for this transaction, and this one sees the bump if
        it came first; the leader's heartbeat, a plain UPDATE, waits for neither."""
        query = sa.select(leadership.c.epoch).where(leadership.c.id == 1)
        if self._dialect == "postgresql":
            query = query.with_for_update(read=True, key_share=True)
        current = (await conn.execute(query)).scalar_one()
        if current != epoch:
            raise NotLeader(epoch, current)

    async def _fenced(self, conn: AsyncConnection, instance_id: str) -> bool:
        """Whether the instance was fenced (judged dead): it may claim nothing then. Its row
        is locked FOR SHARE to the commit, so a fence waits for this claim, and the claim
        sees a fence that came first. An instance with no row at all is not fenced (a store
        used on its own, as in the tests)."""
        query = sa.select(instances.c.fenced_at).where(instances.c.id == instance_id)
        if self._dialect == "postgresql":
            query = query.with_for_update(read=True)
        row = (await conn.execute(query)).first()
        return row is not None and row.fenced_at is not None

    def _now(self) -> Any:
        """Now by the database's clock on PostgreSQL (one clock for every instance); SQLite
        serves one process, whose clock it uses."""
        if self._dialect == "postgresql":
            return sa.func.now()
        return sa.literal(datetime.now(UTC), UtcDateTime())

    def _seen_since(self, stale_after: timedelta) -> Any:
        if self._dialect == "postgresql":
            return sa.func.now() - sa.literal(stale_after, sa.Interval())
        return sa.literal(datetime.now(UTC) - stale_after, UtcDateTime())
