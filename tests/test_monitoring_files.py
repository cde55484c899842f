"""The alert rules and the Grafana dashboard in docs/ are what an operator loads as they are:
``promtool`` accepts the rules and their unit tests pass (each alert fires on its trouble and
not on a healthy series), the dashboard is Grafana JSON whose every query parses, and every
metric that the rules and the dashboard name is one the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from harness import ROOT
from prometheus import PrometheusTools

ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "docs" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "chronoplane.json"

# Grafana's variables, as Grafana would put them in before sending a query.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "$__range": "1h"}

# The names of issue 17's metric contract, until chronoplane.server.metrics exists.
COUNTERS = [
    "grpc_server_handled",
    "grpc_server_msg_sent",
    "fires",
    "manual_runs",
    "executions_finished",
    "fires_missed",
    "fires_skipped",
    "retries",
    "leadership_lost",
    "watch_events_sent",
    "watchers_ended_lagging",
]
HISTOGRAMS = [
    "grpc_server_handling_seconds",
    "fire_lateness_seconds",
    "heartbeat_duration_seconds",
    "lease_renewal_duration_seconds",
    "watch_event_lag_seconds",
    "event_loop_lag_seconds",
]
GAUGES = [
    "grpc_server_streams_open",
    "executions_running",
    "executions_pending",
    "oldest_pending_execution_age_seconds",
    "leader",
    "leader_epoch",
    "instances_alive",
    "watchers_open",
    "db_pool_connections_in_use",
    "db_pool_connections_waiting",
]
DEFAULT_COLLECTORS = ["process_cpu_seconds_total", "process_resident_memory_bytes"]


def exported_series() -> set[str]:
    """Every series name the server exports, histograms' ``_bucket``/``_sum``/``_count`` too."""
    names = {f"chronoplane_{name}_total" for name in COUNTERS}
    names |= {f"chronoplane_{name}" for name in GAUGES}
    names |= {
        f"chronoplane_{name}{suffix}"
        for name in HISTOGRAMS
        for suffix in ("_bucket", "_sum", "_count")
    }
    return names | set(DEFAULT_COLLECTORS)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_expressions() -> list[str]:
    found = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append(expr)
    return found


def test_the_alert_rules_pass_promtool(prometheus_tools: PrometheusTools) -> None:
    checked = prometheus_tools.run_promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = prometheus_tools.run_promtool("test", "rules", str(ALERTS_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a unit test, and says what it means and what to do.
    in_tests = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text()))
    for rule in alert_rules():
        assert rule["alert"] in in_tests, f"{rule['alert']} has no case in alerts_test.yml"
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query"
    panels = dashboard_panels()
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    titles = " / ".join(p["title"] for p in panels).lower()
    for wanted in ("fires", "lateness", "state", "queue", "leader", "epoch", "watchers", "error"):
        assert wanted in titles, f"no panel about {wanted}"


def test_every_expression_parses_and_names_exported_metrics(
    prometheus_tools: PrometheusTools, tmp_path: Path
) -> None:
    expressions = dashboard_expressions() + [rule["expr"] for rule in alert_rules()]
    # promtool parses expressions in a rule file: each one becomes a recording rule.
    rules = [{"record": f"check:expression_{i}", "expr": e} for i, e in enumerate(expressions)]
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    checked = prometheus_tools.run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    exported = exported_series()
    for expr in expressions:
        for name in re.findall(r"\b(?:chronoplane|process|python)_\w+", expr):
            assert name in exported, f"{name} in {expr!r} is not an exported metric"
