"""Chaos: the fault cases of tests/faults, longer, at a higher load, several rounds, with the
server's default timings (heartbeat 1 s, leader timeout 5 s, instance timeout 10 s), on a
throwaway PostgreSQL of its own.

Each round of each case prints one JSON line::

    {"bench": "chaos", "case": "leader_killed", "round": 1, "fires": 9600, "runs": 9000,
     "abandoned": 200, "duplicates": 0, "lost": 0, "stuck": 0, "failover_s": 0.31, ...}

``duplicates``, ``lost`` and ``stuck`` must be 0 (tests/faults/chaos.py says how each is
counted); ``failover_s`` is how long until a new leader after the old one stopped (killed,
or paused inside a fenced write), against a bound of leader timeout + 2 heartbeats (7 s).
A summary goes to stderr.

Run it (initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin)::

    .venv/bin/python bench/chaos.py                      # every case, 2 rounds, 200 jobs
    .venv/bin/python bench/chaos.py --cases leader_killed --rounds 5 --jobs 500
    .venv/bin/python bench/chaos.py --fast               # the tests' short timings
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from faults.chaos import CASES, Timings, cluster_on  # noqa: E402
from postgres import start_throwaway  # noqa: E402

BENCH = "chaos"


def case_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The load of each case, from the command line."""
    if name == "sigterm_during_long_runs":
        return {"jobs": args.jobs // 4, "long_runs": 30, "run_seconds": 25.0}
    if name == "database_outage":
        return {"jobs": args.jobs, "outage": args.outage, "run_seconds": 8.0}
    if name == "leader_session_terminated":
        return {"jobs": args.jobs, "terminations": 40}
    if name in ("leader_paused_mid_write", "follower_paused_between_append_and_commit"):
        return {"jobs": args.jobs, "pause": args.pause}
    return {"jobs": args.jobs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=200, help="jobs firing every second")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds PostgreSQL is down")
    parser.add_argument("--pause", type=float, default=30.0, help="seconds of SIGSTOP")
    parser.add_argument("--fast", action="store_true", help="the tests' short timings")
    args = parser.parse_args()
    timings = (
        Timings()
        if args.fast
        else Timings(heartbeat=1.0, leader_timeout=5.0, instance_timeout=10.0, shutdown_grace=30.0)
    )
    pg = start_throwaway()
    bad = 0
    try:
        for name in args.cases:
            for round_ in range(1, args.rounds + 1):
                with (
                    tempfile.TemporaryDirectory() as workdir,
                    cluster_on(pg, Path(workdir), timings) as cluster,
                ):
                    case = asyncio.run(CASES[name](cluster, **case_options(name, args)))
                figures = {"bench": BENCH, "round": round_, **case.figures()}
                print(json.dumps(figures), flush=True)
                counts = case.counts
                late = case.failover is not None and case.failover > timings.failover_bound
                if counts.duplicates or counts.lost or counts.stuck or late:
                    bad += 1
                    print(
                        f"{name} round {round_}: duplicates {counts.duplicates[:3]}, lost "
                        f"{counts.lost[:3]}, stuck {counts.stuck[:3]}, failover "
                        f"{case.failover}",
                        file=sys.stderr,
                    )
    finally:
        pg.stop()
    print(f"chaos: {bad} of {len(args.cases) * args.rounds} rounds went wrong", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
