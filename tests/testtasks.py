"""Tasks the tests schedule; servers load them with ``--tasks testtasks``."""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
import time
from pathlib import Path
from typing import Any

from chronoplane.server.tasks import task


@task("test.add", description="Adds a and b in a worker thread.")
def add(a: int, b: int) -> dict[str, Any]:
    return {"sum": a + b, "thread": threading.current_thread().name}


@task("test.block")
async def block(seconds: float = 30.0) -> str:
    """Sleeps for a long time (to hold a concurrency slot)."""
    await asyncio.sleep(seconds)
    return "done"


@task("test.sync_sleep")
def sync_sleep(seconds: float = 1.0) -> str:
    time.sleep(seconds)
    return "slept"


@task("test.ledger")
def ledger(path: str, tag: str = "") -> None:
    """Appends one line to a file, so a test can count runs from outside the server."""
    with Path(path).open("a") as out:
        out.write(f"{tag} {os.getpid()} {time.time()}\n")


@task("test.not_json")
async def not_json() -> object:
    return object()


_attempts: dict[str, int] = {}


@task("test.flaky")
async def flaky(key: str, failures: int, error: str = "ConnectionError") -> int:
    """Raises ``error`` (a builtin exception name) the first ``failures`` times it runs for
    ``key``, then returns how many times it ran."""
    _attempts[key] = _attempts.get(key, 0) + 1
    if _attempts[key] <= failures:
        raise getattr(builtins, error)(f"attempt {_attempts[key]} of {key} fails")
    return _attempts[key]
