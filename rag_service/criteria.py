"""The guide's success criteria and rollback thresholds: metric names, PromQL, bounds, verdicts.

Pure: no I/O, no clock. This is the one place these facts are written. The dashboard
(``GET /api/monitoring/dashboard``), ``embedshift baseline --compare`` and the operator's analysis
all read them:

- :data:`METRICS` names each metric of the contract once (the dashboard's keys, a baseline file's
  keys, and the ``metric`` a criterion in ``spec.analysis`` may name) with its PromQL template;
- :func:`metric_query` renders a template for one version of one migration over one window;
- :data:`DEFAULT_SUCCESS_CRITERIA` / :data:`DEFAULT_ROLLBACK_THRESHOLDS` are the guide's numbers;
- :func:`judge` turns a value (and v1's, for a comparison) into a :class:`Verdict`.

Every series is selected by its ``migration`` label ("namespace/name"), so one Prometheus can
watch many migrations without one's traffic judging another's rollout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "DASHBOARD_METRICS",
    "DEFAULT_ROLLBACK_THRESHOLDS",
    "DEFAULT_SUCCESS_CRITERIA",
    "METRICS",
    "PROMQL_RANGE",
    "Bound",
    "CriterionDefault",
    "Metric",
    "MetricSource",
    "Verdict",
    "judge",
    "metric_query",
    "render_custom_query",
    "requests_query",
]


class Verdict(str, Enum):
    """What one check of one criterion concluded."""

    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    FAIL = "fail"  # the bound is not met (for a rollback threshold: it is breached)
    NODATA = "nodata"  # nothing to judge: no series, NaN, or too little traffic
    ERROR = "error"  # the metric source failed (unreachable, a PromQL error, several series)


class MetricSource(str, Enum):
    PROMETHEUS = "prometheus"  # a PromQL template over the metric contract
    DATABASE = "database"  # observed by the control plane in PostgreSQL (the follower's lag)


@dataclass(frozen=True)
class _Scope:
    version: str
    migration: str
    window: str
    provider: str
    model: str

    def selector(self, **extra: str) -> str:
        labels = {"migration": self.migration, "version": self.version, **extra}
        return _selector(labels)


@dataclass(frozen=True)
class Metric:
    """One metric of the contract, for one version. ``unit`` drives how people read it."""

    name: str
    description: str
    unit: str  # seconds | ratio | similarity | usd | count
    source: MetricSource
    template: Callable[[_Scope], str] | None = None
    fixed_range: str | None = None  # overrides the analysis window (critical errors: 24 h)


def _selector(labels: dict[str, str]) -> str:
    parts = []
    for name, value in labels.items():
        if value.startswith("=~"):
            parts.append(f'{name}=~"{_escape(value[2:])}"')
        else:
            parts.append(f'{name}="{_escape(value)}"')
    return "{" + ",".join(parts) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _requests(s: _Scope) -> str:
    return f"sum(increase(embedshift_search_requests_total{s.selector()}[{s.window}]))"


def _avg_latency(s: _Scope) -> str:
    return (
        f"sum(rate(embedshift_search_duration_seconds_sum{s.selector()}[{s.window}])) / "
        f"sum(rate(embedshift_search_duration_seconds_count{s.selector()}[{s.window}]))"
    )


def _p95_latency(s: _Scope) -> str:
    return (
        "histogram_quantile(0.95, sum by (le) "
        f"(rate(embedshift_search_duration_seconds_bucket{s.selector()}[{s.window}])))"
    )


def _error_rate(s: _Scope) -> str:
    # A fallback is a request its version failed to serve (v1 answered instead).
    failed = s.selector(outcome="=~error|fallback")
    return (
        f"sum(rate(embedshift_search_requests_total{failed}[{s.window}])) / "
        f"sum(rate(embedshift_search_requests_total{s.selector()}[{s.window}]))"
    )


def _cache_hit_rate(s: _Scope) -> str:
    return (
        f"sum(rate(embedshift_query_cache_requests_total{s.selector(result='hit')}"
        f"[{s.window}])) / "
        f"sum(rate(embedshift_query_cache_requests_total{s.selector()}[{s.window}]))"
    )


def _avg_top_similarity(s: _Scope) -> str:
    return (
        f"sum(rate(embedshift_search_top_similarity_sum{s.selector()}[{s.window}])) / "
        f"sum(rate(embedshift_search_top_similarity_count{s.selector()}[{s.window}]))"
    )


def _cost_per_1k(s: _Scope) -> str:
    cost = _selector({"migration": s.migration, "provider": s.provider, "model": s.model})
    return (
        f"1000 * sum(increase(embedshift_embedding_cost_usd_total{cost}[{s.window}])) / "
        f"{_requests(s)}"
    )


def _critical_errors(s: _Scope) -> str:
    # ``or vector(0)``: a counter nobody has incremented yet means zero errors, not "no data"
    # (the minRequests gate is what says whether there is enough traffic to judge at all).
    return (
        f"sum(increase(embedshift_errors_total{s.selector(severity='critical')}[{s.window}]))"
        " or vector(0)"
    )


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "requests", "search requests in the window", "count", MetricSource.PROMETHEUS, _requests
        ),
        Metric(
            "avg_latency_seconds",
            "average search latency",
            "seconds",
            MetricSource.PROMETHEUS,
            _avg_latency,
        ),
        Metric(
            "p95_latency_seconds",
            "95th percentile search latency",
            "seconds",
            MetricSource.PROMETHEUS,
            _p95_latency,
        ),
        Metric(
            "error_rate",
            "share of requests that failed or fell back to v1",
            "ratio",
            MetricSource.PROMETHEUS,
            _error_rate,
        ),
        Metric(
            "cache_hit_rate",
            "share of query embeddings served from the cache",
            "ratio",
            MetricSource.PROMETHEUS,
            _cache_hit_rate,
        ),
        Metric(
            "avg_top_similarity",
            "average similarity of the best result",
            "similarity",
            MetricSource.PROMETHEUS,
            _avg_top_similarity,
        ),
        Metric(
            "cost_per_1k_queries_usd",
            "embedding API cost per 1000 searches",
            "usd",
            MetricSource.PROMETHEUS,
            _cost_per_1k,
        ),
        Metric(
            "critical_errors",
            "critical errors (the guide: none in 24 h)",
            "count",
            MetricSource.PROMETHEUS,
            _critical_errors,
            fixed_range="24h",
        ),
        Metric(
            "follower_lag_seconds",
            "age of the oldest change not yet re-embedded",
            "seconds",
            MetricSource.DATABASE,
        ),
    )
}

# The dashboard's figures per version (and a baseline file's keys): the Prometheus metrics that
# describe one version's traffic, in the order people read them.
DASHBOARD_METRICS: tuple[str, ...] = (
    "requests",
    "avg_latency_seconds",
    "p95_latency_seconds",
    "error_rate",
    "cache_hit_rate",
    "avg_top_similarity",
    "cost_per_1k_queries_usd",
)

# A PromQL range duration (``5m``, ``24h``), as every window and ``--range`` is validated.
PROMQL_RANGE = r"^[1-9][0-9]*(ms|s|m|h|d|w|y)$"
_RANGE = re.compile(PROMQL_RANGE)


def metric_query(
    name: str, *, version: str, migration: str, window: str, provider: str = "", model: str = ""
) -> str:
    """PromQL for metric ``name`` of ``version`` ("v1" | "v2") of ``migration``. Pure.

    ``window`` is a PromQL range (``5m``); a metric with a fixed range (critical errors: 24 h)
    ignores it. ``provider``/``model`` select the embedding cost series of that version's model.
    """
    metric = METRICS.get(name)
    if metric is None or metric.template is None:
        raise ValueError(f"{name!r} is not a Prometheus metric; known: {', '.join(_promql())}")
    if not _RANGE.match(metric.fixed_range or window):
        raise ValueError(f"window {window!r} is not a PromQL range such as 5m or 1h")
    scope = _Scope(version, migration, metric.fixed_range or window, provider, model)
    return metric.template(scope)


def requests_query(*, version: str, migration: str, window: str) -> str:
    """Requests of ``version`` in ``window``: the traffic gate under every criterion. Pure."""
    return metric_query("requests", version=version, migration=migration, window=window)


def _promql() -> list[str]:
    return [name for name, m in METRICS.items() if m.source is MetricSource.PROMETHEUS]


_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render_custom_query(query: str, *, migration: str, window: str) -> str:
    """A custom criterion's PromQL with ``{{ migration }}``, ``{{ namespace }}``, ``{{ name }}``
    and ``{{ window }}`` filled in (Flagger's template style). Pure; unknown names raise."""
    namespace, _, name = migration.partition("/")
    values = {"migration": migration, "namespace": namespace, "name": name, "window": window}

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ValueError(
                f"unknown placeholder {{{{ {key} }}}}; use {', '.join(sorted(values))}"
            )
        return _escape(values[key]) if key != "window" else values[key]

    return _PLACEHOLDER.sub(fill, query)


@dataclass(frozen=True)
class Bound:
    """Where a value must lie: exactly one of ``min``, ``max``, ``max_ratio_to_v1``. Inclusive.

    ``max_ratio_to_v1`` compares v2 with v1 in the same check: v2 ≤ ratio × v1 (so 1.0 means
    "not worse than v1"; with both at zero, a free model, it passes).
    """

    min: float | None = None
    max: float | None = None
    max_ratio_to_v1: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.min, self.max, self.max_ratio_to_v1) if v is not None]
        if len(given) != 1:
            raise ValueError("a bound needs exactly one of min, max and maxRatioToV1")

    @property
    def compares_versions(self) -> bool:
        return self.max_ratio_to_v1 is not None

    def limit(self, v1_value: float | None = None) -> float | None:
        """The number the value is held against (None: v1 has no data to compare with)."""
        if self.min is not None:
            return self.min
        if self.max is not None:
            return self.max
        assert self.max_ratio_to_v1 is not None
        return None if v1_value is None else self.max_ratio_to_v1 * v1_value

    def describe(self) -> str:
        """``≥ 0.7``, ``≤ 0.8``, ``≤ 1.0 × v1``: the bound as people read it."""
        if self.min is not None:
            return f"≥ {self.min:g}"
        if self.max is not None:
            return f"≤ {self.max:g}"
        return f"≤ {self.max_ratio_to_v1:g} × v1"


def judge(value: float | None, bound: Bound, *, v1_value: float | None = None) -> Verdict:
    """The verdict for one value. Pure. No value (or NaN, or no v1 to compare with) is nodata."""
    if value is None or math.isnan(value):
        return Verdict.NODATA
    limit = bound.limit(None if v1_value is None or math.isnan(v1_value) else v1_value)
    if limit is None:
        return Verdict.NODATA
    if bound.min is not None:
        return Verdict.PASS if value >= limit else Verdict.FAIL
    return Verdict.PASS if value <= limit else Verdict.FAIL


@dataclass(frozen=True)
class CriterionDefault:
    """A built-in criterion as the guide states it (``spec.analysis`` defaults)."""

    name: str
    metric: str
    bound: Bound
    description: str


# The guide's "Success Criteria" and "Key metrics to watch" (DESIGN.md "Default success criteria").
DEFAULT_SUCCESS_CRITERIA: tuple[CriterionDefault, ...] = (
    CriterionDefault(
        "p95-latency", "p95_latency_seconds", Bound(max=0.8), "v2 p95 within the guide's 800 ms"
    ),
    CriterionDefault(
        "p95-latency-vs-v1",
        "p95_latency_seconds",
        Bound(max_ratio_to_v1=1.0),
        "v2 response time ≤ v1",
    ),
    CriterionDefault(
        "avg-similarity", "avg_top_similarity", Bound(min=0.7), "search relevance maintained"
    ),
    CriterionDefault("error-rate", "error_rate", Bound(max=0.001), "error rate at most 0.1 %"),
    CriterionDefault(
        "cache-hit-rate", "cache_hit_rate", Bound(min=0.7), "query cache hit rate at least 70 %"
    ),
    CriterionDefault(
        "critical-errors", "critical_errors", Bound(max=0), "zero critical errors in 24 h"
    ),
    CriterionDefault(
        "cost-vs-v1",
        "cost_per_1k_queries_usd",
        Bound(max_ratio_to_v1=1.0),
        "embedding cost per query not above v1's",
    ),
)

# Breaching one of these rolls v2 back to 0 % (DESIGN.md: v2 error rate > 10 %, p95 > 1.2 s).
DEFAULT_ROLLBACK_THRESHOLDS: tuple[CriterionDefault, ...] = (
    CriterionDefault("error-rate-critical", "error_rate", Bound(max=0.10), "v2 error rate > 10 %"),
    CriterionDefault(
        "p95-latency-critical", "p95_latency_seconds", Bound(max=1.2), "v2 p95 above 1.2 s"
    ),
)
