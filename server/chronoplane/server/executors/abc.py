"""The executor contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from typing import Any

from chronoplane.server.models import JSONObject
from chronoplane.server.tasks import TaskDefinition

__all__ = ["Executor", "StartCallback"]

StartCallback = Callable[[datetime], None]
"""Told, on the event loop, the moment the task's code begins."""


class Executor(ABC):
    @abstractmethod
    async def run(self, task: TaskDefinition, args: JSONObject, on_start: StartCallback) -> Any:
        """Runs the task and returns what it returned; raises what it raised.

        Cancelling the awaiting coroutine stops an async task; a synchronous task in a thread
        cannot be stopped and runs to its end, its outcome ignored.
        """

    @abstractmethod
    def busy(self) -> int:
        """How many synchronous tasks are in a worker thread right now."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Releases the worker threads without waiting for running ones."""
