"""chronoctl executions: list, show, cancel and purge executions."""

from __future__ import annotations

import argparse
from typing import Any

from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client.cli.args import STATES, add_state_option, when
from chronoplane.client.cli.output import (
    command,
    fields,
    json_field,
    plural,
    source,
    span,
    state,
    table,
    time,
)
from chronoplane.client.cli.watch import add_watch_options, watch_executions
from chronoplane.v1 import execution_pb2
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["RENDERERS", "add_commands", "execution_text", "executions_table"]


async def _list(client: ProtoClient, args: argparse.Namespace) -> Message:
    executions = await client.list_executions(
        job_id=args.job, states=[STATES[name] for name in args.state], limit=args.limit
    )
    return pb.ListExecutionsResponse(executions=executions)


async def _get(client: ProtoClient, args: argparse.Namespace) -> Message:
    return await client.get_execution(args.id)


async def _cancel(client: ProtoClient, args: argparse.Namespace) -> Message:
    return await client.cancel_execution(args.id, reason=args.reason)


async def _purge(client: ProtoClient, args: argparse.Namespace) -> Message:
    purged = await client.purge_executions(
        job_id=args.job, older_than=args.older_than, keep_last=args.keep_last
    )
    return pb.PurgeExecutionsResponse(purged_count=purged)


def _check_purge(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.older_than is None and not args.keep_last:
        parser.error("say what to purge: --older-than, --keep-last or both")


def add_commands(group: Any) -> None:
    listing = command(group, "list", _list, "list executions, newest first")
    listing.add_argument("--job", default="", metavar="ID", help="only this job's")
    add_state_option(listing, "only executions in these states: " + ", ".join(sorted(STATES)))
    listing.add_argument("--limit", type=int, default=20, metavar="N", help="default 20")
    command(group, "get", _get, "show one execution").add_argument("id", metavar="ID")
    watch = command(
        group, "watch", watch_executions, "print execution events as they happen (Ctrl-C stops)"
    )
    add_watch_options(watch)
    add_state_option(watch, "only events after which the execution is in one of these states")
    cancel = command(group, "cancel", _cancel, "stop a pending or running execution")
    cancel.add_argument("id", metavar="ID")
    cancel.add_argument("--reason", default="", help="kept in the execution's error message")
    purge = command(group, "purge", _purge, "delete finished executions", check=_check_purge)
    purge.add_argument("--job", default="", metavar="ID", help="only this job's")
    purge.add_argument(
        "--older-than",
        type=when,
        metavar="TIME",
        help="those that ended before: an ISO 8601 time or a duration ago (7d)",
    )
    purge.add_argument(
        "--keep-last", type=int, default=0, metavar="N", help="all but each job's newest N"
    )


# -- the output -----------------------------------------------------------------------------


def execution_text(execution: execution_pb2.Execution) -> str:
    return fields([*_what_text(execution), *_outcome_text(execution)])


def _what_text(execution: execution_pb2.Execution) -> list[tuple[str, str]]:
    return [
        ("id", execution.id),
        ("job", execution.job_id),
        ("task", execution.task),
        ("args", json_field(execution, "args")),
        ("state", state(execution.state)),
        ("source", source(execution.source)),
        ("attempt", str(execution.attempt) if execution.attempt else ""),
        ("first attempt", execution.first_execution_id),
        ("request id", execution.request_id),
        ("triggered by", execution.triggered_by),
        ("cancelled by", execution.cancelled_by),
        ("scheduled", time(execution, "scheduled_time")),
        ("started", time(execution, "start_time")),
        ("ended", time(execution, "end_time")),
        ("duration", _duration_of(execution)),
    ]


def _outcome_text(execution: execution_pb2.Execution) -> list[tuple[str, str]]:
    celery = execution.executor == execution_pb2.EXECUTOR_CELERY
    return [
        ("result", json_field(execution, "result")),
        ("error type", execution.error_type),
        ("error", execution.error_message),
        ("missed", _missed_text(execution)),
        ("note", execution.note),
        ("instance", execution.instance_id),
        ("executor", "celery" if celery else ""),
        ("dispatched", time(execution, "dispatch_time")),
        ("worker", execution.worker),
        ("pending because", execution.pending_reason),
        ("traceback", execution.error_traceback.rstrip()),
    ]


def _duration_of(execution: execution_pb2.Execution) -> str:
    return span(execution.duration.ToTimedelta()) if execution.HasField("duration") else ""


def _missed_text(execution: execution_pb2.Execution) -> str:
    """42 fires, 2030-01-01T00:00:00Z to 2030-01-01T00:41:00Z."""
    missed = execution.missed
    if not execution.HasField("missed") or not missed.count:
        return ""
    count = f"{'at least ' if missed.count_is_lower_bound else ''}{missed.count:,}"
    text = f"{count} fire{'' if missed.count == 1 else 's'}"
    first, last = time(missed, "first_time"), time(missed, "last_time")
    if first and last and first != last:
        return f"{text}, {first} to {last}"
    return f"{text}, {first or last}" if first or last else text


def _execution_row(execution: execution_pb2.Execution, *, attempts: bool) -> list[str]:
    error = execution.error_message
    return [
        execution.id,
        execution.job_id,
        state(execution.state),
        source(execution.source),
        *([str(execution.attempt or 1)] if attempts else []),
        time(execution, "scheduled_time"),
        _duration_of(execution) or "-",
        error if len(error) <= 60 else error[:57] + "...",
    ]


def executions_table(response: pb.ListExecutionsResponse | pb.BackfillJobResponse) -> str:
    """The ATTEMPT column appears when some execution is a retry."""
    attempts = any(e.attempt > 1 for e in response.executions)
    headers = ["ID", "JOB", "STATE", "SOURCE", *(["ATTEMPT"] if attempts else [])]
    headers += ["SCHEDULED", "DURATION", "ERROR"]
    rows = (_execution_row(e, attempts=attempts) for e in response.executions)
    return table(headers, rows)


def _purged(response: pb.PurgeExecutionsResponse) -> str:
    return f"purged {plural(response.purged_count, 'execution')}"


RENDERERS: dict[type[Message], Any] = {
    execution_pb2.Execution: execution_text,
    pb.ListExecutionsResponse: executions_table,
    pb.PurgeExecutionsResponse: _purged,
}
