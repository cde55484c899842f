"""Runs tasks inside the server: async ones on the loop, sync ones in a bounded thread pool."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from chronoplane.server.executors.abc import Executor, Work
from chronoplane.server.models import JSONObject
from chronoplane.server.tasks import TaskDefinition

__all__ = ["InlineExecutor"]


class _AsyncWork(Work):
    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task

    @property
    def done(self) -> asyncio.Future[Any]:
        return self._task

    def cancel(self) -> bool:
        self._task.cancel()
        return True


class _ThreadWork(Work):
    """A call in a worker thread. Its ``done`` future is our own, not ``wrap_future``'s: that
    one is marked cancelled when cancelled, although the thread goes on running."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: Future[Any]) -> None:
        self._done: asyncio.Future[Any] = loop.create_future()
        self._future = future
        self._loop = loop
        future.add_done_callback(self._from_thread)

    def _from_thread(self, future: Future[Any]) -> None:
        # A thread that outlives the server finds the loop closed: nobody is listening.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._settle, future)

    def _settle(self, future: Future[Any]) -> None:
        if self._done.done():
            return
        if future.cancelled():
            self._done.cancel()
        elif (error := future.exception()) is not None:
            self._done.set_exception(error)
        else:
            self._done.set_result(future.result())

    @property
    def done(self) -> asyncio.Future[Any]:
        return self._done

    def cancel(self) -> bool:
        # Succeeds only while the call still waits for a free thread.
        return self._future.cancel()


class InlineExecutor(Executor):
    def __init__(self, *, threads: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chronoplane-task")
        self._busy = 0
        self._lock = threading.Lock()

    def start(self, task: TaskDefinition, args: JSONObject) -> Work:
        if task.is_async:
            return _AsyncWork(asyncio.ensure_future(task.func(**args)))
        loop = asyncio.get_running_loop()
        # The thread sees the caller's context variables (current_execution, say).
        context = contextvars.copy_context()
        future = self._pool.submit(context.run, self._call, task, args)
        return _ThreadWork(loop, future)

    def _call(self, task: TaskDefinition, args: JSONObject) -> Any:
        with self._lock:
            self._busy += 1
        try:
            return task.func(**args)
        finally:
            with self._lock:
                self._busy -= 1

    def busy(self) -> int:
        return self._busy

    async def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
