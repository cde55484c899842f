"""What makes a job acceptable: its fields (validation.py), its task (registered here, or
sent to Celery if a broker is set), its trigger (the engine's check); and the defaults that
depend on when the job is made or changed (an interval's phase, the first run).

No gRPC, SQL or APScheduler here: the engine checks triggers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from chronoplane.server.engine.abc import Engine
from chronoplane.server.errors import CeleryNotEnabled, InvalidArgument
from chronoplane.server.models import (
    DEFAULT_MAX_CONCURRENT,
    DateTrigger,
    ExecutorKind,
    IntervalTrigger,
    Job,
    OverlapPolicy,
    Trigger,
)
from chronoplane.server.tasks import TaskRegistry
from chronoplane.server.validation import FieldLimits, Violations, check_job, check_text

__all__ = ["NO_TRIGGER", "JobRules"]

# Stands in for a missing trigger while the rest of a job is checked; never stored.
NO_TRIGGER: Trigger = DateTrigger(run_time=datetime.max.replace(tzinfo=UTC))


class JobRules:
    def __init__(
        self,
        *,
        engine: Engine,
        tasks: TaskRegistry,
        limits: FieldLimits,
        celery_enabled: Callable[[], bool],
    ) -> None:
        self._engine = engine
        self._tasks = tasks
        self._limits = limits
        self._celery_enabled = celery_enabled

    def prepare(
        self, job: Job, trigger: Trigger | None, violations: Violations, now: datetime
    ) -> Job:
        """Checks the job whole, with ``trigger`` as its trigger; fills defaults that depend
        on the time of creation."""
        job = self.checked(job, trigger, violations, now, "job")
        violations.raise_if_any()
        return job

    def checked(
        self, job: Job, trigger: Trigger | None, violations: Violations, now: datetime, prefix: str
    ) -> Job:
        """``prepare`` for a job named ``prefix`` in the request, adding what is wrong to
        ``violations`` (the job returned is meaningful only if nothing was)."""
        check_job(violations, job, prefix, self._limits)
        if job.executor is ExecutorKind.CELERY:
            self._check_celery(job, prefix, violations)
        elif job.task and job.task not in self._tasks and len(job.task) <= 256:
            violations.add(
                f"{prefix}.task",
                f"{job.task!r} is not a registered task (see ListTasks)",
            )
        job = replace(
            job, trigger=self.check_trigger(trigger, f"{prefix}.trigger", violations, now)
        )
        if job.max_concurrent == 0 and job.overlap_policy is not OverlapPolicy.ALLOW:
            job = replace(job, max_concurrent=DEFAULT_MAX_CONCURRENT)
        return job

    def _check_celery(self, job: Job, prefix: str, violations: Violations) -> None:
        options = job.celery
        check_text(violations, f"{prefix}.celery.queue", options.queue, limit=256)
        check_text(violations, f"{prefix}.celery.routing_key", options.routing_key, limit=256)
        if options.priority is not None and not 0 <= options.priority <= 9:
            violations.add(f"{prefix}.celery.priority", "must be between 0 and 9")
        if not self._celery_enabled():
            violations.raise_if_any()
            raise CeleryNotEnabled()

    def check_trigger(
        self, trigger: Trigger | None, field: str, violations: Violations, now: datetime
    ) -> Trigger:
        if trigger is None:
            violations.add(field, "is required: set cron, interval or date")
            return NO_TRIGGER
        try:
            self._engine.check(trigger, now=now)
        except InvalidArgument as error:
            violations.extend(error, field)
            return trigger
        if isinstance(trigger, IntervalTrigger) and trigger.start_time is None:
            # Anchor the phase now, so a restart does not shift the interval.
            return replace(trigger, start_time=now + trigger.every)
        return trigger

    def first_run(self, job: Job, now: datetime) -> datetime | None:
        if job.paused:
            return None
        return self._engine.next_fire_time(job.trigger, after=now)
