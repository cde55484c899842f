"""Tasks the tests schedule; servers load them with ``--tasks testtasks``."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from chronoplane.server.tasks import current_execution, task


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


@task("test.log")
def log_lines(text: str) -> str:
    """Logs ``text`` at INFO, then a caught error with its traceback (in a worker thread)."""
    log = logging.getLogger("testtasks")
    log.info("%s", text)
    try:
        raise ValueError(text)
    except ValueError:
        log.exception("the task caught an error")
    return text


@task("test.cluster_ledger")
async def cluster_ledger(path: str, seconds: float = 0.2) -> str:
    """Appends a line when it starts, and when it ends or is cancelled (one write each,
    atomic with O_APPEND): the execution, its job and fire, the process. The cluster and
    fault tests count runs from it."""
    run = current_execution()
    head = f"{run.execution_id} {run.job_id} {run.scheduled_time.isoformat()} {os.getpid()}"
    _append(path, f"start {head} {time.time()}\n")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _append(path, f"cancel {head} {time.time()}\n")
        raise
    _append(path, f"end {head} {time.time()}\n")
    return run.instance_id


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
