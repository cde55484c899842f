"""Small asyncio helpers shared by the server's long-running parts."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancelled"]


async def cancelled(task: asyncio.Task[Any] | None) -> None:
    """Cancels the task and waits until it has let go of what it held. None is ignored."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
