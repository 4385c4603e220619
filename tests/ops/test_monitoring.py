"""The shipped alert rules and Grafana dashboard: valid, and only about metrics the software exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from edge_runtime.metrics import AGENT_ALARMS, BROKER_ALARMS, GAUGES

MONITORING = Path(__file__).resolve().parents[2] / "configs" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
EXPORTED = {f"{ns}_{name}" for ns in ("edge_broker", "gateway_agent")
            for name in (*GAUGES, "events_total", "build_info")}
METRIC = re.compile(r"\b((?:edge_broker|gateway_agent)_[a-z_]+)")


def exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    found = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    found += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return found


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian's prometheus package provides promtool")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_and_panel_uses_an_exported_metric() -> None:
    for expr in exprs():
        names = set(METRIC.findall(expr))
        assert names or "up{" in expr or "process_" in expr, expr
        assert names <= EXPORTED, (expr, names - EXPORTED)


def test_every_alarm_of_the_readme_table_has_a_rule() -> None:
    text = RULES.read_text()
    for event in ("crl.alarm", "crl.stale", "crl.fetch_failed", "crl.rejected", "crl.reload_failed",
                  "renewal.alarm", "agent.service_failed"):
        assert event in text, event
    watched = {event for event, _ in (*BROKER_ALARMS, *AGENT_ALARMS)}
    for event in watched - {"crl.stale"}:  # crl.stale is covered by the timestamp gauges
        assert f'event="{event}"' in text, event
    rules = yaml.safe_load(text)
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["action"]


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(panel["targets"] for panel in dashboard["panels"])


def test_the_readme_alarm_table_names_existing_rules() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("Alert on these events"):readme.index("### Revocation: from the CA")]
    named = set(re.findall(r"`(Edge[A-Za-z]+)`", table))
    rules = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert named and named <= rules, named - rules
