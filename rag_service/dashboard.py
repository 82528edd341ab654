"""The guide's key metrics per version, as PromQL over the service's metric contract.

``version_queries`` is pure and is the one place these expressions are written; the dashboard
(``GET /api/monitoring/dashboard`` with ``--prometheus-url``) and ``embedshift baseline`` read
them, and the operator's default success criteria are the same expressions.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

from rag_service.prometheus import PrometheusClient


def version_queries(version: str, *, range_: str, provider: str, model: str) -> dict[str, str]:
    """PromQL for each of the guide's metrics, for one version over ``range_``. Pure."""
    v = f'version="{version}"'
    rate = f"[{range_}]"
    requests = f"sum(increase(embedshift_search_requests_total{{{v}}}{rate}))"
    return {
        "requests": requests,
        "avg_latency_seconds": (
            f"sum(rate(embedshift_search_duration_seconds_sum{{{v}}}{rate})) / "
            f"sum(rate(embedshift_search_duration_seconds_count{{{v}}}{rate}))"
        ),
        "p95_latency_seconds": (
            "histogram_quantile(0.95, sum by (le) "
            f"(rate(embedshift_search_duration_seconds_bucket{{{v}}}{rate})))"
        ),
        "error_rate": (
            # A fallback is a request its version failed to serve (v1 answered instead).
            f'sum(rate(embedshift_search_requests_total{{{v},outcome=~"error|fallback"}}{rate}))'
            " / "
            f"sum(rate(embedshift_search_requests_total{{{v}}}{rate}))"
        ),
        "cache_hit_rate": (
            f'sum(rate(embedshift_query_cache_requests_total{{{v},result="hit"}}{rate})) / '
            f"sum(rate(embedshift_query_cache_requests_total{{{v}}}{rate}))"
        ),
        "avg_top_similarity": (
            f"sum(rate(embedshift_search_top_similarity_sum{{{v}}}{rate})) / "
            f"sum(rate(embedshift_search_top_similarity_count{{{v}}}{rate}))"
        ),
        "cost_per_1k_queries_usd": (
            "1000 * sum(increase(embedshift_embedding_cost_usd_total"
            f'{{provider="{provider}",model="{model}"}}{rate})) / {requests}'
        ),
    }


async def prometheus_summary(
    url: str, *, range_: str, models: Mapping[str, tuple[str, str]]
) -> dict[str, dict[str, float | None]]:
    """{version: {metric: value or None (no data)}}; raises PrometheusError if unreachable."""
    async with PrometheusClient(url=url) as client:
        result: dict[str, dict[str, float | None]] = {}
        for version, (provider, model) in models.items():
            queries = version_queries(version, range_=range_, provider=provider, model=model)
            values = await asyncio.gather(*(client.query_scalar(q) for q in queries.values()))
            result[version] = {
                name: (None if value is None or math.isnan(value) else value)
                for name, value in zip(queries, values, strict=True)
            }
        return result
