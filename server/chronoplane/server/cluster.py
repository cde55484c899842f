"""What an instance does as a member of its cluster: it registers and heartbeats, leads when
elected (loads the schedule, keeps time), follows otherwise, and as leader resolves what dead
instances left behind.

*Who is dead* (docs/decisions/0015-faults.md). The leader judges an instance dead only once
it has itself watched that instance's heartbeat stay the same for ``instance_timeout``,
looking every heartbeat interval without a gap: after a database outage, a failover or a
stall of its own, everyone gets a full ``instance_timeout`` to heartbeat again before anyone
is judged. It never judges itself. Judging *fences* the instance (its row says so): it can
no longer heartbeat or claim, and its RUNNING executions become ABANDONED in the same
transaction. An instance that finds itself fenced (its heartbeat or a claim says so), or
that was paused or starved for about as long as that (``_stalled``), stops what it runs
before its tasks take another step, then registers again. A draining instance (stopping)
heartbeats until its last run has ended.

No SQL, gRPC or APScheduler here: the store, the coordinator and the engine do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from time import monotonic
from typing import Any

from chronoplane.server import metrics
from chronoplane.server.aio import cancelled
from chronoplane.server.coordination.abc import Coordinator
from chronoplane.server.engine.abc import Engine
from chronoplane.server.errors import JobNotFound
from chronoplane.server.models import Execution, ExecutorKind, Instance, Job
from chronoplane.server.runner import Runner
from chronoplane.server.service import SchedulerService
from chronoplane.server.storage.abc import Store

__all__ = ["Member"]

log = logging.getLogger("chronoplane.cluster")

RESYNC_INTERVAL = 30.0
# How often the leader's schedule moves its horizon on (much shorter than the horizon).
REFILL_INTERVAL = 10.0
# Rows of instances unseen this many instance timeouts are removed (ListInstances shows a
# dead one for a while: when it was last seen is worth knowing).
REMOVE_AFTER_TIMEOUTS = 6
# The judge's watch starts over when it did not look for this many heartbeat intervals.
WATCH_GAP_HEARTBEATS = 3
# After a heartbeat failed, the next is tried this soon.
RETRY_HEARTBEAT_SECONDS = 0.25


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Member:
    """Ties an instance's parts to the coordinator's decisions.

    The coordinator's callbacks only queue a term change; one task carries them out in order,
    so the election loop keeps heartbeating while a new leader loads its schedule.
    """

    def __init__(
        self,
        *,
        instance: Instance,
        store: Store,
        service: SchedulerService,
        runner: Runner,
        engine: Engine,
        heartbeat_interval: float,
        instance_timeout: float,
        shared: bool,
        leases: bool = False,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.instance = instance
        self._store = store
        self._service = service
        self._runner = runner
        self._engine = engine
        self._hb = heartbeat_interval
        self._instance_timeout = timedelta(seconds=instance_timeout)
        self._shared = shared
        # Whether to look for Celery workers' lapsed leases alone on SQLite (with a broker).
        self._leases = leases
        self._clock = clock
        self._coordinator: Coordinator | None = None
        self._terms: asyncio.Queue[int | None] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._changed: set[str] = set()
        self._changed_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.scheduled = 0
        # When (monotonic) the last heartbeat that got through was sent: the leader judges
        # this instance by heartbeats, so past that plus instance_timeout it may have.
        self._heard = monotonic()
        self._beat_now = asyncio.Event()
        self._draining = False
        self._stopping = False
        # The judge's watch (leader): each instance's last heartbeat as last seen, and since
        # when (monotonic) it has been that; when it last looked.
        self._seen: dict[str, tuple[datetime | None, float]] = {}
        self._looked: float | None = None
        # Told whether this instance can reach the database (health checking).
        self._health: list[Callable[[bool], Awaitable[None]]] = []

    # -- the coordinator's callbacks ----------------------------------------------------------

    def attach(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def elected(self, epoch: int) -> None:
        metrics.LEADER.set(1)
        metrics.LEADER_EPOCH.set(epoch)
        self._idle.clear()
        self._terms.put_nowait(epoch)

    def deposed(self, reason: str) -> None:
        # At once, before anything else runs: no fire is written after this.
        metrics.LEADER.set(0)
        metrics.LEADERSHIP_LOST.inc()
        self._service.leading = False
        self._runner.follow()
        self._idle.clear()
        self._terms.put_nowait(None)

    async def settled(self) -> None:
        """Returns when every queued term change has been carried out."""
        await self._idle.wait()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._shared:
            # Alone on this database: any other row is a process that died without leaving.
            await self._store.remove_stale_instances(stale_after=timedelta(0))
        await self._store.register_instance(self.instance)
        await self._heartbeat()
        self._spawn(self._carry_out_terms(), "terms")
        self._spawn(self._heartbeat_forever(), "instance-heartbeat")
        self._spawn(self._refill_forever(), "schedule-refill")
        if self._shared:
            self._spawn(self._sync_forever(), "job-sync")
            self._spawn(self._resync_forever(), "job-resync")
        if self._shared or self._leases:
            # Dead instances (a cluster), and Celery workers whose lease ran out.
            self._spawn(self._sweep_forever(), "orphan-sweep")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_death)
        self._tasks.append(task)

    async def stop(self) -> None:
        # The heartbeat loop ends by itself after the heartbeat it may be writing: a write
        # cut short by a cancellation may leave its connection inside a transaction (SQLite
        # then refuses the next writer until its busy timeout).
        self._stopping = True
        self._beat_now.set()
        for task in self._tasks:
            if task.get_name() == "instance-heartbeat":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), 2 * self._hb)
        for task in self._tasks:
            await cancelled(task)
        self._tasks.clear()

    def on_health(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """``listener(ok)`` is told after each heartbeat whether it reached the database."""
        self._health.append(listener)

    async def drain(self) -> None:
        """The instance stops: says so in its row at once (it goes on heartbeating until
        ``stop``, after its last run)."""
        self._draining = True
        self.instance = replace(self.instance, draining=True)
        self._beat_now.set()  # the next heartbeat says so

    def stalled(self, seconds: float) -> None:
        """The loop did not run for ``seconds`` (the process was paused, or starved): called
        before any task takes its next step. If the last heartbeat that got through is about
        as old as instance_timeout, the leader may have judged this instance dead and given
        its executions to others: they stop now, before they go on (those that were not
        taken over are recorded INTERRUPTED), and a heartbeat says at once which it was."""
        silent = monotonic() - self._heard
        if silent < self._instance_timeout.total_seconds() - self._hb:
            return
        stopped = self._runner.disown(
            f"interrupted: this instance was paused or starved for {seconds:.1f} s and not "
            f"heard from for {silent:.1f} s, long enough to be taken for dead; it stopped "
            "the execution in case another instance had taken it over"
        )
        log.warning(
            "this instance was paused or starved for %.1f s (%.1f s since its last heartbeat "
            "got through): it stopped its %d running executions, in case it was taken for dead",
            seconds,
            silent,
            stopped,
        )
        self._beat_now.set()

    def fenced(self) -> None:
        """A claim found this instance fenced: heartbeat now (which finds it so and acts)."""
        self._beat_now.set()

    async def readdress(self, address: str) -> None:
        """Records the address the server listens on, once it is known."""
        self.instance = replace(self.instance, address=address)
        await self._store.register_instance(self.instance)

    async def leave(self) -> None:
        """Removes this instance's row (the last thing it does)."""
        with contextlib.suppress(Exception):
            await self._store.remove_instance(self.instance.id)

    # -- terms --------------------------------------------------------------------------------

    async def _carry_out_terms(self) -> None:
        while True:
            epoch = await self._terms.get()
            try:
                if epoch is None:
                    await self._engine.shutdown()
                else:
                    await self._lead(epoch)
            except Exception:
                log.exception("could not take up leadership (epoch %s); trying again", epoch)
                # Still elected: a leader without its schedule would fire nothing.
                await asyncio.sleep(self._hb)
                if epoch is not None and self._terms.empty():
                    self._terms.put_nowait(epoch)
                    continue
            if self._terms.empty():
                self._idle.set()

    async def _lead(self, epoch: int) -> None:
        coordinator = self._coordinator
        assert coordinator is not None
        if coordinator.epoch != epoch:
            return  # deposed before this term began
        await self._engine.shutdown()  # a clean slate, whatever a former term left
        self._runner.lead(epoch, coordinator.acting, lambda: self._lead_again(epoch))
        self._service.leading = True
        # Firing before the schedule is filled: the soonest jobs come first, and fire on
        # time while the later pages load.
        await self._engine.start(self._service.schedule.on_fires)
        self.scheduled = await self._service.load_schedule()
        if coordinator.epoch != epoch:
            return
        log.info(
            "leading (epoch %d): %d jobs due within %s scheduled",
            epoch,
            self.scheduled,
            _minutes(self._service.schedule.horizon),
        )

    def _lead_again(self, epoch: int) -> None:
        """Takes up the term again (fires that could not be recorded are then recorded from
        the database, by the misfire policy), if it is still this instance's."""
        if self._coordinator is not None and self._coordinator.epoch == epoch:
            self._idle.clear()
            self._terms.put_nowait(epoch)

    # -- membership ---------------------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        wait = self._hb
        failing_since: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._beat_now.wait()
            self._beat_now.clear()
            if self._stopping:
                return
            try:
                await self._heartbeat()
            except Exception as error:
                if failing_since is None:
                    failing_since = monotonic()
                    log.warning("instance heartbeat failed (retrying): %s", error)
                else:
                    log.debug("instance heartbeat failed again: %s", error)
                await self._tell_health(False)
                # Tried again sooner: health and the lease are back moments after the
                # database is.
                wait = min(self._hb, RETRY_HEARTBEAT_SECONDS)
            else:
                if failing_since is not None:
                    log.info(
                        "instance heartbeats get through again, after %.1f s",
                        monotonic() - failing_since,
                    )
                    failing_since = None
                wait = self._hb

    async def _heartbeat(self) -> None:
        sent = monotonic()
        live = await self._store.heartbeat_instance(
            self.instance.id,
            running=self._runner.running,
            live_after=self._instance_timeout,
            draining=self._draining,
        )
        metrics.HEARTBEAT_DURATION.observe(monotonic() - sent)
        if live:
            metrics.INSTANCES_ALIVE.set(live)
            self._heard = sent
            self._runner.cluster_size(live)
            await self._tell_health(True)
            return
        stopped = self._runner.disown(
            "interrupted: this instance was taken for dead (not heard from for "
            f"{self._instance_timeout.total_seconds():g} s); its executions were ABANDONED"
        )
        log.warning(
            "this instance was taken for dead (not heard from for %g s, or its row was "
            "removed): its executions were ABANDONED; it stopped the %d it still ran and "
            "registers again",
            self._instance_timeout.total_seconds(),
            stopped,
        )
        await self._store.register_instance(self.instance)
        self._heard = sent
        await self._tell_health(True)

    async def _tell_health(self, ok: bool) -> None:
        for listener in self._health:
            await listener(ok)

    # -- job changes (cluster mode) -----------------------------------------------------------

    def job_changed(self, payload: str) -> None:
        """A notification: a job's row changed, on some instance ("<instance id> <job id>").
        A change made here is in this instance's engine already."""
        writer, _, job_id = payload.partition(" ")
        if self._service.leading and writer != self.instance.id:
            self._changed.add(job_id)
            self._changed_ready.set()

    async def resync(self) -> None:
        """After a (re)connect of the listener, notifications may have been lost."""
        self._runner.notified()
        try:
            fixed = await self._service.resync()
        except Exception as error:
            log.warning("job resync failed: %s", error)
            return
        if fixed:
            log.info("resync: %d jobs brought up to date", fixed)

    async def _sync_forever(self) -> None:
        while True:
            await self._changed_ready.wait()
            self._changed_ready.clear()
            changed, self._changed = self._changed, set()
            for job_id in changed:
                try:
                    await self._service.sync_job(job_id)
                except Exception as error:
                    log.warning("could not bring job %s up to date: %s", job_id, error)

    async def _refill_forever(self) -> None:
        """The leader's horizon moves on (schedule.py), a thirtieth of it at a time."""
        every = min(REFILL_INTERVAL, max(0.5, self._service.schedule.horizon.total_seconds() / 30))
        while True:
            await asyncio.sleep(every)
            if not self._service.leading or not self._idle.is_set():
                continue  # a term is being taken up: its load fills the schedule
            try:
                await self._service.schedule.refill()
            except Exception as error:
                log.warning("could not move the schedule's horizon on (trying again): %s", error)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_INTERVAL)
            await self.resync()

    # -- what dead instances left (leader, cluster mode) --------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._hb)
            if not self._service.leading:
                continue
            try:
                await self.sweep()
            except Exception as error:
                log.warning("sweeping dead instances' executions failed: %s", error)

    async def sweep(self) -> None:
        abandoned = []
        if self._shared:
            removed = await self._store.remove_stale_instances(
                stale_after=self._instance_timeout * REMOVE_AFTER_TIMEOUTS
            )
            if removed:
                log.info("removed %d stale instances: %s", len(removed), ", ".join(removed))
            silent = await self._silent()
            if silent:
                epoch = self._coordinator.epoch if self._coordinator is not None else None
                if epoch is None:
                    return
                timeout = self._instance_timeout.total_seconds()
                judged = await self._store.abandon_instances(
                    silent,
                    message=f"abandoned: not heard from for {timeout:g} s",
                    now=self._clock(),
                    epoch=epoch,
                )
                _count_abandoned(judged)
                abandoned += judged
                log.warning(
                    "judged dead (not heard from for %g s): %s",
                    timeout,
                    ", ".join(f"{i} (last heard {_heard(seen)})" for i, seen in silent.items()),
                )
        abandoned += await self._store.abandon_expired_leases(
            message="abandoned: the Celery worker running it stopped renewing its lease"
        )
        await self._retry_abandoned(abandoned)

    async def _silent(self) -> dict[str, datetime | None]:
        """The instances this leader has watched stay silent for instance_timeout, with the
        heartbeat they are stuck at (None: not registered, yet owning executions). Watching
        starts over after a gap in it (the database was away, the leader stalled or just
        took over): every instance gets a full instance_timeout from then on."""
        heartbeats = await self._store.instance_heartbeats()
        owners = await self._store.execution_owners()
        now = monotonic()
        if self._looked is None or now - self._looked > WATCH_GAP_HEARTBEATS * self._hb:
            self._seen.clear()
        self._looked = now
        watched = (set(heartbeats) | owners) - {self.instance.id}
        seen: dict[str, tuple[datetime | None, float]] = {}
        for instance_id in watched:
            last = heartbeats.get(instance_id)
            before = self._seen.get(instance_id)
            seen[instance_id] = before if before is not None and before[0] == last else (last, now)
        self._seen = seen
        timeout = self._instance_timeout.total_seconds()
        return {
            instance_id: last
            for instance_id, (last, since) in seen.items()
            if now - since >= timeout and (last is not None or instance_id in owners)
        }

    async def _retry_abandoned(self, abandoned: list[Execution]) -> None:
        jobs: dict[str, Job | None] = {}
        retried = 0
        for execution in abandoned:
            if execution.job_id not in jobs:
                try:
                    jobs[execution.job_id] = await self._store.get_job(execution.job_id)
                except JobNotFound:
                    jobs[execution.job_id] = None
            job = jobs[execution.job_id]
            if job is not None and self._runner.retry_abandoned(execution, job):
                retried += 1
        if abandoned:
            log.warning(
                "dead instances or workers left %d running executions: marked ABANDONED "
                "(%d retried)",
                len(abandoned),
                retried,
            )


def _count_abandoned(abandoned: list[Execution]) -> None:
    """The inline executions of dead instances (the leader counts Celery ends: census.py)."""
    for execution in abandoned:
        if execution.executor is ExecutorKind.INLINE:
            metrics.scheduling.ended(execution.task, "abandoned", "inline")


def _minutes(span: timedelta) -> str:
    return f"{span.total_seconds() / 60:g} min"


def _heard(seen: datetime | None) -> str:
    return seen.isoformat(timespec="milliseconds") if seen is not None else "never: not registered"


def _log_death(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("cluster task %s died", task.get_name(), exc_info=task.exception())
