"""Creating jobs, one (CreateJob) or many at once (BatchCreateJobs, all or nothing): request
ids make a retried call return the jobs it made; every entry is checked before any is refused,
with violations named by entry; concurrent CreateJobs share a transaction (group commit).

No gRPC, SQL or APScheduler here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from chronoplane.server.aio import GroupCommit, in_turns
from chronoplane.server.errors import InvalidArgument, JobAlreadyExists
from chronoplane.server.ids import new_job_id
from chronoplane.server.models import Job
from chronoplane.server.rules import NO_TRIGGER, JobRules
from chronoplane.server.schedule import Schedule
from chronoplane.server.security import current_principal
from chronoplane.server.storage.abc import Store
from chronoplane.server.validation import MAX_REQUEST_ID, Violations, check_text

__all__ = ["MAX_BATCH_CREATE", "JobCreation", "NewJob", "check_batch_size"]

# Jobs one BatchCreateJobs may create, and the violations its refusal lists (they travel in
# the status trailers, which clients take up to 8 KiB of).
MAX_BATCH_CREATE = 1_000
MAX_BATCH_VIOLATIONS = 20


@dataclass(frozen=True, kw_only=True)
class NewJob:
    """A job to create as the client gave it: ``values`` are Job fields (a None trigger is
    missing); an empty ``job_id`` asks the server to choose one."""

    values: Mapping[str, Any]
    job_id: str = ""
    paused: bool = False
    request_id: str = ""


class JobCreation:
    def __init__(
        self,
        *,
        store: Store,
        rules: JobRules,
        schedule: Schedule,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._rules = rules
        self.schedule = schedule
        self._clock = clock
        self._creates: GroupCommit[tuple[Job, str | None], Job] = GroupCommit(
            self._insert_jobs, name="job-creates", alone=(JobAlreadyExists,)
        )

    async def create(self, new: Sequence[NewJob | InvalidArgument], *, batch: bool) -> list[Job]:
        """An entry whose request_id made a job before is that job; the others are checked
        (every entry, before any is refused) and inserted in one transaction."""
        prefixes = [f"requests[{n}]." if batch else "" for n in range(len(new))]
        request_ids = [
            n.request_id
            for n in new
            if isinstance(n, NewJob) and n.request_id and len(n.request_id) <= MAX_REQUEST_ID
        ]
        for attempt in range(2):
            earlier = await self._store.get_jobs_by_request_ids(request_ids)
            fresh = await self._new_jobs(new, earlier, prefixes, batch=batch)
            jobs, ids = list(fresh.values()), [_request_id(new[n]) or None for n in fresh]
            try:
                if batch or len(jobs) != 1:
                    stored = await self._store.create_jobs(jobs, request_ids=ids)
                else:  # concurrent CreateJobs share a transaction
                    stored = [await self._creates.submit((jobs[0], ids[0]))]
            except JobAlreadyExists as error:
                if attempt == 0 and request_ids:
                    continue  # perhaps a request_id taken meanwhile (a retry of this call)
                if not batch:
                    raise
                index = next((n for n, job in fresh.items() if job.id == error.job_id), 0)
                raise JobAlreadyExists(error.job_id, field=f"{prefixes[index]}job.id") from error
            async for job in in_turns(stored):
                self.schedule.schedule(job, reschedule=True)
            made = dict(zip(fresh, stored, strict=True))
            return [made.get(n) or earlier[_request_id(entry)] for n, entry in enumerate(new)]
        raise AssertionError("unreachable")

    async def _insert_jobs(self, entries: list[tuple[Job, str | None]]) -> list[Job]:
        """The jobs of concurrent CreateJobs, with their request ids, in one transaction."""
        return await self._store.create_jobs(
            [job for job, _ in entries], request_ids=[request_id for _, request_id in entries]
        )

    async def _new_jobs(
        self,
        new: Sequence[NewJob | InvalidArgument],
        earlier: Mapping[str, Job],
        prefixes: Sequence[str],
        *,
        batch: bool,
    ) -> dict[int, Job]:
        """The jobs to insert, by their index in ``new`` (those not made before); raises
        InvalidArgument with the violations of every entry."""
        violations = Violations()
        now = self._clock()
        checked: dict[int, Job] = {}
        first_of: dict[tuple[str, str], int] = {}
        async for n, entry in in_turns(enumerate(new)):
            prefix = prefixes[n]
            if isinstance(entry, InvalidArgument):
                violations.extend(entry, prefix.rstrip("."))
                continue
            check_text(violations, f"{prefix}request_id", entry.request_id, limit=MAX_REQUEST_ID)
            for field, value in (("request_id", entry.request_id), ("job.id", entry.job_id)):
                first = first_of.setdefault((field, value), n) if value else n
                if first != n:
                    violations.add(f"{prefix}{field}", f"repeats that of requests[{first}]")
            if entry.request_id in earlier:
                continue
            fields = dict(entry.values)
            trigger = fields.pop("trigger", None)
            draft = Job(
                id=entry.job_id or new_job_id(), paused=entry.paused, trigger=NO_TRIGGER, **fields
            )
            checked[n] = self._rules.checked(draft, trigger, violations, now, f"{prefix}job")
        violations.raise_if_any(limit=MAX_BATCH_VIOLATIONS if batch else None, field="requests")
        principal = current_principal()
        fresh: dict[int, Job] = {}
        async for n, job in in_turns(checked.items()):
            fresh[n] = replace(
                job,
                create_time=now,
                next_run_time=self._rules.first_run(job, now),
                created_by=principal,
                updated_by=principal,
            )
        return fresh


def check_batch_size(count: int) -> None:
    if not 1 <= count <= MAX_BATCH_CREATE:
        raise InvalidArgument.field(
            "requests", f"has {count:,} entries; give 1 to {MAX_BATCH_CREATE:,} jobs a call"
        )


def _request_id(entry: NewJob | InvalidArgument) -> str:
    return entry.request_id if isinstance(entry, NewJob) else ""
