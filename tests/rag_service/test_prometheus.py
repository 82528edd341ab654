"""PrometheusClient against a real Prometheus scraping a real ``prometheus_client`` exporter.

One Prometheus and one exporter serve the whole module: the first scrape comes ~5 s after
Prometheus starts. A thread makes steady traffic so ``rate()`` has exact answers: the counters
grow by elapsed time (10/s for v1, 4/s for v2), and each tick observes the same durations.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rag_service.criteria import metric_query
from rag_service.errors import ConfigError
from rag_service.prometheus import PrometheusClient, PrometheusError
from rag_service.testing import prometheus as testing_prometheus
from rag_service.testing.prometheus import (
    PrometheusNotInstalled,
    PrometheusProcess,
    prometheus_binary,
    serving_metrics,
)
from tests.prometheus_fixtures import PrometheusFactory

RATES = {"v1": 10.0, "v2": 4.0}
# Per tick: v1 is 80 % at 0.5 s and 20 % at 1.0 s, so its p95 interpolates inside (0.8, 1.2] to
# 0.8 + 0.4 * (0.95 - 0.8) / 0.2 = 1.1; v2's p95 falls in the +Inf bucket, which PromQL reports
# as the highest finite bound, 1.2.
DURATIONS = {"v1": [0.5] * 8 + [1.0] * 2, "v2": [1.0, 1.5]}
TICK = 0.01

# Every series carries the contract's migration label, and every query selects it.
MIGRATION = "rag/prom"
THIS = f'migration="{MIGRATION}"'
REQUESTS = f"embedshift_search_requests_total{{{THIS}}}"
RULES = f"""\
groups:
  - name: embedshift
    rules:
      - record: version:embedshift_search_requests:rate3s
        expr: sum by (migration, version) (rate({REQUESTS}[3s]))
"""


@pytest.fixture(scope="module")
def exporter() -> Iterator[str]:
    """A live exporter (its ``host:port``) with traffic flowing until the module ends."""
    registry = CollectorRegistry()
    requests = Counter(
        "embedshift_search_requests",
        "Searches.",
        ["migration", "version", "outcome"],
        registry=registry,
    )
    durations = Histogram(
        "embedshift_search_duration_seconds",
        "Search latency.",
        ["migration", "version"],
        buckets=(0.8, 1.2),
        registry=registry,
    )
    stop = threading.Event()

    def traffic() -> None:
        last = time.monotonic()
        while not stop.wait(TICK):
            now = time.monotonic()
            for version, rate in RATES.items():
                # By elapsed time, not per tick: a late tick must not slow the rate down.
                requests.labels(MIGRATION, version, "ok").inc(rate * (now - last))
                for seconds in DURATIONS[version]:
                    durations.labels(MIGRATION, version).observe(seconds)
            last = now

    thread = threading.Thread(target=traffic, name="traffic", daemon=True)
    thread.start()
    try:
        with serving_metrics(registry) as target:
            yield target
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def prom(
    module_prometheus: PrometheusFactory,
    exporter: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> PrometheusProcess:
    rules = tmp_path_factory.mktemp("rules") / "embedshift.rules.yml"
    rules.write_text(RULES)
    prometheus = module_prometheus(targets=[exporter], rule_files=[rules])
    # Five scrapes: a [3s] window then holds only samples of a series older than the window,
    # so rate() extrapolates to the window's edges and is exact for steady traffic.
    prometheus.wait_for_scrape(timeout=25, scrapes=5)
    return prometheus


@pytest.fixture
async def client(prom: PrometheusProcess) -> AsyncIterator[PrometheusClient]:
    async with PrometheusClient(url=prom.url) as client:
        yield client


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections and that no other process can take meanwhile
    (bound, never listening: tests running in parallel must not turn it into a live target)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port: int = holder.getsockname()[1]
        yield port


async def test_rate_of_a_counter(client: PrometheusClient) -> None:
    samples = await client.query(f"sum by (version) (rate({REQUESTS}[3s]))")

    rates = {sample.labels["version"]: sample.value for sample in samples}
    assert rates == {
        "v1": pytest.approx(RATES["v1"], rel=0.1),
        "v2": pytest.approx(RATES["v2"], rel=0.1),
    }


async def test_histogram_quantile_lands_in_the_bucket(client: PrometheusClient) -> None:
    p95 = {
        version: await client.query_scalar(
            metric_query("p95_latency_seconds", version=version, migration=MIGRATION, window="3s")
        )
        for version in RATES
    }
    assert p95["v1"] is not None
    assert 0.8 < p95["v1"] <= 1.2
    assert p95["v1"] == pytest.approx(1.1, abs=0.05)
    assert p95["v2"] == 1.2


async def test_label_sets_come_back(client: PrometheusClient, exporter: str) -> None:
    before = datetime.now(UTC)

    samples = await client.query(REQUESTS)

    assert sorted(sample.labels["version"] for sample in samples) == ["v1", "v2"]
    for sample in samples:
        assert sample.labels == {
            "__name__": "embedshift_search_requests_total",
            "instance": exporter,
            "job": "embedshift",
            "migration": MIGRATION,
            "outcome": "ok",
            "version": sample.labels["version"],
        }
        assert sample.value > 0
        assert abs(sample.timestamp - before) < timedelta(seconds=5)


async def test_a_recording_rule_from_rule_files(client: PrometheusClient) -> None:
    rate = await client.query_scalar(
        f'version:embedshift_search_requests:rate3s{{{THIS},version="v1"}}'
    )

    assert rate == pytest.approx(RATES["v1"], rel=0.1)


async def test_query_at_a_past_instant(client: PrometheusClient) -> None:
    at = datetime(2024, 5, 17, 12, 30, 15, tzinfo=UTC)

    [sample] = await client.query("time()", at=at)
    assert sample.labels == {}
    assert sample.value == at.timestamp()
    assert sample.timestamp == at
    assert await client.query(REQUESTS, at=at) == []

    with pytest.raises(ValueError, match="timezone-aware"):
        await client.query("time()", at=datetime(2024, 5, 17))


async def test_query_scalar(client: PrometheusClient) -> None:
    rate = await client.query_scalar(
        f'sum(rate(embedshift_search_requests_total{{{THIS},version="v2"}}[3s]))'
    )
    assert rate == pytest.approx(RATES["v2"], rel=0.1)
    assert await client.query_scalar("42") == 42.0
    assert await client.query_scalar("1 / 0") == float("inf")


async def test_query_scalar_is_none_without_data(client: PrometheusClient) -> None:
    assert await client.query_scalar("embedshift_no_such_metric") is None
    # NaN: what a ratio or quantile over a window without requests gives.
    assert await client.query_scalar("vector(0) / 0") is None
    assert await client.query_scalar("0 / 0") is None


async def test_query_scalar_refuses_many_series(client: PrometheusClient) -> None:
    with pytest.raises(PrometheusError, match="returned 2 series"):
        await client.query_scalar(REQUESTS)


async def test_a_syntax_error_names_the_query(client: PrometheusClient) -> None:
    promql = f"sum(rate({REQUESTS}[3s])"

    with pytest.raises(PrometheusError) as raised:
        await client.query(promql)

    message = str(raised.value)
    assert repr(promql) in message
    assert "bad_data" in message
    assert "parse error" in message
    assert "\n" not in message


async def test_a_range_vector_is_refused(client: PrometheusClient) -> None:
    with pytest.raises(PrometheusError, match="range vector"):
        await client.query(f"{REQUESTS}[5s]")


async def test_unreachable_prometheus() -> None:
    with closed_port() as port:
        url = f"http://scraper:s3cret@127.0.0.1:{port}"
        async with PrometheusClient(url=url, timeout=2) as client:
            assert not await client.ready()
            with pytest.raises(PrometheusError) as raised:
                await client.query("up")

    message = str(raised.value)
    assert "'up'" in message
    assert "cannot reach http://127.0.0.1:" in message
    assert "s3cret" not in message


async def test_something_else_than_prometheus(exporter: str) -> None:
    # prometheus_client's exporter answers every path with its metrics text.
    async with PrometheusClient(url=f"http://{exporter}") as client:
        with pytest.raises(PrometheusError, match="did not answer like Prometheus"):
            await client.query("up")


async def test_ready(client: PrometheusClient) -> None:
    assert await client.ready()


def test_a_url_without_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="http:// or https://"):
        PrometheusClient(url="localhost:9090")


async def test_added_targets_are_scraped(client: PrometheusClient, prom: PrometheusProcess) -> None:
    registry = CollectorRegistry()
    percentage = Gauge(
        "embedshift_rollout_percentage", "Share of v2.", ["migration"], registry=registry
    )
    percentage.labels(MIGRATION).set(25)
    with serving_metrics(registry) as second:
        prom.add_targets(second)
        await prom.wait_for_scrape_async(timeout=15)

        up = await client.query('up{job="embedshift"}')
        assert {sample.labels["instance"]: sample.value for sample in up} == {
            prom.targets[0]: 1.0,
            second: 1.0,
        }
        assert await client.query_scalar(f"embedshift_rollout_percentage{{{THIS}}}") == 25.0


def test_wait_for_scrape_names_a_down_target(prometheus: PrometheusFactory) -> None:
    with closed_port() as port:
        dead = f"127.0.0.1:{port}"
        instance = prometheus(targets=[dead])

        with pytest.raises(TimeoutError) as raised:
            instance.wait_for_scrape(timeout=8)

    assert f"{dead}: down" in str(raised.value)
    assert "connection refused" in str(raised.value)


def test_a_bad_rule_file_fails_the_start(prometheus: PrometheusFactory, tmp_path: Path) -> None:
    rules = tmp_path / "broken.rules.yml"
    rules.write_text("groups:\n  - name: x\n    rules:\n      - record: r\n        expr: sum(\n")

    with pytest.raises(RuntimeError, match="exited with code 1 before it was ready"):
        prometheus(targets=[], rule_files=[rules])


def test_a_missing_binary_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(testing_prometheus, "_DEBIAN_BINARY", Path("/nonexistent/prometheus"))

    with pytest.raises(PrometheusNotInstalled, match="install Debian's 'prometheus' package"):
        prometheus_binary()
