"""A real Prometheus scrapes real ``chronoplane serve`` processes on PostgreSQL every second,
and PromQL over its HTTP API sees what the test caused: one fire a second, started within
the second, exactly as many fires as executions listed, and across a two-instance cluster
one leader, which moves to the survivor after kill -9 of the leader. ``promtool check
metrics`` finds no problem in a scrape of /metrics, and every query of the dashboard and the
alert rules runs on the live data."""

from __future__ import annotations

import contextlib
import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import duration_pb2, struct_pb2
from harness import ServerProcess, free_port, start_server
from prometheus import PrometheusTools, monitoring_expressions, running_prometheus

from chronoplane.v1 import job_pb2 as jpb
from chronoplane.v1 import scheduler_service_pb2 as pb

# The cluster tests' shortened timings (tests/test_cluster.py).
FAST = ("--heartbeat-interval=0.5", "--leader-timeout=2.5", "--instance-timeout=3")


@contextlib.contextmanager
def serving_metrics(url: str, workdir: Path, name: str) -> Iterator[tuple[ServerProcess, str]]:
    """A server with ``--metrics-address``: (the server, its metrics address); killed at the end."""
    metrics = f"127.0.0.1:{free_port()}"
    server = start_server(
        url, workdir, *FAST, f"--instance-name={name}", f"--metrics-address={metrics}"
    )
    try:
        yield server, metrics
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def every_second(server: ServerProcess, job_id: str) -> None:
    args = struct_pb2.Struct()
    args.update({"seconds": 0})
    trigger = jpb.Trigger(interval=jpb.IntervalTrigger(every=duration_pb2.Duration(seconds=1)))
    job = jpb.Job(id=job_id, task="test.block", args=args, trigger=trigger)
    server.stub().CreateJob(pb.CreateJobRequest(job=job))


def executions(server: ServerProcess, job_id: str) -> int:
    request = pb.ListExecutionsRequest(job_id=job_id, page_size=1000)
    return len(server.stub().ListExecutions(request).executions)


def test_prometheus_sees_one_fire_a_second_started_in_time(
    postgres_url: str, tmp_path: Path, prometheus_tools: PrometheusTools
) -> None:
    with (
        serving_metrics(postgres_url, tmp_path, "solo") as (server, metrics),
        running_prometheus(prometheus_tools, tmp_path, [metrics]) as prometheus,
    ):
        every_second(server, "tick")
        # Ten fires, and the ten seconds of scrapes since they began.
        prometheus.wait_for("chronoplane_fires_total >= 11", bool, timeout=20)
        [rate] = prometheus.query("rate(chronoplane_fires_total[10s])")
        assert 0.7 <= rate["value"] <= 1.3, f"{rate['value']} fires/s for one job every second"
        lateness = "sum by (le) (rate(chronoplane_fire_lateness_seconds_bucket[10s]))"
        [p99] = prometheus.query(f"histogram_quantile(0.99, {lateness})")
        assert math.isfinite(p99["value"]) and 0 < p99["value"] < 1.0, p99
        # What the dashboard and the alerts ask runs on live data too (no matching errors).
        for expr in monitoring_expressions():
            prometheus.query(expr)
        # Paused, the count stops where the executions do.
        server.stub().PauseJob(pb.PauseJobRequest(id="tick"))
        prometheus.wait_for(
            "chronoplane_fires_total",
            lambda result: bool(result) and result[0]["value"] == executions(server, "tick"),
            timeout=5,
        )
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
            exposition = response.read().decode()
    checked = prometheus_tools.run_promtool("check", "metrics", stdin=exposition)
    problems = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0 and not problems, problems


def test_prometheus_sees_the_leader_move_after_kill_9(
    postgres_url: str, tmp_path: Path, prometheus_tools: PrometheusTools
) -> None:
    with (
        serving_metrics(postgres_url, tmp_path, "node-a") as (a, metrics_a),
        serving_metrics(postgres_url, tmp_path, "node-b") as (b, metrics_b),
        running_prometheus(prometheus_tools, tmp_path, [metrics_a, metrics_b]) as prometheus,
    ):
        by_address = {metrics_a: a, metrics_b: b}
        both = prometheus.wait_for(
            "chronoplane_leader", lambda result: len(result) == 2, timeout=10
        )
        assert sum(row["value"] for row in both) == 1, both
        [leader] = [row["metric"]["instance"] for row in both if row["value"] == 1]
        [survivor] = [address for address in by_address if address != leader]
        [old_epoch] = prometheus.query(f'chronoplane_leader_epoch{{instance="{leader}"}}')

        by_address[leader].process.kill()
        prometheus.wait_for(f'chronoplane_leader{{instance="{survivor}"}} == 1', bool, timeout=15)
        prometheus.wait_for(f'up{{instance="{leader}"}} == 0', bool, timeout=5)
        prometheus.wait_for(
            "sum(chronoplane_leader)",
            lambda result: bool(result) and result[0]["value"] == 1,
            timeout=5,
        )
        [new_epoch] = prometheus.query(f'chronoplane_leader_epoch{{instance="{survivor}"}}')
        assert new_epoch["value"] > old_epoch["value"]
