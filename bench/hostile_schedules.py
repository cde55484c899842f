"""Hostile schedules: how long ``ApschedulerEngine().check()`` takes to reject each one.

The corpus is tests/hostile_corpus.py (bad cron fields, garbage characters, impossible dates,
unknown or path-like time zones, bounds that leave no fire, bad jitter); tests check that each
is rejected naming the right field, this bench only times it, in process, without gRPC.

* ``cold``: the first check of each entry, in corpus order, on a fresh engine (its time-zone
  list is read when the engine is built, as the server does at start);
* ``warm``: ``--rounds`` more checks of each entry, round-robin.

Target: every rejection, cold or warm, well within 50 ms.

For scale, ``accepted`` times valid schedules whose search is the longest (a Feb 29 that must
also be a Monday is 18 years away from 2026, up to 40 in general).

Output: one JSON object per line on stdout, per figure, for example::

    {"bench": "hostile_schedules", "scenario": "warm", "figure": "reject_max_ms",
     "value": 0.41, "unit": "ms", "entry": "feb-31-weekdays"}

Figures: entries, checks, reject_p50_ms, reject_p99_ms, reject_max_ms (with the slowest
entry's id); for ``accepted``, check_p50_ms, check_p99_ms, check_max_ms. The verdict goes to
stderr.

Run it::

    .venv/bin/python bench/hostile_schedules.py
    .venv/bin/python bench/hostile_schedules.py --rounds 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hostile_corpus import CORPUS, Hostile

from chronoplane.server.engine.apscheduler import ApschedulerEngine
from chronoplane.server.errors import InvalidArgument
from chronoplane.server.models import CronTrigger

BENCH = "hostile_schedules"
TARGET_MAX_MS = 50.0
ACCEPTED = [
    Hostile(id="feb-29-monday", trigger=CronTrigger(expression="0 0 29 2 1"), field=""),
    Hostile(
        id="feb-29-monday-kiritimati",
        trigger=CronTrigger(expression="0 0 29 2 mon", time_zone="Pacific/Kiritimati"),
        field="",
    ),
    Hostile(id="every-second", trigger=CronTrigger(expression="* * * * * *"), field=""),
    Hostile(id="last-of-february", trigger=CronTrigger(expression="0 0 last 2 *"), field=""),
]


def emit(scenario: str, figure: str, value: float | int, unit: str, **extra: str) -> None:
    """One figure, as one JSON line on stdout."""
    if isinstance(value, float):
        value = round(value, 3)
    line = {"bench": BENCH, "scenario": scenario, "figure": figure, "value": value, "unit": unit}
    print(json.dumps(line | extra), flush=True)


def _time_check(engine: ApschedulerEngine, entry: Hostile, now: datetime, *, rejected: bool) -> int:
    """Nanoseconds one check took; fails loudly when it did not end as expected."""
    started = time.perf_counter_ns()
    try:
        engine.check(entry.trigger, now=now)
    except InvalidArgument:
        took = time.perf_counter_ns() - started
        if not rejected:
            raise
        return took
    took = time.perf_counter_ns() - started
    if rejected:
        raise AssertionError(f"{entry.id} was accepted")
    return took


def _report(scenario: str, samples: Sequence[tuple[int, str]], *, what: str = "reject") -> float:
    """Emits the figures of ``(nanoseconds, entry id)`` samples; returns the max in ms."""
    times = sorted(ns / 1e6 for ns, _ in samples)
    slowest_ns, slowest = max(samples)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    emit(scenario, "entries", len({entry for _, entry in samples}), "1")
    emit(scenario, "checks", len(samples), "1")
    emit(scenario, f"{what}_p50_ms", statistics.median(times), "ms")
    emit(scenario, f"{what}_p99_ms", p99, "ms")
    emit(scenario, f"{what}_max_ms", slowest_ns / 1e6, "ms", entry=slowest)
    return slowest_ns / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=200, help="warm checks per entry")
    args = parser.parse_args(argv)
    now = datetime.now(UTC)
    engine = ApschedulerEngine()
    cold = [(_time_check(engine, entry, now, rejected=True), entry.id) for entry in CORPUS]
    warm = [
        (_time_check(engine, entry, now, rejected=True), entry.id)
        for _ in range(args.rounds)
        for entry in CORPUS
    ]
    accepted = [
        (_time_check(engine, entry, now, rejected=False), entry.id)
        for _ in range(max(1, args.rounds // 10))
        for entry in ACCEPTED
    ]
    worst = max(_report("cold", cold), _report("warm", warm))
    _report("accepted", accepted, what="check")
    verdict = "PASS" if worst < TARGET_MAX_MS else "FAIL"
    print(
        f"{BENCH}: {verdict}: slowest rejection {worst:.3f} ms (target < {TARGET_MAX_MS} ms)",
        file=sys.stderr,
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
