"""rag_service's Prometheus metrics: the names the operator's default PromQL judges a rollout by.

The names and labels are a contract (DESIGN.md, "Contract between operator and rag_service");
renaming one silently turns a success criterion into ``nodata``, which never promotes. Every
metric lives on the registry passed in, never on prometheus_client's global default one, so two
services (or two tests) in one process do not share counts.

Every series carries the ``migration`` label ("namespace/name", fixed per service), so one
Prometheus can watch many migrations and each one's criteria select only its own traffic
(:func:`rag_service.criteria.metric_query`).

Series for both versions and every fixed label value exist at 0 from the start: a PromQL ratio
such as ``rate(errors{version="v2"}) / rate(requests{version="v2"})`` has no data at all, rather
than 0, while one of its series is missing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from rag_service.criteria import DASHBOARD_METRICS
from rag_service.routing import Version
from rag_service.shadow import ShadowJob, ShadowResult

# 0.8 s (the p95 target) and 1.2 s (the rollback threshold) are bucket bounds, so PromQL's
# histogram_quantile answers "p95 < 800 ms" exactly instead of interpolating across it.
SEARCH_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip
# Cosine similarity of the best hit; 0.7 (the relevance criterion) is a bound. Negative
# similarities (rare, but possible) land in the first bucket.
SIMILARITY_BUCKETS = (
    0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0,
)  # fmt: skip
OVERLAP_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

# ok: the routed version answered; error: the request failed; fallback: the routed version
# (v2) failed and v1 answered instead. Counted under the routed version, so v2's error rate
# sees its fallbacks.
Outcome = Literal["ok", "error", "fallback"]
ErrorSeverity = Literal["warning", "error", "critical"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
ERROR_SEVERITIES: tuple[ErrorSeverity, ...] = get_args(ErrorSeverity)


class ServiceMetrics:
    """The service's metrics on ``registry``, with typed methods to record them.

    ``migration`` ("namespace/name") is the value of every series' ``migration`` label.
    ``usage_models``: (provider, model) pairs whose token and cost counters should exist at 0
    from the start (the query models of both versions), for "v2 cost per query < v1".
    Constructing two on one registry raises ``ValueError`` (duplicated timeseries).
    """

    def __init__(
        self,
        *,
        migration: str,
        registry: CollectorRegistry,
        usage_models: Iterable[tuple[str, str]] = (),
    ) -> None:
        if not migration:
            raise ValueError("migration must name the migration, e.g. 'namespace/name'")
        self._migration = m = migration
        self._registry = registry
        self._search_duration = Histogram(
            "embedshift_search_duration_seconds",
            "Search latency in seconds, end to end, by the version that served it.",
            ["migration", "version"],
            buckets=SEARCH_DURATION_BUCKETS,
            registry=registry,
        )
        self._search_requests = Counter(
            "embedshift_search_requests_total",
            "Searches by routed version and outcome (ok, error, fallback to v1).",
            ["migration", "version", "outcome"],
            registry=registry,
        )
        self._forced_searches = Counter(
            "embedshift_search_forced_total",
            "Searches that forced a version (X-Embedding-Version, for testing), by that version "
            "and outcome: kept apart, never in the series the rollout's criteria read.",
            ["migration", "version", "outcome", "forced"],
            registry=registry,
        )
        self._top_similarity = Histogram(
            "embedshift_search_top_similarity",
            "Similarity of the best hit of each search that found anything.",
            ["migration", "version"],
            buckets=SIMILARITY_BUCKETS,
            registry=registry,
        )
        self._query_cache = Counter(
            "embedshift_query_cache_requests_total",
            "Query-embedding cache lookups by version and result (hit, miss).",
            ["migration", "version", "result"],
            registry=registry,
        )
        self._embedding_tokens = Counter(
            "embedshift_embedding_tokens_total",
            "Tokens billed by embedding APIs for query embeddings.",
            ["migration", "provider", "model"],
            registry=registry,
        )
        self._embedding_cost = Counter(
            "embedshift_embedding_cost_usd_total",
            "Estimated cost in US dollars of query embeddings.",
            ["migration", "provider", "model"],
            registry=registry,
        )
        self._errors = Counter(
            "embedshift_errors_total",
            "Errors by version and severity (warning, error, critical).",
            ["migration", "version", "severity"],
            registry=registry,
        )
        self._rollout_percentage = Gauge(
            "embedshift_rollout_percentage",
            "Share of sticky buckets routed to v2 (0-100), as this replica applies it.",
            ["migration"],
            registry=registry,
        )
        self._circuit_breaker_open = Gauge(
            "embedshift_circuit_breaker_open",
            "1 while the version's circuit breaker is open or half-open, else 0.",
            ["migration", "version"],
            registry=registry,
        )
        self._shadow_comparisons = Counter(
            "embedshift_shadow_comparisons_total",
            "Sampled shadow comparisons: completed, or dropped because the queue was full.",
            ["migration", "result"],
            registry=registry,
        )
        self._shadow_overlap = Histogram(
            "embedshift_shadow_overlap",
            "overlap@k of the serving and the other version's results on shadowed searches.",
            ["migration"],
            buckets=OVERLAP_BUCKETS,
            registry=registry,
        )
        for v in Version:
            self._search_duration.labels(m, v.value)
            self._top_similarity.labels(m, v.value)
            self._circuit_breaker_open.labels(m, v.value)
            for outcome in OUTCOMES:
                self._search_requests.labels(m, v.value, outcome)
            for result in ("hit", "miss"):
                self._query_cache.labels(m, v.value, result)
            for severity in ERROR_SEVERITIES:
                self._errors.labels(m, v.value, severity)
        self.add_usage_models(usage_models)
        for result in ("completed", "dropped"):
            self._shadow_comparisons.labels(m, result)
        self._rollout_percentage.labels(m)
        self._shadow_overlap.labels(m)

    def add_usage_models(self, usage_models: Iterable[tuple[str, str]]) -> None:
        """Make the token and cost series of these (provider, model) pairs exist at 0: the
        query models, once known (the search service learns them from the record, and again
        when the record changes; counts already made are kept)."""
        for provider, model in usage_models:
            self._embedding_tokens.labels(self._migration, provider, model)
            self._embedding_cost.labels(self._migration, provider, model)

    def observe_search(
        self,
        *,
        version: Version | str,
        seconds: float,
        outcome: Outcome,
        top_similarity: float | None,
    ) -> None:
        """One search: its latency and outcome, and the best hit's similarity if it found any."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}")
        v = Version(version).value
        self._search_requests.labels(self._migration, v, outcome).inc()
        self._search_duration.labels(self._migration, v).observe(seconds)
        if top_similarity is not None:
            self._top_similarity.labels(self._migration, v).observe(top_similarity)

    def count_forced(self, *, version: Version | str, outcome: Outcome) -> None:
        """One search that forced ``version``: counted here only (``forced="true"``)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}")
        self._forced_searches.labels(self._migration, Version(version).value, outcome, "true").inc()

    def count_cache(self, *, version: Version | str, hit: bool) -> None:
        result = "hit" if hit else "miss"
        self._query_cache.labels(self._migration, Version(version).value, result).inc()

    def count_usage(self, *, provider: str, model: str, tokens: int, cost_usd: float) -> None:
        self._embedding_tokens.labels(self._migration, provider, model).inc(tokens)
        self._embedding_cost.labels(self._migration, provider, model).inc(cost_usd)

    def count_error(self, *, version: Version | str, severity: ErrorSeverity) -> None:
        if severity not in ERROR_SEVERITIES:
            raise ValueError(
                f"severity must be one of {', '.join(ERROR_SEVERITIES)}; got {severity!r}"
            )
        self._errors.labels(self._migration, Version(version).value, severity).inc()

    def set_percentage(self, percentage: float) -> None:
        if not 0 <= percentage <= 100:
            raise ValueError(f"percentage must be in [0, 100]; got {percentage}")
        self._rollout_percentage.labels(self._migration).set(percentage)

    def set_breaker_open(self, *, version: Version | str, open: bool) -> None:
        state = 1 if open else 0
        self._circuit_breaker_open.labels(self._migration, Version(version).value).set(state)

    def observe_shadow(self, result: ShadowResult) -> None:
        """A completed shadow comparison and its overlap@k (``ShadowComparer``'s ``on_result``)."""
        self._shadow_comparisons.labels(self._migration, "completed").inc()
        self._shadow_overlap.labels(self._migration).observe(result.overlap)

    def count_shadow_dropped(self, job: ShadowJob | None = None) -> None:
        """A sampled shadow comparison the full queue refused (fits ``on_drop``)."""
        self._shadow_comparisons.labels(self._migration, "dropped").inc()

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus' text format: the ``/metrics`` body and its content type."""
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def summary(
        self, *, models: Mapping[str, tuple[str, str]] | None = None
    ) -> dict[str, dict[str, float | None]]:
        """Per-version figures since start, from this object's own samples, for the dashboard.

        ``{"v1": {...}, "v2": {...}}`` under the names of
        :data:`rag_service.criteria.DASHBOARD_METRICS`, the keys the dashboard has when it reads
        Prometheus too, with the same meanings: ``error_rate`` is (errors + fallbacks) /
        requests, ``p95_latency_seconds`` is estimated from the buckets as PromQL's
        ``histogram_quantile`` does, ``cost_per_1k_queries_usd`` is the cost counted under the
        version's query model in ``models`` (version → (provider, model)). A ratio with nothing
        to divide by is None (JSON null), never NaN.
        """
        requests = _counter_values(self._search_requests, "version", "outcome")
        cache = _counter_values(self._query_cache, "version", "result")
        cost = _counter_values(self._embedding_cost, "provider", "model")
        duration = _histogram_values(self._search_duration, "version")
        similarity = _histogram_values(self._top_similarity, "version")
        out: dict[str, dict[str, float | None]] = {}
        for v in Version:
            by_outcome = {o: requests.get((v.value, o), 0.0) for o in OUTCOMES}
            total = sum(by_outcome.values())
            hits, misses = cache.get((v.value, "hit"), 0.0), cache.get((v.value, "miss"), 0.0)
            lat = duration.get((v.value,), _Histogram())
            sim = similarity.get((v.value,), _Histogram())
            model = (models or {}).get(v.value)
            spent = None if model is None else cost.get(model, 0.0)
            figures: dict[str, float | None] = {
                "requests": total,
                "avg_latency_seconds": _ratio(lat.sum, lat.count),
                "p95_latency_seconds": histogram_quantile(0.95, lat.buckets),
                "error_rate": _ratio(by_outcome["error"] + by_outcome["fallback"], total),
                "cache_hit_rate": _ratio(hits, hits + misses),
                "avg_top_similarity": _ratio(sim.sum, sim.count),
                "cost_per_1k_queries_usd": None if spent is None else _ratio(1000 * spent, total),
            }
            out[v.value] = {name: figures[name] for name in DASHBOARD_METRICS}
        return out


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q``-quantile estimated from cumulative ``(upper bound, count)`` buckets. Pure.

    PromQL's ``histogram_quantile`` on classic buckets: find the first bucket whose cumulative
    count reaches ``q · total`` and interpolate linearly inside it (the lowest bucket starts at
    0 unless its bound is ≤ 0, which is then the answer). A quantile in the ``+Inf`` bucket is
    the highest finite bound. None without observations or without a ``+Inf`` bucket.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1]; got {q}")
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    b = next(i for i, (_, count) in enumerate(ordered) if count >= rank)
    if b == len(ordered) - 1:
        return ordered[-2][0]
    end, count = ordered[b]
    if b == 0 and end <= 0:
        return end
    start, below = ordered[b - 1] if b > 0 else (0.0, 0.0)
    if count == below:  # only at q = 0 with empty lowest buckets
        return start
    return start + (end - start) * (rank - below) / (count - below)


@dataclass
class _Histogram:
    buckets: list[tuple[float, float]] = field(default_factory=list)
    count: float = 0.0
    sum: float = 0.0


def _counter_values(metric: MetricWrapperBase, *label_names: str) -> dict[tuple[str, ...], float]:
    values: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                values[tuple(sample.labels[n] for n in label_names)] = sample.value
    return values


def _histogram_values(
    metric: MetricWrapperBase, *label_names: str
) -> dict[tuple[str, ...], _Histogram]:
    values: dict[tuple[str, ...], _Histogram] = defaultdict(_Histogram)
    for family in metric.collect():
        for sample in family.samples:
            series = values[tuple(sample.labels[n] for n in label_names)]
            if sample.name.endswith("_bucket"):
                series.buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                series.count = sample.value
            elif sample.name.endswith("_sum"):
                series.sum = sample.value
    return values


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None
