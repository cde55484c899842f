"""chronoctl: create, inspect, trigger, backfill and pause the jobs of a Chronoplane server.

One module per noun (jobs, executions, watch, instances, audit, tasks and preview), each with
its commands and how it prints their answers, and status.py, the overview; output.py holds what
they share: tables and ``key: value`` blocks for people, proto3 JSON for scripts
(``--output json``, as grpcurl prints it). API tokens are managed on the server's host, with
``chronoplane token``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client.cli import audit, executions, instances, jobs, status, tasks
from chronoplane.client.cli.args import check_at
from chronoplane.client.cli.output import add_globals, render
from chronoplane.client.errors import ChronoplaneError, InvalidArgument

__all__ = ["main"]

_RENDERERS: dict[type[Message], Any] = {
    **jobs.RENDERERS,
    **executions.RENDERERS,
    **instances.RENDERERS,
    **audit.RENDERERS,
    **tasks.RENDERERS,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronoctl", description=__doc__.split("\n\n")[0])
    add_globals(parser, top=True)
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    status.add_commands(commands)
    tasks.add_commands(commands)
    instances.add_commands(commands)
    group = commands.add_parser("jobs", help="create, inspect, trigger, backfill and pause jobs")
    jobs.add_commands(group.add_subparsers(metavar="COMMAND", required=True))
    group = commands.add_parser("executions", help="inspect, cancel and purge executions")
    executions.add_commands(group.add_subparsers(metavar="COMMAND", required=True))
    audit.add_commands(commands)
    return parser


async def _run(args: argparse.Namespace) -> Message:
    # Ctrl-C cancels the command, so that its channel is closed before the loop ends (a
    # KeyboardInterrupt through asyncio.run leaves grpc's shutdown to print a traceback).
    current = asyncio.current_task()
    assert current is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, current.cancel)
    client = ProtoClient(
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
    if getattr(args, "tz", None) is not None and args.cron is None and args.every is not None:
        parser.error("--tz goes with --cron or --at")
    check_at(parser, args)
    if args.check is not None:
        args.check(parser, args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        message = asyncio.run(_run(args))
    except ChronoplaneError as error:
        _report(error)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except BrokenPipeError:  # chronoctl executions watch | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.render is not None:  # a command that prints its answer its own way
        text = args.render(message, args)
    else:
        text = render(message, args.output, _RENDERERS)
    if text:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
