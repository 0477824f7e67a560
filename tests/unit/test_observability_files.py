"""The alert rules and dashboard: valid for promtool and Grafana, and about real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"
RULES = CONF / "prometheus" / "alerts.yml"
DASHBOARD = CONF / "grafana" / "alertd.json"
METRIC = re.compile(r"\b((?:alertd|rabbitmq)_[a-z_]+)")
# RabbitMQ's rabbitmq_prometheus plugin (per-object metrics) exports these.
RABBITMQ_METRICS = {"rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked"}


def autoscale_only(name: str) -> bool:
    """Exported only by a master started with --autoscale (alertd/statusview.py)."""
    return name.startswith("alertd_autoscale_") or name == "alertd_queue_ready_messages"


def exported_names(metrics_text: str) -> set[str]:
    """Metric names in a /metrics body, each counter with and without ``_total``."""
    names = set(re.findall(r"^# TYPE (\S+)", metrics_text, re.MULTILINE))
    return names | {n.removesuffix("_total") for n in names}


def not_exported(names: set[str], metrics_text: str) -> set[str]:
    exported = exported_names(metrics_text)
    return {n for n in names if n not in exported and n.removesuffix("_total") not in exported}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: scripts/test installs the Debian package prometheus"
    return path


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_fire_and_stay_quiet_as_their_unit_tests_expect() -> None:
    done = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=RULES.parent,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    return re.findall(r"expr: (?:\|\n)?((?:.+\n)+?)\s+(?:for|labels):", RULES.read_text())


def referenced_metrics() -> set[str]:
    names = set()
    for expr in dashboard_exprs() + rule_exprs():
        names |= {re.sub(r"_(bucket|count|sum)$", "", n) for n in METRIC.findall(expr)}
    return names


def test_the_dashboard_is_grafana_json_with_a_query_per_panel() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "alertd" and doc["panels"]
    for panel in doc["panels"]:
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_every_referenced_metric_is_alertds_or_a_known_rabbitmq_one() -> None:
    # That each alertd_* name really exists is checked against a live scrape
    # in tests/e2e/test_metrics.py.
    unknown = {n for n in referenced_metrics()
               if not n.startswith("alertd_") and n not in RABBITMQ_METRICS}
    assert not unknown
    assert len(referenced_metrics()) > 10


def test_the_dashboard_shows_the_autoscaler() -> None:
    # Checked against a live scrape with --autoscale in tests/e2e/test_autoscale.py.
    shown = {n for n in referenced_metrics() if autoscale_only(n)}
    assert {"alertd_autoscale_target_children", "alertd_autoscale_bound_children",
            "alertd_queue_ready_messages"} <= shown
