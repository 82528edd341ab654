"""The alert webhook's parts: payload parsing, the emergency rule, the token check, a recent log.

``POST /api/alerts/webhook`` takes two payloads:

- the guide's: ``{"type": "error_rate", "severity": "critical", "value": 0.5, "threshold": 0.1}``
  (plus an optional ``"status": "firing" | "resolved"`` and ``"summary"``);
- Alertmanager's webhook (``"version": "4"``): ``{"receiver", "status", "alerts": [{"status",
  "labels": {"alertname", "severity", ...}, "annotations": {...}, "startsAt", "endsAt", ...}],
  "groupLabels", "commonLabels", ...}``. ``value``/``threshold`` come from the annotations of
  those names when they hold plain numbers.

Parsing is pure (the receive time is a parameter). Malformed input raises ``ValueError`` whose
message names the field (``alerts[0].labels.alertname: required``), for the app's 400.
"""

from __future__ import annotations

import hmac
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from rag_service.errors import ConfigError
from rag_service.redaction import header_value_problem

# Ordered, mildest first: ``?severity=error`` means "error or worse".
SEVERITIES = ("info", "warning", "error", "critical")
# An Alertmanager alert without a severity label (it is only a convention there).
NO_SEVERITY = "none"
# The environment variable holding the webhooks' bearer token: rag_service's and the operator's
# receiver read the same one, so one Secret carries Alertmanager's token to both.
WEBHOOK_SECRET_ENV = "ALERT_WEBHOOK_SECRET"  # noqa: S105 (a variable's name, not a secret)


def webhook_secret(value: str | None) -> str | None:
    """``ALERT_WEBHOOK_SECRET``'s value as the bearer token the webhooks compare; None when unset
    or empty. A value no ``Authorization`` header can carry (a line break from ``echo`` into the
    Secret, a control character, 64 KiB) could never match: a ``ConfigError`` saying what is
    wrong in words of its own, never quoting the value. Pure."""
    if not value:
        return None
    problem = header_value_problem(value)
    if problem is not None:
        raise ConfigError(
            f"{WEBHOOK_SECRET_ENV} cannot be a bearer token: {problem}; put the token alone in "
            "its Secret key (no newline) and restart"
        )
    return value


class AlertStatus(str, Enum):
    FIRING = "firing"
    RESOLVED = "resolved"


class AlertSource(str, Enum):
    GUIDE = "guide"
    ALERTMANAGER = "alertmanager"


@dataclass(frozen=True)
class Alert:
    type: str  # the guide's ``type``, Alertmanager's ``alertname`` label
    severity: str  # lower-case; one of SEVERITIES by convention, but senders may use others
    status: AlertStatus
    value: float | None
    threshold: float | None
    source: AlertSource
    received_at: datetime
    summary: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # Alertmanager labels, sorted (hashable)

    def describe(self) -> str:
        """One line for logs and the routing row's ``reason``."""
        text = f"{self.severity} alert {self.type} {self.status.value}"
        if self.value is not None and self.threshold is not None:
            text += f": value {self.value:g} vs threshold {self.threshold:g}"
        elif self.value is not None:
            text += f": value {self.value:g}"
        if self.summary:
            text += f" ({self.summary})"
        return f"{text} [{self.source.value}]"

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "severity": self.severity,
            "status": self.status.value,
            "value": self.value,
            "threshold": self.threshold,
            "source": self.source.value,
            "receivedAt": self.received_at.isoformat(),
            "summary": self.summary,
            "labels": dict(self.labels),
            "emergency": is_emergency(self),
        }


def parse_alerts(payload: object, *, now: datetime) -> list[Alert]:
    """The alerts in a decoded JSON webhook body, received at ``now``. Pure.

    A body with an ``alerts`` key is Alertmanager's, anything else the guide's. Raises
    ``ValueError`` naming the bad field.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload: must be a JSON object; got {_json_type(payload)}")
    if "alerts" in payload:
        return _parse_alertmanager(payload, now=now)
    return [_parse_guide(payload, now=now)]


def is_emergency(alert: Alert) -> bool:
    """Whether ``alert`` must route all traffic back to v1 at once. Pure.

    Critical and firing, and for the guide's format the value breaches the threshold
    (``value > threshold``: the guide's thresholds are upper bounds). An Alertmanager alert is
    a breach by construction (Alertmanager only sends ``firing`` when its rule's expression
    holds), and its ``value``/``threshold`` annotations are informative only: the rule may just
    as well be a lower bound (similarity below 0.7).
    """
    if alert.severity != "critical" or alert.status is not AlertStatus.FIRING:
        return False
    if alert.source is AlertSource.ALERTMANAGER:
        return True
    return alert.value is not None and alert.threshold is not None and alert.value > alert.threshold


def check_bearer(authorization: str | None, secret: str) -> Literal["ok", "missing", "wrong"]:
    """Check an ``Authorization: Bearer <token>`` header against ``secret`` in constant time.

    ``missing`` (answer 401): no header, an empty one, another scheme or no token. ``wrong``
    (answer 403): a bearer token that is not ``secret``. An empty ``secret`` admits no one: an
    unset ``ALERT_WEBHOOK_SECRET`` must not open the emergency switch to everybody.
    """
    if authorization is None:
        return "missing"
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return "missing"
    # Bytes: compare_digest refuses non-ASCII str, and a header may carry anything.
    matches = hmac.compare_digest(
        token.encode("utf-8", "surrogatepass"), secret.encode("utf-8", "surrogatepass")
    )
    return "ok" if matches else "wrong"


def parse_severity(value: str) -> str:
    """A ``?severity=`` filter value, lower-cased; ``ValueError`` if it is not in SEVERITIES."""
    severity = value.strip().lower()
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}; got {value!r}")
    return severity


class AlertLog:
    """The most recent alerts received, for ``GET /api/alerts/webhook?severity=error``.

    A bounded ring in memory: it is a debugging aid, not an audit trail (the operator records
    what it did about an alert in the resource's status and events).
    """

    def __init__(self, *, capacity: int = 200) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1; got {capacity}")
        self._alerts: deque[Alert] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._alerts)

    def add(self, alerts: Iterable[Alert]) -> None:
        self._alerts.extend(alerts)

    def recent(self, *, min_severity: str | None = None) -> list[Alert]:
        """Newest first; with ``min_severity``, only alerts that severe or worse.

        Severities outside SEVERITIES (``none``, ``page``) only show without a filter.
        ``min_severity`` is parsed as ``parse_severity`` does (``ValueError`` if unknown).
        """
        newest_first = list(reversed(self._alerts))
        if min_severity is None:
            return newest_first
        floor = SEVERITIES.index(parse_severity(min_severity))
        return [a for a in newest_first if _rank(a.severity) >= floor]


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


def _parse_guide(payload: Mapping[Any, Any], *, now: datetime) -> Alert:
    return Alert(
        type=_required_str(payload, "type", path="type"),
        severity=_required_str(payload, "severity", path="severity").lower(),
        status=_status(payload.get("status", AlertStatus.FIRING.value), path="status"),
        value=_required_number(payload, "value", path="value"),
        threshold=_required_number(payload, "threshold", path="threshold"),
        source=AlertSource.GUIDE,
        received_at=now,
        summary=_optional_str(payload, "summary", path="summary"),
    )


def _parse_alertmanager(payload: Mapping[Any, Any], *, now: datetime) -> list[Alert]:
    alerts = payload["alerts"]
    if not isinstance(alerts, list):
        raise ValueError(f"alerts: must be a list; got {_json_type(alerts)}")
    group_status = payload.get("status")
    parsed = []
    for i, item in enumerate(alerts):
        path = f"alerts[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{path}: must be an object; got {_json_type(item)}")
        labels = _string_map(item.get("labels"), path=f"{path}.labels")
        annotations = _string_map(item.get("annotations", {}), path=f"{path}.annotations")
        alertname = labels.get("alertname", "").strip()
        if not alertname:
            raise ValueError(f"{path}.labels.alertname: required")
        # Each alert carries its own status; the group's (firing if any fires) is a fallback.
        status = item.get("status", group_status)
        parsed.append(
            Alert(
                type=alertname,
                severity=labels.get("severity", NO_SEVERITY).strip().lower() or NO_SEVERITY,
                status=_status(status, path=f"{path}.status"),
                value=_annotation_number(annotations.get("value")),
                threshold=_annotation_number(annotations.get("threshold")),
                source=AlertSource.ALERTMANAGER,
                received_at=now,
                summary=annotations.get("summary") or annotations.get("description") or "",
                labels=tuple(sorted(labels.items())),
            )
        )
    return parsed


def _annotation_number(text: str | None) -> float | None:
    # Annotations are templates (``{{ $value | humanizePercentage }}`` gives "12.5%"): a value
    # that is not a plain number is shown nowhere rather than refusing the whole group, which
    # Alertmanager would retry forever while the critical alert in it went unheeded.
    if text is None:
        return None
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _required_str(payload: Mapping[Any, Any], key: str, *, path: str) -> str:
    if key not in payload:
        raise ValueError(f"{path}: required")
    value = payload[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: must be a non-empty string; got {_json_type(value)}")
    return value.strip()


def _optional_str(payload: Mapping[Any, Any], key: str, *, path: str) -> str:
    value = payload.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{path}: must be a string; got {_json_type(value)}")
    return value.strip()


def _required_number(payload: Mapping[Any, Any], key: str, *, path: str) -> float:
    # Required in the guide's format: without both numbers there is no breach to judge, and a
    # 400 tells the sender so, where a silent "not an emergency" would not.
    if key not in payload:
        raise ValueError(f"{path}: required")
    value = payload[key]
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{path}: must be a number; got {value!r}") from None
    # bool is an int to Python, but ``true`` is no measurement.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: must be a number; got {_json_type(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{path}: must be a finite number; got {value!r}")
    return number


def _status(value: object, *, path: str) -> AlertStatus:
    if isinstance(value, str):
        try:
            return AlertStatus(value.strip().lower())
        except ValueError:
            pass
    raise ValueError(f"{path}: must be 'firing' or 'resolved'; got {value!r}")


def _string_map(value: object, *, path: str) -> dict[str, str]:
    if value is None:
        raise ValueError(f"{path}: required")
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: must be an object; got {_json_type(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ValueError(f"{path}.{key}: must be a string; got {_json_type(item)}")
    return {str(k): v for k, v in value.items()}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
