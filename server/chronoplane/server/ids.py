"""Identifiers."""

from __future__ import annotations

import secrets
import threading
import time

__all__ = ["new_execution_id", "new_instance_id", "new_job_id"]


_lock = threading.Lock()
_last = (0, 0)


def new_execution_id() -> str:
    """28 hex digits: milliseconds since the epoch, then 64 bits that start random and count
    up within a millisecond (as ULIDs do). Sorting by id sorts by creation, also among the
    executions one process makes in one millisecond (a batch of fires, a backfill), which
    is what "newest first" pages on."""
    global _last
    with _lock:
        millis = time.time_ns() // 1_000_000
        last_millis, last_tail = _last
        if millis <= last_millis and last_tail < (1 << 64) - 1:
            millis, tail = last_millis, last_tail + 1
        else:
            tail = secrets.randbits(63)  # room to count up
        _last = (millis, tail)
    return f"{millis:012x}{tail:016x}"


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


def new_instance_id() -> str:
    return f"inst-{secrets.token_hex(6)}"
