"""The dispatcher: sends Celery executions to the broker (decision 0014).

Every instance with ``celery_broker_url`` runs one. It claims due, ready Celery executions
from the queue (their slots held, the rows its own), sends each with its execution id as
the task id, and records how that went: a sent one belongs to no instance any more (the
worker that starts it holds a lease), one the broker did not take is ready again later,
PENDING with the reason. Nothing is lost while the broker is away; a message sent twice (an
instance that died between sending and recording) is one run, because a worker starts an
execution only if it is still PENDING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from chronoplane.server.executors.abc import Broker, BrokerError
from chronoplane.server.logs import Outage, brief
from chronoplane.server.storage.abc import Dispatch, Store

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
MAX_BATCH = 500
# Sends in flight at once (each is a thread of the broker client).
CONCURRENT_SENDS = 8
# A send that failed is tried again after 1 s, 2 s, 4 s ... at most this long.
MAX_RETRY_DELAY = 30.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    def __init__(
        self,
        *,
        store: Store,
        broker: Broker,
        instance_id: str,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._broker = broker
        self._instance_id = instance_id
        self._clock = clock
        self._wake = asyncio.Event()
        self._failures: dict[str, int] = {}
        self._loop: asyncio.Task[None] | None = None
        self._sends = asyncio.Semaphore(CONCURRENT_SENDS)
        self._background: set[asyncio.Task[None]] = set()
        self.sent = 0
        self._broker_down = Outage(
            log,
            "Celery broker down: its executions stay PENDING and are sent again",
            "Celery broker back up",
        )
        self._claims_down = Outage(
            log, "dispatching to Celery failed (trying again)", "dispatching to Celery works again"
        )

    def start(self) -> None:
        self._loop = asyncio.create_task(self._dispatch_forever(), name="celery-dispatch")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for task in list(self._background):
            task.cancel()
        self._broker.close()

    def notified(self, _writer: str = "") -> None:
        """Executions became ready somewhere: look at the queue."""
        self._wake.set()

    async def revoke(self, task_id: str) -> None:
        """Asks the workers to skip or stop a cancelled execution; in the background, so
        that CancelExecution does not wait on the broker (the row is CANCELLED already, and
        a worker that starts it later finds it so)."""

        async def revoke() -> None:
            try:
                await self._broker.revoke(task_id)
            except BrokerError as error:
                log.warning("could not revoke Celery task %s: %s", task_id, brief(error))

        task = asyncio.create_task(revoke(), name=f"revoke-{task_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _dispatch_forever(self) -> None:
        delay = 0.1
        while True:
            timeout = POLL_SECONDS
            try:
                claim = await self._store.claim_dispatches(
                    instance_id=self._instance_id, limit=MAX_BATCH
                )
                if claim.next_due_in is not None:
                    timeout = min(timeout, max(claim.next_due_in.total_seconds(), 0.001))
                if claim.dispatches:
                    await self._send(claim.dispatches)
                    if len(claim.dispatches) == MAX_BATCH:
                        continue  # there may be more
                delay = 0.1
                self._claims_down.ok()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._claims_down.failed(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def _send(self, dispatches: list[Dispatch]) -> None:
        outcomes = await asyncio.gather(*(self._send_one(d) for d in dispatches))
        sent: list[tuple[str, datetime]] = []
        failed: list[tuple[str, str, datetime]] = []
        now = self._clock()
        for dispatch, (when, error) in zip(dispatches, outcomes, strict=True):
            execution_id = dispatch.execution.id
            if when is not None:
                self._failures.pop(execution_id, None)
                sent.append((execution_id, when))
                continue
            attempts = self._failures[execution_id] = self._failures.get(execution_id, 0) + 1
            retry_at = now + timedelta(seconds=min(2.0 ** (attempts - 1), MAX_RETRY_DELAY))
            reason = (
                f"the Celery broker did not take it ({attempts} "
                f"{'attempt' if attempts == 1 else 'attempts'}): {error}; sending again at "
                f"{retry_at.isoformat(timespec='seconds').replace('+00:00', 'Z')}"
            )
            failed.append((execution_id, reason[:1024], retry_at))
        if failed:
            self._broker_down.failed(f"it did not take {len(failed)} executions: {failed[0][1]}")
        elif sent:
            self._broker_down.ok()
        if len(self._failures) > 100_000:
            self._failures.clear()
        # Until this is written the rows are this instance's: keep at it (a database that
        # is away stops everything else too).
        delay = 0.1
        outage = Outage(
            log, f"recording {len(sent)} sends failed (trying again)", "sends are recorded again"
        )
        while True:
            try:
                await self._store.record_dispatches(
                    instance_id=self._instance_id, sent=sent, failed=failed
                )
                outage.ok()
                break
            except asyncio.CancelledError:
                raise
            except Exception as error:
                outage.failed(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.sent += len(sent)

    async def _send_one(self, dispatch: Dispatch) -> tuple[datetime | None, str]:
        async with self._sends:
            try:
                await self._broker.send(dispatch)
            except BrokerError as error:
                return None, str(error)
            return self._clock(), ""
