"""The chart's Grafana dashboard: generated from the criteria, and every query it runs answers
with series from a real Prometheus that scraped the service's series (steady contract traffic
plus a ServiceMetrics for tokens, breaker and percentage) and the operator's (an OperatorMetrics
that recorded real decide() outputs)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from embedshift_operator import observability
from embedshift_operator.adapters.operator_metrics import OperatorMetrics
from embedshift_operator.core import Observations
from embedshift_operator.resource import MigrationProgress, Phase
from rag_service.metrics import ServiceMetrics
from rag_service.testing.prometheus import PrometheusProcess, serving_metrics
from rag_service.testing.traffic import ContractTraffic, VersionTraffic
from tests.operator.core.builders import MIGRATION, all_pass, at, check, make_spec, status_at, tick
from tests.prometheus_fixtures import PrometheusFactory

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "embedshift" / "dashboards" / "embedshift.json"
V1 = VersionTraffic("gemini", "text-embedding-004", cost_usd_per_request=0.00002)
V2 = VersionTraffic("openai", "text-embedding-3-small", latency_seconds=0.3, error_share=0.01)
VARIABLES = {"$migration": MIGRATION, "$v1_model": V1.model, "$v2_model": V2.model}


def substituted(query: str) -> str:
    for name, value in VARIABLES.items():
        query = query.replace(name, value)
    assert "$" not in query, query
    return query


def record_operator(metrics: OperatorMetrics) -> None:
    """A check that passes, then one that breaches: verdicts, a RolledBack transition and a
    rollback, with the re-embedding done but for the follower's queue."""
    spec = make_spec()
    status = status_at(spec, Phase.PROGRESSING, step=1)
    progress = MigrationProgress(total=4000, migrated=3990, pending=10, oldest_pending_seconds=12)
    passed = tick(spec, status, Observations(analysis=all_pass(spec)), at(hours=1))
    passed = replace(passed, status=passed.status.model_copy(update={"migration": progress}))
    metrics.record(MIGRATION, status, passed, seconds=0.05)
    breach = tick(
        spec, passed.status, Observations(analysis=check(spec, fail=["errors"])), at(hours=2)
    )
    assert breach.status.phase is Phase.ROLLED_BACK
    metrics.record(MIGRATION, passed.status, breach, seconds=0.05)


@pytest.fixture(scope="module")
def scraped(module_prometheus: PrometheusFactory) -> Iterator[PrometheusProcess]:
    traffic_registry, service_registry, operator_registry = (CollectorRegistry() for _ in range(3))
    service = ServiceMetrics(
        migration=MIGRATION,
        registry=service_registry,
        usage_models=[(V1.provider, V1.model), (V2.provider, V2.model)],
    )
    service.set_percentage(25)
    service.set_breaker_open(version="v2", open=True)
    service.observe_search(version="v2", seconds=0.4, outcome="fallback", top_similarity=0.8)
    service.count_usage(provider=V2.provider, model=V2.model, tokens=120, cost_usd=0.0001)
    record_operator(OperatorMetrics(registry=operator_registry))
    traffic = ContractTraffic(traffic_registry, {MIGRATION: {"v1": V1, "v2": V2}})
    with (
        traffic,
        serving_metrics(traffic_registry) as contract,
        serving_metrics(service_registry) as service_target,
        serving_metrics(operator_registry) as operator_target,
    ):
        prometheus = module_prometheus(targets=[contract, service_target, operator_target])
        # rate() and increase() need two samples of each series in the window
        prometheus.wait_for_scrape(scrapes=3)
        service.count_usage(provider=V2.provider, model=V2.model, tokens=80, cost_usd=0.0001)
        prometheus.wait_for_scrape(scrapes=2)
        yield prometheus


def query(prometheus: PrometheusProcess, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=10)
    assert response.status_code == 200, (promql, response.text)
    body = response.json()
    assert body["status"] == "success", (promql, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_checked_in_dashboard_is_the_generated_one() -> None:
    assert DASHBOARD.read_text(encoding="utf-8") == observability.render_dashboard(), (
        f"{DASHBOARD.relative_to(REPO)} is stale: run `python -m embedshift_operator.observability`"
        " and commit the result"
    )


def test_the_dashboard_tells_the_whole_rollout() -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for topic in (
        "share of searches on v2",
        "p50 / p95",
        "error and fallback",
        "similarity",
        "cache hit rate",
        "cost per 1k",
        "tokens",
        "spend",
        "progress",
        "lag",
        "circuit breaker",
        "verdicts per criterion",
    ):
        assert topic in titles, topic
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "migration", "v1_model", "v2_model"} <= variables
    (annotation,) = board["annotations"]["list"]
    assert "embedshift_operator_transitions_total" in annotation["expr"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert '$migration"' in target["expr"], (panel["title"], target["expr"])
    # the criteria's own PromQL, with the panel's migration
    p95 = observability.metric_query(
        "p95_latency_seconds", version="v2", migration="$migration", window="5m"
    )
    assert p95 in [t["expr"] for p in board["panels"] for t in p["targets"]]


def test_every_query_answers_with_series_after_traffic(scraped: PrometheusProcess) -> None:
    empty = []
    for where, promql in observability.dashboard_queries():
        if not query(scraped, substituted(promql)):
            empty.append(f"{where}: {substituted(promql)}")
    assert not empty, "queries without series:\n" + "\n".join(empty)


def test_the_numbers_are_the_recorded_ones(scraped: PrometheusProcess) -> None:
    queries = dict(observability.dashboard_queries())
    percentage = query(
        scraped, substituted(queries["Share of searches on v2: operator (effective)"])
    )
    assert [float(s["value"][1]) for s in percentage] == [0.0]  # rolled back
    progress = query(scraped, substituted(queries["Re-embedding progress: migrated"]))
    assert [round(float(s["value"][1]), 4) for s in progress] == [round(3990 / 4000, 4)]
    breaker = query(scraped, substituted(queries["Circuit breaker open: {{version}} {{instance}}"]))
    assert {s["metric"]["version"]: float(s["value"][1]) for s in breaker} == {"v1": 0.0, "v2": 1.0}
    transitions = query(scraped, substituted(queries["annotation: Phase transitions"]))
    assert ("RolledBack", "ThresholdBreached") in {
        (s["metric"]["phase"], s["metric"]["reason"]) for s in transitions
    }
    verdicts = query(
        scraped,
        substituted(queries["Verdicts per criterion (last hour): {{criterion}} {{verdict}}"]),
    )
    assert {"errors"} <= {s["metric"]["criterion"] for s in verdicts}


def test_the_variables_list_the_migration_and_models(scraped: PrometheusProcess) -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = match.groups()
        response = httpx.get(
            f"{scraped.url}/api/v1/series", params={"match[]": substituted(selector)}, timeout=10
        )
        values = {s.get(label) for s in response.json()["data"]}
        expected = {"migration": {MIGRATION}, "v1_model": {V1.model}, "v2_model": {V2.model}}
        assert expected[variable["name"]] <= values, (variable["name"], values)
