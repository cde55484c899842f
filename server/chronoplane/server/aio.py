"""Small asyncio helpers shared by the server's long-running parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["GroupCommit", "cancelled", "in_turns", "report_slow", "where"]

RECANCEL_SECONDS = 0.5
# Items one group commit writes at most.
GROUP_LIMIT = 1000
# How long a long piece of work holds the loop before it lets others run.
SLICE_SECONDS = 0.02


async def cancelled(task: asyncio.Task[Any] | None) -> None:
    """Cancels the task and waits until it has let go of what it held. None is ignored."""
    if task is None:
        return
    task.cancel()
    while not task.done():
        await asyncio.wait([task], timeout=RECANCEL_SECONDS)
        if not task.done():
            # It swallowed the cancellation: a database driver interrupted mid-query may turn
            # it into an error that a retry loop catches. Ask again.
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class GroupCommit(Generic[T, R]):
    """Group commit: ``await submit(item)`` gives ``write(items)``'s result for ``item``,
    where ``items`` are the items submitted while the previous write ran (``limit`` at most),
    so that concurrent callers share one transaction; a caller alone is written at once, with
    no timer. A failed write of several items is tried again an item at a time: one bad item
    fails only its own caller (when the error is one of ``alone``: others fail them all).
    With ``key``, items of the same key never share a write: a group ends before the first
    item whose key it holds already, so items are written in the order submitted."""

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        name: str,
        limit: int = GROUP_LIMIT,
        alone: tuple[type[Exception], ...] = (Exception,),
        key: Callable[[T], Hashable] | None = None,
    ) -> None:
        self._write = write
        self._name = name
        self._limit = limit
        self._alone = alone
        self._key = key
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name=self._name)
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._settle(self._group())
        except BaseException as error:  # cancelled with the loop: no caller waits forever
            while self._queue:
                _, future = self._queue.popleft()
                if not future.done():
                    future.set_exception(error)
            raise

    def _group(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The next items to write together, taken from the queue."""
        queue, key = self._queue, self._key
        if key is None:
            return [queue.popleft() for _ in range(min(self._limit, len(queue)))]
        group = [queue.popleft()]
        keys = {key(group[0][0])}
        while queue and len(group) < self._limit:
            next_key = key(queue[0][0])
            if next_key in keys:
                break
            keys.add(next_key)
            group.append(queue.popleft())
        return group

    async def _settle(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._write([item for item, _ in batch])
        except Exception as error:
            if len(batch) > 1 and isinstance(error, self._alone):
                for entry in batch:
                    await self._settle([entry])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


async def in_turns(items: Iterable[T], seconds: float = SLICE_SECONDS) -> AsyncIterator[T]:
    """The items, with the event loop free to run other work whenever ``seconds`` have passed
    since it last was: work proportional to the number of jobs (checking, scheduling or
    converting thousands) would otherwise hold heartbeats and every other call (DESIGN.md:
    no stall over 100 ms)."""
    since = time.monotonic()
    for item in items:
        yield item
        if time.monotonic() - since >= seconds:
            await asyncio.sleep(0)
            since = time.monotonic()


def where(task: asyncio.Task[Any]) -> str:
    """Where a task waits: its chain of awaits, outermost first (``Task.get_stack`` shows
    only the outermost frame of a suspended coroutine)."""
    steps: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            steps.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " -> ".join(steps) or repr(task)


async def report_slow(what: str, after: float, every: float, log: logging.Logger) -> None:
    """Logs every task's await chain once ``what`` has taken ``after`` seconds, and again
    every ``every`` seconds: a hang then names the step it hangs in."""
    started = asyncio.get_running_loop().time()
    await asyncio.sleep(after)
    while True:
        elapsed = asyncio.get_running_loop().time() - started
        current = asyncio.current_task()
        waiting = sorted(
            f"  {task.get_name()}: {where(task)}"
            for task in asyncio.all_tasks()
            if task is not current
        )
        log.warning("%s has taken %.0f s; waiting on:\n%s", what, elapsed, "\n".join(waiting))
        await asyncio.sleep(every)
