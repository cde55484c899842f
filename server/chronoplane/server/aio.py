"""Small asyncio helpers shared by the server's long-running parts."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancelled"]

RECANCEL_SECONDS = 0.5


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
