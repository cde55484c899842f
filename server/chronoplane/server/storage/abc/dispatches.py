"""Celery dispatches and the leases of the workers that run them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from chronoplane.server.models import (
    CeleryOptions,
    Execution,
    RunPolicy,
)

__all__ = ["Dispatch", "DispatchClaim", "DispatchStore"]


@dataclass(frozen=True, kw_only=True)
class Dispatch:
    """A Celery execution claimed to be sent: its job's routing and timeout."""

    execution: Execution
    options: CeleryOptions
    timeout: timedelta | None


@dataclass(frozen=True, kw_only=True)
class DispatchClaim:
    dispatches: list[Dispatch]
    next_due_in: timedelta | None
    fenced: bool = False
    """Nothing was claimed: this instance was judged dead."""


class DispatchStore(ABC):
    """Executions of Celery jobs: claimed by an instance to be sent, sent (then no
    instance's), started by a worker under a lease it renews, ABANDONED when it lapses
    (docs/decisions/0014-celery-dispatch.md)."""

    @abstractmethod
    async def claim_dispatches(self, *, instance_id: str, limit: int) -> DispatchClaim:
        """Takes up to ``limit`` due, ready Celery executions to send: still PENDING, their
        slots held, this instance's until ``record_dispatches`` says how sending went."""

    @abstractmethod
    async def record_dispatches(
        self,
        *,
        instance_id: str,
        sent: Sequence[tuple[str, datetime]],
        failed: Sequence[tuple[str, str, datetime]],
    ) -> None:
        """``sent``: (id, when); ``failed``: (id, reason, when to try again)."""

    @abstractmethod
    async def start_dispatched(
        self, execution_id: str, *, worker: str, lease_until: datetime
    ) -> tuple[Execution, RunPolicy] | None: ...

    @abstractmethod
    async def renew_lease(self, execution_id: str, *, worker: str, until: datetime) -> bool:
        """False when the execution is no longer RUNNING on ``worker``."""

    @abstractmethod
    async def abandon_expired_leases(self, *, message: str) -> list[Execution]:
        """RUNNING Celery executions whose worker's lease ran out: ABANDONED."""
