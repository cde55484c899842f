"""chronoctl jobs apply: make the server's jobs what a file says.

The file (YAML or JSON; ``-`` is stdin) holds a list of jobs, each a Job in proto3 JSON form,
the form ``chronoctl --json jobs get`` and grpcurl print (snake_case names are accepted too);
or an object whose ``jobs`` are that list, which is what ``chronoctl --json jobs list``
prints. Every job needs its ``id``. Output-only fields (etag, times, last execution, actors)
are ignored, so a listing can be edited and applied back.

A job the server lacks is created (BatchCreateJobs, 1,000 a call). A job it has is compared
field by field: only the fields the file sets count (a field left out keeps the server's
value, and so does a sub-field left out of a message, such as a trigger's start time), and
``args`` and ``labels`` are compared whole. Changed fields are set with UpdateJob, with the
etag the job had when it was read and a field mask of what changed; ``paused`` with PauseJob
or ResumeJob. ``--prune`` deletes the jobs the file does not name (with their etags).
``--dry-run`` prints what would change and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client.errors import InvalidArgument
from chronoplane.v1 import job_pb2

__all__ = [
    "MANAGED",
    "Plan",
    "Wanted",
    "applied_text",
    "apply",
    "carry_out",
    "changed_fields",
    "load",
    "plan",
    "wanted",
]

BATCH = 1_000
# What apply compares and sets: the fields UpdateJob can change, and paused.
MANAGED = (
    "display_name",
    "description",
    "task",
    "args",
    "trigger",
    "paused",
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
)
# Compared whole: a key left out of the file is a key to remove.
_WHOLE = frozenset({"args", "labels"})
_OUTPUT_ONLY = frozenset(
    {
        "etag",
        "create_time",
        "update_time",
        "next_run_time",
        "last_execution",
        "created_by",
        "updated_by",
    }
)
_FIELDS = job_pb2.Job.DESCRIPTOR.fields_by_name
_BY_JSON_NAME: dict[str, str] = {str(f.json_name): f.name for f in job_pb2.Job.DESCRIPTOR.fields}


@dataclass(frozen=True)
class Wanted:
    """A job of the file, and the fields it sets."""

    job: job_pb2.Job
    fields: frozenset[str]


@dataclass
class Plan:
    create: list[job_pb2.Job] = field(default_factory=list)
    # The job as the file wants it, with the server's etag, and the fields that differ.
    update: list[tuple[job_pb2.Job, list[str]]] = field(default_factory=list)
    delete: list[job_pb2.Job] = field(default_factory=list)
    unchanged: int = 0


# -- reading the file -----------------------------------------------------------------------


def _problem(where: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: {why}", field_violations={where: why})


def _plain(value: Any) -> Any:
    """YAML's own types made JSON: an unquoted time is a datetime to YAML, a string to JSON."""
    if isinstance(value, datetime | date):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _yaml(path: str, text: str) -> Any:
    # PyYAML is the client's one optional dependency: chronoplane-client[yaml].
    try:
        import yaml
    except ModuleNotFoundError:
        raise _problem(
            path,
            "is not JSON, and reading YAML needs PyYAML: pip install 'chronoplane-client[yaml]'",
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise _problem(path, f"is neither JSON nor YAML: {error}") from None


def load(path: str) -> list[Any]:
    """The file's list of jobs, as JSON values."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = _plain(_yaml(path, text))
    if isinstance(document, dict) and set(document) == {"jobs"}:
        document = document["jobs"]
    elif isinstance(document, dict) and set(document) == {"job"}:  # `jobs get --json`
        document = [document]
    if document is None:
        document = []
    if not isinstance(document, list):
        raise _problem(path, "must hold a list of jobs, or an object with a list of jobs")
    return document


def wanted(entries: Sequence[Any]) -> list[Wanted]:
    jobs: list[Wanted] = []
    seen: dict[str, int] = {}
    for n, entry in enumerate(entries):
        where = f"jobs[{n}]"
        if isinstance(entry, dict) and set(entry) == {"job"}:  # as `jobs get --json` prints
            entry = entry["job"]
        if not isinstance(entry, dict):
            raise _problem(where, "is not an object")
        names = {_BY_JSON_NAME.get(str(key), str(key)) for key in entry}
        kept = {k: v for k, v in entry.items() if _BY_JSON_NAME.get(k, k) not in _OUTPUT_ONLY}
        try:
            job = json_format.ParseDict(kept, job_pb2.Job())
        except json_format.ParseError as error:
            raise _problem(where, str(error)) from None
        if not job.id:
            raise _problem(f"{where}.id", "is required")
        if job.id in seen:
            raise _problem(f"{where}.id", f"repeats that of jobs[{seen[job.id]}]")
        seen[job.id] = n
        jobs.append(Wanted(job, frozenset(names & set(MANAGED))))
    return jobs


# -- the plan -------------------------------------------------------------------------------


def _covers(want: Any, have: Any) -> bool:
    """Whether ``have`` has every value ``want`` sets (objects: key by key)."""
    if isinstance(want, dict) and isinstance(have, dict):
        return all(_covers(value, have.get(key)) for key, value in want.items())
    return bool(want == have)


def changed_fields(wanted: Wanted, current: job_pb2.Job) -> list[str]:
    want = json_format.MessageToDict(wanted.job)
    have = json_format.MessageToDict(current)
    changed = []
    for name in MANAGED:
        if name not in wanted.fields:
            continue
        key = _FIELDS[name].json_name
        mine, theirs = want.get(key), have.get(key)
        same = mine == theirs if name in _WHOLE else _covers(mine, theirs)
        if not same:
            changed.append(name)
    return changed


def plan(jobs: Sequence[Wanted], current: Iterable[job_pb2.Job], *, prune: bool) -> Plan:
    stored = {job.id: job for job in current}
    result = Plan()
    for wanted_job in jobs:
        job = stored.pop(wanted_job.job.id, None)
        if job is None:
            result.create.append(wanted_job.job)
            continue
        changed = changed_fields(wanted_job, job)
        if changed:
            update = job_pb2.Job()
            update.CopyFrom(wanted_job.job)
            update.etag = job.etag
            result.update.append((update, changed))
        else:
            result.unchanged += 1
    if prune:
        result.delete = sorted(stored.values(), key=lambda job: job.id)
    return result


# -- carrying it out ------------------------------------------------------------------------


async def _update(client: ProtoClient, job: job_pb2.Job, fields: list[str]) -> None:
    etag = job.etag
    mask = [name for name in fields if name != "paused"]
    if mask:
        etag = (await client.update_job_fields(job, mask)).etag
    if "paused" in fields:
        if job.paused:
            await client.pause_job(job.id, etag=etag)
        else:
            await client.resume_job(job.id, etag=etag)


async def carry_out(client: ProtoClient, todo: Plan) -> None:
    for start in range(0, len(todo.create), BATCH):
        await client.batch_create_jobs(todo.create[start : start + BATCH])
    for job, fields in todo.update:
        await _update(client, job, fields)
    for job in todo.delete:
        await client.delete_job(job.id, etag=job.etag)


async def apply(client: ProtoClient, args: argparse.Namespace) -> Message:
    jobs = wanted(load(args.file))
    todo = plan(jobs, await client.list_jobs(), prune=args.prune)
    if not args.dry_run:
        await carry_out(client, todo)
    return _result(todo, dry_run=args.dry_run)


# -- the output -----------------------------------------------------------------------------


def _result(todo: Plan, *, dry_run: bool) -> struct_pb2.Struct:
    """What was done (or, in a dry run, would be): proto3 JSON of it with --json."""
    result = struct_pb2.Struct()
    result.update(
        {
            "dryRun": dry_run,
            "created": [job.id for job in todo.create],
            "updated": [{"id": job.id, "fields": fields} for job, fields in todo.update],
            "deleted": [job.id for job in todo.delete],
            "unchanged": todo.unchanged,
        }
    )
    return result


def applied_text(result: struct_pb2.Struct) -> str:
    values: Mapping[str, Any] = json_format.MessageToDict(result)
    lines = [f"create  {job_id}" for job_id in values["created"]]
    lines += [
        f"update  {change['id']}  ({', '.join(change['fields'])})" for change in values["updated"]
    ]
    lines += [f"delete  {job_id}" for job_id in values["deleted"]]
    created, updated, deleted = (
        f"{len(values[key]):,}" for key in ("created", "updated", "deleted")
    )
    unchanged = f"{int(values['unchanged']):,}"
    if values["dryRun"]:
        summary = (
            f"dry run: {created} to create, {updated} to update, {deleted} to delete, "
            f"{unchanged} unchanged; nothing was written"
        )
    else:
        summary = f"{created} created, {updated} updated, {deleted} deleted, {unchanged} unchanged"
    return "\n".join([*lines, summary])
