"""Identifiers."""

from __future__ import annotations

import secrets
import time

__all__ = ["new_execution_id", "new_instance_id", "new_job_id"]


def new_execution_id() -> str:
    """28 hex digits: milliseconds since the epoch, then 64 random bits. Sorting by id sorts
    by creation time (to the millisecond), which is what "newest first" pages on."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.randbits(64):016x}"


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


def new_instance_id() -> str:
    return f"inst-{secrets.token_hex(6)}"
