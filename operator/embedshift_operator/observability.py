"""The Prometheus alert rules and the Grafana dashboard, generated from the metric contract. Pure.

``python -m embedshift_operator.observability`` (``make observability``) writes
``charts/embedshift/files/rules.yaml`` (a Prometheus rule file) and
``charts/embedshift/dashboards/embedshift.json`` (a Grafana dashboard); tests fail when the
checked-in files are not what this module generates, so every expression and threshold keeps
coming from :mod:`rag_service.criteria` (the one place for the guide's numbers and PromQL) and
the operator's own series from :mod:`embedshift_operator.adapters.operator_metrics`.

The alerts keep the ``migration`` label ("namespace/name"): the operator's receiver
(:func:`embedshift_operator.adapters.alerts.targets`) rolls that migration back when one of them
is critical and firing. They keep the ``namespace`` label too (every rule aggregates
``by (namespace, migration)``): the one the scrape attaches to each series (a ServiceMonitor's
target's namespace), which the receiver requires to be the migration's
(:func:`embedshift_operator.adapters.alerts.in_own_namespace`) unless it trusts alerts across
namespaces. Only the rollback thresholds are critical, so an alert never rolls back
what the operator's own analysis would keep; the success criteria page as warnings.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from embedshift_operator.adapters.kube import COMPONENT_FOLLOWER, LABEL_COMPONENT, LABEL_MIGRATION
from embedshift_operator.adapters.operator_metrics import AUTOMATIC_ROLLBACK_REASONS
from embedshift_operator.resource import AnalysisSpec
from rag_service.criteria import (
    DEFAULT_ROLLBACK_THRESHOLDS,
    DEFAULT_SUCCESS_CRITERIA,
    METRICS,
    CriterionDefault,
    metric_query,
    requests_query,
)

__all__ = [
    "DASHBOARD_PATH",
    "FOLLOWER_LAG_SECONDS",
    "RULES_PATH",
    "alerts_table",
    "dashboard",
    "dashboard_queries",
    "main",
    "render_dashboard",
    "render_rules",
    "rules",
]

_REPO = Path(__file__).resolve().parents[2]
RULES_PATH = _REPO / "charts" / "embedshift" / "files" / "rules.yaml"
DASHBOARD_PATH = _REPO / "charts" / "embedshift" / "dashboards" / "embedshift.json"

# The analysis' defaults (spec.analysis): each alert judges the window a check judges, and is
# quiet below the traffic under which a check says nodata.
WINDOW: str = AnalysisSpec.model_fields["window"].default
MIN_REQUESTS: int = AnalysisSpec.model_fields["min_requests"].default
# The guide gives no number for the follower; changes older than this are edits v2's searches
# have not seen for five minutes, well past a healthy follower's seconds (LISTEN + sweep).
FOLLOWER_LAG_SECONDS = 300
# A label value selecting every migration: the rules aggregate by migration instead.
_EVERY = "=~.+"
# What every alert rule aggregates by: the migration, and the namespace the scrape attached (the
# receiver accepts an alert for "ns/name" only with namespace="ns"; dropping it refuses them all).
_KEEP = "namespace, migration"


@dataclass(frozen=True)
class _Alert:
    name: str
    criterion: CriterionDefault
    severity: str
    duration: str  # how long the breach must hold ("for")
    runbook: str


def _criterion(name: str) -> CriterionDefault:
    for criterion in (*DEFAULT_SUCCESS_CRITERIA, *DEFAULT_ROLLBACK_THRESHOLDS):
        if criterion.name == name:
            return criterion
    raise KeyError(name)


_RUNBOOK_LATENCY = (
    "Compare the versions: `embedshift compare --sample 200`. Check the query cache hit rate "
    "(a cold cache embeds every query), that the ANN index exists (`embedshift migrate status`; "
    "`embedshift migrate index` builds it) and the embedding API's response times."
)
# The search service answers these reads only with its ALERT_WEBHOOK_SECRET as a bearer token.
_AUTH = '-H "Authorization: Bearer $ALERT_WEBHOOK_SECRET"'
_RUNBOOK_ERRORS = (
    f'Read the v2 errors: `curl "$SERVICE/api/alerts/webhook?severity=error" {_AUTH}` and the '
    "service's log; check the target API key and rate limits and "
    f"`curl $SERVICE/api/monitoring/circuit-breaker {_AUTH}`. Fallbacks count as errors: v1 "
    "answered."
)
_ROLLBACK_NOTE = (
    " Critical: the operator's receiver rolls this migration back to 0 % while it fires; "
    "after the fix, retry with a Git commit that changes the resource's spec."
)

_ALERTS: tuple[_Alert, ...] = (
    _Alert(
        "EmbeddingV2ErrorRateCritical",
        _criterion("error-rate-critical"),
        "critical",
        "1m",
        _RUNBOOK_ERRORS + _ROLLBACK_NOTE,
    ),
    _Alert(
        "EmbeddingV2LatencyCritical",
        _criterion("p95-latency-critical"),
        "critical",
        "1m",
        _RUNBOOK_LATENCY + _ROLLBACK_NOTE,
    ),
    _Alert(
        "EmbeddingV2ErrorRateHigh",
        _criterion("error-rate"),
        "warning",
        "10m",
        _RUNBOOK_ERRORS + " The rollout does not promote while this holds.",
    ),
    _Alert(
        "EmbeddingV2LatencyHigh",
        _criterion("p95-latency"),
        "warning",
        "10m",
        _RUNBOOK_LATENCY + " The rollout does not promote while this holds.",
    ),
    _Alert(
        "EmbeddingV2LowSimilarity",
        _criterion("avg-similarity"),
        "warning",
        "10m",
        "Check the embedding dimensions (`embedshift migrate verify`), that documents and "
        "queries are preprocessed the same way, and compare the versions' results on the same "
        "queries: `embedshift compare --queries FILE.jsonl`.",
    ),
    _Alert(
        "EmbeddingV2LowCacheHitRate",
        _criterion("cache-hit-rate"),
        "warning",
        "15m",
        "A cold or too small query cache makes every search call the embedding API (latency, "
        "cost). Expected for minutes after a restart or a step up; if it persists, check the "
        "cache's size and that replicas share it.",
    ),
)


def _by_migration(query: str) -> str:
    """A criterion's query for one migration, made to keep the ``namespace`` and ``migration``
    labels of every migration: each ``sum`` aggregates by them. Raises if the query has a shape
    this does not know, so a new template cannot silently lose the labels."""
    rewritten = query.replace("sum by (le) (", f"sum by (le, {_KEEP}) (").replace(
        "sum(", f"sum by ({_KEEP}) ("
    )
    unaggregated = "sum(" in rewritten or "sum by (le) (" in rewritten
    if "vector(" in rewritten or unaggregated or f"{_KEEP}) (" not in rewritten:
        raise ValueError(f"cannot aggregate by namespace and migration: {query}")
    return rewritten


def _condition(criterion: CriterionDefault) -> str:
    """PromQL that has a series per migration whose v2 breaches ``criterion``."""
    bound = criterion.bound
    if bound.compares_versions:
        raise ValueError(f"{criterion.name} compares versions; no alert rule for it")
    value = _by_migration(
        metric_query(criterion.metric, version="v2", migration=_EVERY, window=WINDOW)
    )
    limit = bound.limit()
    breach = "<" if bound.min is not None else ">"  # bounds are inclusive: equality passes
    traffic = _by_migration(requests_query(version="v2", migration=_EVERY, window=WINDOW))
    return f"({value}) {breach} {limit:g}\nand on ({_KEEP})\n({traffic}) >= {MIN_REQUESTS}"


def _threshold_rule(alert: _Alert) -> dict[str, Any]:
    criterion = alert.criterion
    metric = METRICS[criterion.metric]
    return {
        "alert": alert.name,
        "expr": _condition(criterion),
        "for": alert.duration,
        "labels": {"severity": alert.severity, "criterion": criterion.name},
        "annotations": {
            "summary": f"{{{{ $labels.migration }}}}: {criterion.description}",
            "description": (
                f"v2's {metric.description} over {WINDOW} breaks the bound "
                f"{criterion.bound.describe()} ({criterion.name}) for {alert.duration}, with at "
                f"least {MIN_REQUESTS} v2 requests in the window."
            ),
            "runbook": alert.runbook,
        },
    }


def _lag_rule() -> dict[str, Any]:
    return {
        "alert": "EmbeddingFollowerLagging",
        # max by migration: one alert per migration, whichever operator replica reported it (the
        # operator's series carry the operator's namespace, the release's in the default install)
        "expr": (
            f"max by ({_KEEP}) (embedshift_operator_follower_lag_seconds) > {FOLLOWER_LAG_SECONDS}"
        ),
        "for": "5m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "{{ $labels.migration }}: the follower is behind the source table",
            "description": (
                f"The oldest change not yet re-embedded is older than {FOLLOWER_LAG_SECONDS} s: "
                "v2's searches do not see recent edits."
            ),
            "runbook": (
                "Check the follower Deployment and its log (`kubectl -n NAMESPACE get deploy "
                f"-l {LABEL_COMPONENT}={COMPONENT_FOLLOWER},{LABEL_MIGRATION}=NAME`); "
                "`embedshift migrate status` shows the queue (pending rows, oldest change); "
                "the embedding API's rate limits and errors slow it down."
            ),
        },
    }


def _rollback_rule() -> dict[str, Any]:
    reasons = "|".join(AUTOMATIC_ROLLBACK_REASONS)
    return {
        "alert": "EmbeddingMigrationRolledBack",
        "expr": (
            f"sum by ({_KEEP}, reason) (increase(embedshift_operator_rollbacks_total"
            f'{{reason=~"{reasons}"}}[{WINDOW}])) > 0'
        ),
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "{{ $labels.migration }} was rolled back to 0 % ({{ $labels.reason }})",
            "description": (
                "The operator rolled v2 back by itself: AlertFiring (a critical alert for this "
                "migration), EmergencyFlag (the service's emergency webhook) or "
                "ThresholdBreached (a rollback threshold of spec.analysis). A warning, never "
                "critical: it must not keep the migration at 0 % after a retry."
            ),
            "runbook": (
                "`kubectl describe em NAME` shows the Events and the criterion that breached; "
                "`embedshift rollout status` the timeline. Fix the cause, then retry with a Git "
                "commit that changes the spec."
            ),
        },
    }


def rules() -> dict[str, Any]:
    """The rule file: one group, the guide's thresholds first."""
    return {
        "groups": [
            {
                "name": "embedshift",
                "rules": [
                    *(_threshold_rule(a) for a in _ALERTS),
                    _lag_rule(),
                    _rollback_rule(),
                ],
            }
        ]
    }


def alerts_table() -> str:
    """The rules as a Markdown table (docs/alerts.md holds it; a test keeps it current)."""
    lines = ["| alert | severity | fires when | for |", "|---|---|---|---|"]
    for alert in _ALERTS:
        c = alert.criterion
        breach = "<" if c.bound.min is not None else ">"
        metric = METRICS[c.metric]
        unit = " s" if metric.unit == "seconds" else ""
        lines.append(
            f"| `{alert.name}` | {alert.severity} | v2 {metric.description} "
            f"{breach} {c.bound.limit():g}{unit} over {WINDOW} (`{c.name}`), ≥ {MIN_REQUESTS} v2 "
            f"requests | {alert.duration} |"
        )
    lag, rollback = _lag_rule(), _rollback_rule()
    lines.append(
        f"| `{lag['alert']}` | warning | the follower's oldest queued change is older than "
        f"{FOLLOWER_LAG_SECONDS} s | {lag['for']} |"
    )
    lines.append(
        f"| `{rollback['alert']}` | warning | the operator rolled back by itself "
        f"({', '.join(AUTOMATIC_ROLLBACK_REASONS)}) in the last {WINDOW} | – |"
    )
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line expressions as block scalars: readable in review and in the PrometheusRule.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_rules() -> str:
    header = (
        "# Generated by `python -m embedshift_operator.observability` from rag_service/criteria.py"
        "\n# and the operator's metrics; do not edit (a test compares this file with the output).\n"
    )
    return header + yaml.dump(
        rules(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )


# ---- the dashboard ------------------------------------------------------------------------------

_M = "$migration"
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_VERSIONS = ("v1", "v2")
# The query models of each version, for the cost series (labelled by provider and model).
_MODEL = {"v1": "$v1_model", "v2": "$v2_model"}


def _q(name: str, version: str) -> str:
    return metric_query(
        name, version=version, migration=_M, window=WINDOW, provider=_EVERY, model=_MODEL[version]
    )


def _p50(version: str) -> str:
    p95 = _q("p95_latency_seconds", version)
    p50 = p95.replace("histogram_quantile(0.95,", "histogram_quantile(0.5,")
    if p50 == p95:
        raise ValueError(f"the p95 template changed shape: {p95}")
    return p50


def _per_version(name: str) -> list[tuple[str, str]]:
    return [(_q(name, v), v) for v in _VERSIONS]


def _fallback_rate(version: str) -> str:
    scope = f'migration="{_M}",version="{version}"'
    return (
        f'sum(rate(embedshift_search_requests_total{{{scope},outcome="fallback"}}[{WINDOW}])) / '
        f"sum(rate(embedshift_search_requests_total{{{scope}}}[{WINDOW}]))"
    )


_SEL = f'{{migration="{_M}"}}'


def _panels() -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """(title, panel type, unit, [(query, legend)]) in reading order."""
    return [
        (
            "Share of searches on v2",
            "timeseries",
            "percent",
            [
                (f"embedshift_operator_percentage{_SEL}", "operator (effective)"),
                (f"embedshift_rollout_percentage{_SEL}", "service {{instance}}"),
            ],
        ),
        (
            "Search latency p50 / p95",
            "timeseries",
            "s",
            [(_p50(v), f"{v} p50") for v in _VERSIONS]
            + [(q, f"{v} p95") for q, v in _per_version("p95_latency_seconds")],
        ),
        (
            "Error and fallback rates",
            "timeseries",
            "percentunit",
            [(q, f"{v} errors + fallbacks") for q, v in _per_version("error_rate")]
            + [(_fallback_rate("v2"), "v2 fallbacks to v1")],
        ),
        (
            "Top-1 similarity (average)",
            "timeseries",
            "none",
            _per_version("avg_top_similarity"),
        ),
        ("Query cache hit rate", "timeseries", "percentunit", _per_version("cache_hit_rate")),
        (
            "Embedding cost per 1k queries",
            "timeseries",
            "currencyUSD",
            _per_version("cost_per_1k_queries_usd"),
        ),
        (
            "Query embedding tokens per second",
            "timeseries",
            "short",
            [
                (
                    "sum by (provider, model) "
                    f"(rate(embedshift_embedding_tokens_total{_SEL}[{WINDOW}]))",
                    "{{provider}} {{model}}",
                )
            ],
        ),
        (
            "Query embedding spend per hour",
            "timeseries",
            "currencyUSD",
            [
                (
                    "sum by (provider, model) "
                    f"(increase(embedshift_embedding_cost_usd_total{_SEL}[1h]))",
                    "{{provider}} {{model}}",
                )
            ],
        ),
        (
            "Re-embedding progress",
            "stat",
            "percentunit",
            [
                (
                    f'embedshift_operator_migration_rows{{migration="{_M}",state="migrated"}} '
                    "/ ignoring (state) "
                    f'embedshift_operator_migration_rows{{migration="{_M}",state="total"}}',
                    "migrated",
                )
            ],
        ),
        (
            "Rows by state",
            "timeseries",
            "short",
            [(f"embedshift_operator_migration_rows{_SEL}", "{{state}}")],
        ),
        (
            "Follower lag (oldest change not re-embedded)",
            "timeseries",
            "s",
            [(f"embedshift_operator_follower_lag_seconds{_SEL}", "lag")],
        ),
        (
            "Circuit breaker open",
            "state-timeline",
            "none",
            [(f"embedshift_circuit_breaker_open{_SEL}", "{{version}} {{instance}}")],
        ),
        (
            "Verdicts per criterion (last hour)",
            "timeseries",
            "short",
            [
                (
                    "sum by (criterion, verdict) "
                    f"(increase(embedshift_operator_verdicts_total{_SEL}[1h]))",
                    "{{criterion}} {{verdict}}",
                )
            ],
        ),
        (
            "Rollbacks by reason (last hour)",
            "timeseries",
            "short",
            [
                (
                    f"sum by (reason) (increase(embedshift_operator_rollbacks_total{_SEL}[1h]))",
                    "{{reason}}",
                )
            ],
        ),
        (
            "Searches per second",
            "timeseries",
            "reqps",
            [
                (
                    "sum by (version, outcome) "
                    f"(rate(embedshift_search_requests_total{_SEL}[{WINDOW}]))",
                    "{{version}} {{outcome}}",
                )
            ],
        ),
    ]


# A transition's series appears with its first count, which increase() cannot see: "unless
# offset" catches the appearance, increase() every later one.
_TRANSITIONS = (
    f"(increase(embedshift_operator_transitions_total{_SEL}[1m]) > 0) or "
    f"(embedshift_operator_transitions_total{_SEL} unless "
    f"embedshift_operator_transitions_total{_SEL} offset 1m)"
)


def _panel(index: int, title: str, kind: str, unit: str, targets: Sequence[tuple[str, str]]) -> Any:
    width = 12
    return {
        "id": index + 1,
        "title": title,
        "type": kind,
        "datasource": _DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * width, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "datasource": _DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "refId": chr(ord("A") + i),
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": _DATASOURCE,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
    }


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (schema 39): one migration at a time, picked by ``$migration``."""
    cost = f'embedshift_embedding_cost_usd_total{{migration="{_M}"}}'
    return {
        "uid": "embedshift",
        "title": "embedshift: embedding migration",
        "description": "An EmbeddingMigration's rollout, v1 against v2, and the operator's "
        "decisions. Generated by python -m embedshift_operator.observability.",
        "tags": ["embedshift"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "annotations": {
            "list": [
                {
                    "name": "Phase transitions",
                    "datasource": _DATASOURCE,
                    "enable": True,
                    "iconColor": "purple",
                    "expr": _TRANSITIONS,
                    "step": "30s",
                    "titleFormat": "{{phase}}",
                    "textFormat": "{{reason}}",
                    "tagKeys": "phase,reason",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                },
                _variable(
                    "migration",
                    "Migration",
                    "label_values(embedshift_search_requests_total, migration)",
                ),
                _variable("v1_model", "v1 query model", f"label_values({cost}, model)"),
                _variable("v2_model", "v2 query model", f"label_values({cost}, model)"),
            ]
        },
        "panels": [_panel(i, *panel) for i, panel in enumerate(_panels())],
    }


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every query the dashboard runs: each panel's, the annotation's."""
    found = [("annotation: Phase transitions", _TRANSITIONS)]
    for title, _, _, targets in _panels():
        found += [(f"{title}: {legend}", expr) for expr, legend in targets]
    return found


def render_dashboard() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedshift_operator.observability",
        description="Write the chart's Prometheus rules and Grafana dashboard.",
    )
    parser.add_argument("--rules", type=Path, default=RULES_PATH, help=f"default: {RULES_PATH}")
    parser.add_argument(
        "--dashboard", type=Path, default=DASHBOARD_PATH, help=f"default: {DASHBOARD_PATH}"
    )
    args = parser.parse_args(argv)
    for path, text in ((args.rules, render_rules()), (args.dashboard, render_dashboard())):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
