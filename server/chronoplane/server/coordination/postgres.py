"""Cluster mode on PostgreSQL: one leader elected with an advisory lock, fenced by an epoch.

Advisory lock keys used by Chronoplane (bigint, one key space per database; see
docs/decisions/0002-advisory-lock-keys.md and 0009-cluster-mode.md): the high 32 bits are
0x43504C4E ("CPLN"), the low 32 bits name the purpose.

The protocol, in order (docs/decisions/0009-cluster-mode.md):

* every instance polls ``pg_try_advisory_lock(LEADER_LOCK_KEY)`` every heartbeat interval
  ``hb`` on its own connection, never a pooled one;
* the winner bumps ``leadership.epoch`` and heartbeats ``leadership.heartbeat_at = now()``
  (database time) on that connection, each heartbeat bounded by ``hb``;
* it acts as leader only while its *lease* holds: until ``2·hb`` after it sent its last
  successful heartbeat, measured on its own monotonic clock; past that it steps down;
* a follower that sees the heartbeat older than ``leader_timeout`` on two polls in a row, held
  by the same backend, ends that backend and every other session of the stale leader's
  instance (``pg_terminate_backend``): a SIGSTOPped or partitioned leader keeps its sessions,
  its lock and whatever its transactions lock, until then; the follower then takes the lock
  at once;
* every write the leader makes as leader reads the epoch ``FOR KEY SHARE`` and aborts unless
  it is its own; the bump locks the row ``FOR UPDATE`` first, so it waits for the fenced
  writes in flight and nothing a deposed leader writes after the bump lands (the leader's
  own heartbeat, a plain UPDATE, waits for neither).

Safety needs the lease to end before anyone may take over: ``2·hb < leader_timeout``, checked
at start-up with a second to spare for clock rates and scheduling (config.py).

The election runs on its own thread and event loop, so that no work of the server's loop can
starve the lease: a leader busy filling its schedule, or saturated by a burst of fires, keeps
leading. A paused process stops both (the lease lapses as before); a server loop that has not
run at all for ``WEDGED_AFTER`` seconds is taken for stuck, and the leader steps down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from chronoplane.server import metrics
from chronoplane.server.aio import cancelled
from chronoplane.server.coordination.abc import Coordinator
from chronoplane.server.storage.sqlalchemy import CONNECT_TIMEOUT, SessionLimits

__all__ = [
    "LEADER_LOCK_KEY",
    "MIGRATION_LOCK_KEY",
    "ChangeListener",
    "LeaderElection",
    "dedicated_engine",
]

log = logging.getLogger(__name__)

_PREFIX = 0x43504C4E << 32
LEADER_LOCK_KEY = _PREFIX | 1
MIGRATION_LOCK_KEY = _PREFIX | 2

_HOLDER = sa.text(
    "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.classid = :high "
    "AND l.objid = :low AND l.objsubid = 1 AND l.granted AND l.database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database())"
).bindparams(high=LEADER_LOCK_KEY >> 32, low=LEADER_LOCK_KEY & 0xFFFFFFFF)


_LOCK_TERM = sa.text("SELECT epoch FROM leadership WHERE id = 1 FOR UPDATE")
# The stale leader's lock session, and every session its instance opened (their application
# names end with its instance id: see storage/sqlalchemy.py create_engine), never our own.
_TERMINATE = sa.text(
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND (pid = :holder OR "
    "(:leader <> '' AND :leader <> :me AND application_name LIKE 'chronoplane%' "
    "AND right(application_name, length(:leader)) = :leader))"
)
# After ending a stale leader's sessions: how often, and how far apart, to try its lock.
TAKEOVER_TRIES = 10
TAKEOVER_PAUSE = 0.05
# A server loop silent this long is stuck, not busy: its leader steps down.
WEDGED_AFTER = 30.0


def dedicated_engine(
    url: str, application_name: str, limits: SessionLimits | None = None
) -> AsyncEngine:
    """Connections that are never pooled, bounded like the pool's (lock and idle-in-
    transaction timeouts, TCP keepalives so that the server notices a vanished peer in
    seconds, not hours). They sit idle outside a transaction for as long as they live: no
    idle_session_timeout."""
    limits = limits or SessionLimits()
    return create_async_engine(
        url,
        poolclass=NullPool,
        connect_args={
            "server_settings": {"application_name": application_name[:63]}
            | limits.server_settings(),
            "timeout": CONNECT_TIMEOUT,
        },
    )


class LeaderElection(Coordinator):
    """Runs the election loop on a thread of its own; calls ``on_elected(epoch)`` and
    ``on_deposed(reason)`` on the loop that started it.

    ``acting`` may be asked from any thread: the lease is a deadline on the monotonic clock.
    """

    def __init__(
        self,
        url: str,
        instance_id: str,
        *,
        heartbeat_interval: float,
        leader_timeout: float,
        on_elected: Callable[[int], None],
        on_deposed: Callable[[str], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = dedicated_engine(
            url,
            f"chronoplane leader lock {instance_id}",
            SessionLimits(lock_timeout=leader_timeout, idle_in_transaction=leader_timeout),
        )
        self._instance_id = instance_id
        self._hb = heartbeat_interval
        self._timeout = leader_timeout
        self._lease = 2 * heartbeat_interval
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._monotonic = monotonic
        self._conn: AsyncConnection | None = None
        self._epoch: int | None = None
        self._lease_until = 0.0
        self._suspect: int | None = None
        self._first_round = asyncio.Event()
        # The server's loop, and the election's own thread, loop and task.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = threading.Event()
        # When (monotonic) the server's loop last ran a callback the election sent it.
        self._loop_seen = monotonic()

    @property
    def epoch(self) -> int | None:
        return self._epoch

    async def settled(self) -> None:
        await self._first_round.wait()

    def acting(self) -> bool:
        """Whether this instance may write as leader now: elected, and its lease holds."""
        return self._epoch is not None and self._monotonic() < self._lease_until

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_seen = self._monotonic()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._own(),), name="chronoplane-leader-lease", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        await asyncio.to_thread(self._running.wait)
        own, task = self._own_loop, self._task
        if own is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                own.call_soon_threadsafe(task.cancel)
        await asyncio.to_thread(thread.join)

    async def _own(self) -> None:
        """The election thread's loop: runs until cancelled by ``stop``, then steps down."""
        self._own_loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._running.set()
        try:
            await self._run()
        except asyncio.CancelledError:
            pass
        finally:
            if self._epoch is not None:
                self._step_down("this instance is stopping")
            await self._close()
            await self._engine.dispose()

    def _tell(self, callback: Callable[[Any], object], argument: object) -> None:
        """Calls ``callback(argument)`` on the server's loop."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the server's loop is closed
            self._loop.call_soon_threadsafe(callback, argument)

    def _saw_loop(self, _: object) -> None:
        self._loop_seen = self._monotonic()

    async def _run(self) -> None:
        while True:
            self._tell(self._saw_loop, None)
            started = self._monotonic()
            try:
                if self._epoch is None:
                    await self._campaign()
                else:
                    await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self._epoch is not None:
                    await self._resign(f"the leader lock connection failed: {error}")
                else:
                    log.warning("leader election: %s", error)
                    await self._close()
            if not self._first_round.is_set():
                self._tell(lambda _: self._first_round.set(), None)
            await asyncio.sleep(max(0.0, self._hb - (self._monotonic() - started)))

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await asyncio.wait_for(self._engine.connect(), self._hb * 5)
        return self._conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def _campaign(self) -> None:
        conn = await self._connection()
        got = await self._try_lock(conn)
        if not got:
            if not await self._depose_stale(conn):
                return
            # The stale leader's sessions are ending: its lock is free in a moment.
            for _ in range(TAKEOVER_TRIES):
                await asyncio.sleep(TAKEOVER_PAUSE)
                if got := await self._try_lock(conn):
                    break
            if not got:
                return
        sent = self._monotonic()
        # FOR UPDATE waits for the fenced writes in flight (FOR KEY SHARE); the leader's own
        # heartbeat (a plain UPDATE) never waits for them.
        await asyncio.wait_for(conn.execute(_LOCK_TERM), self._timeout)
        epoch = await asyncio.wait_for(
            conn.scalar(
                sa.text(
                    "UPDATE leadership SET epoch = epoch + 1, leader_id = :me, "
                    "elected_at = now(), heartbeat_at = now() WHERE id = 1 RETURNING epoch"
                ),
                {"me": self._instance_id},
            ),
            self._timeout,
        )
        await conn.commit()
        self._epoch = int(epoch)
        self._lease_until = sent + self._lease
        self._suspect = None
        log.info("this instance leads now (epoch %d)", self._epoch)
        self._tell(self._on_elected, self._epoch)

    async def _try_lock(self, conn: AsyncConnection) -> bool:
        got = await asyncio.wait_for(
            conn.scalar(sa.select(sa.func.pg_try_advisory_lock(LEADER_LOCK_KEY))), self._hb
        )
        await conn.commit()
        return bool(got)

    async def _depose_stale(self, conn: AsyncConnection) -> bool:
        """Ends the sessions of a leader whose heartbeat is older than the timeout, seen
        twice from the same backend (the second look spares a leader that has just been
        elected): its lock connection, and every other session of that instance, so that a
        transaction it is stuck in (paused, cut off) holds nothing the next leader waits for.
        Returns whether it did."""
        row = (
            await asyncio.wait_for(
                conn.execute(
                    sa.text(
                        "SELECT heartbeat_at < now() - make_interval(secs => :timeout) AS stale, "
                        "leader_id FROM leadership WHERE id = 1"
                    ),
                    {"timeout": self._timeout},
                ),
                self._hb,
            )
        ).one()
        holder = await asyncio.wait_for(conn.scalar(_HOLDER), self._hb)
        await conn.commit()
        if not row.stale or holder is None:
            self._suspect = None
            return False
        if self._suspect != holder:
            self._suspect = holder
            return False
        log.warning(
            "the leader %s (backend pid %d) has not heartbeat for %.1f s: ending its sessions",
            row.leader_id,
            holder,
            self._timeout,
        )
        ended = await asyncio.wait_for(
            conn.scalar(
                _TERMINATE,
                {"holder": holder, "leader": row.leader_id or "", "me": self._instance_id},
            ),
            self._hb,
        )
        await conn.commit()
        log.info("ended %d sessions of the stale leader", ended or 0)
        self._suspect = None
        return True

    async def _heartbeat(self) -> None:
        if not self.acting():
            await self._resign("its lease lapsed before a heartbeat got through")
            return
        silent = self._monotonic() - self._loop_seen
        if silent > WEDGED_AFTER:
            await self._resign(f"the server's event loop has not run for {silent:.0f} s")
            return
        conn = await self._connection()
        sent = self._monotonic()
        try:
            result = await asyncio.wait_for(
                conn.execute(
                    sa.text(
                        "UPDATE leadership SET heartbeat_at = now() WHERE id = 1 AND epoch = :e"
                    ),
                    {"e": self._epoch},
                ),
                self._hb,
            )
            await asyncio.wait_for(conn.commit(), self._hb)
        except TimeoutError:
            await self._resign(f"a heartbeat took longer than {self._hb:g} s")
            return
        if result.rowcount != 1:
            await self._resign("another instance took the leadership")
            return
        self._lease_until = sent + self._lease
        metrics.LEASE_RENEWAL_DURATION.observe(self._monotonic() - sent)

    async def _resign(self, reason: str) -> None:
        """Steps down and drops the lock connection: a hung or foreign session must not keep
        the lock."""
        self._step_down(reason)
        await self._close()

    def _step_down(self, reason: str) -> None:
        epoch, self._epoch = self._epoch, None
        self._lease_until = 0.0
        log.warning("this instance stops leading (epoch %s): %s", epoch, reason)
        self._tell(self._on_deposed, reason)


class ChangeListener:
    """LISTENs on channels; calls each channel's handler with the payload of every
    notification, and ``on_resync()`` whenever it (re)connects, since notifications sent
    while it was away are lost."""

    def __init__(
        self,
        url: str,
        handlers: Mapping[str, Callable[[str], None]],
        *,
        on_resync: Callable[[], Awaitable[Any]],
        instance_id: str,
    ) -> None:
        self._engine = dedicated_engine(url, f"chronoplane listener {instance_id}")
        self._handlers = dict(handlers)
        self._on_resync = on_resync
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="change-listener")

    async def stop(self) -> None:
        await cancelled(self._task)
        self._task = None
        await self._engine.dispose()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            lost = asyncio.Event()
            try:
                async with self._engine.connect() as conn:
                    raw = (await conn.get_raw_connection()).driver_connection
                    assert raw is not None

                    def notified(_conn: Any, _pid: int, channel: str, payload: str) -> None:
                        self._handlers[channel](payload)

                    raw.add_termination_listener(lambda _conn, lost=lost: lost.set())
                    for channel in self._handlers:
                        await raw.add_listener(channel, notified)
                    delay = 0.5
                    await self._on_resync()
                    while not lost.is_set() and not raw.is_closed():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(lost.wait(), 5.0)
                        if not lost.is_set():
                            # A cheap round trip: a silently dead connection shows here.
                            await asyncio.wait_for(raw.execute("SELECT 1"), 5.0)
                log.warning("change listener: connection lost; reconnecting in %.1f s", delay)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("change listener: %s; reconnecting in %.1f s", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
