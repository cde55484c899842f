"""chronoctl audit: the log of mutating calls, allowed or refused, newest first (admin)."""

from __future__ import annotations

import argparse
from typing import Any

from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client.cli.args import when
from chronoplane.client.cli.output import command, table, time
from chronoplane.v1 import scheduler_service_pb2 as pb

__all__ = ["RENDERERS", "add_commands"]


async def _audit(client: ProtoClient, args: argparse.Namespace) -> Message:
    events = await client.list_audit_events(
        principal=args.principal,
        rpc=args.rpc,
        job_id=args.job,
        execution_id=args.execution,
        start_time=args.since,
        limit=args.limit,
    )
    return pb.ListAuditEventsResponse(audit_events=events)


def add_commands(commands: Any) -> None:
    audit = command(commands, "audit", _audit, "list the audit log of changes, newest first")
    audit.add_argument("--principal", default="", help="only calls by this: token:NAME, ...")
    audit.add_argument("--rpc", default="", help="only calls of this RPC, e.g. TriggerJob")
    audit.add_argument("--job", default="", metavar="ID", help="only calls about this job")
    audit.add_argument("--execution", default="", metavar="ID", help="only about this execution")
    audit.add_argument(
        "--since", type=when, metavar="TIME", help="an ISO 8601 time or a duration ago (1h)"
    )
    audit.add_argument("--limit", type=int, default=20, metavar="N", help="default 20")


def _audit_table(response: pb.ListAuditEventsResponse) -> str:
    return table(
        ["TIME", "PRINCIPAL", "RPC", "JOB", "EXECUTION", "CODE"],
        (
            [time(e, "time"), e.principal, e.rpc, e.job_id, e.execution_id, e.code]
            for e in response.audit_events
        ),
    )


RENDERERS: dict[type[Message], Any] = {pb.ListAuditEventsResponse: _audit_table}
