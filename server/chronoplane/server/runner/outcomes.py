"""Outcomes: how an execution ended, recorded. Final states (the first one queued for an
execution wins), slots given back by synchronous tasks that outlived their execution, and the
leader's next run times are queued here and written in batches: whatever comes while a batch
is written goes in the next (group commit, no timer), and a batch that fails is kept and
written again, since a lost final state would leave an execution RUNNING for ever."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from chronoplane.server import metrics
from chronoplane.server.models import ExecutionState
from chronoplane.server.runner.state import Run, Shared
from chronoplane.server.storage.abc import ExecutionFinish, NextRun, SlotRelease

__all__ = [
    "MAX_NOTE_CHARS",
    "MAX_RESULT_BYTES",
    "MAX_TRACEBACK_CHARS",
    "Failure",
    "Outcomes",
    "backoff",
    "json_result",
    "type_names",
]

log = logging.getLogger("chronoplane.server.runner")

MAX_RESULT_BYTES = 1 << 20
MAX_TRACEBACK_CHARS = 64 * 1024
MAX_NOTE_CHARS = 4 * 1024


def json_result(value: Any) -> Any:
    """What a task returned, as JSON, or ValueError saying why it cannot be stored."""
    if value is None:
        return None
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the task returned a value that is not JSON: {error}") from None
    if len(text) > MAX_RESULT_BYTES:
        raise ValueError(f"the task returned {len(text)} bytes of JSON; the limit is 1 MiB")
    return json.loads(text)


def type_names(error: BaseException) -> tuple[str, ...]:
    """The qualified names of the error's class and its bases, most specific first."""
    return tuple(
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in type(error).__mro__
        if cls not in (object, BaseException)
    )


@dataclass(frozen=True)
class Failure:
    """How an execution's failure is recorded: the message, the traceback (its end), the
    qualified type names (most specific first) that retry_on matches."""

    message: str
    traceback: str
    types: tuple[str, ...]

    @property
    def type(self) -> str:
        return self.types[0] if self.types else ""

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        return cls(
            message=f"{type(error).__name__}: {error}",
            traceback="".join(traceback.format_exception(error))[-MAX_TRACEBACK_CHARS:],
            types=type_names(error),
        )


def backoff() -> Iterator[float]:
    """Waits between attempts at a write that failed: at once (a connection that died is
    usually alone: the next one works), then doubling from 50 ms to a second; what waits
    behind the write waits for it, so it is tried often."""
    yield 0.0
    delay = 0.05
    while True:
        yield delay
        delay = min(delay * 2, 1.0)


class Outcomes:
    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._finishes: dict[str, ExecutionFinish] = {}
        self._releases: dict[str, SlotRelease] = {}
        self._next_runs: dict[str, NextRun] = {}
        self._ready = asyncio.Event()
        # Held while a batch is written, so that stop() never cancels a write half-way.
        self.lock = asyncio.Lock()

    def finish(
        self,
        run: Run,
        state: ExecutionState,
        *,
        result: Any = None,
        error_message: str = "",
        error_traceback: str = "",
        error_type: str = "",
        keeps_slot: bool = False,
    ) -> None:
        """Queues the final state; the first one queued for an execution wins."""
        if run.final is not None:
            return
        run.final = state
        metrics.scheduling.ended(run.execution.task, state.value, "inline")
        self._finishes[run.id] = ExecutionFinish(
            id=run.id,
            job_id=run.execution.job_id,
            state=state,
            start_time=run.started,
            end_time=self._shared.clock(),
            result=result,
            error_message=error_message,
            error_traceback=error_traceback,
            error_type=error_type,
            keeps_slot=keeps_slot,
            cancelled_by=run.cancelled_by if state is ExecutionState.CANCELLED else "",
        )
        run.finalized.set()
        self._ready.set()

    def release(self, run: Run, note: str) -> None:
        """Queues the slot of a synchronous task that outlived its execution, with a note of
        what it did."""
        self._releases[run.id] = SlotRelease(id=run.id, job_id=run.execution.job_id, note=note)
        self._ready.set()

    def next_runs(self, next_runs: Iterable[NextRun]) -> None:
        """Queues the leader's next run times (written with its epoch, while it leads)."""
        for next_run in next_runs:
            self._next_runs[next_run.job_id] = next_run
        self._ready.set()

    async def write_forever(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("could not record execution progress")

    async def flush(self) -> None:
        """Writes everything queued so far (and what comes meanwhile)."""
        async with self.lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        delays = backoff()
        while self._finishes or self._releases or self._next_runs:
            finishes, self._finishes = self._finishes, {}
            releases, self._releases = self._releases, {}
            next_runs, self._next_runs = self._next_runs, {}
            epoch = self._shared.epoch
            if epoch is None:
                next_runs = {}  # the leader's to write
            try:
                progress = await self._shared.store.record_progress(
                    list(finishes.values()),
                    list(releases.values()),
                    list(next_runs.values()),
                    epoch=epoch,
                )
            except Exception as error:
                # Kept and tried again, whatever went wrong: a lost final state would leave
                # an execution RUNNING for ever.
                log.warning(
                    "recording execution progress failed, retrying: %s: %s",
                    type(error).__name__,
                    error,
                )
                # Put them back under anything newer, then wait before trying again.
                self._finishes = finishes | self._finishes
                self._releases = releases | self._releases
                self._next_runs = next_runs | self._next_runs
                await asyncio.sleep(next(delays))
                continue
            if progress.readied:
                self._shared.wake.set()  # slots were freed: queued executions may go
