"""PrometheusClient.query_range against a real Prometheus, and the client's credentials.

Range queries here are built from ``time()`` and ``vector()``, which Prometheus evaluates at
every step without any scraped data, so each value is known exactly and no exporter (and no
wait for a first scrape) is needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from rag_service.errors import ConfigError
from rag_service.prometheus import PrometheusClient, PrometheusError
from rag_service.testing.prometheus import PrometheusProcess
from tests.prometheus_fixtures import PrometheusFactory

START = datetime(2024, 5, 17, 12, 0, 0, tzinfo=UTC)
TWO_SERIES = (
    'label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", "")'
)


@pytest.fixture(scope="module")
def prom(module_prometheus: PrometheusFactory) -> Iterator[PrometheusProcess]:
    yield module_prometheus(targets=[])


@pytest.fixture
async def client(prom: PrometheusProcess) -> AsyncIterator[PrometheusClient]:
    async with PrometheusClient(url=prom.url) as client:
        yield client


async def test_one_point_per_step_inclusive(client: PrometheusClient) -> None:
    points = await client.query_range(
        "time()", start=START, end=START + timedelta(minutes=1), step=timedelta(seconds=15)
    )

    expected = [START + timedelta(seconds=15 * k) for k in range(5)]
    assert points == [(at, at.timestamp()) for at in expected]


async def test_an_end_between_steps_stops_at_the_last_step_before_it(
    client: PrometheusClient,
) -> None:
    points = await client.query_range(
        "vector(1)", start=START, end=START + timedelta(seconds=29), step=timedelta(seconds=10)
    )

    assert [at for at, _ in points] == [START + timedelta(seconds=s) for s in (0, 10, 20)]


async def test_milliseconds_survive(client: PrometheusClient) -> None:
    start = START + timedelta(milliseconds=123)

    points = await client.query_range(
        "time()", start=start, end=start + timedelta(seconds=1), step=timedelta(milliseconds=250)
    )

    assert [at for at, _ in points] == [start + timedelta(milliseconds=250 * k) for k in range(5)]
    assert [value for _, value in points] == [
        pytest.approx(at.timestamp(), abs=1e-6) for at, _ in points
    ]


async def test_steps_without_a_sample_are_none(client: PrometheusClient) -> None:
    half = START + timedelta(seconds=30)

    points = await client.query_range(
        f"vector(time()) >= {half.timestamp()}",
        start=START,
        end=START + timedelta(minutes=1),
        step=timedelta(seconds=10),
    )

    assert [value for _, value in points] == [
        None,
        None,
        None,
        half.timestamp(),
        half.timestamp() + 10,
        half.timestamp() + 20,
        half.timestamp() + 30,
    ]


async def test_no_series_is_every_step_none(client: PrometheusClient) -> None:
    points = await client.query_range(
        "embedshift_no_such_metric",
        start=START,
        end=START + timedelta(seconds=20),
        step=timedelta(seconds=10),
    )

    assert points == [(START + timedelta(seconds=s), None) for s in (0, 10, 20)]


async def test_nan_is_none(client: PrometheusClient) -> None:
    points = await client.query_range(
        "vector(0) / 0", start=START, end=START + timedelta(seconds=20), step=timedelta(seconds=10)
    )

    assert [value for _, value in points] == [None, None, None]


async def test_several_series_are_refused(client: PrometheusClient) -> None:
    with pytest.raises(PrometheusError) as raised:
        await client.query_range(
            TWO_SERIES, start=START, end=START + timedelta(minutes=1), step=timedelta(seconds=10)
        )

    message = str(raised.value)
    assert message.startswith("Prometheus range query 'label_replace(vector(1)")
    assert "returned 2 series, expected one: aggregate it" in message


async def test_a_long_range_is_fetched_in_pieces(client: PrometheusClient) -> None:
    # 12,001 points: beyond the 11,000 Prometheus answers in one query.
    end = START + timedelta(seconds=12_000)

    points = await client.query_range("time()", start=START, end=end, step=timedelta(seconds=1))

    assert len(points) == 12_001
    assert points[0] == (START, START.timestamp())
    assert points[-1] == (end, end.timestamp())
    assert all(at.timestamp() == value for at, value in points)


async def test_a_promql_error_names_the_query(client: PrometheusClient) -> None:
    with pytest.raises(PrometheusError) as raised:
        await client.query_range(
            "sum(rate(x[5m])", start=START, end=START, step=timedelta(seconds=1)
        )

    assert str(raised.value).startswith("Prometheus query 'sum(rate(x[5m])' failed: bad_data: ")


async def test_bad_arguments(client: PrometheusClient) -> None:
    second = timedelta(seconds=1)
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.query_range("1", start=datetime(2024, 5, 17), end=START, step=second)
    with pytest.raises(ValueError, match="at least 1 ms"):
        await client.query_range("1", start=START, end=START, step=timedelta(microseconds=10))
    with pytest.raises(ValueError, match="before `start`"):
        await client.query_range("1", start=START, end=START - second, step=second)


async def test_a_stopped_prometheus(prometheus: PrometheusFactory) -> None:
    instance = prometheus(targets=[])
    async with PrometheusClient(url=instance.url, timeout=2) as client:
        instance.process.kill()
        instance.process.wait()
        with pytest.raises(
            PrometheusError, match=r"^Prometheus query 'time\(\)' failed: cannot reach"
        ):
            await client.query_range("time()", start=START, end=START, step=timedelta(seconds=1))


def test_repr_shows_no_credentials() -> None:
    client = PrometheusClient(url="https://scraper:pa55@prom.example:9090", timeout=3)
    assert repr(client) == "PrometheusClient(url='https://prom.example:9090', timeout=3)"
    client = PrometheusClient(url="https://prom.example:9090", bearer_token="t0ken")
    assert "t0ken" not in repr(client)


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_a_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ConfigError, match="timeout must be positive"):
        PrometheusClient(url="http://prom:9090", timeout=timeout)
