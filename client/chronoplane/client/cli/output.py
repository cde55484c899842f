"""How chronoctl prints: tables and ``key: value`` blocks for people, proto3 JSON (what
grpcurl prints) for scripts (``--output json``); and the commands' shared plumbing."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from chronoplane.client._client import ProtoClient
from chronoplane.client._convert import from_timestamp
from chronoplane.v1 import execution_pb2, job_pb2

__all__ = [
    "DEFAULT_ADDRESS",
    "Check",
    "Run",
    "add_globals",
    "command",
    "fields",
    "integral",
    "json_field",
    "nothing",
    "optional_span",
    "plural",
    "proto_json",
    "render",
    "source",
    "span",
    "state",
    "table",
    "time",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"

Run = Callable[[ProtoClient, argparse.Namespace], Awaitable[Message]]
Check = Callable[[argparse.ArgumentParser, argparse.Namespace], None]
Renderers = dict[type[Message], Callable[[Any], str]]


def add_globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--address and --output (--json), accepted before the command and after it.

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
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--output",
        "-o",
        choices=["text", "json"],
        default="text" if top else argparse.SUPPRESS,
        help="text for people (default), or proto3 JSON as grpcurl prints it",
    )
    output.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        default=argparse.SUPPRESS,
        help="the same as --output json",
    )


def command(
    group: Any, name: str, run: Run, summary: str, *, check: Check | None = None
) -> argparse.ArgumentParser:
    """A command: its parser, with the global options, running ``run``; ``check`` says
    what argparse cannot (options that go with others)."""
    parser: argparse.ArgumentParser = group.add_parser(name, help=summary, description=summary)
    add_globals(parser, top=False)
    parser.set_defaults(run=run, check=check, render=None)
    return parser


def render(message: Message, output: str, renderers: Renderers) -> str:
    if output == "json":
        return proto_json(message)
    return renderers[type(message)](message)


# The responses that carry one job or execution name it so; chronoctl prints the same.
_ENVELOPES: dict[type[Message], str] = {job_pb2.Job: "job", execution_pb2.Execution: "execution"}


def proto_json(message: Message, *, indent: int | None = 2) -> str:
    """What grpcurl prints for the RPC's response: proto3 JSON (camelCase, enums by name), a
    lone job or execution inside its response's ``{"job": …}``, and whole doubles as the
    integers Go prints (``2``, not ``2.0``)."""
    value = integral(json_format.MessageToDict(message))
    envelope = _ENVELOPES.get(type(message))
    return json.dumps({envelope: value} if envelope else value, indent=indent, ensure_ascii=False)


# -- pieces of text -------------------------------------------------------------------------


def time(message: Message, field: str) -> str:
    """A Timestamp field in ISO 8601 UTC, or "" when unset."""
    if not message.HasField(field):
        return ""
    value = from_timestamp(getattr(message, field))
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def span(value: timedelta) -> str:
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


def optional_span(message: Message, field: str) -> str:
    """A Duration field as a span, or "" when unset."""
    return span(getattr(message, field).ToTimedelta()) if message.HasField(field) else ""


def integral(value: Any) -> Any:
    """JSON numbers travel as doubles; show 1.0 as the 1 it was given as."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral(item) for item in value]
    return value


def json_field(message: Message, field: str) -> str:
    """A Struct or Value field as compact JSON, or "" when unset."""
    if not message.HasField(field):
        return ""
    return json.dumps(integral(json_format.MessageToDict(getattr(message, field))))


def state(value: execution_pb2.ExecutionState.ValueType) -> str:
    return execution_pb2.ExecutionState.Name(value).removeprefix("EXECUTION_STATE_")


def source(value: execution_pb2.ExecutionSource.ValueType) -> str:
    return execution_pb2.ExecutionSource.Name(value).removeprefix("EXECUTION_SOURCE_")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def fields(pairs: Iterable[tuple[str, str]]) -> str:
    """``key: value`` lines, aligned, leaving out empty values."""
    shown = [(key + ":", value) for key, value in pairs if value]
    width = max(len(key) for key, _ in shown)
    indent = "\n" + " " * (width + 1)  # continuation lines of a multi-line value
    return "\n".join(f"{key:<{width}} " + value.replace("\n", indent) for key, value in shown)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns aligned on the widest cell, two spaces apart."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def nothing(response: Message) -> str:
    return ""
