"""The metric contract with steady, settable traffic: an exporter tests and benchmarks control.

:class:`ContractTraffic` publishes, on a ``prometheus_client`` registry, the series rag_service
exports for a migration (DESIGN.md "Contract"), each labelled ``migration``, and a thread makes
traffic flow by elapsed time so ``rate()`` and ``increase()`` have steady answers::

    registry = CollectorRegistry()
    with ContractTraffic(registry, {"default/demo": {"v1": v1, "v2": v2}}) as traffic, \\
            serving_metrics(registry) as target:
        ...  # Prometheus scrapes ``target``; traffic.burst_errors("default/demo", "v2", 1000)

The series are written here with ``prometheus_client`` rather than through
``rag_service.metrics.ServiceMetrics``, so these tests pin the contract's names and labels as
the operator's queries read them. As ServiceMetrics does, every label combination exists at 0
from the start (a ratio with a missing series is no data, not 0), and the histograms use the
service's buckets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from prometheus_client import CollectorRegistry, Counter, Histogram

from rag_service.metrics import SEARCH_DURATION_BUCKETS, SIMILARITY_BUCKETS

__all__ = ["ContractTraffic", "VersionTraffic"]

TICK = 0.01


@dataclass(frozen=True)
class VersionTraffic:
    """One version's steady traffic: requests per second and what they look like."""

    provider: str
    model: str
    requests_per_second: float = 50.0
    error_share: float = 0.0  # of requests, counted as outcome="error"
    latency_seconds: float = 0.15  # every search takes this long
    top_similarity: float = 0.85
    cache_hit_share: float = 0.8
    cost_usd_per_request: float = 0.00001


class ContractTraffic:
    """The contract's series for ``migrations`` ({migration: {version: traffic}}), flowing
    until :meth:`stop` (or the end of the ``with`` block)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        migrations: Mapping[str, Mapping[str, VersionTraffic]],
    ) -> None:
        self._migrations = {m: dict(versions) for m, versions in migrations.items()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contract-traffic", daemon=True)
        self.requests = Counter(
            "embedshift_search_requests",
            "Searches by outcome.",
            ["migration", "version", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "embedshift_search_duration_seconds",
            "Search latency.",
            ["migration", "version"],
            buckets=SEARCH_DURATION_BUCKETS,
            registry=registry,
        )
        self.similarity = Histogram(
            "embedshift_search_top_similarity",
            "Similarity of the best hit.",
            ["migration", "version"],
            buckets=SIMILARITY_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "embedshift_query_cache_requests",
            "Query embedding cache lookups.",
            ["migration", "version", "result"],
            registry=registry,
        )
        self.errors = Counter(
            "embedshift_errors",
            "Errors by severity.",
            ["migration", "version", "severity"],
            registry=registry,
        )
        self.cost = Counter(
            "embedshift_embedding_cost_usd",
            "Embedding API cost.",
            ["migration", "provider", "model"],
            registry=registry,
        )
        for migration, versions in self._migrations.items():
            for version, traffic in versions.items():
                self.duration.labels(migration, version)
                self.similarity.labels(migration, version)
                for outcome in ("ok", "error", "fallback"):
                    self.requests.labels(migration, version, outcome)
                for result in ("hit", "miss"):
                    self.cache.labels(migration, version, result)
                for severity in ("warning", "error", "critical"):
                    self.errors.labels(migration, version, severity)
                self.cost.labels(migration, traffic.provider, traffic.model)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def set_traffic(self, migration: str, version: str, traffic: VersionTraffic) -> None:
        """Change one version's traffic from now on (a degraded v2, a quiet one)."""
        with self._lock:
            self._migrations[migration][version] = traffic

    def burst_errors(self, migration: str, version: str, count: int) -> None:
        """``count`` failed requests at once (and as many errors of severity ``error``)."""
        with self._lock:
            self.requests.labels(migration, version, "error").inc(count)
            self.errors.labels(migration, version, "error").inc(count)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(TICK):
            now = time.monotonic()
            with self._lock:
                for migration, versions in self._migrations.items():
                    for version, traffic in versions.items():
                        self._flow(migration, version, traffic, now - last)
            last = now

    def _flow(self, migration: str, version: str, t: VersionTraffic, seconds: float) -> None:
        # By elapsed time, not per tick: a late tick must not slow the rates down.
        served = t.requests_per_second * seconds
        self.requests.labels(migration, version, "ok").inc(served * (1 - t.error_share))
        self.requests.labels(migration, version, "error").inc(served * t.error_share)
        self.cache.labels(migration, version, "hit").inc(served * t.cache_hit_share)
        self.cache.labels(migration, version, "miss").inc(served * (1 - t.cache_hit_share))
        self.cost.labels(migration, t.provider, t.model).inc(served * t.cost_usd_per_request)
        # One observation per tick: averages and quantiles depend on the values, not the count.
        self.duration.labels(migration, version).observe(t.latency_seconds)
        self.similarity.labels(migration, version).observe(t.top_similarity)
