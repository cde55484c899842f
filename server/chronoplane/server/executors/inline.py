"""Runs tasks inside the server: async ones on the loop, sync ones in a bounded thread pool."""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from chronoplane.server.executors.abc import Executor, StartCallback
from chronoplane.server.models import JSONObject
from chronoplane.server.tasks import TaskDefinition

__all__ = ["InlineExecutor"]


class InlineExecutor(Executor):
    def __init__(self, *, threads: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chronoplane-task")
        self._busy = 0
        self._lock = threading.Lock()

    async def run(self, task: TaskDefinition, args: JSONObject, on_start: StartCallback) -> Any:
        if task.is_async:
            on_start(datetime.now(UTC))
            return await task.func(**args)
        loop = asyncio.get_running_loop()
        call = functools.partial(self._call, loop, task, args, on_start)
        return await asyncio.shield(loop.run_in_executor(self._pool, call))

    def _call(
        self,
        loop: asyncio.AbstractEventLoop,
        task: TaskDefinition,
        args: JSONObject,
        on_start: StartCallback,
    ) -> Any:
        with self._lock:
            self._busy += 1
        try:
            loop.call_soon_threadsafe(on_start, datetime.now(UTC))
            return task.func(**args)
        finally:
            with self._lock:
                self._busy -= 1

    def busy(self) -> int:
        return self._busy

    async def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
