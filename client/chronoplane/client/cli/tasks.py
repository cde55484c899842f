"""chronoctl tasks, preview: what the server can run, and when a trigger would fire."""

from __future__ import annotations

import argparse
from typing import Any

from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client._convert import from_timestamp, timestamp
from chronoplane.client.cli.args import add_trigger_options, trigger_of
from chronoplane.client.cli.output import command, table
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["RENDERERS", "add_commands"]


async def _tasks(client: ProtoClient, args: argparse.Namespace) -> Message:
    return pb.ListTasksResponse(tasks=await client.list_tasks())


async def _preview(client: ProtoClient, args: argparse.Namespace) -> Message:
    times = await client.preview_trigger(trigger_of(args), count=args.count)
    return pb.PreviewTriggerResponse(fire_times=[timestamp(t) for t in times])


def add_commands(commands: Any) -> None:
    command(commands, "tasks", _tasks, "list the tasks registered on the server")
    preview = command(commands, "preview", _preview, "show when a trigger would fire")
    add_trigger_options(preview, date=False)
    preview.add_argument("--count", type=int, default=10, metavar="N", help="default 10")


def _tasks_table(response: pb.ListTasksResponse) -> str:
    return table(["NAME", "DESCRIPTION"], ([t.name, t.description] for t in response.tasks))


def _fire_times(response: pb.PreviewTriggerResponse) -> str:
    times = (from_timestamp(t) for t in response.fire_times)
    return "\n".join(t.isoformat().replace("+00:00", "Z") for t in times)


RENDERERS: dict[type[Message], Any] = {
    pb.ListTasksResponse: _tasks_table,
    pb.PreviewTriggerResponse: _fire_times,
}
