"""Log lines for operators: text for a terminal (the default), or one JSON object per line
(``--log-format json``) for a log pipeline, each line saying what it is about.

A JSON line has ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger`` and
``message``; then, where known: ``job_id`` and ``execution_id`` (in an execution's run, the
task's own lines included), ``instance`` (this process's instance id), ``epoch`` (the
leadership term, while this instance leads), ``trace_id`` (the current OpenTelemetry span's,
when OpenTelemetry is installed and a span is recording) and ``exc_info`` (the traceback, one
string). Absent fields are left out, never null. See docs/decisions/0024-operator-signals.md.

Where the fields come from: the job and execution from ``tasks.execution_context``, which
the runner sets for each run's asyncio task (a task's own coroutine, and the thread of a
synchronous task, inherit it); the instance and epoch from process state that a filter reads
when the record is made, since the leader election logs from a thread of its own, where no
context variable of the server's loop is set. A line may name its own ``epoch`` (``extra``):
the lines of a term's start and end do.

The standard library's ``logging.Formatter``, not a JSON-logging package: what such a package
would leave to write is the same (the field names, the time format, leaving out the absent
context, the traceback as a string), so it would add a dependency to every installation and
save next to nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from chronoplane.server.errors import ChronoplaneError
from chronoplane.server.tasks import execution_context

__all__ = [
    "CONTEXT_FIELDS",
    "ContextFilter",
    "JsonFormatter",
    "Outage",
    "brief",
    "configure",
    "describe_process",
    "failure",
]

CONTEXT_FIELDS = ("job_id", "execution_id", "instance", "epoch", "trace_id")


def _not_leading() -> int | None:
    return None


_instance: str | None = None
_epoch: Callable[[], int | None] = _not_leading


def describe_process(instance: str, epoch: Callable[[], int | None]) -> None:
    """From now on, lines carry ``instance`` and, while it returns one, ``epoch()``."""
    global _instance, _epoch
    _instance, _epoch = instance, epoch


def brief(error: BaseException) -> str:
    """An expected fault in one line: its class and message, no traceback."""
    return f"{type(error).__name__}: {error}"


def failure(logger: logging.Logger, what: str, error: BaseException) -> None:
    """``what`` failed (and is tried again later): an expected fault (the database away, a
    lost race, a timeout) is one WARNING line; anything else is a bug, logged with its
    traceback."""
    if isinstance(error, ChronoplaneError | ConnectionError | TimeoutError):
        logger.warning("%s: %s", what, brief(error))
    else:
        logger.error("%s", what, exc_info=error)


class Outage:
    """A retry loop's failures as state changes: the first failure is one WARNING line (the
    error's class and message), the next ones DEBUG, the first success after them one INFO
    line saying how long it lasted. A database outage is then two lines per loop, not a
    line (or a traceback) per retry."""

    def __init__(self, logger: logging.Logger, failing: str, back: str) -> None:
        self._log = logger
        self._failing = failing
        self._back = back
        self._since: float | None = None
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException | str) -> None:
        said = error if isinstance(error, str) else brief(error)
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning("%s: %s", self._failing, said)
        else:
            self._log.debug("%s (again): %s", self._failing, said)

    def ok(self) -> None:
        if self._since is None:
            return
        lasted = time.monotonic() - self._since
        self._log.info("%s, after %.1f s and %d failures", self._back, lasted, self._failures)
        self._since, self._failures = None, 0


class ContextFilter(logging.Filter):
    """Adds the context fields known where the record is made (a handler's filter: it sees
    the records of every logger)."""

    def __init__(self) -> None:
        super().__init__()
        self._span: Callable[[], Any] | None = _otel_current_span()

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if _instance is not None:
            fields.setdefault("instance", _instance)
        if "epoch" not in fields:
            epoch = _epoch()
            if epoch is not None:
                fields["epoch"] = epoch
        execution = execution_context.get(None)
        if execution is not None:
            fields.setdefault("job_id", execution.job_id)
            fields.setdefault("execution_id", execution.execution_id)
        if self._span is not None and "trace_id" not in fields:
            context = self._span().get_span_context()
            if context.is_valid:
                fields["trace_id"] = f"{context.trace_id:032x}"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (newlines in a message or traceback are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, log_format: str) -> None:
    """The root logger writes to stderr in ``log_format`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        handler.addFilter(ContextFilter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _rfc3339(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _otel_current_span() -> Callable[[], Any] | None:
    """OpenTelemetry's ``get_current_span``, when it is installed (an optional extra)."""
    try:
        trace = importlib.import_module("opentelemetry.trace")
    except ImportError:
        return None
    current: Callable[[], Any] = trace.get_current_span
    return current
