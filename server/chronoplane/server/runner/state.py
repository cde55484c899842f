"""What the runner's phases share: the executions running here and the room left, the alarm
that wakes the claimer, whether the server stops, and the leadership under which scheduled
fires are written."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chronoplane.server.executors.abc import Work
from chronoplane.server.models import Execution, ExecutionState, RunPolicy
from chronoplane.server.storage.abc import Store

__all__ = ["Alarm", "Run", "Shared"]


@dataclass(eq=False)
class Run:
    """An execution this instance claimed and runs."""

    execution: Execution
    policy: RunPolicy
    started: datetime
    stop: asyncio.Future[tuple[ExecutionState, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None
    work: Work | None = None
    final: ExecutionState | None = None
    finalized: asyncio.Event = field(default_factory=asyncio.Event)
    # Who asked, through CancelExecution here, to cancel it.
    cancelled_by: str = ""

    @property
    def id(self) -> str:
        return self.execution.id

    def request_stop(self, state: ExecutionState, message: str) -> None:
        """Asks it to end in ``state``, when its coroutine sees it; the first ask wins."""
        if not self.stop.done():
            self.stop.set_result((state, message))


class Alarm(asyncio.Event):
    """An event that also tells its listeners when it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        self.tell_listeners()

    def tell_listeners(self) -> None:
        """Only the listeners: Celery executions were queued, for the dispatcher alone."""
        for listener in self.listeners:
            listener()


class Shared:
    """The runner's state that more than one phase reads or changes."""

    def __init__(
        self,
        *,
        store: Store,
        instance_id: str,
        clock: Callable[[], datetime],
        max_running: int,
    ) -> None:
        self.store = store
        self.instance_id = instance_id
        self.clock = clock
        self.max_running = max_running
        # Executions claimed here, by id, and synchronous tasks that outlived their
        # execution's final state: both take room of max_running.
        self.runs: dict[str, Run] = {}
        self.lingering = 0
        # How many executions this instance runs at most of those it creates itself (its
        # share of the cluster's room; the rest go to whoever claims them first).
        self.share = max_running
        # Wakes the claimer: executions may be ready, or room freed here.
        self.wake = Alarm()
        # Whether ready executions may be waiting for room here (a claim was full).
        self.backlog = False
        self.stopping = False
        self.background: set[asyncio.Task[Any]] = set()
        # Scheduled fires and next run times are written only while leading, with the epoch.
        self.epoch: int | None = None
        self.acting: Callable[[], bool] = lambda: False
        # Starts the leader's term again when fires could not be recorded.
        self.relead: Callable[[], None] | None = None
        # Stops the Celery task of an execution this server ended.
        self.revoke: Callable[[str], Awaitable[None]] | None = None
        # Called when a claim finds this instance fenced.
        self.fenced: Callable[[], None] = lambda: None

    def free(self) -> int:
        """Room for more executions here, by max_running."""
        return self.max_running - len(self.runs) - self.lingering

    def room_here(self) -> int:
        """How many executions it creates this instance may run itself, now."""
        busy = len(self.runs) + self.lingering
        return max(0, min(self.max_running, self.share) - busy)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Runs ``coro`` in the background; the runner's stop waits for it."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
