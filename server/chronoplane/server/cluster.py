"""What an instance does as a member of its cluster: it registers and heartbeats, leads when
elected (loads the schedule, keeps time), follows otherwise, and as leader resolves what dead
instances left behind.

No SQL, gRPC or APScheduler here: the store, the coordinator and the engine do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from chronoplane.server.aio import cancelled
from chronoplane.server.coordination.abc import Coordinator
from chronoplane.server.engine.abc import Engine
from chronoplane.server.errors import JobNotFound
from chronoplane.server.models import Instance, Job
from chronoplane.server.runner import Runner
from chronoplane.server.service import SchedulerService
from chronoplane.server.storage.abc import Store

__all__ = ["Member"]

log = logging.getLogger("chronoplane.cluster")

RESYNC_INTERVAL = 30.0
# Rows of instances unseen this many instance timeouts are removed (ListInstances shows a
# dead one for a while: when it was last seen is worth knowing).
REMOVE_AFTER_TIMEOUTS = 6


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

    # -- the coordinator's callbacks ----------------------------------------------------------

    def attach(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def elected(self, epoch: int) -> None:
        self._idle.clear()
        self._terms.put_nowait(epoch)

    def deposed(self, reason: str) -> None:
        # At once, before anything else runs: no fire is written after this.
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
        for task in self._tasks:
            await cancelled(task)
        self._tasks.clear()

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
        self._runner.lead(epoch, coordinator.acting)
        self._service.leading = True
        self.scheduled = await self._service.load_schedule()
        if coordinator.epoch != epoch:
            return
        await self._engine.start(self._runner.on_fires)
        log.info("leading (epoch %d): %d jobs scheduled", epoch, self.scheduled)

    # -- membership ---------------------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._hb)
            try:
                await self._heartbeat()
            except Exception as error:
                log.warning("instance heartbeat failed: %s", error)

    async def _heartbeat(self) -> None:
        live = await self._store.heartbeat_instance(
            self.instance.id, running=self._runner.running, live_after=self._instance_timeout
        )
        if live:
            self._runner.cluster_size(live)
            return
        log.warning(
            "this instance's registration was removed (it was not seen for too long; "
            "executions it ran may have been marked ABANDONED): registering again"
        )
        await self._store.register_instance(self.instance)

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
            abandoned += await self._store.abandon_orphans(
                stale_after=self._instance_timeout,
                message="abandoned: the instance running it stopped heartbeating",
                now=self._clock(),
            )
        abandoned += await self._store.abandon_expired_leases(
            message="abandoned: the Celery worker running it stopped renewing its lease"
        )
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


def _log_death(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("cluster task %s died", task.get_name(), exc_info=task.exception())
