"""Claims: every instance, leader included, takes due, ready executions of the tasks it has
from the queue, up to ``max_running`` at once, and runs them. It looks when woken (its own
writes, a NOTIFY from another instance, a run here ending while executions wait for room),
at the next due time, and every second regardless: then it also promotes what waits for a
free slot, and reads the cancel requests of its runs (the safety nets under notifications)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from chronoplane.server.logs import Outage
from chronoplane.server.runner.cancels import Cancels
from chronoplane.server.runner.running import Running
from chronoplane.server.runner.state import Run, Shared
from chronoplane.server.tasks import TaskRegistry

__all__ = ["CLAIM_POLL_SECONDS", "Claimer"]

log = logging.getLogger("chronoplane.server.runner")

# Claims are also tried this often, whatever notifications say: the safety net.
CLAIM_POLL_SECONDS = 1.0


class Claimer:
    def __init__(
        self, shared: Shared, *, running: Running, cancels: Cancels, tasks: TaskRegistry
    ) -> None:
        self._shared = shared
        self._running = running
        self._cancels = cancels
        self._registry = tasks
        self._tasks: list[str] = []
        self._next_due: float | None = None

    def notified(self, writer: str = "") -> None:
        """Executions were made ready (by instance ``writer``): look at the queue. This
        instance's own writes have woken it already."""
        if writer != self._shared.instance_id:
            self._shared.wake.set()

    async def claim_forever(self) -> None:
        shared = self._shared
        self._tasks = [definition.name for definition in self._registry]
        delay = 0.1
        loop = asyncio.get_running_loop()
        last_poll = loop.time()
        outage = Outage(log, "claiming executions failed (trying again)", "claims work again")
        while not shared.stopping:
            await self._wait()
            if shared.stopping:
                return
            try:
                await self._look()
                if loop.time() - last_poll >= CLAIM_POLL_SECONDS:
                    last_poll = loop.time()
                    await self._poll()
            except Exception as error:
                outage.failed(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            outage.ok()
            delay = 0.1

    async def _wait(self) -> None:
        """Until woken, the next due time, or the next poll."""
        timeout = CLAIM_POLL_SECONDS
        if self._next_due is not None:
            loop = asyncio.get_running_loop()
            timeout = min(timeout, max(self._next_due - loop.time(), 0.001))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._shared.wake.wait(), timeout)
        self._shared.wake.clear()

    async def _look(self) -> None:
        if self._shared.free() > 0:
            await self._claim()
        else:
            self._shared.backlog = True

    async def _poll(self) -> None:
        shared = self._shared
        if await shared.store.promote_waiting():
            shared.wake.set()
        if shared.runs:
            await self._cancels.apply_requests()

    async def _claim(self) -> None:
        shared = self._shared
        free = shared.free()
        claim = await shared.store.claim_executions(
            instance_id=shared.instance_id, limit=free, tasks=self._tasks
        )
        loop = asyncio.get_running_loop()
        self._next_due = (
            None if claim.next_due_in is None else loop.time() + claim.next_due_in.total_seconds()
        )
        if claim.fenced:
            shared.fenced()
        for execution, policy in claim.executions:
            started = execution.start_time or shared.clock()
            self._running.launch(Run(execution=execution, policy=policy, started=started))
        # There may be more: look again once there is room (when a run here ends).
        shared.backlog = len(claim.executions) >= free
