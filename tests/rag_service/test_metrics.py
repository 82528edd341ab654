"""metrics.py: the exposition carries the contract's names, labels and buckets; the dashboard's
summary reads the right numbers back; registries are separate.

The exposition is checked as Prometheus would read it: ``render()``'s body parsed by
prometheus_client's own text parser.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rag_service.criteria import DASHBOARD_METRICS
from rag_service.metrics import ServiceMetrics, histogram_quantile
from rag_service.routing import Version
from rag_service.shadow import ShadowJob, ShadowResult

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
INF = math.inf
MIGRATION = "rag/docs"


def scrape(metrics: ServiceMetrics) -> tuple[dict[str, str], Samples]:
    """Family name → type, and (sample name, labels) → value, as a scraper sees them."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample of ``name`` with exactly ``labels`` (and the migration's label)."""
    return samples[(name, frozenset({"migration": MIGRATION, **labels}.items()))]


def buckets_of(samples: Samples, name: str, **labels: str) -> list[float]:
    return sorted(
        float(dict(key)["le"])
        for (sample, key) in samples
        if sample == f"{name}_bucket"
        and {k: v for k, v in key if k != "le"} == {"migration": MIGRATION, **labels}
    )


@pytest.fixture
def metrics() -> ServiceMetrics:
    return ServiceMetrics(migration=MIGRATION, registry=CollectorRegistry())


# The contract (DESIGN.md): family name → (type, label names). Counter families are named
# without ``_total``, as the text format's parser reports them; the samples carry it. Every
# series carries ``migration``, so one Prometheus can tell many migrations apart.
CONTRACT = {
    "embedshift_search_duration_seconds": ("histogram", {"migration", "version"}),
    "embedshift_search_requests": ("counter", {"migration", "version", "outcome"}),
    "embedshift_search_top_similarity": ("histogram", {"migration", "version"}),
    "embedshift_query_cache_requests": ("counter", {"migration", "version", "result"}),
    "embedshift_embedding_tokens": ("counter", {"migration", "provider", "model"}),
    "embedshift_embedding_cost_usd": ("counter", {"migration", "provider", "model"}),
    "embedshift_errors": ("counter", {"migration", "version", "severity"}),
    "embedshift_rollout_percentage": ("gauge", {"migration"}),
    "embedshift_circuit_breaker_open": ("gauge", {"migration", "version"}),
    "embedshift_shadow_comparisons": ("counter", {"migration", "result"}),
    "embedshift_shadow_overlap": ("histogram", {"migration"}),
}


def test_every_contract_metric_is_exposed_with_its_type_and_labels() -> None:
    metrics = ServiceMetrics(
        migration=MIGRATION, registry=CollectorRegistry(), usage_models=[("openai", "m")]
    )
    metrics.count_usage(provider="openai", model="m", tokens=1, cost_usd=0.1)
    types, samples = scrape(metrics)
    for name, (kind, labels) in CONTRACT.items():
        assert types.get(name) == kind, name
        seen = {
            frozenset(k for k, _ in key if k != "le")
            for (sample, key) in samples
            if sample.startswith(name) and not sample.endswith("_created")
        }
        assert seen == {frozenset(labels)}, name


def test_every_series_a_promql_ratio_needs_exists_at_zero_from_the_start(
    metrics: ServiceMetrics,
) -> None:
    _, samples = scrape(metrics)
    for v in ("v1", "v2"):
        for outcome in ("ok", "error", "fallback"):
            assert (
                value(samples, "embedshift_search_requests_total", version=v, outcome=outcome) == 0
            )
        for result in ("hit", "miss"):
            assert (
                value(samples, "embedshift_query_cache_requests_total", version=v, result=result)
                == 0
            )
        for severity in ("warning", "error", "critical"):
            assert value(samples, "embedshift_errors_total", version=v, severity=severity) == 0
        assert value(samples, "embedshift_search_duration_seconds_count", version=v) == 0
        assert value(samples, "embedshift_search_top_similarity_count", version=v) == 0
        assert value(samples, "embedshift_circuit_breaker_open", version=v) == 0
    for result in ("completed", "dropped"):
        assert value(samples, "embedshift_shadow_comparisons_total", result=result) == 0
    assert value(samples, "embedshift_rollout_percentage") == 0


def test_the_query_models_usage_series_exist_at_zero_when_named() -> None:
    metrics = ServiceMetrics(
        migration=MIGRATION,
        registry=CollectorRegistry(),
        usage_models=[("google", "gemini-embedding-001"), ("openai", "text-embedding-3-small")],
    )
    _, samples = scrape(metrics)
    for provider, model in [
        ("google", "gemini-embedding-001"),
        ("openai", "text-embedding-3-small"),
    ]:
        labels = {"provider": provider, "model": model}
        assert value(samples, "embedshift_embedding_tokens_total", **labels) == 0
        assert value(samples, "embedshift_embedding_cost_usd_total", **labels) == 0


def test_latency_buckets_resolve_the_p95_target_and_the_rollback_threshold(
    metrics: ServiceMetrics,
) -> None:
    _, samples = scrape(metrics)
    bounds = buckets_of(samples, "embedshift_search_duration_seconds", version="v2")
    assert 0.8 in bounds and 1.2 in bounds
    assert bounds == sorted(bounds) and bounds[-1] == INF
    assert bounds[0] <= 0.01 and 10 in bounds  # from cache hits to a stuck database
    similarity = buckets_of(samples, "embedshift_search_top_similarity", version="v2")
    assert 0.7 in similarity and similarity[-2] == 1.0
    assert 0.7 in buckets_of(samples, "embedshift_shadow_overlap")


@pytest.mark.parametrize(
    ("seconds", "le_08", "le_12"),
    [(0.79, 1, 1), (0.8, 1, 1), (0.81, 0, 1), (1.2, 0, 1), (1.21, 0, 0)],
)
def test_a_latency_on_a_threshold_counts_as_within_it(
    metrics: ServiceMetrics, seconds: float, le_08: int, le_12: int
) -> None:
    metrics.observe_search(version=Version.V2, seconds=seconds, outcome="ok", top_similarity=None)
    _, samples = scrape(metrics)
    bucket = "embedshift_search_duration_seconds_bucket"
    assert value(samples, bucket, version="v2", le="0.8") == le_08
    assert value(samples, bucket, version="v2", le="1.2") == le_12


def test_recorded_events_show_up_under_their_labels(metrics: ServiceMetrics) -> None:
    metrics.observe_search(version=Version.V2, seconds=0.2, outcome="fallback", top_similarity=0.9)
    metrics.observe_search(version="v1", seconds=0.1, outcome="ok", top_similarity=None)
    metrics.count_cache(version=Version.V2, hit=True)
    metrics.count_cache(version=Version.V2, hit=False)
    metrics.count_cache(version=Version.V2, hit=False)
    metrics.count_usage(
        provider="openai", model="text-embedding-3-small", tokens=12, cost_usd=2.4e-7
    )
    metrics.count_usage(
        provider="openai", model="text-embedding-3-small", tokens=8, cost_usd=1.6e-7
    )
    metrics.count_error(version=Version.V2, severity="critical")
    metrics.set_percentage(25)
    metrics.set_breaker_open(version=Version.V2, open=True)
    job = ShadowJob(query="q", k=4, category=None, primary_version=Version.V1, primary_ids=(1, 2))
    metrics.observe_shadow(ShadowResult.compare(job, other_ids=[2, 3], latency_seconds=0.1))
    metrics.count_shadow_dropped(job)

    _, samples = scrape(metrics)
    requests = "embedshift_search_requests_total"
    assert value(samples, requests, version="v2", outcome="fallback") == 1
    assert value(samples, requests, version="v2", outcome="ok") == 0
    assert value(samples, requests, version="v1", outcome="ok") == 1
    assert value(samples, "embedshift_search_top_similarity_count", version="v2") == 1
    assert value(samples, "embedshift_search_top_similarity_count", version="v1") == 0
    cache = "embedshift_query_cache_requests_total"
    assert value(samples, cache, version="v2", result="hit") == 1
    assert value(samples, cache, version="v2", result="miss") == 2
    usage = {"provider": "openai", "model": "text-embedding-3-small"}
    assert value(samples, "embedshift_embedding_tokens_total", **usage) == 20
    assert value(samples, "embedshift_embedding_cost_usd_total", **usage) == pytest.approx(4e-7)
    assert value(samples, "embedshift_errors_total", version="v2", severity="critical") == 1
    assert value(samples, "embedshift_rollout_percentage") == 25
    assert value(samples, "embedshift_circuit_breaker_open", version="v2") == 1
    assert value(samples, "embedshift_circuit_breaker_open", version="v1") == 0
    assert value(samples, "embedshift_shadow_comparisons_total", result="completed") == 1
    assert value(samples, "embedshift_shadow_comparisons_total", result="dropped") == 1
    assert value(samples, "embedshift_shadow_overlap_sum") == pytest.approx(0.25)  # 1 of top 4


def test_the_summary_on_known_observations(metrics: ServiceMetrics) -> None:
    # v2: 20 searches. Latencies: 10 × 50 ms, 6 × 300 ms, 2 × 700 ms, 2 × 1.1 s.
    latencies = [0.05] * 10 + [0.3] * 6 + [0.7] * 2 + [1.1] * 2
    outcomes = ["ok"] * 17 + ["error"] * 2 + ["fallback"]
    for seconds, outcome in zip(latencies, outcomes, strict=True):
        metrics.observe_search(
            version=Version.V2,
            seconds=seconds,
            outcome=outcome,  # type: ignore[arg-type]
            top_similarity=0.8 if outcome == "ok" else None,
        )
    for hit in [True] * 7 + [False] * 3:
        metrics.count_cache(version=Version.V2, hit=hit)
    metrics.count_error(version=Version.V2, severity="critical")
    metrics.count_error(version=Version.V2, severity="error")
    metrics.count_usage(provider="openai", model="small", tokens=1000, cost_usd=0.002)
    models = {"v1": ("google", "gemini"), "v2": ("openai", "small")}

    summary = metrics.summary(models=models)
    # p95: rank 0.95 · 20 = 19 lands in (1.0, 1.2], which holds observations 19 and 20:
    # 1.0 + 0.2 · (19 - 18) / (20 - 18) = 1.1.
    assert summary["v2"] == {
        "requests": 20,
        "avg_latency_seconds": pytest.approx((0.5 + 1.8 + 1.4 + 2.2) / 20),
        "p95_latency_seconds": pytest.approx(1.1),
        "error_rate": pytest.approx(3 / 20),
        "cache_hit_rate": pytest.approx(0.7),
        "avg_top_similarity": pytest.approx(0.8),
        "cost_per_1k_queries_usd": pytest.approx(1000 * 0.002 / 20),
    }
    # The dashboard's keys, in its order, whichever source answers (Prometheus: dashboard.py).
    assert list(summary["v2"]) == list(DASHBOARD_METRICS)
    # v1 saw nothing: counts are 0 and ratios are null, never NaN (which JSON cannot carry).
    assert summary["v1"] == {
        "requests": 0,
        "avg_latency_seconds": None,
        "p95_latency_seconds": None,
        "error_rate": None,
        "cache_hit_rate": None,
        "avg_top_similarity": None,
        "cost_per_1k_queries_usd": None,
    }
    # Without the versions' models there is no cost to count.
    assert metrics.summary()["v2"]["cost_per_1k_queries_usd"] is None


def test_two_services_on_two_registries_do_not_interfere() -> None:
    first = ServiceMetrics(migration=MIGRATION, registry=CollectorRegistry())
    second = ServiceMetrics(migration=MIGRATION, registry=CollectorRegistry())
    first.observe_search(version=Version.V1, seconds=0.1, outcome="ok", top_similarity=0.9)
    first.set_percentage(50)
    assert first.summary()["v1"]["requests"] == 1
    assert second.summary()["v1"]["requests"] == 0
    _, samples = scrape(second)
    assert value(samples, "embedshift_search_requests_total", version="v1", outcome="ok") == 0
    assert value(samples, "embedshift_rollout_percentage") == 0


def test_nothing_lands_on_the_global_default_registry(metrics: ServiceMetrics) -> None:
    metrics.observe_search(version=Version.V1, seconds=0.1, outcome="ok", top_similarity=0.9)
    exposed = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "embedshift_" not in exposed


def test_one_registry_holds_one_service() -> None:
    registry = CollectorRegistry()
    ServiceMetrics(migration=MIGRATION, registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        ServiceMetrics(migration=MIGRATION, registry=registry)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            lambda m: m.observe_search(version="v3", seconds=1, outcome="ok", top_similarity=None),
            "v3",
        ),
        (
            lambda m: m.observe_search(
                version="v1", seconds=1, outcome="oops", top_similarity=None
            ),
            "outcome",
        ),
        (lambda m: m.count_error(version="v2", severity="fatal"), "severity"),
        (lambda m: m.set_percentage(101), "percentage"),
        (lambda m: m.set_percentage(-1), "percentage"),
        (lambda m: m.count_cache(version="V2", hit=True), "V2"),
    ],
)
def test_label_values_outside_the_contract_are_refused(
    metrics: ServiceMetrics, record: Callable[[ServiceMetrics], object], message: str
) -> None:
    # A typo'd label value would be a new series that no PromQL in the contract ever reads.
    with pytest.raises(ValueError, match=message):
        record(metrics)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # Linear inside the bucket the rank falls in; the lowest bucket starts at 0.
        (0.5, [(0.1, 10), (INF, 10)], 0.05),
        (0.95, [(0.1, 10), (0.2, 20), (INF, 20)], 0.19),
        (0.5, [(0.1, 0), (0.2, 10), (0.4, 20), (INF, 20)], 0.2),
        (1.0, [(0.1, 5), (0.2, 10), (INF, 10)], 0.2),
        # Order of the input does not matter.
        (0.5, [(INF, 20), (0.4, 20), (0.2, 10), (0.1, 0)], 0.2),
        # In the +Inf bucket: the highest finite bound (all PromQL can say).
        (0.95, [(0.5, 90), (1.0, 94), (INF, 100)], 1.0),
        (0.5, [(0.5, 0), (INF, 4)], 0.5),
        # A lowest bound at or below zero is the answer when the rank falls in it.
        (0.5, [(0.0, 10), (1.0, 10), (INF, 10)], 0.0),
        (0.5, [(-1.0, 10), (INF, 10)], -1.0),
        # No observations, or no +Inf bucket: no answer (PromQL's NaN).
        (0.95, [(0.1, 0), (INF, 0)], None),
        (0.95, [(0.1, 5), (0.2, 10)], None),
        (0.95, [(INF, 10)], None),
        (0.95, [], None),
    ],
)
def test_histogram_quantile_as_promql_estimates_it(
    q: float, buckets: list[tuple[float, float]], expected: float | None
) -> None:
    result = histogram_quantile(q, buckets)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


@pytest.mark.parametrize("q", [-0.1, 1.1])
def test_histogram_quantile_needs_q_between_0_and_1(q: float) -> None:
    with pytest.raises(ValueError, match="q must be"):
        histogram_quantile(q, [(INF, 1)])
