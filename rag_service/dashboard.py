"""The dashboard's figures per version, read from Prometheus.

The PromQL is :func:`rag_service.criteria.metric_query`'s, the one place it is written, so the
dashboard (``GET /api/monitoring/dashboard`` with ``--prometheus-url``), ``embedshift baseline``
and the operator's success criteria read the same numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from rag_service.criteria import DASHBOARD_METRICS, metric_query
from rag_service.prometheus import PrometheusClient


async def prometheus_summary(
    url: str, *, migration: str, range_: str, models: Mapping[str, tuple[str, str]]
) -> dict[str, dict[str, float | None]]:
    """{version: {metric: value or None (no data)}} of ``migration`` over ``range_``, for each
    version in ``models`` (version → its query model's (provider, model), which the cost per
    query is counted under). Raises PrometheusError if Prometheus cannot answer."""
    async with PrometheusClient(url=url) as client:
        result: dict[str, dict[str, float | None]] = {}
        for version, (provider, model) in models.items():
            queries = [
                metric_query(
                    name,
                    version=version,
                    migration=migration,
                    window=range_,
                    provider=provider,
                    model=model,
                )
                for name in DASHBOARD_METRICS
            ]
            # query_scalar already turns NaN (PromQL's 0/0) into None.
            values = await asyncio.gather(*(client.query_scalar(q) for q in queries))
            result[version] = dict(zip(DASHBOARD_METRICS, values, strict=True))
        return result
