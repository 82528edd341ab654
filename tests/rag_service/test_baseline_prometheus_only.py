"""`embedshift baseline --prometheus-url …` reads Prometheus alone: it needs no DATABASE_URL,
to record v1's figures or to judge v2 against them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rag_service.metrics import ServiceMetrics
from rag_service.testing.prometheus import serving_metrics
from tests.helpers import cli, cli_async
from tests.prometheus_fixtures import PrometheusFactory

TABLE = "docs_prom_only"
SPEC_FLAGS = ["--table", TABLE, "--source", "local:v1model@768", "--target", "local:v2model@768"]


async def test_baseline_from_prometheus_alone_needs_no_database_url(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    prometheus: PrometheusFactory,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    registry = CollectorRegistry()
    models = [("local", "v1model"), ("local", "v2model")]
    metrics = ServiceMetrics(migration=f"default/{TABLE}", registry=registry, usage_models=models)
    with serving_metrics(registry) as target:
        prom = prometheus(targets=[target])
        await prom.wait_for_scrape_async()
        for _ in range(40):
            metrics.observe_search(version="v1", seconds=0.2, outcome="ok", top_similarity=0.8)
            metrics.observe_search(version="v2", seconds=0.1, outcome="ok", top_similarity=0.9)
        await prom.wait_for_scrape_async()
        output = tmp_path / "baseline.json"
        flags = [*SPEC_FLAGS, "--output", str(output)]

        record = await cli_async(
            capsys, "baseline", *flags, "--prometheus-url", prom.url, "--range", "5m", "--json"
        )
        assert record.code == 0, record.err
        assert "DATABASE_URL" not in record.err
        saved = json.loads(output.read_text())
        assert saved["source"] == "prometheus"
        assert saved["metrics"]["requests"] > 0
        assert saved["metrics"]["avg_top_similarity"] == pytest.approx(0.8)

        # --compare reads the Prometheus the baseline names: still no database.
        judged = await cli_async(capsys, "baseline", *flags, "--compare", "--json")
        assert judged.code in (0, 1), judged.err  # the verdict is the criteria's, not an error
        report = json.loads(judged.out)
        assert report["current"]["source"] == "prometheus"
        assert report["current"]["metrics"]["avg_top_similarity"] == pytest.approx(0.9)


def test_a_baseline_from_a_compare_run_still_needs_the_database(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    result = cli(capsys, "baseline", *SPEC_FLAGS, "--output", str(tmp_path / "b.json"))
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert line.startswith("embedshift: error: DATABASE_URL is not set")
