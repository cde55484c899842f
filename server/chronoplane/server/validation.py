"""Checks on what clients send, collecting every violation with its field path."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from chronoplane.server.errors import FieldViolation, InvalidArgument
from chronoplane.server.models import Job
from chronoplane.server.pagination import MAX_PAGE_SIZE

__all__ = ["MAX_ARGS_BYTES", "FieldLimits", "Violations", "check_job", "check_text"]


def _positive_up_to(
    violations: Violations, field: str, value: timedelta | None, limit: timedelta, what: str
) -> None:
    if value is not None and not timedelta(0) < value <= limit:
        violations.add(field, f"must be more than 0 and at most {what}")


JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
EXCEPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,15}$")
LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9_./-]{0,61}[a-z0-9])?$")
MAX_DISPLAY_NAME = 256
MAX_DESCRIPTION = 4_096
MAX_TASK_NAME = 256
MAX_REQUEST_ID = 128
MAX_LABELS = 64
MAX_LABEL_VALUE = 255
MAX_ARGS_BYTES = 64 * 1024
MAX_ARGS_DEPTH = 32
MAX_MISFIRE_GRACE = timedelta(days=7)
MAX_CONCURRENT = 1_000
MAX_CATCHUP_WINDOW = timedelta(days=366)
MAX_CATCHUP_LIMIT = 1_000
MAX_TIMEOUT = timedelta(days=7)
MAX_HISTORY_LIMIT = 1_000_000
MAX_ATTEMPTS = 100
MAX_BACKOFF = timedelta(days=1)
MAX_RETRY_ON = 32
MAX_MULTIPLIER = 100.0


@dataclass(frozen=True, kw_only=True)
class FieldLimits:
    """The limits on what a request may carry that are settings (``max_*``); each violation
    names its setting. The defaults are the largest the schema stores (names and labels)."""

    args_bytes: int = MAX_ARGS_BYTES
    args_depth: int = MAX_ARGS_DEPTH
    display_name: int = MAX_DISPLAY_NAME
    description: int = MAX_DESCRIPTION
    labels: int = MAX_LABELS
    label_value: int = MAX_LABEL_VALUE
    page_size: int = MAX_PAGE_SIZE


DEFAULT_LIMITS = FieldLimits()


class Violations:
    """Collects field violations; ``raise_if_any`` turns them into one InvalidArgument."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field=field, description=description))

    def extend(self, error: InvalidArgument, prefix: str) -> None:
        for v in error.violations:
            self.add(f"{prefix}.{v.field}" if prefix else v.field, v.description)

    def raise_if_any(self, *, limit: int | None = None, field: str = "") -> None:
        """Raises with every violation, or the first ``limit`` and one on ``field`` saying how
        many more there were."""
        if limit is not None and len(self.items) > limit:
            rest = len(self.items) - limit
            more = FieldViolation(field=field, description=f"{rest:,} more violations not listed")
            raise InvalidArgument([*self.items[:limit], more])
        if self.items:
            raise InvalidArgument(self.items)


def check_text(
    violations: Violations,
    field: str,
    value: str,
    *,
    limit: int,
    required: bool = False,
    setting: str = "",
) -> None:
    if required and not value:
        violations.add(field, "is required")
    elif len(value) > limit:
        named = f" ({setting})" if setting else ""
        violations.add(
            field, f"is {len(value)} characters long; at most {limit} are allowed{named}"
        )
    elif "\x00" in value:
        violations.add(field, "contains a NUL character")


def _strings(value: Any, depth: int = 0) -> Iterator[tuple[str, int]]:
    """Every string (keys included) in a JSON value, with its nesting depth."""
    if isinstance(value, str):
        yield value, depth
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key, depth + 1
            yield from _strings(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, depth + 1)
    else:
        yield "", depth


def check_args(
    violations: Violations,
    field: str,
    args: dict[str, Any],
    limits: FieldLimits = DEFAULT_LIMITS,
) -> None:
    size = len(json.dumps(args))
    if size > limits.args_bytes:
        violations.add(
            field,
            f"is {size} bytes of JSON; at most {limits.args_bytes} are allowed (max_args_bytes)",
        )
        return
    for text, depth in _strings(args):
        if depth > limits.args_depth:
            violations.add(field, f"nests deeper than {limits.args_depth} levels (max_args_depth)")
            return
        if "\x00" in text:
            violations.add(field, "contains a NUL character")
            return


def check_labels(
    violations: Violations,
    field: str,
    labels: dict[str, str],
    limits: FieldLimits = DEFAULT_LIMITS,
) -> None:
    if len(labels) > limits.labels:
        violations.add(field, f"has {len(labels)} labels; at most {limits.labels} (max_labels)")
    for key, value in list(labels.items())[: limits.labels + 1]:
        if not LABEL_KEY.fullmatch(key):
            violations.add(
                field,
                f"key {key[:70]!r} must be 1 to 63 characters from [a-z0-9_./-], "
                "starting and ending with a letter or digit",
            )
        elif len(value) > limits.label_value or "\x00" in value:
            violations.add(
                field,
                f"value of {key!r} must be at most {limits.label_value} characters, without "
                "NUL (max_label_value)",
            )


def check_job(
    violations: Violations, job: Job, prefix: str, limits: FieldLimits = DEFAULT_LIMITS
) -> None:
    """The checks that need nothing but the job itself (not the task registry or engine)."""
    if not JOB_ID.fullmatch(job.id):
        violations.add(
            f"{prefix}.id",
            "must be 1 to 128 characters from [A-Za-z0-9._-], starting with a letter or digit",
        )
    check_text(
        violations,
        f"{prefix}.display_name",
        job.display_name,
        limit=limits.display_name,
        setting="max_display_name",
    )
    check_text(
        violations,
        f"{prefix}.description",
        job.description,
        limit=limits.description,
        setting="max_description",
    )
    check_text(violations, f"{prefix}.task", job.task, limit=MAX_TASK_NAME, required=True)
    check_args(violations, f"{prefix}.args", job.args, limits)
    if job.misfire_grace <= timedelta(0) or job.misfire_grace > MAX_MISFIRE_GRACE:
        violations.add(f"{prefix}.misfire_grace", "must be more than 0 and at most 7 days")
    if not 0 <= job.max_concurrent <= MAX_CONCURRENT:
        violations.add(f"{prefix}.max_concurrent", f"must be between 0 and {MAX_CONCURRENT}")
    _check_policies(violations, job, prefix)
    check_labels(violations, f"{prefix}.labels", job.labels, limits)


def _check_policies(violations: Violations, job: Job, prefix: str) -> None:
    _positive_up_to(
        violations, f"{prefix}.catchup_window", job.catchup_window, MAX_CATCHUP_WINDOW, "366 days"
    )
    if not 1 <= job.catchup_limit <= MAX_CATCHUP_LIMIT:
        violations.add(f"{prefix}.catchup_limit", f"must be between 0 and {MAX_CATCHUP_LIMIT}")
    _positive_up_to(violations, f"{prefix}.timeout", job.timeout, MAX_TIMEOUT, "7 days")
    if not 0 <= job.history_limit <= MAX_HISTORY_LIMIT:
        violations.add(f"{prefix}.history_limit", f"must be between 0 and {MAX_HISTORY_LIMIT:,}")
    retry = job.retry
    field = f"{prefix}.retry"
    if not 1 <= retry.max_attempts <= MAX_ATTEMPTS:
        violations.add(f"{field}.max_attempts", f"must be between 0 and {MAX_ATTEMPTS}")
    _positive_up_to(
        violations, f"{field}.initial_backoff", retry.initial_backoff, MAX_BACKOFF, "1 day"
    )
    _positive_up_to(violations, f"{field}.max_backoff", retry.max_backoff, MAX_BACKOFF, "1 day")
    if not 1.0 <= retry.multiplier <= MAX_MULTIPLIER:
        violations.add(f"{field}.backoff_multiplier", f"must be between 1 and {MAX_MULTIPLIER:g}")
    if len(retry.retry_on) > MAX_RETRY_ON:
        violations.add(f"{field}.retry_on", f"has {len(retry.retry_on)} names; at most 32")
    for name in retry.retry_on:
        if not EXCEPTION_NAME.fullmatch(name):
            violations.add(
                f"{field}.retry_on",
                f"{name[:80]!r} is not an exception class name like 'ConnectionError' or "
                "'requests.exceptions.Timeout'",
            )
