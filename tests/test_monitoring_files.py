"""The alert rules and the Grafana dashboard in docs/ are what an operator loads as they are:
``promtool`` accepts the rules and their unit tests pass (each alert fires on its trouble and
not on a healthy series), the dashboard is Grafana JSON whose every query parses, and every
metric that the rules and the dashboard name is one the server exports."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import yaml
from prometheus import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD,
    PrometheusTools,
    alert_rules,
    dashboard_panels,
    monitoring_expressions,
)
from prometheus_client import REGISTRY

SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "info": ("_info",),
}


def exported_series() -> set[str]:
    """Every series name the server exports (histograms' ``_bucket``/``_sum``/``_count``
    too): chronoplane.server.metrics registers them in prometheus-client's default registry,
    beside the library's process and Python collectors."""
    importlib.import_module("chronoplane.server.metrics")
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


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
    expressions = monitoring_expressions()
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
