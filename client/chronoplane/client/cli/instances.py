"""chronoctl instances: the server processes on one database, and which one leads."""

from __future__ import annotations

import argparse
from typing import Any

from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client.cli.output import command, table, time
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["RENDERERS", "add_commands"]


async def _instances(client: ProtoClient, args: argparse.Namespace) -> Message:
    return pb.ListInstancesResponse(instances=await client.list_instances())


def add_commands(commands: Any) -> None:
    command(commands, "instances", _instances, "list the server processes and which one leads")


def _role(instance: Any) -> str:
    role = "leader" if instance.leader else "follower"
    return f"{role}, draining" if instance.draining else role


def _instances_table(response: pb.ListInstancesResponse) -> str:
    return table(
        ["ID", "NAME", "HOST", "PID", "ADDRESS", "ROLE", "LAST SEEN"],
        (
            [i.id, i.name, i.host, str(i.pid), i.address, _role(i), time(i, "last_seen_time")]
            for i in response.instances
        ),
    )


RENDERERS: dict[type[Message], Any] = {pb.ListInstancesResponse: _instances_table}
