"""chronoctl jobs: create, list, show, pause, resume, delete, trigger and backfill jobs, and
apply a file of them (apply.py)."""

from __future__ import annotations

import argparse
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client._convert import MISFIRE_POLICIES, OVERLAP_POLICIES, retry_policy
from chronoplane.client.cli.apply import __doc__ as apply_doc
from chronoplane.client.cli.apply import applied_text, apply
from chronoplane.client.cli.args import (
    add_overlap_option,
    add_trigger_options,
    duration,
    instant,
    json_object,
    label,
    trigger_of,
    when,
)
from chronoplane.client.cli.executions import executions_table
from chronoplane.client.cli.output import (
    command,
    fields,
    json_field,
    nothing,
    optional_span,
    plural,
    proto_json,
    span,
    state,
    table,
    time,
)
from chronoplane.client.cli.watch import add_watch_options, watch_jobs
from chronoplane.v1 import execution_pb2, job_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["RENDERERS", "add_commands", "job_text"]


# -- the commands ---------------------------------------------------------------------------


async def _list(client: ProtoClient, args: argparse.Namespace) -> Message:
    return pb.ListJobsResponse(jobs=await client.list_jobs())


async def _get(client: ProtoClient, args: argparse.Namespace) -> Message:
    return await client.get_job(args.id)


async def _create(client: ProtoClient, args: argparse.Namespace) -> Message:
    return await client.create_job(
        args.id,
        task=args.task,
        trigger=trigger_of(args),
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


def _celery(args: argparse.Namespace) -> job_pb2.CeleryOptions | None:
    if not args.celery:
        return None
    options = job_pb2.CeleryOptions(queue=args.queue, routing_key=args.routing_key)
    if args.priority is not None:
        options.priority = args.priority
    return options


def _check_create(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.at is not None and (args.start is not None or args.end is not None):
        parser.error("--start and --end go with --cron or --every")
    retry = [args.initial_backoff, args.backoff_multiplier, args.max_backoff]
    if args.max_attempts is None and (any(v is not None for v in retry) or args.retry_on):
        parser.error("the retry options go with --max-attempts")
    if not args.celery and (args.queue or args.routing_key or args.priority is not None):
        parser.error("--queue, --routing-key and --priority go with --celery")


async def _pause(client: ProtoClient, args: argparse.Namespace) -> Message:
    return await client.pause_job(args.id)


async def _resume(client: ProtoClient, args: argparse.Namespace) -> Message:
    return await client.resume_job(args.id)


async def _delete(client: ProtoClient, args: argparse.Namespace) -> Message:
    await client.delete_job(args.id)
    return pb.DeleteJobResponse()


def _render_delete(response: Message, args: argparse.Namespace) -> str:
    """grpcurl's empty object for scripts; for people, what is gone."""
    if args.output == "json":
        return proto_json(response)
    return f"deleted job {args.id} and its execution history"


async def _trigger(client: ProtoClient, args: argparse.Namespace) -> Message:
    return await client.trigger_job(
        args.id, args=args.args, request_id=args.request_id, overlap_policy=args.overlap
    )


async def _backfill(client: ProtoClient, args: argparse.Namespace) -> Message:
    return await client.backfill_job(
        args.id, start=args.start, end=args.end, overlap_policy=args.overlap
    )


# -- the parser -----------------------------------------------------------------------------


def add_commands(group: Any) -> None:
    command(group, "list", _list, "list every job")
    add_watch_options(
        command(group, "watch", watch_jobs, "print job events as they happen (Ctrl-C stops)")
    )
    command(group, "get", _get, "show one job").add_argument("id", metavar="ID")
    _add_create(group)
    for name, run, summary in [
        ("pause", _pause, "stop a job from firing"),
        ("resume", _resume, "let a paused job fire again"),
    ]:
        command(group, name, run, summary).add_argument("id", metavar="ID")
    delete = command(group, "delete", _delete, "delete a job and its execution history")
    delete.add_argument("id", metavar="ID")
    delete.set_defaults(render=_render_delete)
    trigger = command(group, "trigger", _trigger, "run a job now")
    trigger.add_argument("id", metavar="ID")
    trigger.add_argument("--args", type=json_object, metavar="JSON", help="instead of the job's")
    trigger.add_argument("--request-id", default="", help="an idempotency key")
    add_overlap_option(trigger, "instead of the job's overlap policy")
    _add_backfill(group)
    _add_apply(group)


def _add_apply(group: Any) -> None:
    summary = "create, update (and with --prune delete) jobs to match a YAML or JSON file"
    command_ = command(group, "apply", apply, summary)
    command_.description = (apply_doc or "").split("\n\n", 1)[1]
    command_.formatter_class = argparse.RawDescriptionHelpFormatter
    command_.add_argument(
        "-f", "--file", required=True, metavar="FILE", help="the jobs (YAML or JSON; - is stdin)"
    )
    command_.add_argument(
        "--prune", action="store_true", help="delete the jobs on the server the file leaves out"
    )
    command_.add_argument(
        "--dry-run", action="store_true", help="print what would change; change nothing"
    )


def _add_create(group: Any) -> None:
    create = command(group, "create", _create, "create a job", check=_check_create)
    create.add_argument("id", metavar="ID")
    create.add_argument("--task", required=True, help="a registered task (see: chronoctl tasks)")
    add_trigger_options(create, date=True)
    create.add_argument(
        "--start", type=instant, metavar="ISO8601", help="no fire before (--cron, --every)"
    )
    create.add_argument(
        "--end", type=instant, metavar="ISO8601", help="no fire after (--cron, --every)"
    )
    create.add_argument(
        "--jitter", type=duration, metavar="DURATION", help="start each run up to this late"
    )
    create.add_argument("--args", type=json_object, metavar="JSON", help="the task's arguments")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.add_argument(
        "--label", type=label, action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    create.add_argument("--description", default="")
    _add_policy_options(create)
    _add_celery_options(create)
    _add_retry_options(create)


def _add_policy_options(create: argparse.ArgumentParser) -> None:
    policies = create.add_argument_group("policies")
    policies.add_argument(
        "--misfire-grace", type=duration, metavar="DURATION", help="how late a fire may start"
    )
    policies.add_argument(
        "--misfire-policy",
        choices=list(MISFIRE_POLICIES),
        metavar="POLICY",
        help="what missed fires do (default run_once); one of " + ", ".join(MISFIRE_POLICIES),
    )
    policies.add_argument(
        "--catchup-window", type=duration, metavar="DURATION", help="never run older missed fires"
    )
    policies.add_argument(
        "--catchup-limit", type=int, default=0, metavar="N", help="run_all runs at most N (10)"
    )
    add_overlap_option(
        policies, "what a fire does when max-concurrent runs are going (default skip)"
    )
    policies.add_argument("--max-concurrent", type=int, default=0, metavar="N", help="default 1")
    policies.add_argument(
        "--timeout", type=duration, metavar="DURATION", help="stop runs longer than this"
    )
    policies.add_argument(
        "--history-limit", type=int, default=0, metavar="N", help="keep the newest N executions"
    )


def _add_celery_options(create: argparse.ArgumentParser) -> None:
    celery = create.add_argument_group("Celery (the server needs --celery-broker-url)")
    celery.add_argument(
        "--celery",
        action="store_true",
        help="run on Celery workers: --task names a task registered with chronoplane.celery",
    )
    celery.add_argument("--queue", default="", help="the Celery queue (default: celery)")
    celery.add_argument("--routing-key", default="", metavar="KEY", help="the routing key")
    celery.add_argument("--priority", type=int, metavar="0-9", help="the message priority")


def _add_retry_options(create: argparse.ArgumentParser) -> None:
    retry = create.add_argument_group("retries (of failed and timed-out runs)")
    retry.add_argument("--max-attempts", type=int, metavar="N", help="runs in all, the first too")
    retry.add_argument("--initial-backoff", type=duration, metavar="DURATION", help="default 1s")
    retry.add_argument("--backoff-multiplier", type=float, metavar="X", help="default 2")
    retry.add_argument("--max-backoff", type=duration, metavar="DURATION", help="default 10m")
    retry.add_argument(
        "--retry-on",
        nargs="+",
        action="extend",
        default=[],
        metavar="EXCEPTION",
        help="only failures raising these, e.g. ConnectionError (default: any)",
    )


def _add_backfill(group: Any) -> None:
    backfill = command(group, "backfill", _backfill, "run the fires a job had in a past time range")
    backfill.add_argument("id", metavar="ID")
    what = "an ISO 8601 time, a duration ago (2h) or now"
    backfill.add_argument(
        "--start", type=when, required=True, metavar="TIME", help=f"the first fire: {what}"
    )
    backfill.add_argument(
        "--end", type=when, required=True, metavar="TIME", help=f"exclusive: {what}"
    )
    add_overlap_option(backfill, "when runs are all taken (default buffer_all)")


# -- the output -----------------------------------------------------------------------------

_MISFIRE_NAMES = {value: name for name, value in MISFIRE_POLICIES.items()}
_OVERLAP_NAMES = {value: name for name, value in OVERLAP_POLICIES.items()}


def trigger_text(trigger: job_pb2.Trigger, *, bounds: bool = False) -> str:
    """The kind and schedule; with ``bounds``, also when it starts and stops firing."""
    spec: job_pb2.CronTrigger | job_pb2.IntervalTrigger
    kind = trigger.WhichOneof("kind")
    if kind == "cron":
        spec = trigger.cron
        text = f"cron {spec.expression} ({spec.time_zone or 'UTC'})"
        if spec.day_match == job_pb2.DAY_MATCH_ALL:
            text += " both day fields"
    elif kind == "interval":
        spec = trigger.interval
        text = f"every {span(spec.every.ToTimedelta())}"
    elif kind == "date":
        date = trigger.date
        if date.local_time:
            return f"at {date.local_time} {date.time_zone} ({time(date, 'run_time')})"
        return f"at {time(date, 'run_time')}"
    else:
        return ""
    if bounds and spec.HasField("start_time"):
        text += f" from {time(spec, 'start_time')}"
    if bounds and spec.HasField("end_time"):
        text += f" until {time(spec, 'end_time')}"
    return text


def _retry_text(job: job_pb2.Job) -> str:
    """3 attempts; backoff 1s, x2, at most 10m; on ConnectionError, TimeoutError."""
    retry = job.retry
    if retry.max_attempts <= 1:
        return ""
    first = optional_span(retry, "initial_backoff") or "1s"
    most = optional_span(retry, "max_backoff") or "10m"
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


def job_text(job: job_pb2.Job) -> str:
    return fields([*_what_text(job), *_policy_text(job), *_record_text(job)])


def _what_text(job: job_pb2.Job) -> list[tuple[str, str]]:
    last = job.last_execution
    return [
        ("id", job.id),
        ("display name", job.display_name),
        ("description", job.description),
        ("task", job.task),
        ("args", json_field(job, "args")),
        ("trigger", trigger_text(job.trigger, bounds=True)),
        ("jitter", optional_span(job.trigger, "jitter")),
        ("paused", "yes" if job.paused else "no"),
        ("next run", time(job, "next_run_time")),
        ("last execution", f"{last.id} {state(last.state)}" if last.id else ""),
    ]


def _policy_text(job: job_pb2.Job) -> list[tuple[str, str]]:
    run_all = job.misfire_policy == job_pb2.MISFIRE_POLICY_RUN_ALL
    return [
        ("misfire grace", span(job.misfire_grace.ToTimedelta())),
        ("misfire policy", _MISFIRE_NAMES.get(job.misfire_policy, "run_once")),
        ("catch-up window", optional_span(job, "catchup_window")),
        ("catch-up limit", str(job.catchup_limit or 10) if run_all else ""),
        ("overlap policy", _OVERLAP_NAMES.get(job.overlap_policy, "skip")),
        ("max concurrent", _max_concurrent_text(job)),
        ("retry", _retry_text(job)),
        ("timeout", optional_span(job, "timeout")),
        ("history limit", str(job.history_limit) if job.history_limit else ""),
        ("executor", _celery_text(job)),
    ]


def _record_text(job: job_pb2.Job) -> list[tuple[str, str]]:
    return [
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))),
        ("created", " by ".join(filter(None, [time(job, "create_time"), job.created_by]))),
        ("updated", " by ".join(filter(None, [time(job, "update_time"), job.updated_by]))),
        ("etag", job.etag),
    ]


def _job_row(job: job_pb2.Job) -> list[str]:
    next_run = "paused" if job.paused else time(job, "next_run_time") or "-"
    last = state(job.last_execution.state) if job.last_execution.id else "-"
    return [job.id, job.task, trigger_text(job.trigger), next_run, last]


def _jobs_table(response: pb.ListJobsResponse) -> str:
    return table(["ID", "TASK", "TRIGGER", "NEXT RUN", "LAST"], map(_job_row, response.jobs))


def _backfilled(response: pb.BackfillJobResponse) -> str:
    lines = [executions_table(response)] if response.executions else []
    summary = f"{plural(len(response.executions), 'execution')} created"
    if response.already_backfilled:
        done = plural(response.already_backfilled, "fire")
        summary += f"; {done} of the range had been backfilled before and did not run again"
    return "\n".join([*lines, summary])


RENDERERS: dict[type[Message], Any] = {
    job_pb2.Job: job_text,
    pb.ListJobsResponse: _jobs_table,
    pb.DeleteJobResponse: nothing,
    pb.BackfillJobResponse: _backfilled,
    struct_pb2.Struct: applied_text,
}
