"""The guide's criteria as pure functions: PromQL scoped by migration, bounds, verdicts."""

from __future__ import annotations

import math

import pytest

from rag_service.criteria import (
    DEFAULT_ROLLBACK_THRESHOLDS,
    DEFAULT_SUCCESS_CRITERIA,
    METRICS,
    Bound,
    MetricSource,
    Verdict,
    judge,
    metric_query,
    render_custom_query,
    requests_query,
)


@pytest.mark.parametrize(
    ("value", "bound", "v1", "expected"),
    [
        (0.5, Bound(max=0.8), None, Verdict.PASS),
        (0.8, Bound(max=0.8), None, Verdict.PASS),  # inclusive, as Flagger's thresholdRange
        (0.81, Bound(max=0.8), None, Verdict.FAIL),
        (0.71, Bound(min=0.7), None, Verdict.PASS),
        (0.69, Bound(min=0.7), None, Verdict.FAIL),
        (None, Bound(min=0.7), None, Verdict.NODATA),
        (math.nan, Bound(max=1.0), None, Verdict.NODATA),
        (0.3, Bound(max_ratio_to_v1=1.0), 0.4, Verdict.PASS),
        (0.5, Bound(max_ratio_to_v1=1.0), 0.4, Verdict.FAIL),
        (0.5, Bound(max_ratio_to_v1=1.5), 0.4, Verdict.PASS),
        (0.5, Bound(max_ratio_to_v1=1.0), None, Verdict.NODATA),  # nothing to compare with
        (0.5, Bound(max_ratio_to_v1=1.0), math.nan, Verdict.NODATA),
        (0.0, Bound(max_ratio_to_v1=1.0), 0.0, Verdict.PASS),  # two free models
        (0.0, Bound(max=0), None, Verdict.PASS),  # zero critical errors
        (1.0, Bound(max=0), None, Verdict.FAIL),
    ],
)
def test_judge(value: float | None, bound: Bound, v1: float | None, expected: Verdict) -> None:
    assert judge(value, bound, v1_value=v1) is expected


@pytest.mark.parametrize(
    "kwargs", [{}, {"min": 1.0, "max": 2.0}, {"max": 1.0, "max_ratio_to_v1": 1.0}]
)
def test_a_bound_needs_exactly_one_limit(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="exactly one of min, max and maxRatioToV1"):
        Bound(**kwargs)


def test_bounds_read_as_people_write_them() -> None:
    assert Bound(min=0.7).describe() == "≥ 0.7"
    assert Bound(max=0.8).describe() == "≤ 0.8"
    assert Bound(max_ratio_to_v1=1.0).describe() == "≤ 1 × v1"


def test_every_query_is_scoped_to_its_migration_version_and_window() -> None:
    for name, metric in METRICS.items():
        if metric.source is not MetricSource.PROMETHEUS:
            continue
        query = metric_query(
            name, version="v2", migration="rag/docs", window="5m", provider="openai", model="m"
        )
        assert 'migration="rag/docs"' in query, name
        assert 'version="v2"' in query, name
        assert ("[24h]" if name == "critical_errors" else "[5m]") in query, name
        assert "[5m]" not in query or name != "critical_errors"


def test_error_rate_counts_fallbacks_as_failures() -> None:
    query = metric_query("error_rate", version="v2", migration="a/b", window="1m")
    assert 'outcome=~"error|fallback"' in query


def test_requests_query_is_the_traffic_gate() -> None:
    assert requests_query(version="v2", migration="a/b", window="30s") == (
        'sum(increase(embedshift_search_requests_total{migration="a/b",version="v2"}[30s]))'
    )


@pytest.mark.parametrize("window", ["", "5", "5 m", "-1m", "5m; drop"])
def test_a_bad_window_is_refused(window: str) -> None:
    with pytest.raises(ValueError, match="not a PromQL range"):
        metric_query("error_rate", version="v2", migration="a/b", window=window)


def test_database_metrics_have_no_promql() -> None:
    with pytest.raises(ValueError, match="not a Prometheus metric"):
        metric_query("follower_lag_seconds", version="v2", migration="a/b", window="5m")


def test_custom_queries_fill_flagger_style_placeholders() -> None:
    query = render_custom_query(
        'sum(x{namespace="{{ namespace }}",name="{{name}}",m="{{ migration }}"}[{{ window }}])',
        migration="rag/docs",
        window="2m",
    )
    assert query == 'sum(x{namespace="rag",name="docs",m="rag/docs"}[2m])'
    with pytest.raises(ValueError, match="unknown placeholder"):
        render_custom_query("x{a='{{ nope }}'}", migration="a/b", window="1m")


def test_defaults_are_the_guides_numbers() -> None:
    success = {c.name: c for c in DEFAULT_SUCCESS_CRITERIA}
    assert success["p95-latency"].bound == Bound(max=0.8)
    assert success["p95-latency-vs-v1"].bound == Bound(max_ratio_to_v1=1.0)
    assert success["avg-similarity"].bound == Bound(min=0.7)
    assert success["error-rate"].bound == Bound(max=0.001)
    assert success["cache-hit-rate"].bound == Bound(min=0.7)
    assert success["critical-errors"].bound == Bound(max=0)
    assert success["cost-vs-v1"].bound == Bound(max_ratio_to_v1=1.0)
    rollback = {c.name: c.bound for c in DEFAULT_ROLLBACK_THRESHOLDS}
    assert rollback == {
        "error-rate-critical": Bound(max=0.10),
        "p95-latency-critical": Bound(max=1.2),
    }
    for criterion in (*DEFAULT_SUCCESS_CRITERIA, *DEFAULT_ROLLBACK_THRESHOLDS):
        assert criterion.metric in METRICS
