"""The chart's Prometheus rules: generated from the criteria, valid, and proven by promtool's unit
tests (tests/chart/rules_test.yaml) to fire and to stay quiet when they should; the example
Alertmanager route that sends them to the operator's receiver, checked by amtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedshift_operator import observability
from embedshift_operator.adapters.alerts import DEFAULT_TTL, PATH, in_own_namespace, targets
from rag_service.criteria import DEFAULT_ROLLBACK_THRESHOLDS, DEFAULT_SUCCESS_CRITERIA

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "embedshift" / "files" / "rules.yaml"
UNIT_TESTS = Path(__file__).with_name("rules_test.yaml")
ALERTMANAGER = REPO / "examples" / "alertmanager.yaml"
_LABEL = re.compile(r"\{\{ \$labels\.(\w+) \}\}")
# The label lists of a PromQL expression's aggregations ("by (...)") and matchings ("on (...)").
_GROUPING = re.compile(r"\b(by|on) \(([^)]*)\)")


def _tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if not found:
        pytest.fail(f"{name} is missing: run scripts/install-prometheus.sh", pytrace=False)
    return found


def _rules() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}


def test_checked_in_rules_are_the_generated_ones() -> None:
    assert RULES.read_text(encoding="utf-8") == observability.render_rules(), (
        f"{RULES.relative_to(REPO)} is stale: run `python -m embedshift_operator.observability`"
        " and commit the result"
    )


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_thresholds_come_from_the_criteria_and_criticals_roll_back() -> None:
    """Each threshold alert names its criterion and holds the criterion's bound; exactly the
    rollback thresholds are critical (the receiver's emergencies), and every alert keeps the
    ``migration`` label the receiver routes by."""
    rules = _rules()
    criteria = {c.name: c for c in (*DEFAULT_SUCCESS_CRITERIA, *DEFAULT_ROLLBACK_THRESHOLDS)}
    rollback = {c.name for c in DEFAULT_ROLLBACK_THRESHOLDS}
    judged = {r["labels"]["criterion"]: r for r in rules.values() if "criterion" in r["labels"]}
    assert rollback <= set(judged)
    assert {"error-rate", "p95-latency", "avg-similarity", "cache-hit-rate"} <= set(judged)
    for name, rule in judged.items():
        limit = criteria[name].bound.limit()
        assert f" {limit:g}\n" in rule["expr"], (name, rule["expr"])
        expected = "critical" if name in rollback else "warning"
        assert rule["labels"]["severity"] == expected, name
    for rule in rules.values():
        assert set(rule["annotations"]) == {"summary", "description", "runbook"}
        assert "{{ $labels.migration }}" in rule["annotations"]["summary"]


def test_every_alert_keeps_the_namespace_label() -> None:
    """Every aggregation and matching keeps ``namespace`` next to ``migration``: an alert without
    it is refused by the receiver (unless it trusts alerts across namespaces), so a rule that
    drops it would never roll anything back."""
    for name, rule in _rules().items():
        groupings = _GROUPING.findall(rule["expr"])
        assert groupings, (name, rule["expr"])
        for keyword, labels in groupings:
            kept = {label.strip() for label in labels.split(",")}
            assert {"namespace", "migration"} <= kept, (name, keyword, labels)


def _with_annotations(unit_tests: dict[str, Any]) -> dict[str, Any]:
    """promtool compares annotations too: take them from the rule, labels substituted."""
    rules = _rules()
    for case in unit_tests["tests"]:
        for check in case.get("alert_rule_test", []):
            annotations = rules[check["alertname"]]["annotations"]
            for alert in check.get("exp_alerts", []):
                labels = alert["exp_labels"]
                # what fires reaches the operator's receiver for that migration, and passes its
                # namespace check: the alert's namespace label is the migration's namespace
                assert targets({k: str(v) for k, v in labels.items()}) == {labels["migration"]}
                assert in_own_namespace(labels["migration"], labels), labels
                filled = {k: _fill(v, labels) for k, v in annotations.items()}
                assert not any("{{" in v for v in filled.values()), filled
                alert["exp_annotations"] = filled
    return unit_tests


def _fill(text: str, labels: dict[str, str]) -> str:
    return _LABEL.sub(lambda m: labels[m.group(1)], text)


def test_promtool_unit_tests_fire_and_stay_quiet(tmp_path: Path) -> None:
    unit_tests = yaml.safe_load(UNIT_TESTS.read_text(encoding="utf-8"))
    unit_tests["rule_files"] = [str(RULES)]
    tested = {c["alertname"] for case in unit_tests["tests"] for c in case["alert_rule_test"]}
    fired = {
        c["alertname"]
        for case in unit_tests["tests"]
        for c in case["alert_rule_test"]
        if c.get("exp_alerts")
    }
    assert tested == fired == set(_rules()), "every alert is tested firing and quiet"
    filled = tmp_path / "rules_test.yaml"
    filled.write_text(yaml.safe_dump(_with_annotations(unit_tests), allow_unicode=True))
    result = subprocess.run(
        [_tool("promtool"), "test", "rules", str(filled)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_alertmanager_route_reaches_the_operators_receiver() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    route = config["route"]
    (embedshift,) = [r for r in route["routes"] if r["receiver"] == "embedshift-operator"]
    # re-sent well within the receiver's hold, so one lost re-send does not release it
    assert _seconds(embedshift["repeat_interval"]) + _seconds(embedshift["group_interval"]) < (
        DEFAULT_TTL
    )
    assert "migration" in embedshift["group_by"]
    (receiver,) = [r for r in config["receivers"] if r["name"] == "embedshift-operator"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"].endswith(f":8081{PATH}")
    assert webhook["send_resolved"] is True
    assert webhook["http_config"]["authorization"]["credentials_file"]

    result = subprocess.run(
        [_tool("amtool"), "check-config", str(ALERTMANAGER)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

    # The route's only matcher is the label every rule keeps and the receiver routes by.
    assert embedshift["matchers"] == ['migration=~".+/.+"']


def _seconds(duration: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return float(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def test_docs_list_the_alerts_as_generated() -> None:
    docs = (REPO / "docs" / "alerts.md").read_text(encoding="utf-8")
    assert observability.alerts_table() in docs, "docs/alerts.md: paste alerts_table() again"
    for name in _rules():
        assert f"`{name}`" in docs
