"""What chronoctl's options accept (durations, times, JSON, labels, states), and the options
several commands share."""

from __future__ import annotations

import argparse
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from chronoplane.client._convert import OVERLAP_POLICIES, at, cron, every
from chronoplane.v1 import execution_pb2, job_pb2

__all__ = [
    "STATES",
    "add_overlap_option",
    "add_state_option",
    "add_trigger_options",
    "check_at",
    "duration",
    "instant",
    "json_object",
    "label",
    "trigger_of",
    "when",
]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
STATES = {
    name.removeprefix("EXECUTION_STATE_").lower(): value
    for name, value in execution_pb2.ExecutionState.items()
    if value != execution_pb2.EXECUTION_STATE_UNSPECIFIED
}


def duration(text: str) -> timedelta:
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 10m or 1h30m")
    return timedelta(seconds=sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts))


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('not a JSON object like {"region": "eu"}')
    return value


def label(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time like 2030-01-31T09:00:00+01:00"
        ) from None
    return value if value.tzinfo else value.astimezone()  # no zone given: local time


def when(text: str) -> datetime:
    """An ISO 8601 time, "now", or a duration meaning that long ago ("2h")."""
    if text == "now":
        return datetime.now(UTC)
    if _DURATION_PART.match(text):
        try:
            return datetime.now(UTC) - duration(text)
        except argparse.ArgumentTypeError:
            pass
    try:
        return instant(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time like 2030-01-31T09:00:00+01:00, "
            "a duration ago like 2h, or now"
        ) from None


def add_trigger_options(parser: argparse.ArgumentParser, *, date: bool) -> None:
    kinds = parser.add_mutually_exclusive_group(required=True)
    kinds.add_argument("--cron", metavar="EXPR", help='a cron expression, e.g. "30 2 * * *"')
    kinds.add_argument("--every", type=duration, metavar="DURATION", help="e.g. 5s, 10m, 1h")
    if date:
        kinds.add_argument(
            "--at",
            type=datetime.fromisoformat,
            metavar="ISO8601",
            help="once, at this time; without an offset, a wall time in --tz (default: this "
            "machine's zone); in a spring-forward gap it fires at the gap's end",
        )
    parser.add_argument(
        "--tz",
        metavar="ZONE",
        help="IANA time zone of --cron (default UTC) or of an --at without offset",
    )


def trigger_of(args: argparse.Namespace) -> job_pb2.Trigger:
    """The trigger the --cron, --every or --at options (and their bounds) describe."""
    start, end = getattr(args, "start", None), getattr(args, "end", None)
    jitter = getattr(args, "jitter", None)
    if args.cron is not None:
        return cron(args.cron, args.tz or "", start=start, end=end, jitter=jitter)
    if args.every is not None:
        return every(args.every, start=start, end=end, jitter=jitter)
    return at(args.at, time_zone=args.tz or "", jitter=jitter)


def check_at(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An --at without offset is a wall time in --tz, or in this machine's zone (by name, so
    that the server reads it, and a time in a spring-forward gap is not moved an hour early
    as ``mktime`` would move it)."""
    when: datetime | None = getattr(args, "at", None)
    if when is None:
        return
    if when.tzinfo is not None:
        if args.tz:
            parser.error("--at has a UTC offset: --tz goes with a wall time (no offset)")
        return
    if not args.tz:
        args.tz = local_zone_name()
        if not args.tz:
            parser.error("cannot tell this machine's time zone: give --tz or an offset in --at")


def local_zone_name() -> str | None:
    """This machine's IANA zone name: tzlocal's answer where it is installed (the server has
    it), else TZ or /etc/localtime's link or /etc/timezone, as tzlocal reads them on Unix;
    the client distribution depends on grpcio and protobuf alone."""
    try:
        import tzlocal
    except ImportError:
        pass
    else:
        try:
            return str(tzlocal.get_localzone_name()) or None
        except (LookupError, ValueError, OSError):
            return None
    named = os.environ.get("TZ", "").lstrip(":")
    if named and not named.startswith("/"):
        return named
    link = os.path.realpath(named or "/etc/localtime")
    if "/zoneinfo/" in link:
        return link.split("/zoneinfo/", 1)[1]
    try:
        return Path("/etc/timezone").read_text().strip() or None
    except OSError:
        return None


def add_overlap_option(parser: argparse._ActionsContainer, help_text: str) -> None:
    parser.add_argument(
        "--overlap",
        "--overlap-policy",
        dest="overlap",
        choices=list(OVERLAP_POLICIES),
        metavar="POLICY",
        help=f"{help_text}; one of {', '.join(OVERLAP_POLICIES)}",
    )


def add_state_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--state",
        nargs="+",
        action="extend",
        default=[],
        choices=sorted(STATES),
        metavar="STATE",
        help=help_text,
    )
