"""The use cases: what may change when, and what it means for the schedule.

No gRPC, SQL or APScheduler here: the store, the engine and the runner do that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from chronoplane.server.engine.abc import Engine
from chronoplane.server.errors import EtagMismatch, InvalidArgument, JobAlreadyExists
from chronoplane.server.ids import new_job_id
from chronoplane.server.models import (
    DateTrigger,
    Execution,
    ExecutionQuery,
    IntervalTrigger,
    Job,
    JSONObject,
    Trigger,
)
from chronoplane.server.pagination import PageTokens, page_size
from chronoplane.server.runner import Runner
from chronoplane.server.storage.abc import Store
from chronoplane.server.tasks import TaskDefinition, TaskRegistry
from chronoplane.server.validation import (
    MAX_REQUEST_ID,
    Violations,
    check_args,
    check_job,
    check_text,
)

__all__ = ["UPDATABLE_FIELDS", "Page", "SchedulerService"]

log = logging.getLogger(__name__)

UPDATABLE_FIELDS = frozenset(
    {
        "display_name",
        "description",
        "task",
        "args",
        "trigger",
        "misfire_grace",
        "coalesce",
        "max_concurrent",
        "labels",
    }
)
MAX_PREVIEW = 1_000
DEFAULT_PREVIEW = 10
# An update without an etag is a read-modify-write; retried this often when it races.
_UPDATE_ATTEMPTS = 5


T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


# Stands in for a missing trigger while the rest of a job is checked; never stored.
_NO_TRIGGER: Trigger = DateTrigger(run_time=datetime.max.replace(tzinfo=UTC))


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _expected_version(job_id: str, etag: str, current: Job) -> int:
    if etag and etag != current.etag:
        raise EtagMismatch(job_id, etag, current.etag)
    return current.version


class SchedulerService:
    def __init__(
        self,
        *,
        store: Store,
        engine: Engine,
        runner: Runner,
        tasks: TaskRegistry,
        page_tokens: PageTokens,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._engine = engine
        self._runner = runner
        self._tasks = tasks
        self._tokens = page_tokens
        self._clock = clock

    # -- start-up -----------------------------------------------------------------------------

    async def load_schedule(self) -> int:
        """Gives the engine every active job from the database; returns how many."""
        jobs = await self._store.list_schedulable_jobs()
        for job in jobs:
            self._engine.schedule(job, reschedule=True)
        return len(jobs)

    # -- jobs ---------------------------------------------------------------------------------

    async def create_job(
        self, values: Mapping[str, Any], *, job_id: str, paused: bool, request_id: str = ""
    ) -> Job:
        """Creates a job from the client's ``values`` (Job fields; a None trigger is missing)."""
        violations = Violations()
        check_text(violations, "request_id", request_id, limit=MAX_REQUEST_ID)
        if request_id:
            violations.raise_if_any()
            earlier = await self._store.get_job_by_request_id(request_id)
            if earlier is not None:
                return earlier
        now = self._clock()
        fields = dict(values)
        trigger = fields.pop("trigger", None)
        draft = Job(id=job_id or new_job_id(), paused=paused, trigger=_NO_TRIGGER, **fields)
        job = self._prepare(draft, trigger, violations, now)
        job = replace(job, create_time=now, next_run_time=self._first_run(job, now))
        try:
            stored = await self._store.create_job(job, request_id=request_id or None)
        except JobAlreadyExists:
            earlier = await self._store.get_job_by_request_id(request_id) if request_id else None
            if earlier is None:
                raise
            return earlier
        self._engine.schedule(stored, reschedule=True)
        return stored

    async def get_job(self, job_id: str) -> Job:
        return await self._store.get_job(job_id)

    async def list_jobs(self, *, size: int, token: str) -> Page[Job]:
        limit = page_size(size)
        after = self._tokens.decode(token, "jobs", None)
        page = await self._store.list_jobs(after=after, limit=limit)
        next_token = self._tokens.encode("jobs", page.next_after, None) if page.next_after else ""
        return Page(items=page.jobs, next_page_token=next_token)

    async def update_job(self, job_id: str, changes: Mapping[str, Any], *, etag: str) -> Job:
        """Applies ``changes`` (field name to new value; a None trigger means it was left out)."""
        if not changes:
            raise InvalidArgument.field(
                "update_mask", f"is required: name the fields to change, or '*' for {_listed()}"
            )
        unknown = sorted(set(changes) - UPDATABLE_FIELDS)
        if unknown:
            raise InvalidArgument.field(
                "update_mask", f"cannot update {', '.join(unknown)}; updatable: {_listed()}"
            )
        for attempt in range(_UPDATE_ATTEMPTS):
            current = await self._store.get_job(job_id)
            expected = _expected_version(job_id, etag, current)
            now = self._clock()
            fields = dict(changes)
            trigger = fields.pop("trigger") if "trigger" in fields else current.trigger
            changed = self._prepare(replace(current, **fields), trigger, Violations(), now)
            if "trigger" in changes:
                changed = replace(changed, next_run_time=self._first_run(changed, now))
            try:
                stored = await self._store.update_job(changed, expected_version=expected)
            except EtagMismatch:
                if etag or attempt == _UPDATE_ATTEMPTS - 1:
                    raise
                continue
            self._engine.schedule(stored, reschedule="trigger" in changes)
            return stored
        raise AssertionError("unreachable")

    async def delete_job(self, job_id: str, *, etag: str) -> None:
        expected = None
        if etag:
            expected = _expected_version(job_id, etag, await self._store.get_job(job_id))
        await self._store.delete_job(job_id, expected_version=expected)
        self._engine.unschedule(job_id)

    async def pause_job(self, job_id: str, *, etag: str) -> Job:
        return await self._set_paused(job_id, etag, paused=True)

    async def resume_job(self, job_id: str, *, etag: str) -> Job:
        return await self._set_paused(job_id, etag, paused=False)

    async def _set_paused(self, job_id: str, etag: str, *, paused: bool) -> Job:
        current = await self._store.get_job(job_id)
        expected = _expected_version(job_id, etag, current)
        if current.paused == paused:
            return current
        now = self._clock()
        changed = replace(current, paused=paused)
        changed = replace(changed, next_run_time=self._first_run(changed, now))
        stored = await self._store.update_job(changed, expected_version=expected)
        self._engine.schedule(stored, reschedule=True)
        return stored

    def _prepare(
        self, job: Job, trigger: Trigger | None, violations: Violations, now: datetime
    ) -> Job:
        """Checks the job whole, with ``trigger`` as its trigger; fills defaults that depend
        on the time of creation."""
        prefix = "job"
        check_job(violations, job, prefix)
        if job.task and job.task not in self._tasks and len(job.task) <= 256:
            violations.add(
                f"{prefix}.task",
                f"{job.task!r} is not a registered task (see ListTasks)",
            )
        checked = self._check_trigger(trigger, f"{prefix}.trigger", violations, now)
        violations.raise_if_any()
        return replace(job, trigger=checked)

    def _check_trigger(
        self, trigger: Trigger | None, field: str, violations: Violations, now: datetime
    ) -> Trigger:
        if trigger is None:
            violations.add(field, "is required: set cron, interval or date")
            return _NO_TRIGGER
        try:
            self._engine.check(trigger, now=now)
        except InvalidArgument as error:
            violations.extend(error, field)
            return trigger
        if isinstance(trigger, IntervalTrigger) and trigger.start_time is None:
            # Anchor the phase now, so a restart does not shift the interval.
            return replace(trigger, start_time=now + trigger.every)
        return trigger

    def _first_run(self, job: Job, now: datetime) -> datetime | None:
        if job.paused:
            return None
        return self._engine.next_fire_time(job.trigger, after=now)

    # -- executions ---------------------------------------------------------------------------

    async def trigger_job(
        self, job_id: str, *, args: JSONObject | None, request_id: str
    ) -> Execution:
        violations = Violations()
        check_text(violations, "request_id", request_id, limit=MAX_REQUEST_ID)
        if args is not None:
            check_args(violations, "args", args)
        violations.raise_if_any()
        job = await self._store.get_job(job_id)
        return await self._runner.trigger(job, args=args, request_id=request_id)

    async def get_execution(self, execution_id: str) -> Execution:
        return await self._store.get_execution(execution_id)

    async def list_executions(
        self, query: ExecutionQuery, *, size: int, token: str
    ) -> Page[Execution]:
        limit = page_size(size)
        if query.job_id:
            await self._store.get_job(query.job_id)
        fingerprint = [
            query.job_id,
            sorted(s.value for s in query.states),
            query.scheduled_after.isoformat() if query.scheduled_after else None,
            query.scheduled_before.isoformat() if query.scheduled_before else None,
        ]
        before = self._tokens.decode(token, "executions", fingerprint)
        page = await self._store.list_executions(query, before=before, limit=limit)
        next_token = (
            self._tokens.encode("executions", page.next_before, fingerprint)
            if page.next_before
            else ""
        )
        return Page(items=page.executions, next_page_token=next_token)

    # -- tasks and triggers -------------------------------------------------------------------

    def list_tasks(self) -> list[TaskDefinition]:
        return list(self._tasks)

    def preview_trigger(
        self, trigger: Trigger | None, *, count: int, start: datetime | None
    ) -> list[datetime]:
        violations = Violations()
        if not 0 <= count <= MAX_PREVIEW:
            violations.add("count", f"must be between 0 and {MAX_PREVIEW}")
        now = start or self._clock()
        checked = self._check_trigger(trigger, "trigger", violations, now)
        violations.raise_if_any()
        return self._engine.preview(checked, start=now, count=count or DEFAULT_PREVIEW)


def _listed() -> str:
    return ", ".join(sorted(UPDATABLE_FIELDS))
