"""PrometheusSource: the analysis's metric source over a real Prometheus.

One Prometheus (scraping every 500 ms) and one exporter serve the module: the exporter's gauges
are set once for the single-query cases, and :class:`ContractTraffic` publishes the contract's
series for three migrations with steady traffic for the end-to-end checks of the default
criteria. Prometheus's first scrape comes ~5 s after it starts, hence one per module. What a
real Prometheus cannot show (the headers a client sent, a 5xx from a proxy, a server that never
answers) is checked against :class:`StubPrometheus`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from embedshift_operator.adapters.prometheus import PrometheusSource
from embedshift_operator.core.analysis import (
    MetricSource,
    MetricSourceError,
    breached_thresholds,
    evaluate,
    measure,
    plan_analysis,
)
from embedshift_operator.resource import AnalysisStatus, CriterionResult, EmbeddingMigrationSpec
from rag_service.criteria import Verdict
from rag_service.errors import ConfigError
from rag_service.testing.prometheus import PrometheusProcess, serving_metrics
from rag_service.testing.traffic import ContractTraffic, VersionTraffic
from tests.operator.adapters.http_stub import StubPrometheus, vector
from tests.prometheus_fixtures import PrometheusFactory

DEMO = "default/demo"  # healthy traffic: every default criterion passes
BURST = "default/burst"  # healthy until a test bursts v2's errors
QUIET = "default/quiet"  # healthy but too little v2 traffic to judge
WINDOW = "10s"
SCRAPE_INTERVAL = "500ms"

# v1 is the guide's Google model, v2 OpenAI's: v2 is faster, as relevant, cheaper. 200 searches a
# second clear the default minRequests (100 in the window) even while Prometheus holds only the
# first second or two of the series, so the module need not wait for a whole window of scrapes.
RATE = 200.0
V1 = VersionTraffic(
    provider="google",
    model="gemini-embedding-001",
    requests_per_second=RATE,
    latency_seconds=0.25,  # p95 interpolates in the (0.2, 0.3] bucket: 0.295
    top_similarity=0.8,
    cost_usd_per_request=0.00002,
)
V2 = VersionTraffic(
    provider="openai",
    model="text-embedding-3-small",
    requests_per_second=RATE,
    latency_seconds=0.15,  # p95 in (0.1, 0.2]: 0.195
    top_similarity=0.85,
    cache_hit_share=0.8,
    cost_usd_per_request=0.00001,
)
V2_QUIET = VersionTraffic(provider=V2.provider, model=V2.model, requests_per_second=1.0)  # < 100

SPEC: dict[str, Any] = {
    "database": {"table": "public.documents"},
    "source": {"provider": V1.provider, "model": V1.model, "dimensions": 1536},
    "target": {"provider": V2.provider, "model": V2.model, "dimensions": 768},
}


def make_spec(**analysis: Any) -> EmbeddingMigrationSpec:
    """The default criteria (unless overridden) over a ``WINDOW`` window."""
    return EmbeddingMigrationSpec.model_validate(
        {**SPEC, "analysis": {"window": WINDOW, **analysis}}
    )


def custom_spec(query: str, **bound: float) -> EmbeddingMigrationSpec:
    """One custom success criterion, ``custom``, and no traffic gate."""
    return make_spec(
        minRequests=0,
        successCriteria=[{"name": "custom", "query": query, **bound}],
        rollbackThresholds=[],
    )


async def check(
    source: MetricSource,
    spec: EmbeddingMigrationSpec,
    *,
    migration: str = DEMO,
    previous: AnalysisStatus | None = None,
) -> AnalysisStatus:
    """One analysis check, as the drivers run it: plan, measure, evaluate."""
    observation = await measure(source, plan_analysis(spec, migration=migration), progress=None)
    return evaluate(spec, observation, previous or AnalysisStatus(), now=datetime.now(UTC))


def by_name(status: AnalysisStatus) -> dict[str, CriterionResult]:
    return {result.name: result for result in status.results}


def verdicts(status: AnalysisStatus) -> dict[str, Verdict]:
    return {result.name: result.verdict for result in status.results}


@dataclass(frozen=True)
class Exporter:
    target: str
    traffic: ContractTraffic


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    registry = CollectorRegistry()
    values = Gauge("embedshift_test_value", "Set by the tests.", ["case"], registry=registry)
    for case, value in {"pass": 0.5, "fail": 3.0, "pair-a": 1.0, "pair-b": 2.0}.items():
        values.labels(case).set(value)
    # A counter that never moves: its rate is 0, and a ratio of two such rates is 0/0 = NaN.
    Counter("embedshift_test_idle", "Never incremented.", registry=registry)
    migrations = {
        DEMO: {"v1": V1, "v2": V2},
        BURST: {"v1": V1, "v2": V2},
        QUIET: {"v1": V1, "v2": V2_QUIET},
    }
    with ContractTraffic(registry, migrations) as traffic, serving_metrics(registry) as target:
        yield Exporter(target, traffic)


@pytest.fixture(scope="module")
def prom(module_prometheus: PrometheusFactory, exporter: Exporter) -> PrometheusProcess:
    prometheus = module_prometheus(targets=[exporter.target], scrape_interval=SCRAPE_INTERVAL)
    # Several scrapes, so rate() over the window has points to work with.
    prometheus.wait_for_scrape(timeout=20, scrapes=4)
    return prometheus


@pytest.fixture
async def source(prom: PrometheusProcess) -> AsyncIterator[PrometheusSource]:
    async with PrometheusSource(url=prom.url) as source:
        yield source


# ---- one query, one verdict --------------------------------------------------------------------


async def test_a_value_within_its_bound_passes(source: PrometheusSource) -> None:
    spec = custom_spec('max(embedshift_test_value{case="pass"})', max=1.0)

    status = await check(source, spec)

    [result] = status.results
    assert (result.verdict, result.value) == (Verdict.PASS, 0.5)
    assert status.consecutive_passes == 1
    assert status.streaks == {"custom": 0}


async def test_a_value_out_of_its_bound_fails(source: PrometheusSource) -> None:
    spec = custom_spec('max(embedshift_test_value{case="fail"})', max=1.0)

    status = await check(source, spec, previous=AnalysisStatus(consecutive_passes=2))

    [result] = status.results
    assert (result.verdict, result.value, result.bound) == (Verdict.FAIL, 3.0, "≤ 1")
    assert status.consecutive_passes == 0
    assert status.streaks == {"custom": 1}


async def test_no_such_series_is_nodata(source: PrometheusSource) -> None:
    assert await source.query("embedshift_no_such_metric") is None

    status = await check(source, custom_spec("sum(embedshift_no_such_metric)", max=1.0))

    [result] = status.results
    assert (result.verdict, result.value) == (Verdict.NODATA, None)
    assert status.consecutive_passes == 0


async def test_a_zero_over_zero_ratio_is_nodata(source: PrometheusSource) -> None:
    query = (
        "sum(rate(embedshift_test_idle_total[{{ window }}])) / "
        "sum(rate(embedshift_test_idle_total[{{ window }}]))"
    )

    status = await check(source, custom_spec(query, max=1.0))

    [result] = status.results
    assert result.query == query.replace("{{ window }}", WINDOW)
    assert (result.verdict, result.value) == (Verdict.NODATA, None)
    assert "NaN" in result.message


async def test_several_series_are_an_error_naming_the_query(source: PrometheusSource) -> None:
    query = 'embedshift_test_value{case=~"pair-.*"}'

    with pytest.raises(MetricSourceError) as raised:
        await source.query(query)
    status = await check(source, custom_spec(query, max=10.0))

    [result] = status.results
    assert result.verdict is Verdict.ERROR
    assert result.message == str(raised.value)
    assert repr(query) in result.message
    assert "returned 2 series" in result.message
    assert "aggregate it" in result.message


async def test_a_promql_error_names_the_query_and_the_cause(source: PrometheusSource) -> None:
    query = "sum(rate(embedshift_test_idle_total[5m])"

    status = await check(source, custom_spec(query, max=1.0))

    [result] = status.results
    assert result.verdict is Verdict.ERROR
    assert repr(query) in result.message
    assert "bad_data" in result.message
    assert "\n" not in result.message


# ---- the default criteria over the contract's series -------------------------------------------


async def test_healthy_traffic_passes_every_default_criterion(source: PrometheusSource) -> None:
    spec = make_spec()

    status = await check(source, spec)

    assert verdicts(status) == {
        "p95-latency": Verdict.PASS,
        "p95-latency-vs-v1": Verdict.PASS,
        "avg-similarity": Verdict.PASS,
        "error-rate": Verdict.PASS,
        "cache-hit-rate": Verdict.PASS,
        "critical-errors": Verdict.PASS,
        "cost-vs-v1": Verdict.PASS,
        "error-rate-critical": Verdict.PASS,
        "p95-latency-critical": Verdict.PASS,
    }
    results = by_name(status)
    assert results["p95-latency"].value == pytest.approx(0.195)
    assert results["p95-latency-vs-v1"].message == "v1 0.295"
    assert results["error-rate"].value == 0.0
    assert results["critical-errors"].value == 0.0
    # A scrape may fall between two increments of one tick, hence approximately.
    assert results["avg-similarity"].value == pytest.approx(0.85, rel=0.02)
    assert results["cache-hit-rate"].value == pytest.approx(0.8, rel=0.02)
    assert results["cost-vs-v1"].value == pytest.approx(0.01, rel=0.02)  # USD per 1000 searches
    v1_cost = float(results["cost-vs-v1"].message.removeprefix("v1 "))
    assert v1_cost == pytest.approx(0.02, rel=0.02)
    assert status.consecutive_passes == 1
    assert breached_thresholds(spec, status) == []


async def test_an_error_burst_breaches_the_critical_error_rate(
    source: PrometheusSource, prom: PrometheusProcess, exporter: Exporter
) -> None:
    spec = make_spec()
    before = await check(source, spec, migration=BURST)
    assert set(verdicts(before).values()) == {Verdict.PASS}

    exporter.traffic.burst_errors(BURST, "v2", 10 * int(RATE))
    await prom.wait_for_scrape_async(timeout=10)
    after = await check(source, spec, migration=BURST, previous=before)

    results = by_name(after)
    assert results["error-rate-critical"].verdict is Verdict.FAIL
    assert results["error-rate-critical"].value is not None
    assert results["error-rate-critical"].value > 0.5
    assert results["error-rate"].verdict is Verdict.FAIL
    assert results["p95-latency-critical"].verdict is Verdict.PASS
    assert results["critical-errors"].verdict is Verdict.PASS  # severity "error", not critical
    assert after.consecutive_passes == 0
    assert breached_thresholds(spec, after) == ["error-rate-critical"]
    # The other migrations' series are untouched: scoped by the migration label.
    assert set(verdicts(await check(source, spec, migration=DEMO)).values()) == {Verdict.PASS}


async def test_below_min_requests_every_criterion_is_nodata(source: PrometheusSource) -> None:
    spec = make_spec()

    status = await check(source, spec, migration=QUIET)

    assert set(verdicts(status).values()) == {Verdict.NODATA}
    assert "minRequests 100" in status.results[0].message
    assert status.consecutive_passes == 0
    # The same traffic judged with a gate it clears passes.
    relaxed = await check(source, make_spec(minRequests=1), migration=QUIET)
    assert set(verdicts(relaxed).values()) == {Verdict.PASS}


# ---- when Prometheus cannot answer --------------------------------------------------------------


async def test_a_stopped_prometheus_is_an_error_verdict(prometheus: PrometheusFactory) -> None:
    instance = prometheus(targets=[])
    spec = make_spec()
    async with PrometheusSource(url=instance.url) as source:
        assert await source.query("vector(1)") == 1.0
        instance.process.kill()
        instance.process.wait()

        with pytest.raises(MetricSourceError) as raised:
            await source.query("vector(1)")
        status = await check(source, spec, previous=AnalysisStatus(streaks={"error-rate": 1}))

    message = str(raised.value)
    assert message.startswith("Prometheus query 'vector(1)' failed: cannot reach ")
    assert instance.url in message
    assert set(verdicts(status).values()) == {Verdict.ERROR}
    for result in status.results:
        assert result.message.startswith("traffic gate failed: Prometheus query 'sum(increase(")
        assert "cannot reach" in result.message
    # onError: hold (the default) leaves failure streaks as they were.
    assert status.streaks["error-rate"] == 1
    assert status.consecutive_passes == 0


async def test_a_server_that_never_answers_times_out() -> None:
    async with (
        StubPrometheus(hang=True) as stub,
        PrometheusSource(url=stub.url, timeout=0.5) as source,
    ):
        started = time.monotonic()
        with pytest.raises(MetricSourceError) as raised:
            await source.query("vector(1)")
        elapsed = time.monotonic() - started

        status = await check(source, custom_spec("vector(1)", max=1.0))

    assert 0.5 <= elapsed < 1.5
    assert str(raised.value) == f"Prometheus query 'vector(1)' timed out after 0.5s at {stub.url}"
    [result] = status.results
    assert result.verdict is Verdict.ERROR
    assert "timed out after 0.5s" in result.message


async def test_a_5xx_is_an_error_naming_the_query() -> None:
    async with StubPrometheus() as stub, PrometheusSource(url=stub.url) as source:
        stub.answer(502, b"<html>Bad Gateway</html>", "text/html")
        with pytest.raises(MetricSourceError) as raised:
            await source.query("up")

    assert str(raised.value) == f"Prometheus query 'up' failed: HTTP 502 from {stub.url}"


# ---- the bearer token ---------------------------------------------------------------------------


async def test_the_bearer_token_is_sent_and_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = "s3cret-t0ken"
    async with (
        StubPrometheus() as stub,
        # A token read from a Secret file often ends with a newline.
        PrometheusSource(url=stub.url, bearer_token=f"{token}\n") as source,
    ):
        stub.answer(200, vector("0.25"))
        assert await source.query("embedshift_rollout_percentage") == 0.25

        stub.answer(500, {"status": "error", "errorType": "internal", "error": "boom"})
        with pytest.raises(MetricSourceError) as raised:
            await source.query("up")
        stub.answer(502, b"Bad Gateway")
        status = await check(source, custom_spec("up", max=1.0))

    assert stub.requests[0].headers["authorization"] == f"Bearer {token}"
    assert stub.requests[0].target.startswith("/api/v1/query?query=embedshift_rollout_percentage")
    assert {r.headers["authorization"] for r in stub.requests} == {f"Bearer {token}"}
    assert str(raised.value) == "Prometheus query 'up' failed: internal: boom"
    shown = [
        str(raised.value),
        repr(raised.value),
        repr(source),
        json.dumps(status.model_dump(mode="json")),
        caplog.text,
    ]
    assert all(token not in text for text in shown)
    assert repr(source) == f"PrometheusSource(url={stub.url!r})"


async def test_headers_are_sent() -> None:
    async with (
        StubPrometheus() as stub,
        PrometheusSource(url=stub.url, headers={"X-Scope-OrgID": "rag"}) as source,
    ):
        await source.query("up")

    assert stub.requests[0].headers["x-scope-orgid"] == "rag"
    assert "authorization" not in stub.requests[0].headers


@pytest.mark.parametrize(
    ("url", "bearer_token", "headers", "message"),
    [
        ("http://prom:9090", "  \n", None, "bearer token cannot be sent: it is empty"),
        ("http://user:pw@prom:9090", "t0ken", None, "not both"),
        ("http://prom:9090", "t0ken", {"authorization": "Basic x"}, "not both"),
        ("prom:9090", None, None, "http:// or https://"),
    ],
)
def test_bad_configuration_is_a_config_error(
    url: str, bearer_token: str | None, headers: dict[str, str] | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        PrometheusSource(url=url, bearer_token=bearer_token, headers=headers)

    assert "t0ken" not in str(raised.value)
    assert "pw" not in str(raised.value)
