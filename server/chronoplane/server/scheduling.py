"""The rules for fires that come late, for spreading fires and for fires that overlap:
pure functions, no I/O.

A fire is *on time* when it is noticed within the job's misfire grace, and *missed* otherwise
(the server was busy, or down). On-time fires run. What happens to missed ones is the job's
misfire policy, limited by its catch-up window; those that do not run are summarised in one
MISSED execution (count and time range), never one row per fire.

A new execution is *admitted* by the job's overlap policy, given how many of the job's slots
are in use and how many executions already wait for one (``admit``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from chronoplane.server.models import Job, MisfirePolicy, MissedFires, OverlapPolicy

__all__ = ["Admitted", "Plan", "admit", "jitter_delay", "plan_fires"]


@dataclass(frozen=True, kw_only=True)
class Plan:
    run: list[datetime]
    """Fire times to run, ascending."""
    missed: MissedFires | None
    """The fires that do not run, if any."""


def plan_fires(
    job: Job,
    fires: Sequence[datetime],
    *,
    now: datetime,
    uncounted: int = 0,
    first_uncounted: datetime | None = None,
) -> Plan:
    """Which of ``fires`` (due, ascending, none after ``now``) run.

    ``uncounted`` is how many more missed fires the caller did not list, from
    ``first_uncounted`` on, all older than ``fires`` (a backlog too long to walk: at least
    that many). They never run.
    """
    on_time = [t for t in fires if now - t <= job.misfire_grace]
    missed = [t for t in fires if now - t > job.misfire_grace]
    window = job.catchup_window
    eligible = [t for t in missed if window is None or now - t <= window]
    if job.misfire_policy is MisfirePolicy.RUN_ALL:
        catch_up = eligible[-job.catchup_limit :] if job.catchup_limit > 0 else []
    elif job.misfire_policy is MisfirePolicy.RUN_ONCE and not on_time:
        catch_up = eligible[-1:]
    else:
        catch_up = []
    chosen = set(catch_up)
    not_run = [t for t in missed if t not in chosen]
    summary = None
    if uncounted and first_uncounted is not None:
        summary = MissedFires(
            count=len(not_run) + uncounted,
            count_is_lower_bound=True,
            first_time=first_uncounted,
            last_time=not_run[-1] if not_run else first_uncounted,
        )
    elif not_run:
        summary = MissedFires(count=len(not_run), first_time=not_run[0], last_time=not_run[-1])
    return Plan(run=catch_up + on_time, missed=summary)


def jitter_delay(job_id: str, scheduled_time: datetime, jitter: timedelta) -> timedelta:
    """A delay in [0, jitter) that every instance computes alike for the same fire."""
    if jitter <= timedelta(0):
        return timedelta(0)
    key = f"{job_id}|{scheduled_time.isoformat()}".encode()
    fraction = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    return jitter * fraction


@dataclass(frozen=True, kw_only=True)
class Admitted:
    """What the overlap policy makes of a new execution."""

    waits: bool
    """True: it is queued (PENDING) until a slot is free; False: it is SKIPPED."""
    reason: str = ""
    """Why it was skipped."""
    cancel_oldest: bool = False
    """Ask the job's oldest running execution to stop, for this one (CANCEL_RUNNING)."""


def admit(policy: OverlapPolicy, max_concurrent: int, *, running: int, waiting: int) -> Admitted:
    """The overlap policy's decision for a new execution of a job that has ``running``
    executions holding slots and ``waiting`` queued for one; ``max_concurrent`` 0 means no
    limit. ALLOW is SKIP with a limit (runs overlap up to it), and no limit without one."""
    if max_concurrent <= 0 or policy is OverlapPolicy.BUFFER_ALL:
        return Admitted(waits=True)
    busy = running + waiting
    if busy < max_concurrent:
        return Admitted(waits=True)
    if policy is OverlapPolicy.BUFFER_ONE:
        if busy < max_concurrent + 1:
            return Admitted(waits=True)
        return Admitted(waits=False, reason="a run was already waiting (overlap policy buffer_one)")
    if policy is OverlapPolicy.CANCEL_RUNNING:
        return Admitted(waits=True, cancel_oldest=running > 0)
    return Admitted(
        waits=False, reason=f"max_concurrent ({max_concurrent}) executions were running"
    )
