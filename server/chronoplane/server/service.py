"""The use cases: what may change when, and what it means for the schedule.

No gRPC, SQL or APScheduler here: the store, the engine and the runner do that.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from chronoplane.server.aio import GroupCommit
from chronoplane.server.creation import JobCreation, NewJob, check_batch_size
from chronoplane.server.dispatch import Dispatcher
from chronoplane.server.engine.abc import Engine
from chronoplane.server.errors import (
    EtagMismatch,
    InvalidArgument,
    TaskNotRegistered,
)
from chronoplane.server.models import (
    AuditEvent,
    AuditQuery,
    EventResource,
    Execution,
    ExecutionQuery,
    ExecutionState,
    ExecutorKind,
    Instance,
    Job,
    JSONObject,
    OverlapPolicy,
    Trigger,
)
from chronoplane.server.pagination import PageTokens, page_size
from chronoplane.server.rules import JobRules
from chronoplane.server.runner import Runner
from chronoplane.server.schedule import HORIZON, TICK, Schedule
from chronoplane.server.security import current_principal
from chronoplane.server.storage.abc import JobChange, JobDeletion, JobRefusal, JobUpdate, Store
from chronoplane.server.tasks import TaskDefinition, TaskRegistry
from chronoplane.server.validation import (
    DEFAULT_LIMITS,
    JOB_ID,
    MAX_REQUEST_ID,
    FieldLimits,
    Violations,
    check_args,
    check_text,
)
from chronoplane.server.watch import StreamControl, WatchFilter, WatchHub, WatchItem

__all__ = [
    "UPDATABLE_FIELDS",
    "Page",
    "SchedulerService",
]

log = logging.getLogger(__name__)

UPDATABLE_FIELDS = frozenset(
    {
        "display_name",
        "description",
        "task",
        "args",
        "trigger",
        "misfire_grace",
        "max_concurrent",
        "labels",
        "misfire_policy",
        "catchup_window",
        "catchup_limit",
        "overlap_policy",
        "retry",
        "timeout",
        "history_limit",
        "executor",
        "celery",
    }
)
MAX_PREVIEW = 1_000
DEFAULT_PREVIEW = 10
MAX_BACKFILL = 1_000
MAX_REASON = 1_024
MAX_KEEP_LAST = 1_000_000
# A backlog of missed fires is walked this far; beyond, it is counted as "at least".
# An update without an etag is a read-modify-write; retried this often when it races.
_UPDATE_ATTEMPTS = 5


T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


def _utcnow() -> datetime:
    return datetime.now(UTC)


MAX_WATCH_JOBS = 100


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
        leader_timeout: timedelta = timedelta(seconds=5),
        clock: Callable[[], datetime] = _utcnow,
        watch_hub: WatchHub | None = None,
        limits: FieldLimits = DEFAULT_LIMITS,
        horizon: timedelta = HORIZON,
    ) -> None:
        self._store = store
        self._limits = limits
        self._hub = watch_hub or WatchHub(store)
        self._engine = engine
        self._runner = runner
        self._tasks = tasks
        self._tokens = page_tokens
        self._clock = clock
        self._leader_timeout = leader_timeout
        # Sends Celery jobs' executions to a broker, when celery_broker_url is set.
        self.dispatcher: Dispatcher | None = None
        # Concurrent updates, pauses, resumes and deletions share a transaction, one change
        # of a job per transaction (decision 0020).
        self._changes: GroupCommit[JobChange, Job | JobRefusal] = GroupCommit(
            self._store.change_jobs, name="job-changes", key=lambda change: change.job_id
        )
        self.schedule = Schedule(
            store=store, engine=engine, runner=runner, clock=clock, horizon=horizon
        )
        self._rules = JobRules(
            engine=engine,
            tasks=tasks,
            limits=limits,
            celery_enabled=lambda: self.dispatcher is not None,
        )
        self._creation = JobCreation(
            store=store, rules=self._rules, schedule=self.schedule, clock=clock
        )

    # -- the leader's schedule (schedule.py) --------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.schedule.leading

    @leading.setter
    def leading(self, value: bool) -> None:
        self.schedule.leading = value

    async def load_schedule(self) -> int:
        """Gives the engine the jobs due within the horizon, with what each missed; returns
        how many."""
        return await self.schedule.load()

    async def sync_job(self, job_id: str) -> None:
        """Brings the leader's engine up to date with the job's row (changed elsewhere)."""
        await self.schedule.sync_job(job_id)

    async def resync(self) -> int:
        """Compares the jobs due within the horizon with the engine and fixes what differs;
        returns how many."""
        return await self.schedule.resync()

    # -- jobs ---------------------------------------------------------------------------------

    async def create_job(
        self, values: Mapping[str, Any], *, job_id: str, paused: bool, request_id: str = ""
    ) -> Job:
        """Creates a job from the client's ``values`` (Job fields; a None trigger is missing)."""
        new = NewJob(values=values, job_id=job_id, paused=paused, request_id=request_id)
        [job] = await self._creation.create([new], batch=False)
        return job

    async def batch_create_jobs(self, new: Sequence[NewJob | InvalidArgument]) -> list[Job]:
        """Creates the jobs, all or none, and returns them in order. An entry that is an
        InvalidArgument is one the transport could not decode (its fields named as CreateJob
        names them); it is refused with the violations of the others."""
        check_batch_size(len(new))
        return await self._creation.create(new, batch=True)

    async def get_job(self, job_id: str) -> Job:
        return await self._store.get_job(job_id)

    async def list_jobs(self, *, size: int, token: str) -> Page[Job]:
        limit = page_size(size, self._limits.page_size)
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
            changed = self._rules.prepare(
                replace(current, **fields, updated_by=current_principal()),
                trigger,
                Violations(),
                now,
            )
            if "trigger" in changes:
                changed = replace(changed, next_run_time=self._rules.first_run(changed, now))
            try:
                stored = await self._change(JobUpdate(job=changed, expected_version=expected))
            except EtagMismatch:
                if etag or attempt == _UPDATE_ATTEMPTS - 1:
                    raise
                continue
            self.schedule.schedule(stored, reschedule="trigger" in changes)
            return stored
        raise AssertionError("unreachable")

    async def _change(self, change: JobChange) -> Job:
        """Writes the change with concurrent ones; raises its own refusal."""
        outcome = await self._changes.submit(change)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def delete_job(self, job_id: str, *, etag: str) -> None:
        expected = None
        if etag:
            expected = _expected_version(job_id, etag, await self._store.get_job(job_id))
        await self._change(JobDeletion(job_id=job_id, expected_version=expected))
        self.schedule.unschedule(job_id)

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
        changed = replace(current, paused=paused, updated_by=current_principal())
        changed = replace(changed, next_run_time=self._rules.first_run(changed, now))
        stored = await self._change(JobUpdate(job=changed, expected_version=expected))
        self.schedule.schedule(stored, reschedule=True)
        return stored

    # -- executions ---------------------------------------------------------------------------

    async def trigger_job(
        self,
        job_id: str,
        *,
        args: JSONObject | None,
        request_id: str,
        overlap_policy: OverlapPolicy | None = None,
    ) -> Execution:
        violations = Violations()
        check_text(violations, "request_id", request_id, limit=MAX_REQUEST_ID)
        if args is not None:
            check_args(violations, "args", args, self._limits)
        violations.raise_if_any()
        job = await self._store.get_job(job_id)
        return await self._runner.trigger(
            job, args=args, request_id=request_id, policy=overlap_policy, by=current_principal()
        )

    async def backfill_job(
        self,
        job_id: str,
        *,
        start: datetime | None,
        end: datetime | None,
        overlap_policy: OverlapPolicy | None,
    ) -> tuple[list[Execution], int]:
        """Runs the job's fires in [start, end), a past range; returns the executions made
        and how many fires had been backfilled before."""
        violations = Violations()
        now = self._clock()
        if start is None:
            violations.add("start_time", "is required")
        if end is None:
            violations.add("end_time", "is required")
        elif end > now:
            violations.add("end_time", "is in the future: backfill runs past fires only")
        if start is not None and end is not None and start >= end:
            violations.add("end_time", "must be after start_time")
        violations.raise_if_any()
        assert start is not None and end is not None
        job = await self._store.get_job(job_id)
        if job.executor is ExecutorKind.INLINE and job.task not in self._tasks:
            raise TaskNotRegistered(job.task)
        fires = self._engine.fires_between(
            job.trigger, start=start, end=end - TICK, limit=MAX_BACKFILL + 1
        )
        if len(fires) > MAX_BACKFILL:
            raise InvalidArgument.field(
                "end_time",
                f"the range holds more than {MAX_BACKFILL} fires (the {MAX_BACKFILL + 1}th is "
                f"at {fires[-1].isoformat()}); backfill it in parts",
            )
        return await self._runner.backfill(
            job, fires, policy=overlap_policy or OverlapPolicy.BUFFER_ALL, by=current_principal()
        )

    async def cancel_execution(self, execution_id: str, *, reason: str) -> Execution:
        violations = Violations()
        check_text(violations, "reason", reason, limit=MAX_REASON)
        violations.raise_if_any()
        return await self._runner.cancel(execution_id, reason=reason, by=current_principal())

    async def purge_executions(
        self, *, job_id: str, older_than: datetime | None, keep_last: int
    ) -> int:
        if older_than is None and keep_last == 0:
            raise InvalidArgument.field(
                "older_than", "is required unless keep_last is set: say what to purge"
            )
        if not 0 <= keep_last <= MAX_KEEP_LAST:
            raise InvalidArgument.field("keep_last", f"must be between 0 and {MAX_KEEP_LAST:,}")
        if job_id:
            await self._store.get_job(job_id)
        return await self._store.purge_executions(
            job_id=job_id or None, ended_before=older_than, keep_last=keep_last
        )

    async def purge_history(
        self, *, max_age: timedelta | None, audit_max_age: timedelta | None = None
    ) -> int:
        """The periodic purge: every job's history_limit, and the server's maximum ages of
        executions and of audit events; returns how many executions went."""
        purged = await self._store.purge_history_limits()
        if max_age is not None:
            purged += await self._store.purge_executions(
                job_id=None, ended_before=self._clock() - max_age, keep_last=0
            )
        if audit_max_age is not None:
            await self._store.purge_audit_events(before=self._clock() - audit_max_age)
        return purged

    # -- the audit log ------------------------------------------------------------------------

    async def record_audits(self, events: Sequence[AuditEvent]) -> None:
        await self._store.record_audits(events)

    async def list_audit_events(
        self, query: AuditQuery, *, size: int, token: str
    ) -> Page[AuditEvent]:
        violations = Violations()
        check_text(violations, "principal", query.principal, limit=256)
        check_text(violations, "rpc", query.rpc, limit=64)
        check_text(violations, "job_id", query.job_id, limit=128)
        check_text(violations, "execution_id", query.execution_id, limit=32)
        if query.after and query.before and query.after >= query.before:
            violations.add("end_time", "must be after start_time")
        violations.raise_if_any()
        limit = page_size(size, self._limits.page_size)
        fingerprint = [
            query.principal,
            query.rpc,
            query.job_id,
            query.execution_id,
            query.after.isoformat() if query.after else None,
            query.before.isoformat() if query.before else None,
        ]
        before = self._tokens.decode(token, "audit", fingerprint)
        page = await self._store.list_audit_events(
            query, before=None if before is None else int(before), limit=limit
        )
        next_token = (
            self._tokens.encode("audit", str(page.next_before), fingerprint)
            if page.next_before is not None
            else ""
        )
        return Page(items=page.events, next_page_token=next_token)

    async def get_execution(self, execution_id: str) -> Execution:
        return await self._store.get_execution(execution_id)

    async def list_executions(
        self, query: ExecutionQuery, *, size: int, token: str
    ) -> Page[Execution]:
        limit = page_size(size, self._limits.page_size)
        fingerprint = [
            query.job_id,
            sorted(s.value for s in query.states),
            query.scheduled_after.isoformat() if query.scheduled_after else None,
            query.scheduled_before.isoformat() if query.scheduled_before else None,
        ]
        before = self._tokens.decode(token, "executions", fingerprint)
        page = await self._store.list_executions(query, before=before, limit=limit)
        if query.job_id and not page.executions:
            # NOT_FOUND for a job that does not exist; one that has executions does (they
            # are deleted with it, in one transaction).
            await self._store.get_job(query.job_id)
        next_token = (
            self._tokens.encode("executions", page.next_before, fingerprint)
            if page.next_before
            else ""
        )
        return Page(items=page.executions, next_page_token=next_token)

    # -- watches ------------------------------------------------------------------------------

    def watch(
        self,
        resource: EventResource,
        *,
        job_ids: list[str],
        states: frozenset[ExecutionState] = frozenset(),
        labels: Mapping[str, str],
        after: int | None,
        snapshot: bool,
        control: StreamControl | None = None,
    ) -> AsyncIterator[WatchItem]:
        """A stream of changes of executions or of jobs (see watch.py)."""
        violations = Violations()
        if len(job_ids) > MAX_WATCH_JOBS:
            violations.add("job_ids", f"names {len(job_ids)} jobs; at most {MAX_WATCH_JOBS}")
        for n, job_id in enumerate(job_ids[:MAX_WATCH_JOBS]):
            if not JOB_ID.match(job_id):
                violations.add(f"job_ids[{n}]", "is not a job id ([A-Za-z0-9._-], 1-128)")
        labels_limit, value_limit = self._limits.labels, self._limits.label_value
        if len(labels) > labels_limit:
            violations.add(
                "labels", f"has {len(labels)} entries; at most {labels_limit} (max_labels)"
            )
        for key, value in list(labels.items())[:labels_limit]:
            check_text(violations, f"labels[{key[:64]!r}]", key, limit=63, required=True)
            check_text(
                violations,
                f"labels[{key[:64]!r}]",
                value,
                limit=value_limit,
                setting="max_label_value",
            )
        if after is not None and after < 0:
            violations.add("after_cursor", "must be 0 or more")
        if after is not None and snapshot:
            violations.add(
                "snapshot", "cannot be combined with after_cursor (a snapshot starts afresh)"
            )
        violations.raise_if_any()
        watch_filter = WatchFilter(
            resource=resource,
            job_ids=frozenset(job_ids),
            states=states,
            labels=tuple(sorted(labels.items())),
        )
        return self._hub.watch(watch_filter, after=after, snapshot=snapshot, control=control)

    @property
    def watch_buffer(self) -> int:
        return self._hub.buffer

    # -- instances ----------------------------------------------------------------------------

    async def list_instances(self) -> list[Instance]:
        return await self._store.list_instances(leader_timeout=self._leader_timeout)

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
        checked = self._rules.check_trigger(trigger, "trigger", violations, now)
        violations.raise_if_any()
        return self._engine.preview(checked, start=now, count=count or DEFAULT_PREVIEW)


def _listed() -> str:
    return ", ".join(sorted(UPDATABLE_FIELDS))
