"""The coordinator contract."""

from __future__ import annotations

from abc import ABC, abstractmethod

__all__ = ["Coordinator"]


class Coordinator(ABC):
    """Decides whether this process may schedule on its database.

    Until cluster mode exists, one server process per database: ``acquire`` claims the
    database for this process and refuses (``InstanceConflict``) when another holds it.
    """

    @abstractmethod
    async def acquire(self) -> None:
        """Claims the database; raises ``InstanceConflict`` when another process holds it."""

    @abstractmethod
    async def release(self) -> None:
        """Gives the claim back. Idempotent."""
