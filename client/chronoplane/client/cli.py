"""chronoctl: create, inspect, trigger, backfill and pause the jobs of a Chronoplane server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from chronoplane.client._client import AsyncClient
from chronoplane.client._convert import (
    MISFIRE_POLICIES,
    OVERLAP_POLICIES,
    at,
    cron,
    every,
    from_timestamp,
    retry_policy,
    timestamp,
)
from chronoplane.client.errors import ChronoplaneError, InvalidArgument
from chronoplane.v1 import execution_pb2, job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["main"]

DEFAULT_ADDRESS = "127.0.0.1:50051"

_Run = Callable[[AsyncClient, argparse.Namespace], Awaitable[Message]]

# -- argument types -------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_STATES = {
    name.removeprefix("EXECUTION_STATE_").lower(): value
    for name, value in execution_pb2.ExecutionState.items()
    if value != execution_pb2.EXECUTION_STATE_UNSPECIFIED
}


def _duration(text: str) -> timedelta:
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 10m or 1h30m")
    return timedelta(seconds=sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('not a JSON object like {"region": "eu"}')
    return value


def _label(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time like 2030-01-31T09:00:00+01:00"
        ) from None
    return value if value.tzinfo else value.astimezone()  # no zone given: local time


def _when(text: str) -> datetime:
    """An ISO 8601 time, "now", or a duration meaning that long ago ("2h")."""
    if text == "now":
        return datetime.now(UTC)
    if _DURATION_PART.match(text):
        try:
            return datetime.now(UTC) - _duration(text)
        except argparse.ArgumentTypeError:
            pass
    try:
        return _instant(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time like 2030-01-31T09:00:00+01:00, "
            "a duration ago like 2h, or now"
        ) from None


# -- commands -------------------------------------------------------------------------------------


def _trigger(args: argparse.Namespace) -> job_pb2.Trigger:
    start, end = getattr(args, "start", None), getattr(args, "end", None)
    jitter = getattr(args, "jitter", None)
    if args.cron is not None:
        return cron(args.cron, args.tz or "", start=start, end=end, jitter=jitter)
    if args.every is not None:
        return every(args.every, start=start, end=end, jitter=jitter)
    return at(args.at, jitter=jitter)


def _retry(args: argparse.Namespace) -> job_pb2.RetryPolicy | None:
    if args.max_attempts is None:
        return None
    return retry_policy(
        args.max_attempts,
        initial_backoff=args.initial_backoff,
        backoff_multiplier=args.backoff_multiplier or 0.0,
        max_backoff=args.max_backoff,
        retry_on=args.retry_on,
    )


async def _instances(client: AsyncClient, args: argparse.Namespace) -> Message:
    return pb.ListInstancesResponse(instances=await client.list_instances())


async def _audit(client: AsyncClient, args: argparse.Namespace) -> Message:
    events = await client.list_audit_events(
        principal=args.principal,
        rpc=args.rpc,
        job_id=args.job,
        execution_id=args.execution,
        start_time=args.since,
        limit=args.limit,
    )
    return pb.ListAuditEventsResponse(audit_events=events)


async def _tasks(client: AsyncClient, args: argparse.Namespace) -> Message:
    return pb.ListTasksResponse(tasks=await client.list_tasks())


async def _jobs_list(client: AsyncClient, args: argparse.Namespace) -> Message:
    return pb.ListJobsResponse(jobs=await client.list_jobs())


async def _jobs_get(client: AsyncClient, args: argparse.Namespace) -> Message:
    return await client.get_job(args.id)


async def _jobs_create(client: AsyncClient, args: argparse.Namespace) -> Message:
    return await client.create_job(
        args.id,
        task=args.task,
        trigger=_trigger(args),
        args=args.args,
        description=args.description,
        paused=args.paused,
        misfire_grace=args.misfire_grace,
        misfire_policy=args.misfire_policy,
        catchup_window=args.catchup_window,
        catchup_limit=args.catchup_limit,
        overlap_policy=args.overlap,
        max_concurrent=args.max_concurrent,
        retry=_retry(args),
        timeout=args.timeout,
        history_limit=args.history_limit,
        labels=dict(args.label),
        celery=_celery(args),
    )


def _celery(args: argparse.Namespace) -> job_pb2.CeleryOptions | None:
    if not args.celery:
        return None
    options = job_pb2.CeleryOptions(queue=args.queue, routing_key=args.routing_key)
    if args.priority is not None:
        options.priority = args.priority
    return options


async def _jobs_pause(client: AsyncClient, args: argparse.Namespace) -> Message:
    return await client.pause_job(args.id)


async def _jobs_resume(client: AsyncClient, args: argparse.Namespace) -> Message:
    return await client.resume_job(args.id)


async def _jobs_delete(client: AsyncClient, args: argparse.Namespace) -> Message:
    await client.delete_job(args.id)
    return pb.DeleteJobResponse()


async def _jobs_trigger(client: AsyncClient, args: argparse.Namespace) -> Message:
    return await client.trigger_job(
        args.id, args=args.args, request_id=args.request_id, overlap_policy=args.overlap
    )


async def _jobs_backfill(client: AsyncClient, args: argparse.Namespace) -> Message:
    return await client.backfill_job(
        args.id, start=args.start, end=args.end, overlap_policy=args.overlap
    )


async def _executions_list(client: AsyncClient, args: argparse.Namespace) -> Message:
    executions = await client.list_executions(
        job_id=args.job, states=[_STATES[name] for name in args.state], limit=args.limit
    )
    return pb.ListExecutionsResponse(executions=executions)


_KIND_WORDS = {
    pb.WATCH_EVENT_KIND_ADDED: "added",
    pb.WATCH_EVENT_KIND_MODIFIED: "modified",
    pb.WATCH_EVENT_KIND_DELETED: "deleted",
    pb.WATCH_EVENT_KIND_SNAPSHOT: "current",
    pb.WATCH_EVENT_KIND_SNAPSHOT_END: "(the snapshot ends; live events follow)",
    pb.WATCH_EVENT_KIND_PROGRESS: "progress",
}


def _event_line(event: pb.WatchExecutionsResponse | pb.WatchJobsResponse, *, json: bool) -> str:
    if json:
        return json_format.MessageToJson(event, indent=None)
    head = f"{event.cursor:>8}  {_KIND_WORDS.get(event.kind, '?'):<8}"
    if event.kind == pb.WATCH_EVENT_KIND_SNAPSHOT_END:
        return head.rstrip()
    if isinstance(event, pb.WatchExecutionsResponse) and event.HasField("execution"):
        e = event.execution
        return f"{head}  {e.id}  {e.job_id}  {_state(e.state)}  {e.error_message[:60]}".rstrip()
    if isinstance(event, pb.WatchJobsResponse) and event.HasField("job"):
        job = event.job
        return f"{head}  {job.id}  {'paused' if job.paused else 'active'}  etag {job.etag}"
    return head.rstrip()


async def _print_events(events: Any, args: argparse.Namespace) -> Message:
    """Prints each event as it comes, until the stream ends or Ctrl-C."""
    async for event in events:
        if event.kind == pb.WATCH_EVENT_KIND_PROGRESS and not args.progress:
            continue
        sys.stdout.write(_event_line(event, json=args.json) + "\n")
        sys.stdout.flush()
    return pb.DeleteJobResponse()  # prints nothing


async def _executions_watch(client: AsyncClient, args: argparse.Namespace) -> Message:
    events = client.watch_executions(
        job_ids=args.job,
        states=[_STATES[name] for name in args.state],
        labels=dict(args.label),
        after_cursor=args.after,
        snapshot=args.snapshot,
    )
    return await _print_events(events, args)


async def _jobs_watch(client: AsyncClient, args: argparse.Namespace) -> Message:
    events = client.watch_jobs(
        job_ids=args.job, labels=dict(args.label), after_cursor=args.after, snapshot=args.snapshot
    )
    return await _print_events(events, args)


def _add_watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--job", action="append", default=[], metavar="ID", help="only this job's (repeatable)"
    )
    parser.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only jobs with this label (repeatable)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--after", type=int, metavar="CURSOR", help="resume: the events after this cursor"
    )
    start.add_argument("--snapshot", action="store_true", help="start with what is there now")
    parser.add_argument("--progress", action="store_true", help="print progress events too")


async def _executions_get(client: AsyncClient, args: argparse.Namespace) -> Message:
    return await client.get_execution(args.id)


async def _executions_cancel(client: AsyncClient, args: argparse.Namespace) -> Message:
    return await client.cancel_execution(args.id, reason=args.reason)


async def _executions_purge(client: AsyncClient, args: argparse.Namespace) -> Message:
    purged = await client.purge_executions(
        job_id=args.job, older_than=args.older_than, keep_last=args.keep_last
    )
    return pb.PurgeExecutionsResponse(purged_count=purged)


async def _preview(client: AsyncClient, args: argparse.Namespace) -> Message:
    times = await client.preview_trigger(_trigger(args), count=args.count)
    return pb.PreviewTriggerResponse(fire_times=[timestamp(t) for t in times])


# -- text output ----------------------------------------------------------------------------------


def _time(message: Message, field: str) -> str:
    """A Timestamp field in ISO 8601 UTC, or "" when unset."""
    if not message.HasField(field):
        return ""
    value = from_timestamp(getattr(message, field))
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def _span(value: timedelta) -> str:
    """5s, 1h30m, 1.25s, 3.2ms, 0.041ms."""
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.3g}ms"
    if seconds < 60 or not seconds.is_integer():
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    text, rest = "", int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        text += f"{count}{unit}" if count else ""
    return text


def _integral(value: Any) -> Any:
    """JSON numbers travel as doubles; show 1.0 as the 1 it was given as."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def _json_field(message: Message, field: str) -> str:
    """A Struct or Value field as compact JSON, or "" when unset."""
    if not message.HasField(field):
        return ""
    return json.dumps(_integral(json_format.MessageToDict(getattr(message, field))))


def _state(state: execution_pb2.ExecutionState.ValueType) -> str:
    return execution_pb2.ExecutionState.Name(state).removeprefix("EXECUTION_STATE_")


def _source(source: execution_pb2.ExecutionSource.ValueType) -> str:
    return execution_pb2.ExecutionSource.Name(source).removeprefix("EXECUTION_SOURCE_")


_MISFIRE_NAMES = {value: name for name, value in MISFIRE_POLICIES.items()}
_OVERLAP_NAMES = {value: name for name, value in OVERLAP_POLICIES.items()}


def _trigger_text(trigger: job_pb2.Trigger, *, bounds: bool = False) -> str:
    """The kind and schedule; with ``bounds``, also when it starts and stops firing."""
    spec: job_pb2.CronTrigger | job_pb2.IntervalTrigger
    kind = trigger.WhichOneof("kind")
    if kind == "cron":
        spec = trigger.cron
        text = f"cron {spec.expression} ({spec.time_zone or 'UTC'})"
    elif kind == "interval":
        spec = trigger.interval
        text = f"every {_span(spec.every.ToTimedelta())}"
    elif kind == "date":
        return f"at {_time(trigger.date, 'run_time')}"
    else:
        return ""
    if bounds and spec.HasField("start_time"):
        text += f" from {_time(spec, 'start_time')}"
    if bounds and spec.HasField("end_time"):
        text += f" until {_time(spec, 'end_time')}"
    return text


def _optional_span(message: Message, field: str) -> str:
    """A Duration field as a span, or "" when unset."""
    return _span(getattr(message, field).ToTimedelta()) if message.HasField(field) else ""


def _retry_text(job: job_pb2.Job) -> str:
    """3 attempts; backoff 1s, x2, at most 10m; on ConnectionError, TimeoutError."""
    retry = job.retry
    if retry.max_attempts <= 1:
        return ""
    first = _optional_span(retry, "initial_backoff") or "1s"
    most = _optional_span(retry, "max_backoff") or "10m"
    parts = [
        f"{retry.max_attempts} attempts",
        f"backoff {first}, x{retry.backoff_multiplier or 2:g}, at most {most}",
    ]
    if retry.retry_on:
        parts.append("on " + ", ".join(retry.retry_on))
    return "; ".join(parts)


def _max_concurrent_text(job: job_pb2.Job) -> str:
    if job.max_concurrent:
        return str(job.max_concurrent)
    return "no limit" if job.overlap_policy == job_pb2.OVERLAP_POLICY_ALLOW else "1"


def _fields(pairs: Iterable[tuple[str, str]]) -> str:
    """``key: value`` lines, aligned, leaving out empty values."""
    shown = [(key + ":", value) for key, value in pairs if value]
    width = max(len(key) for key, _ in shown)
    indent = "\n" + " " * (width + 1)  # continuation lines of a multi-line value
    return "\n".join(f"{key:<{width}} " + value.replace("\n", indent) for key, value in shown)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns aligned on the widest cell, two spaces apart."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _job_text(job: job_pb2.Job) -> str:
    last = job.last_execution
    return _fields(
        [
            ("id", job.id),
            ("display name", job.display_name),
            ("description", job.description),
            ("task", job.task),
            ("args", _json_field(job, "args")),
            ("trigger", _trigger_text(job.trigger, bounds=True)),
            ("jitter", _optional_span(job.trigger, "jitter")),
            ("paused", "yes" if job.paused else "no"),
            ("next run", _time(job, "next_run_time")),
            ("last execution", f"{last.id} {_state(last.state)}" if last.id else ""),
            ("misfire grace", _span(job.misfire_grace.ToTimedelta())),
            ("misfire policy", _MISFIRE_NAMES.get(job.misfire_policy, "run_once")),
            ("catch-up window", _optional_span(job, "catchup_window")),
            (
                "catch-up limit",
                str(job.catchup_limit or 10)
                if job.misfire_policy == job_pb2.MISFIRE_POLICY_RUN_ALL
                else "",
            ),
            ("overlap policy", _OVERLAP_NAMES.get(job.overlap_policy, "skip")),
            ("max concurrent", _max_concurrent_text(job)),
            ("retry", _retry_text(job)),
            ("timeout", _optional_span(job, "timeout")),
            ("history limit", str(job.history_limit) if job.history_limit else ""),
            ("executor", _celery_text(job)),
            ("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))),
            ("created", " by ".join(filter(None, [_time(job, "create_time"), job.created_by]))),
            ("updated", " by ".join(filter(None, [_time(job, "update_time"), job.updated_by]))),
            ("etag", job.etag),
        ]
    )


def _celery_text(job: job_pb2.Job) -> str:
    """celery (queue reports, routing key r, priority 5), or "" for an inline job."""
    if job.executor != execution_pb2.EXECUTOR_CELERY:
        return ""
    options = job.celery
    parts = [f"queue {options.queue or 'celery'}"]
    if options.routing_key:
        parts.append(f"routing key {options.routing_key}")
    if options.HasField("priority"):
        parts.append(f"priority {options.priority}")
    return f"celery ({', '.join(parts)})"


def _execution_text(execution: execution_pb2.Execution) -> str:
    return _fields(
        [
            ("id", execution.id),
            ("job", execution.job_id),
            ("task", execution.task),
            ("args", _json_field(execution, "args")),
            ("state", _state(execution.state)),
            ("source", _source(execution.source)),
            ("attempt", str(execution.attempt) if execution.attempt else ""),
            ("first attempt", execution.first_execution_id),
            ("request id", execution.request_id),
            ("triggered by", execution.triggered_by),
            ("cancelled by", execution.cancelled_by),
            ("scheduled", _time(execution, "scheduled_time")),
            ("started", _time(execution, "start_time")),
            ("ended", _time(execution, "end_time")),
            ("duration", _duration_of(execution)),
            ("result", _json_field(execution, "result")),
            ("error type", execution.error_type),
            ("error", execution.error_message),
            ("missed", _missed_text(execution)),
            ("note", execution.note),
            ("instance", execution.instance_id),
            ("executor", "celery" if execution.executor == execution_pb2.EXECUTOR_CELERY else ""),
            ("dispatched", _time(execution, "dispatch_time")),
            ("worker", execution.worker),
            ("pending because", execution.pending_reason),
            ("traceback", execution.error_traceback.rstrip()),
        ]
    )


def _duration_of(execution: execution_pb2.Execution) -> str:
    return _span(execution.duration.ToTimedelta()) if execution.HasField("duration") else ""


def _missed_text(execution: execution_pb2.Execution) -> str:
    """42 fires, 2030-01-01T00:00:00Z to 2030-01-01T00:41:00Z."""
    missed = execution.missed
    if not execution.HasField("missed") or not missed.count:
        return ""
    count = f"{'at least ' if missed.count_is_lower_bound else ''}{missed.count:,}"
    text = f"{count} fire{'' if missed.count == 1 else 's'}"
    first, last = _time(missed, "first_time"), _time(missed, "last_time")
    if first and last and first != last:
        return f"{text}, {first} to {last}"
    return f"{text}, {first or last}" if first or last else text


def _job_row(job: job_pb2.Job) -> list[str]:
    next_run = "paused" if job.paused else _time(job, "next_run_time") or "-"
    last = _state(job.last_execution.state) if job.last_execution.id else "-"
    return [job.id, job.task, _trigger_text(job.trigger), next_run, last]


def _execution_row(execution: execution_pb2.Execution, *, attempts: bool) -> list[str]:
    error = execution.error_message
    return [
        execution.id,
        execution.job_id,
        _state(execution.state),
        _source(execution.source),
        *([str(execution.attempt or 1)] if attempts else []),
        _time(execution, "scheduled_time"),
        _duration_of(execution) or "-",
        error if len(error) <= 60 else error[:57] + "...",
    ]


def _tasks_table(response: pb.ListTasksResponse) -> str:
    return _table(["NAME", "DESCRIPTION"], ([t.name, t.description] for t in response.tasks))


def _instances_table(response: pb.ListInstancesResponse) -> str:
    return _table(
        ["ID", "NAME", "HOST", "PID", "ADDRESS", "ROLE", "LAST SEEN"],
        (
            [
                i.id,
                i.name,
                i.host,
                str(i.pid),
                i.address,
                "leader" if i.leader else "follower",
                _time(i, "last_seen_time"),
            ]
            for i in response.instances
        ),
    )


def _audit_table(response: pb.ListAuditEventsResponse) -> str:
    return _table(
        ["TIME", "PRINCIPAL", "RPC", "JOB", "EXECUTION", "CODE"],
        (
            [_time(e, "time"), e.principal, e.rpc, e.job_id, e.execution_id, e.code]
            for e in response.audit_events
        ),
    )


def _jobs_table(response: pb.ListJobsResponse) -> str:
    return _table(["ID", "TASK", "TRIGGER", "NEXT RUN", "LAST"], map(_job_row, response.jobs))


def _executions_table(response: pb.ListExecutionsResponse | pb.BackfillJobResponse) -> str:
    """The ATTEMPT column appears when some execution is a retry."""
    attempts = any(e.attempt > 1 for e in response.executions)
    headers = ["ID", "JOB", "STATE", "SOURCE", *(["ATTEMPT"] if attempts else [])]
    headers += ["SCHEDULED", "DURATION", "ERROR"]
    rows = (_execution_row(e, attempts=attempts) for e in response.executions)
    return _table(headers, rows)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _backfilled(response: pb.BackfillJobResponse) -> str:
    lines = [_executions_table(response)] if response.executions else []
    summary = f"{_plural(len(response.executions), 'execution')} created"
    if response.already_backfilled:
        done = _plural(response.already_backfilled, "fire")
        summary += f"; {done} of the range had been backfilled before and did not run again"
    return "\n".join([*lines, summary])


def _purged(response: pb.PurgeExecutionsResponse) -> str:
    return f"purged {_plural(response.purged_count, 'execution')}"


def _fire_times(response: pb.PreviewTriggerResponse) -> str:
    times = (from_timestamp(t) for t in response.fire_times)
    return "\n".join(t.isoformat().replace("+00:00", "Z") for t in times)


def _nothing(response: Message) -> str:
    return ""


_RENDERERS: dict[type[Message], Callable[[Any], str]] = {
    job_pb2.Job: _job_text,
    execution_pb2.Execution: _execution_text,
    pb.ListTasksResponse: _tasks_table,
    pb.ListInstancesResponse: _instances_table,
    pb.ListAuditEventsResponse: _audit_table,
    pb.ListJobsResponse: _jobs_table,
    pb.ListExecutionsResponse: _executions_table,
    pb.PreviewTriggerResponse: _fire_times,
    pb.DeleteJobResponse: _nothing,
    pb.BackfillJobResponse: _backfilled,
    pb.PurgeExecutionsResponse: _purged,
}


# -- the parser -----------------------------------------------------------------------------------


def _add_globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--address and --json, accepted before the command and after it.

    On the commands their default is SUPPRESS, so that leaving them out there keeps what was
    given (or defaulted) before the command.
    """
    address = os.environ.get("CHRONOPLANE_ADDRESS", DEFAULT_ADDRESS)
    parser.add_argument(
        "--address",
        default=address if top else argparse.SUPPRESS,
        metavar="HOST:PORT",
        help=f"the server (env CHRONOPLANE_ADDRESS; now {address})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print proto3 JSON instead of text",
    )


def _command(group: Any, name: str, run: _Run, summary: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=summary, description=summary)
    _add_globals(parser, top=False)
    parser.set_defaults(run=run)
    return parser


def _add_trigger_options(parser: argparse.ArgumentParser, *, date: bool) -> None:
    kinds = parser.add_mutually_exclusive_group(required=True)
    kinds.add_argument("--cron", metavar="EXPR", help='a cron expression, e.g. "30 2 * * *"')
    kinds.add_argument("--every", type=_duration, metavar="DURATION", help="e.g. 5s, 10m, 1h")
    if date:
        kinds.add_argument(
            "--at", type=_instant, metavar="ISO8601", help="once, at this time (local if no zone)"
        )
    parser.add_argument("--tz", metavar="ZONE", help="IANA time zone of --cron (default UTC)")


def _add_overlap_option(parser: argparse._ActionsContainer, help_text: str) -> None:
    parser.add_argument(
        "--overlap",
        "--overlap-policy",
        dest="overlap",
        choices=list(OVERLAP_POLICIES),
        metavar="POLICY",
        help=f"{help_text}; one of {', '.join(OVERLAP_POLICIES)}",
    )


def _add_policy_options(create: argparse.ArgumentParser) -> None:
    policies = create.add_argument_group("policies")
    policies.add_argument(
        "--misfire-grace", type=_duration, metavar="DURATION", help="how late a fire may start"
    )
    policies.add_argument(
        "--misfire-policy",
        choices=list(MISFIRE_POLICIES),
        metavar="POLICY",
        help="what missed fires do (default run_once); one of " + ", ".join(MISFIRE_POLICIES),
    )
    policies.add_argument(
        "--catchup-window", type=_duration, metavar="DURATION", help="never run older missed fires"
    )
    policies.add_argument(
        "--catchup-limit", type=int, default=0, metavar="N", help="run_all runs at most N (10)"
    )
    _add_overlap_option(
        policies, "what a fire does when max-concurrent runs are going (default skip)"
    )
    policies.add_argument("--max-concurrent", type=int, default=0, metavar="N", help="default 1")
    policies.add_argument(
        "--timeout", type=_duration, metavar="DURATION", help="stop runs longer than this"
    )
    policies.add_argument(
        "--history-limit", type=int, default=0, metavar="N", help="keep the newest N executions"
    )
    celery = create.add_argument_group("Celery (the server needs --celery-broker-url)")
    celery.add_argument(
        "--celery",
        action="store_true",
        help="run on Celery workers: --task names a task registered with chronoplane.celery",
    )
    celery.add_argument("--queue", default="", help="the Celery queue (default: celery)")
    celery.add_argument("--routing-key", default="", metavar="KEY", help="the routing key")
    celery.add_argument("--priority", type=int, metavar="0-9", help="the message priority")
    retry = create.add_argument_group("retries (of failed and timed-out runs)")
    retry.add_argument("--max-attempts", type=int, metavar="N", help="runs in all, the first too")
    retry.add_argument("--initial-backoff", type=_duration, metavar="DURATION", help="default 1s")
    retry.add_argument("--backoff-multiplier", type=float, metavar="X", help="default 2")
    retry.add_argument("--max-backoff", type=_duration, metavar="DURATION", help="default 10m")
    retry.add_argument(
        "--retry-on",
        nargs="+",
        action="extend",
        default=[],
        metavar="EXCEPTION",
        help="only failures raising these, e.g. ConnectionError (default: any)",
    )


def _add_job_commands(group: Any) -> None:
    _command(group, "list", _jobs_list, "list every job")
    _add_watch_options(
        _command(group, "watch", _jobs_watch, "print job events as they happen (Ctrl-C stops)")
    )
    _command(group, "get", _jobs_get, "show one job").add_argument("id", metavar="ID")
    create = _command(group, "create", _jobs_create, "create a job")
    create.add_argument("id", metavar="ID")
    create.add_argument("--task", required=True, help="a registered task (see: chronoctl tasks)")
    _add_trigger_options(create, date=True)
    create.add_argument(
        "--start", type=_instant, metavar="ISO8601", help="no fire before (--cron, --every)"
    )
    create.add_argument(
        "--end", type=_instant, metavar="ISO8601", help="no fire after (--cron, --every)"
    )
    create.add_argument(
        "--jitter", type=_duration, metavar="DURATION", help="start each run up to this late"
    )
    create.add_argument("--args", type=_json_object, metavar="JSON", help="the task's arguments")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.add_argument(
        "--label", type=_label, action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    create.add_argument("--description", default="")
    _add_policy_options(create)
    for name, run, summary in [
        ("pause", _jobs_pause, "stop a job from firing"),
        ("resume", _jobs_resume, "let a paused job fire again"),
        ("delete", _jobs_delete, "delete a job and its execution history"),
    ]:
        _command(group, name, run, summary).add_argument("id", metavar="ID")
    trigger = _command(group, "trigger", _jobs_trigger, "run a job now")
    trigger.add_argument("id", metavar="ID")
    trigger.add_argument("--args", type=_json_object, metavar="JSON", help="instead of the job's")
    trigger.add_argument("--request-id", default="", help="an idempotency key")
    _add_overlap_option(trigger, "instead of the job's overlap policy")
    backfill = _command(
        group, "backfill", _jobs_backfill, "run the fires a job had in a past time range"
    )
    backfill.add_argument("id", metavar="ID")
    when = "an ISO 8601 time, a duration ago (2h) or now"
    backfill.add_argument(
        "--start", type=_when, required=True, metavar="TIME", help=f"the first fire: {when}"
    )
    backfill.add_argument(
        "--end", type=_when, required=True, metavar="TIME", help=f"exclusive: {when}"
    )
    _add_overlap_option(backfill, "when runs are all taken (default buffer_all)")


def _add_state_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--state",
        nargs="+",
        action="extend",
        default=[],
        choices=sorted(_STATES),
        metavar="STATE",
        help=help_text,
    )


def _add_execution_commands(group: Any) -> None:
    listing = _command(group, "list", _executions_list, "list executions, newest first")
    listing.add_argument("--job", default="", metavar="ID", help="only this job's")
    _add_state_option(listing, "only executions in these states: " + ", ".join(sorted(_STATES)))
    listing.add_argument("--limit", type=int, default=20, metavar="N", help="default 20")
    _command(group, "get", _executions_get, "show one execution").add_argument("id", metavar="ID")
    watch = _command(
        group, "watch", _executions_watch, "print execution events as they happen (Ctrl-C stops)"
    )
    _add_watch_options(watch)
    _add_state_option(watch, "only events after which the execution is in one of these states")
    cancel = _command(group, "cancel", _executions_cancel, "stop a pending or running execution")
    cancel.add_argument("id", metavar="ID")
    cancel.add_argument("--reason", default="", help="kept in the execution's error message")
    purge = _command(group, "purge", _executions_purge, "delete finished executions")
    purge.add_argument("--job", default="", metavar="ID", help="only this job's")
    purge.add_argument(
        "--older-than",
        type=_when,
        metavar="TIME",
        help="those that ended before: an ISO 8601 time or a duration ago (7d)",
    )
    purge.add_argument(
        "--keep-last", type=int, default=0, metavar="N", help="all but each job's newest N"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronoctl", description=__doc__)
    _add_globals(parser, top=True)
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    _command(commands, "tasks", _tasks, "list the tasks registered on the server")
    _command(commands, "instances", _instances, "list the server processes and which one leads")
    jobs = commands.add_parser("jobs", help="create, inspect, trigger, backfill and pause jobs")
    _add_job_commands(jobs.add_subparsers(metavar="COMMAND", required=True))
    executions = commands.add_parser("executions", help="inspect, cancel and purge executions")
    _add_execution_commands(executions.add_subparsers(metavar="COMMAND", required=True))
    audit = _command(commands, "audit", _audit, "list the audit log of changes, newest first")
    audit.add_argument("--principal", default="", help="only calls by this: token:NAME, ...")
    audit.add_argument("--rpc", default="", help="only calls of this RPC, e.g. TriggerJob")
    audit.add_argument("--job", default="", metavar="ID", help="only calls about this job")
    audit.add_argument("--execution", default="", metavar="ID", help="only about this execution")
    audit.add_argument(
        "--since", type=_when, metavar="TIME", help="an ISO 8601 time or a duration ago (1h)"
    )
    audit.add_argument("--limit", type=int, default=20, metavar="N", help="default 20")
    preview = _command(commands, "preview", _preview, "show when a trigger would fire")
    _add_trigger_options(preview, date=False)
    preview.add_argument("--count", type=int, default=10, metavar="N", help="default 10")
    return parser


# -- main -----------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> Message:
    client = AsyncClient(
        args.address,
        token=os.environ.get("CHRONOPLANE_TOKEN") or None,
        tls_ca=os.environ.get("CHRONOPLANE_TLS_CA") or None,
        tls_cert=os.environ.get("CHRONOPLANE_TLS_CERT") or None,
        tls_key=os.environ.get("CHRONOPLANE_TLS_KEY") or None,
    )
    async with client:
        message: Message = await args.run(client, args)
        return message


def _report(error: ChronoplaneError) -> None:
    if isinstance(error, InvalidArgument) and error.field_violations:
        # The message repeats the violations; one line per field reads better.
        lines = [f"chronoctl: {error.code.name}:"]
        lines += [f"  {field}: {why}" for field, why in error.field_violations.items()]
    else:
        lines = [f"chronoctl: {error.code.name}: {error.message}"]
    sys.stderr.write("\n".join(lines) + "\n")


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say: options that go with others."""
    if getattr(args, "tz", None) is not None and args.cron is None:
        parser.error("--tz goes with --cron")
    if args.run is _jobs_create:
        if args.at is not None and (args.start is not None or args.end is not None):
            parser.error("--start and --end go with --cron or --every")
        retry = [args.initial_backoff, args.backoff_multiplier, args.max_backoff]
        if args.max_attempts is None and (any(v is not None for v in retry) or args.retry_on):
            parser.error("the retry options go with --max-attempts")
    if args.run is _jobs_create and not args.celery:
        if args.queue or args.routing_key or args.priority is not None:
            parser.error("--queue, --routing-key and --priority go with --celery")
    if args.run is _executions_purge and args.older_than is None and not args.keep_last:
        parser.error("say what to purge: --older-than, --keep-last or both")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        message = asyncio.run(_run(args))
    except ChronoplaneError as error:
        _report(error)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # chronoctl executions watch | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    text = json_format.MessageToJson(message) if args.json else _RENDERERS[type(message)](message)
    if text:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
