"""alerts.py: both webhook payloads, the emergency rule, the bearer check and the recent-alert log.

What an operator notices: the guide's curl and Alertmanager's webhook both switch to v1 when they
should and only then; a malformed payload is refused with the field that is wrong; a missing
token is told apart from a wrong one; ``?severity=error`` lists errors and worse, newest first.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rag_service.alerts import (
    SEVERITIES,
    Alert,
    AlertLog,
    AlertSource,
    AlertStatus,
    check_bearer,
    is_emergency,
    parse_alerts,
    parse_severity,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

# The guide's emergency curl, verbatim.
GUIDE = {"type": "error_rate", "severity": "critical", "value": 0.5, "threshold": 0.1}

# Alertmanager's webhook body (version 4), as its receiver docs describe it.
ALERTMANAGER: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}:{alertname="EmbedshiftV2ErrorRate"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "embedshift",
    "groupLabels": {"alertname": "EmbedshiftV2ErrorRate"},
    "commonLabels": {"alertname": "EmbedshiftV2ErrorRate", "namespace": "rag"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager.monitoring:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "EmbedshiftV2ErrorRate",
                "severity": "critical",
                "namespace": "rag",
                "version": "v2",
            },
            "annotations": {
                "summary": "v2 error rate above 10 %",
                "value": "0.23",
                "threshold": "0.1",
            },
            "startsAt": "2025-03-01T11:58:00.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
            "fingerprint": "c0ffee0123456789",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "EmbedshiftV2SlowP95", "severity": "Warning"},
            "annotations": {"description": "p95 back under 1.2 s"},
            "startsAt": "2025-03-01T10:00:00Z",
            "endsAt": "2025-03-01T11:00:00Z",
            "generatorURL": "",
            "fingerprint": "0123456789abcdef",
        },
    ],
}


def alertmanager(**changes: Any) -> dict[str, Any]:
    """ALERTMANAGER with the first alert's fields changed (``labels``/``annotations`` merged)."""
    payload = copy.deepcopy(ALERTMANAGER)
    first = payload["alerts"][0]
    for key, value in changes.items():
        if key in ("labels", "annotations") and isinstance(value, dict):
            first[key] = {k: v for k, v in {**first[key], **value}.items() if v is not None}
        else:
            first[key] = value
    return payload


def test_the_guides_curl_is_an_emergency() -> None:
    [alert] = parse_alerts(json.loads(json.dumps(GUIDE)), now=NOW)
    assert alert == Alert(
        type="error_rate",
        severity="critical",
        status=AlertStatus.FIRING,
        value=0.5,
        threshold=0.1,
        source=AlertSource.GUIDE,
        received_at=NOW,
    )
    assert is_emergency(alert)


def test_an_alertmanager_group_gives_one_alert_each() -> None:
    firing, resolved = parse_alerts(ALERTMANAGER, now=NOW)
    assert firing.type == "EmbedshiftV2ErrorRate"
    assert firing.severity == "critical"
    assert firing.status is AlertStatus.FIRING
    assert (firing.value, firing.threshold) == (0.23, 0.1)
    assert firing.source is AlertSource.ALERTMANAGER
    assert firing.summary == "v2 error rate above 10 %"
    assert dict(firing.labels)["version"] == "v2"
    assert firing.received_at == NOW
    assert is_emergency(firing)

    assert resolved.type == "EmbedshiftV2SlowP95"
    assert resolved.severity == "warning"  # lower-cased
    assert resolved.status is AlertStatus.RESOLVED
    assert (resolved.value, resolved.threshold) == (None, None)
    assert resolved.summary == "p95 back under 1.2 s"  # description when there is no summary
    assert not is_emergency(resolved)


@pytest.mark.parametrize(
    ("payload", "emergency"),
    [
        pytest.param(GUIDE, True, id="guide: critical, value above threshold"),
        pytest.param({**GUIDE, "severity": "warning"}, False, id="guide: warning"),
        pytest.param({**GUIDE, "severity": "error"}, False, id="guide: error"),
        pytest.param({**GUIDE, "severity": "CRITICAL"}, True, id="guide: CRITICAL"),
        pytest.param({**GUIDE, "value": 0.05}, False, id="guide: value below threshold"),
        pytest.param({**GUIDE, "value": 0.1}, False, id="guide: value at threshold"),
        pytest.param({**GUIDE, "status": "resolved"}, False, id="guide: resolved"),
        pytest.param({**GUIDE, "value": "0.5"}, True, id="guide: numbers as strings"),
        pytest.param(alertmanager(), True, id="am: critical firing"),
        pytest.param(
            alertmanager(annotations={"value": None, "threshold": None}),
            True,
            id="am: critical firing without numbers (Alertmanager fires only on a breach)",
        ),
        pytest.param(
            alertmanager(annotations={"value": "0.55", "threshold": "0.7"}),
            True,
            id="am: a lower-bound rule (similarity below 0.7) still fired",
        ),
        pytest.param(
            alertmanager(annotations={"value": "12.5%"}),
            True,
            id="am: a humanized value is no number, still an emergency",
        ),
        pytest.param(alertmanager(status="resolved"), False, id="am: resolved"),
        pytest.param(alertmanager(labels={"severity": "warning"}), False, id="am: warning"),
        pytest.param(alertmanager(labels={"severity": None}), False, id="am: no severity"),
    ],
)
def test_only_firing_critical_breaches_are_emergencies(payload: Any, emergency: bool) -> None:
    alerts = parse_alerts(payload, now=NOW)
    assert is_emergency(alerts[0]) is emergency
    assert all(not is_emergency(a) for a in alerts[1:])


def test_an_alert_without_its_own_status_takes_the_groups() -> None:
    payload = alertmanager()
    for item in payload["alerts"]:
        del item["status"]
    assert [a.status for a in parse_alerts(payload, now=NOW)] == [AlertStatus.FIRING] * 2


@pytest.mark.parametrize(
    ("annotations", "value", "threshold"),
    [
        ({"value": " 0.5 ", "threshold": "1e-1"}, 0.5, 0.1),
        ({"value": "+Inf"}, float("inf"), None),  # a ratio over zero requests
        ({"value": "NaN"}, None, None),
        ({"value": "12.5%", "threshold": "10%"}, None, None),
        ({"value": ""}, None, None),
    ],
)
def test_alertmanager_numbers_come_from_plain_numeric_annotations(
    annotations: dict[str, str], value: float | None, threshold: float | None
) -> None:
    payload = alertmanager()
    payload["alerts"][0]["annotations"] = annotations
    [alert, _] = parse_alerts(payload, now=NOW)
    assert (alert.value, alert.threshold) == (value, threshold)


def test_an_empty_alertmanager_group_is_no_alert() -> None:
    assert parse_alerts({**ALERTMANAGER, "alerts": []}, now=NOW) == []


def without(payload: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != key}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (None, "payload"),
        ([GUIDE], "payload"),
        ("critical", "payload"),
        (without(GUIDE, "type"), "type"),
        ({**GUIDE, "type": ""}, "type"),
        ({**GUIDE, "type": 7}, "type"),
        (without(GUIDE, "severity"), "severity"),
        ({**GUIDE, "severity": None}, "severity"),
        (without(GUIDE, "value"), "value"),
        ({**GUIDE, "value": "high"}, "value"),
        ({**GUIDE, "value": True}, "value"),
        ({**GUIDE, "value": None}, "value"),
        ({**GUIDE, "value": float("nan")}, "value"),
        (without(GUIDE, "threshold"), "threshold"),
        ({**GUIDE, "threshold": [0.1]}, "threshold"),
        ({**GUIDE, "status": "pending"}, "status"),
        ({**GUIDE, "summary": 3}, "summary"),
        ({**ALERTMANAGER, "alerts": {"0": {}}}, "alerts"),
        ({**ALERTMANAGER, "alerts": ["firing"]}, "alerts[0]"),
        (alertmanager(labels=None), "alerts[0].labels"),
        (alertmanager(labels=["critical"]), "alerts[0].labels"),
        (alertmanager(labels={"alertname": None}), "alerts[0].labels.alertname"),
        (alertmanager(labels={"alertname": " "}), "alerts[0].labels.alertname"),
        (alertmanager(labels={"replica": 2}), "alerts[0].labels.replica"),
        (alertmanager(annotations="summary"), "alerts[0].annotations"),
        (alertmanager(annotations={"value": 0.5}), "alerts[0].annotations.value"),
        (alertmanager(status="pending"), "alerts[0].status"),
    ],
)
def test_malformed_payloads_name_the_field(payload: Any, field: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_alerts(payload, now=NOW)
    assert str(raised.value).startswith(f"{field}:"), str(raised.value)


def test_a_payload_without_status_anywhere_names_the_alerts_status() -> None:
    payload = without(alertmanager(), "status")
    for item in payload["alerts"]:
        del item["status"]
    with pytest.raises(ValueError, match=r"^alerts\[0\]\.status:"):
        parse_alerts(payload, now=NOW)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
GUIDE_FIELDS = st.sampled_from(["type", "severity", "value", "threshold", "status", "summary"])
ALERT_FIELDS = st.sampled_from(["status", "labels", "annotations", "startsAt"])


@given(payload=json_values)
def test_any_json_is_parsed_or_refused_with_a_valueerror(payload: object) -> None:
    # The app answers a ValueError with 422; anything else would be a 500.
    try:
        alerts = parse_alerts(payload, now=NOW)
    except ValueError as exc:
        assert str(exc)
    else:
        assert all(isinstance(a, Alert) for a in alerts)


@given(guide_field=GUIDE_FIELDS, alert_field=ALERT_FIELDS, junk=json_values)
def test_a_known_payload_with_any_field_spoiled_is_parsed_or_refused(
    guide_field: str, alert_field: str, junk: object
) -> None:
    spoiled_alert = copy.deepcopy(ALERTMANAGER)
    spoiled_alert["alerts"][0][alert_field] = junk
    for payload in ({**GUIDE, guide_field: junk}, {**ALERTMANAGER, "alerts": junk}, spoiled_alert):
        try:
            alerts = parse_alerts(payload, now=NOW)
        except ValueError as exc:
            assert ":" in str(exc)  # "<field>: <what is wrong>"
        else:
            assert all(isinstance(a, Alert) for a in alerts)


def test_describe_and_as_dict_for_the_routing_row_and_the_log() -> None:
    [guide] = parse_alerts(GUIDE, now=NOW)
    assert (
        guide.describe() == "critical alert error_rate firing: value 0.5 vs threshold 0.1 [guide]"
    )
    am, _ = parse_alerts(alertmanager(annotations={"value": None, "threshold": None}), now=NOW)
    assert am.describe() == (
        "critical alert EmbedshiftV2ErrorRate firing (v2 error rate above 10 %) [alertmanager]"
    )
    shown = json.loads(json.dumps(guide.as_dict()))
    assert shown == {
        "type": "error_rate",
        "severity": "critical",
        "status": "firing",
        "value": 0.5,
        "threshold": 0.1,
        "source": "guide",
        "receivedAt": "2025-03-01T12:00:00+00:00",
        "summary": "",
        "labels": {},
        "emergency": True,
    }


SECRET = "s3cret-token"


@pytest.mark.parametrize(
    ("header", "secret", "verdict"),
    [
        (f"Bearer {SECRET}", SECRET, "ok"),
        (f"bearer {SECRET}", SECRET, "ok"),  # the scheme is case-insensitive (RFC 9110)
        (f"  Bearer   {SECRET}  ", SECRET, "ok"),
        (None, SECRET, "missing"),
        ("", SECRET, "missing"),
        ("Bearer", SECRET, "missing"),
        ("Bearer   ", SECRET, "missing"),
        (SECRET, SECRET, "missing"),  # the token without its scheme
        (f"Basic {SECRET}", SECRET, "missing"),
        ("Bearer wrong", SECRET, "wrong"),
        (f"Bearer {SECRET.upper()}", SECRET, "wrong"),  # the token is case-sensitive
        (f"Bearer {SECRET}x", SECRET, "wrong"),
        (f"Bearer {SECRET[:-1]}", SECRET, "wrong"),
        ("Bearer jeton-é", SECRET, "wrong"),  # non-ASCII does not crash compare_digest
        ("Bearer jeton-é", "jeton-é", "ok"),
        ("Bearer anything", "", "wrong"),  # no secret configured: nobody gets in
    ],
)
def test_check_bearer(header: str | None, secret: str, verdict: str) -> None:
    assert check_bearer(header, secret) == verdict


def alert(severity: str, n: int) -> Alert:
    return Alert(
        type=f"alert-{n}",
        severity=severity,
        status=AlertStatus.FIRING,
        value=None,
        threshold=None,
        source=AlertSource.ALERTMANAGER,
        received_at=NOW + timedelta(seconds=n),
    )


LOGGED = [
    alert(s, n)
    for n, s in enumerate(["info", "critical", "warning", "none", "error", "page", "info"])
]


@pytest.mark.parametrize(
    ("min_severity", "expected"),
    [
        (None, [6, 5, 4, 3, 2, 1, 0]),
        ("info", [6, 4, 2, 1, 0]),  # unknown severities only show unfiltered
        ("warning", [4, 2, 1]),
        ("error", [4, 1]),
        ("ERROR", [4, 1]),
        ("critical", [1]),
    ],
)
def test_recent_alerts_newest_first_at_or_above_a_severity(
    min_severity: str | None, expected: list[int]
) -> None:
    log = AlertLog()
    log.add(LOGGED[:3])
    log.add(LOGGED[3:])
    assert [a.type for a in log.recent(min_severity=min_severity)] == [
        f"alert-{n}" for n in expected
    ]


def test_the_log_keeps_only_the_most_recent() -> None:
    log = AlertLog(capacity=3)
    log.add(LOGGED)
    assert len(log) == 3
    assert [a.type for a in log.recent()] == ["alert-6", "alert-5", "alert-4"]


@pytest.mark.parametrize("bad", ["fatal", "", "errors"])
def test_an_unknown_severity_filter_is_refused_with_the_allowed_values(bad: str) -> None:
    with pytest.raises(ValueError, match="info, warning, error, critical"):
        AlertLog().recent(min_severity=bad)
    with pytest.raises(ValueError, match="severity"):
        parse_severity(bad)


def test_severities_are_ordered_mildest_first() -> None:
    assert SEVERITIES == ("info", "warning", "error", "critical")


def test_a_log_needs_room_for_one() -> None:
    with pytest.raises(ValueError, match="capacity"):
        AlertLog(capacity=0)
