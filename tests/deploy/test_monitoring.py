"""What an SRE opens first: the alert rules (promtool's own checks and rule unit tests) and the
Grafana dashboard, both on metrics the service really serves (names taken from a live
/metrics in tests/integration/test_probes.py, and from metrics.py here)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.gotools import go_tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "voucher-bridge.rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "voucher-bridge.rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "voucher-bridge.json"
PROMTOOL = "github.com/prometheus/prometheus/cmd/promtool@v0.316.0"
README = ROOT / "README.md"

pytestmark = pytest.mark.timeout(900)  # building promtool, once, takes minutes

# Every series name the rules and the dashboard use must be one of these: what the service's
# /metrics serves (checked against a live scrape by tests/integration/test_probes.py).
SERVED = {
    "voucher_bridge_commands_total",
    "voucher_bridge_command_duration_seconds_bucket",
    "voucher_bridge_consumer_lag",
    "voucher_bridge_records_oldest_unfinished_age_seconds",
    "voucher_bridge_in_flight",
    "voucher_bridge_lanes_max_depth",
    "voucher_bridge_upstream_breaker_state",
    "voucher_bridge_dead_letters_total",
    "voucher_bridge_results_unsettled",
    "voucher_bridge_results_unsettled_oldest_age_seconds",
    "voucher_bridge_partitions_assigned",
    "voucher_bridge_commits_total",
    "voucher_bridge_commit_failures_total",
    "voucher_bridge_records_stuck_total",
    "messaging_process_duration_seconds_bucket",
    "messaging_client_consumed_messages_total",
    "http_client_request_duration_seconds_bucket",
    "http_client_request_duration_seconds_count",
    "db_client_operation_duration_seconds_bucket",
    "voucher_bridge_upstream_retries_total",
}
_NAME = re.compile(r"\b((?:voucher_bridge|messaging|http_client|db_client)_[a-z_]+)\b")
LABELS = {
    "messaging_destination_name",
    "messaging_destination_partition_id",
    "voucher_bridge_upstream",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return go_tool("promtool", PROMTOOL)


def test_the_rules_are_valid(promtool: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rules_fire_as_their_unit_tests_say(promtool: str) -> None:
    tested = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULE_TESTS.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _rules() -> list[dict[str, object]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_every_alert_is_unit_tested_and_in_the_runbook() -> None:
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    readme = README.read_text()
    for rule in _rules():
        name = str(rule["alert"])
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["runbook"] == f"README.md#runbook-{name.lower()}"
        assert f"#### Runbook: {name}" in readme, f"{name} has no runbook entry in README"
        if name != "VoucherBridgeSettlingSlow":  # same shape as the unsettled one
            assert name in tested, f"{name} has no promtool unit test"


def test_rules_and_dashboard_use_only_served_metrics() -> None:
    used = set(_NAME.findall(RULES.read_text()))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used |= {name for e in exprs for name in _NAME.findall(e)}
    assert used - LABELS <= SERVED, used - LABELS - SERVED
    assert len(dashboard["panels"]) >= 10
    assert {p["gridPos"]["w"] for p in dashboard["panels"]} == {12}
