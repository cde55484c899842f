"""The coordinator contract: which process leads (runs the scheduling timer)."""

from __future__ import annotations

from abc import ABC, abstractmethod

__all__ = ["Coordinator"]


class Coordinator(ABC):
    """Elects this process leader, or not, and says so through the callbacks it was given.

    A leader makes its leader-only writes (scheduled fires, next run times) with its
    ``epoch``; the store refuses them once another leader has bumped it.
    """

    @property
    @abstractmethod
    def epoch(self) -> int | None:
        """The leadership epoch while this process leads, else None."""

    @abstractmethod
    def acting(self) -> bool:
        """Whether this process may write as leader at this moment."""

    @abstractmethod
    async def start(self) -> None:
        """Starts taking part; returns at once."""

    @abstractmethod
    async def settled(self) -> None:
        """Returns once the first election round is over (won or lost)."""

    @abstractmethod
    async def stop(self) -> None:
        """Steps down (if leading) and lets go of every connection. Idempotent."""
