"""When a wall-clock time happens in a time zone: the rule cron and date triggers share.

* A wall time that does not exist (a spring-forward gap, like 02:30 on 2027-03-14 in
  America/New_York) happens at the end of the gap, the transition instant (03:00 EDT):
  never an hour early (01:30 EST, where ``mktime`` puts it) nor an hour late (03:30 EDT,
  where ``datetime.astimezone`` puts it).
* A wall time that happens twice (a fall-back overlap) happens at its first occurrence.

Time zones are IANA names that zoneinfo lists; nothing else reaches ``ZoneInfo``, which would
otherwise read any file under the zone directories (``posixrules``, ``right/UTC``).
"""

from __future__ import annotations

import functools
import math
import zoneinfo
from datetime import UTC, datetime

from chronoplane.server.errors import InvalidArgument

__all__ = ["MAX_TIME_ZONE", "first_instant", "time_zone", "transition", "zone_names"]

MAX_TIME_ZONE = 64


@functools.cache
def zone_names() -> frozenset[str]:
    """IANA names zoneinfo finds (about 0.1 s to list, so once). ``localtime`` is dropped: it
    is the host's own zone under a file name, not a zone name, and would move with the host."""
    return frozenset(zoneinfo.available_timezones() - {"localtime"})


def time_zone(name: str, field: str) -> zoneinfo.ZoneInfo:
    """The zone named ``name`` (empty: UTC); ``InvalidArgument`` on ``field`` otherwise."""
    if len(name) > MAX_TIME_ZONE:
        raise InvalidArgument.field(field, f"longer than {MAX_TIME_ZONE} characters")
    name = name or "UTC"
    if name not in zone_names():
        raise InvalidArgument.field(
            field, f"{name!r} is not an IANA time zone (like 'Europe/Berlin')"
        )
    return zoneinfo.ZoneInfo(name)


def first_instant(wall: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """When the naive ``wall`` first happens in ``zone`` (the end of the gap it falls in), in
    UTC."""
    instant = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == wall:
        return instant
    # In a gap fold=0 reads the wall time with the offset from before the jump, an instant
    # after the gap, and fold=1 with the offset from after it, an instant before the gap.
    earlier = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    return transition(earlier, instant, zone)


def transition(earlier: datetime, later: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """The first instant in (``earlier``, ``later``] with ``later``'s UTC offset in ``zone``,
    found by bisection in whole seconds (tzdata transitions fall on whole seconds)."""
    offset = later.astimezone(zone).utcoffset()
    low, high = math.floor(earlier.timestamp()), math.ceil(later.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == offset:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def local_time(text: str, zone_name: str, field: str) -> tuple[datetime, datetime]:
    """A date trigger's ``local_time`` and ``time_zone`` (``field`` is the date trigger's
    path): the naive wall time, and the instant it resolves to, in UTC."""
    try:
        wall = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument.field(
            f"{field}.local_time",
            f"{text[:64]!r} is not an ISO 8601 local time like 2027-03-14T02:30:00",
        ) from None
    if wall.tzinfo is not None:
        raise InvalidArgument.field(
            f"{field}.local_time",
            f"{text!r} has a UTC offset; a local time has none (its zone is time_zone), and "
            "an instant goes in run_time",
        )
    if not zone_name:
        raise InvalidArgument.field(f"{field}.time_zone", "is required with local_time")
    zone = time_zone(zone_name, f"{field}.time_zone")
    try:
        return wall, first_instant(wall, zone)
    except (OverflowError, ValueError):
        raise InvalidArgument.field(f"{field}.local_time", "is out of range") from None
