"""chronoctl jobs watch, executions watch: print events as they happen, one line each (or a
JSON object a line with --output json), resuming on their own across reconnects, until
Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client.cli.args import STATES, label
from chronoplane.client.cli.output import proto_json, state
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["add_watch_options", "event_line", "watch_executions", "watch_jobs"]

_KIND_WORDS = {
    pb.WATCH_EVENT_KIND_ADDED: "added",
    pb.WATCH_EVENT_KIND_MODIFIED: "modified",
    pb.WATCH_EVENT_KIND_DELETED: "deleted",
    pb.WATCH_EVENT_KIND_SNAPSHOT: "current",
    pb.WATCH_EVENT_KIND_SNAPSHOT_END: "(the snapshot ends; live events follow)",
    pb.WATCH_EVENT_KIND_PROGRESS: "progress",
}


def add_watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--job", action="append", default=[], metavar="ID", help="only this job's (repeatable)"
    )
    parser.add_argument(
        "--label",
        type=label,
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


async def watch_executions(client: ProtoClient, args: argparse.Namespace) -> Message:
    events = client.watch_executions(
        job_ids=args.job,
        states=[STATES[name] for name in args.state],
        labels=dict(args.label),
        after_cursor=args.after,
        snapshot=args.snapshot,
    )
    return await _print_events(events, args)


async def watch_jobs(client: ProtoClient, args: argparse.Namespace) -> Message:
    events = client.watch_jobs(
        job_ids=args.job, labels=dict(args.label), after_cursor=args.after, snapshot=args.snapshot
    )
    return await _print_events(events, args)


async def _print_events(events: Any, args: argparse.Namespace) -> Message:
    """Prints each event as it comes, until the stream ends or Ctrl-C."""
    async for event in events:
        if event.kind == pb.WATCH_EVENT_KIND_PROGRESS and not args.progress:
            continue
        sys.stdout.write(event_line(event, json=args.output == "json") + "\n")
        sys.stdout.flush()
    return pb.DeleteJobResponse()  # prints nothing


def event_line(event: pb.WatchExecutionsResponse | pb.WatchJobsResponse, *, json: bool) -> str:
    if json:
        return proto_json(event, indent=None)
    head = f"{event.cursor:>8}  {_KIND_WORDS.get(event.kind, '?'):<8}"
    if event.kind == pb.WATCH_EVENT_KIND_SNAPSHOT_END:
        return head.rstrip()
    if isinstance(event, pb.WatchExecutionsResponse) and event.HasField("execution"):
        e = event.execution
        return f"{head}  {e.id}  {e.job_id}  {state(e.state)}  {e.error_message[:60]}".rstrip()
    if isinstance(event, pb.WatchJobsResponse) and event.HasField("job"):
        job = event.job
        return f"{head}  {job.id}  {'paused' if job.paused else 'active'}  etag {job.etag}"
    return head.rstrip()
