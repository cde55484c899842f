"""Finds ``prometheus`` and ``promtool`` for the tests, or installs Debian's package; runs a
Prometheus of the test's own.

In order: both on PATH; else, as root with apt-get, ``apt-get install --no-install-recommends
prometheus`` (about 10 s; ``apt-get update`` first only when the install fails without it, as
on a machine whose package lists were never fetched). If neither works the tests fail, saying
how to provide them: they never skip. Debian's packaged service is never used (where systemd
runs, the install's start of it is undone): each test starts its own ``prometheus`` on a free
loopback port, with its storage in the test's temporary directory, and stops it at the end.

Also the PromQL that docs/ hands to operators: the alert rules' and the Grafana dashboard's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from harness import ROOT, free_port

__all__ = [
    "ALERTS",
    "ALERTS_TEST",
    "DASHBOARD",
    "Prometheus",
    "PrometheusTools",
    "alert_rules",
    "dashboard_panels",
    "find_prometheus",
    "monitoring_expressions",
    "running_prometheus",
]

HOW_TO = (
    "the tests need Prometheus: put prometheus and promtool on PATH "
    "(apt-get install prometheus, or the release tarball from prometheus.io), "
    "or run the tests as root on Debian/Ubuntu so that they install the package themselves"
)
INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: str
    promtool: str

    def run_promtool(
        self, *args: str, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.promtool, *args], input=stdin, capture_output=True, text=True, timeout=60
        )


def _on_path() -> PrometheusTools | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus and promtool:
        return PrometheusTools(prometheus, promtool)
    return None


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _install() -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"prometheus or promtool is not on PATH; {HOW_TO}")
    installed = _run(*INSTALL)
    if installed.returncode != 0:  # no package lists yet, or stale ones
        _run("apt-get", "update")
        installed = _run(*INSTALL)
    if installed.returncode != 0:
        raise RuntimeError(f"{' '.join(INSTALL)} failed:\n{installed.stderr[-2000:]}\n{HOW_TO}")
    if Path("/run/systemd/system").is_dir():  # the package started its service: not ours
        _run("systemctl", "disable", "--now", "prometheus.service")


def find_prometheus() -> PrometheusTools:
    found = _on_path()
    if found is None:
        _install()
        found = _on_path()
    if found is None:
        raise RuntimeError(f"the prometheus package installed no prometheus/promtool; {HOW_TO}")
    return found


@dataclass
class Prometheus:
    """A running ``prometheus``; ``query`` asks its HTTP API."""

    process: subprocess.Popen[str]
    url: str
    log_path: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` gives now: ``[{"metric": {...}, "value": float}]``."""
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(address, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400/422: the query's error, in JSON
            raise AssertionError(f"{expr}: {error.read().decode()}") from None
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return [
            {"metric": row["metric"], "value": float(row["value"][1])}
            for row in body["data"]["result"]
        ]

    def wait_for(
        self,
        expr: str,
        accept: Callable[[list[dict[str, Any]]], bool],
        timeout: float,
    ) -> list[dict[str, Any]]:
        """Queries ``expr`` until ``accept`` takes its answer; fails with the last one."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if accept(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} gave {result} for {timeout} s")
            time.sleep(0.5)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


def _config(targets: list[str]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "chronoplane", "static_configs": [{"targets": targets}]}],
    }


@contextlib.contextmanager
def running_prometheus(
    tools: PrometheusTools, workdir: Path, targets: list[str]
) -> Iterator[Prometheus]:
    """A Prometheus scraping ``targets`` (``host:port``) every second, once it has scraped each
    of them; stopped at the end."""
    root = workdir / f"prometheus-{time.monotonic_ns()}"
    root.mkdir()
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump(_config(targets)))
    port = free_port()
    log_path = root / "log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                tools.prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    running = Prometheus(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 30
        while not running._ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        # Its scrape manager takes the targets about 5 s after start: wait for a scrape of each.
        running.wait_for("up", lambda result: len(result) == len(targets), timeout=15)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the PromQL of docs/ ------------------------------------------------------------------------

ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "docs" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "chronoplane.json"

# Grafana's variables, as Grafana would put them in before sending a query.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "$__range": "1h"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def monitoring_expressions() -> list[str]:
    """The PromQL of the dashboard (its variables put in as Grafana would) and of the alerts."""
    found = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append(expr)
    return found + [rule["expr"] for rule in alert_rules()]
