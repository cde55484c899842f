"""Instances, their heartbeats and fences, and the leadership term."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime, timedelta

from chronoplane.server.models import (
    Execution,
    Instance,
)

__all__ = ["InstanceStore"]


class InstanceStore(ABC):
    """The processes serving one database: their rows and heartbeats, the fences of those
    judged dead, and the leadership term (docs/decisions/0009 and 0015)."""

    @abstractmethod
    async def register_instance(self, instance: Instance) -> None:
        """Inserts (or refreshes) the instance's row, not fenced; last seen now."""

    @abstractmethod
    async def heartbeat_instance(
        self, instance_id: str, *, running: int, live_after: timedelta, draining: bool = False
    ) -> int:
        """Marks the instance seen now, running ``running`` executions (and ``draining``);
        returns how many instances were seen within ``live_after`` (this one included), or 0
        if its row is gone or fenced (it was taken for dead: it must stop what it runs and
        register again)."""

    @abstractmethod
    async def remove_instance(self, instance_id: str) -> None:
        """Deletes the instance's row (it stops)."""

    @abstractmethod
    async def list_instances(self, *, leader_timeout: timedelta) -> list[Instance]:
        """Every registered instance, oldest start first; ``leader`` is set on the one that
        was elected last, if it was seen within ``leader_timeout``."""

    @abstractmethod
    async def remove_stale_instances(self, *, stale_after: timedelta) -> list[str]:
        """Deletes instances not seen for ``stale_after`` (database time); returns their ids."""

    @abstractmethod
    async def instance_heartbeats(self) -> dict[str, datetime]:
        """The last heartbeat (database time) of every instance that is not fenced."""

    @abstractmethod
    async def execution_owners(self) -> set[str]:
        """The instances that run executions or hold slots."""

    @abstractmethod
    async def abandon_instances(
        self,
        silent: Mapping[str, datetime | None],
        *,
        message: str,
        now: datetime,
        epoch: int | None = None,
    ) -> list[Execution]:
        """Fences each instance of ``silent`` whose last heartbeat is still the one given
        (None: that is still not registered), unless it heartbeat or registered meanwhile;
        then the RUNNING executions of every fenced instance become ABANDONED with
        ``message``, and every slot one held is freed. With ``epoch``, only while it is the
        leadership's (``NotLeader``). Returns the executions abandoned.

        A fenced instance can no longer heartbeat or claim: whichever of the fence and its
        own write comes first wins, so an execution it claims is never abandoned while it
        believes itself alive, nor claimed after it was judged dead."""

    @abstractmethod
    async def take_leadership(self, instance_id: str) -> int:
        """Bumps the leadership epoch for ``instance_id`` (which must hold the leader lock, or
        be alone on its database); returns the new epoch."""
