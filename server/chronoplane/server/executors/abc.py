"""The executor contract."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

from chronoplane.server.models import JSONObject
from chronoplane.server.tasks import TaskDefinition

if TYPE_CHECKING:
    from chronoplane.server.storage.abc import Dispatch

__all__ = ["Broker", "BrokerError", "Executor", "Work"]


class Work(ABC):
    """A task started by an executor."""

    @property
    @abstractmethod
    def done(self) -> asyncio.Future[Any]:
        """Resolves when the task's code has really ended, with what it returned or raised.

        Never cancelled by the caller's waiting: a caller that stops waiting (timeout,
        cancellation) can still learn when the code ended, and how.
        """

    @abstractmethod
    def cancel(self) -> bool:
        """Asks the task to stop. True if it will (an async task, or a synchronous one that
        has not begun); False for a synchronous task already in its thread, which cannot be
        interrupted and runs to its end."""


class Executor(ABC):
    @abstractmethod
    def start(self, task: TaskDefinition, args: JSONObject) -> Work:
        """Starts the task; must be called on the event loop. A synchronous task may wait for
        a worker thread; the execution is RUNNING, and its start time set, before that."""

    @abstractmethod
    def busy(self) -> int:
        """How many synchronous tasks are in a worker thread right now."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Releases the worker threads without waiting for running ones."""


class BrokerError(Exception):
    """The broker did not take the message (the text says why)."""


class Broker(Protocol):
    """Where Celery executions are sent (executors/celery.py); dispatch.py drives it."""

    async def send(self, dispatch: Dispatch) -> None:
        """Raises ``BrokerError`` when the broker did not take it."""

    async def revoke(self, task_id: str) -> None: ...

    def close(self) -> None: ...
