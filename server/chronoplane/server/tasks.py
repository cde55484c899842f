"""Tasks: the named callables jobs run.

A module passed to ``chronoplane serve --tasks my.module`` registers its tasks when imported::

    from chronoplane.server.tasks import task

    @task("reports.daily", description="Builds yesterday's report")
    async def daily(region: str = "eu") -> dict[str, int]:
        ...

A job's JSON ``args`` become keyword arguments. Async functions run on the server's event loop;
plain functions run in a bounded thread pool. What a task returns must be JSON-serializable;
it is stored as the execution's result. Inside a task, ``current_execution()`` tells which
execution is running (its id, job, scheduled time and attempt), for logs and idempotency keys.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from chronoplane.server.config import ConfigError

__all__ = [
    "ExecutionContext",
    "TaskDefinition",
    "TaskRegistry",
    "current_execution",
    "default_registry",
    "load_modules",
    "task",
]


@dataclass(frozen=True, kw_only=True)
class ExecutionContext:
    """The execution a task runs for."""

    execution_id: str
    job_id: str
    scheduled_time: datetime
    attempt: int
    instance_id: str


execution_context: contextvars.ContextVar[ExecutionContext] = contextvars.ContextVar(
    "chronoplane_execution"
)


def current_execution() -> ExecutionContext:
    """The execution the calling task runs for; LookupError outside a task."""
    return execution_context.get()


F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, kw_only=True)
class TaskDefinition:
    name: str
    description: str
    func: Callable[..., Any]

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)


class TaskRegistry:
    """Task definitions by name."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition] = {}

    def register(self, name: str, func: Callable[..., Any], description: str = "") -> None:
        """Adds a task; a second task with the same name (from another function) is an error."""
        existing = self._tasks.get(name)
        if existing is not None and existing.func is not func:
            raise ValueError(f"task {name!r} is already registered by {existing.func!r}")
        if not description:
            description = inspect.cleandoc(func.__doc__ or "").split("\n\n")[0]
        self._tasks[name] = TaskDefinition(name=name, description=description, func=func)

    def get(self, name: str) -> TaskDefinition | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskDefinition]:
        return iter(sorted(self._tasks.values(), key=lambda t: t.name))


default_registry = TaskRegistry()


def task(name: str | None = None, *, description: str = "") -> Callable[[F], F]:
    """Registers the decorated function as a task named ``name`` (default: module.qualname)."""

    def decorate(func: F) -> F:
        default_registry.register(
            name or f"{func.__module__}.{func.__qualname__}", func, description
        )
        return func

    return decorate


def load_modules(modules: list[str]) -> None:
    """Imports the task modules named on the command line; their decorators register them.

    As ``celery -A`` does, the working directory comes first on ``sys.path``, so that
    ``--tasks myapp.tasks`` finds ``./myapp/tasks.py``. A module that is not there is a
    ``ConfigError`` naming the flag; an import that fails inside the module keeps its
    traceback, which says where.
    """
    cwd = os.getcwd()
    if modules and cwd not in sys.path:
        sys.path.insert(0, cwd)
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not _is_prefix(error.name, module):
                raise
            raise ConfigError(f"--tasks {module}: no module named {error.name!r}") from None


def _is_prefix(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


@task("chronoplane.echo", description="Returns its arguments; useful to try things out.")
async def _echo(**args: Any) -> dict[str, Any]:
    return args


@task("chronoplane.sleep", description="Sleeps for `seconds` (default 1), then returns.")
async def _sleep(seconds: float = 1.0) -> dict[str, float]:
    if not isinstance(seconds, int | float) or not 0 <= seconds <= 86_400:
        raise ValueError("seconds must be a number between 0 and 86400")
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@task("chronoplane.fail", description="Raises an error with `message`; to see failures.")
async def _fail(message: str = "chronoplane.fail was asked to fail") -> None:
    raise RuntimeError(message)
