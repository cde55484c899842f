"""chronoctl status: what an operator looks at first, from the API alone.

The instances (who leads, under which epoch, how busy each is); how many jobs fire in the next
minute; how many executions run, wait, and failed in the last hour; the oldest waiting one.
Counts read at most a bounded number of items: past it they say "1000+" (in JSON: the count
read, and ``"more": true``), so that a status never walks a million rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client._convert import from_timestamp
from chronoplane.client.cli.output import command, fields, integral, span, table
from chronoplane.v1 import execution_pb2 as epb
from chronoplane.v1 import instance_pb2

__all__ = ["add_commands"]

# The most executions counted in one state, and jobs read for their next run time.
COUNT_LIMIT = 1000
JOB_LIMIT = 10_000
# Pending executions read to find the oldest (newest first: the oldest is the last read).
PENDING_LIMIT = 10_000
DUE_WITHIN = timedelta(minutes=1)
FAILED_WITHIN = timedelta(hours=1)


async def _status(client: ProtoClient, args: argparse.Namespace) -> Message:
    now = datetime.now(UTC)
    instances, jobs, running, pending, failed = await asyncio.gather(
        client.list_instances(),
        client.list_jobs(limit=JOB_LIMIT + 1),
        client.list_executions(states=[epb.EXECUTION_STATE_RUNNING], limit=COUNT_LIMIT + 1),
        client.list_executions(states=[epb.EXECUTION_STATE_PENDING], limit=PENDING_LIMIT + 1),
        client.list_executions(
            states=[epb.EXECUTION_STATE_FAILED],
            scheduled_after=now - FAILED_WITHIN,
            limit=COUNT_LIMIT + 1,
        ),
    )
    due = [
        job
        for job in jobs[:JOB_LIMIT]
        if job.HasField("next_run_time") and from_timestamp(job.next_run_time) <= now + DUE_WITHIN
    ]
    leader = next((i for i in instances if i.leader), None)
    status: dict[str, Any] = {
        "time": _stamp(now),
        "leader": leader.id if leader else None,
        "epoch": leader.epoch if leader else None,
        "instances": [_instance(i) for i in instances],
        "jobsDueNextMinute": {"count": len(due), "more": len(jobs) > JOB_LIMIT},
        "executions": {
            "running": _count(running, COUNT_LIMIT),
            "pending": _count(pending, COUNT_LIMIT),
            "failedLastHour": _count(failed, COUNT_LIMIT),
        },
        "oldestPending": _oldest(pending[:PENDING_LIMIT], now, len(pending) > PENDING_LIMIT),
    }
    message = struct_pb2.Struct()
    message.update(status)
    return message


def add_commands(commands: Any) -> None:
    status = command(
        commands,
        "status",
        _status,
        "who leads, what is due, running, waiting and failing: what to look at first",
    )
    status.set_defaults(render=_render)


def _stamp(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def _instance(instance: instance_pb2.Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "name": instance.name,
        "address": instance.address,
        "leader": instance.leader,
        "epoch": instance.epoch,
        "draining": instance.draining,
        "running": instance.running,
        "maxRunning": instance.max_running,
        "lastSeenTime": _stamp(from_timestamp(instance.last_seen_time)),
    }


def _count(items: list[epb.Execution], limit: int) -> dict[str, Any]:
    return {"count": min(len(items), limit), "more": len(items) > limit}


def _oldest(pending: list[epb.Execution], now: datetime, more: bool) -> dict[str, Any] | None:
    """The pending execution created first (of the newest PENDING_LIMIT, when ``more``)."""
    if not pending:
        return None
    oldest = pending[-1]
    created = from_timestamp(oldest.create_time)
    return {
        "id": oldest.id,
        "jobId": oldest.job_id,
        "createTime": _stamp(created),
        "ageSeconds": round((now - created).total_seconds(), 3),
        "ofNewest": PENDING_LIMIT if more else None,
    }


# -- the output -----------------------------------------------------------------------------


def _render(message: struct_pb2.Struct, args: argparse.Namespace) -> str:
    """Text for people; for scripts, JSON with whole numbers as integers and keys sorted."""
    values: Mapping[str, Any] = integral(json_format.MessageToDict(message))
    if args.output == "json":
        return json.dumps(values, indent=2, sort_keys=True)
    return _text(values)


def _text(values: Mapping[str, Any]) -> str:
    instances = table(
        ["INSTANCE", "NAME", "ADDRESS", "ROLE", "EPOCH", "RUNNING", "LAST SEEN"],
        (
            [
                i["id"],
                i["name"],
                i["address"],
                ("leader" if i["leader"] else "follower") + (", draining" if i["draining"] else ""),
                f"{int(i['epoch'])}" if i["leader"] else "",
                f"{int(i['running'])}/{int(i['maxRunning'])}",
                i["lastSeenTime"],
            ]
            for i in values["instances"]
        ),
    )
    runs = values["executions"]
    lines = fields(
        [
            ("leader", _leader(values)),
            ("jobs due in the next minute", _counted(values["jobsDueNextMinute"])),
            ("executions running", _counted(runs["running"])),
            ("executions pending", _counted(runs["pending"])),
            ("failed in the last hour", _counted(runs["failedLastHour"])),
            ("oldest pending", _oldest_text(values.get("oldestPending"))),
        ]
    )
    return f"{instances}\n\n{lines}"


def _leader(values: Mapping[str, Any]) -> str:
    if values.get("leader") is None:
        return "none: no instance leads (nothing fires)"
    return f"{values['leader']} (epoch {int(values['epoch'])})"


def _counted(count: Mapping[str, Any]) -> str:
    """A count, with + when there were more than were read."""
    return f"{int(count['count']):,}" + ("+" if count["more"] else "")


def _oldest_text(oldest: Mapping[str, Any] | None) -> str:
    if oldest is None:
        return "none"
    age = span(timedelta(seconds=round(oldest["ageSeconds"])))
    text = f"{oldest['id']} (job {oldest['jobId']}), waiting {age}"
    if oldest.get("ofNewest"):
        text += f" (the oldest of the newest {int(oldest['ofNewest']):,})"
    return text
