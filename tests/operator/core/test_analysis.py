"""Analysis: which queries a check runs (plan_analysis), what the numbers mean (evaluate), and how
they are asked for (measure, against a small MetricSource answering from a dict)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import pytest

from embedshift_operator.core import (
    AnalysisObservation,
    Measurement,
    MetricSource,
    MetricSourceError,
    ProgressObservation,
    evaluate,
    measure,
    plan_analysis,
)
from embedshift_operator.resource import (
    AnalysisSpec,
    AnalysisStatus,
    CriterionKind,
    EmbeddingMigrationSpec,
    PrometheusSpec,
)
from rag_service.criteria import Verdict, metric_query, requests_query
from tests.operator.core.builders import (
    MIGRATION,
    SUCCESS,
    all_pass,
    at,
    check,
    make_spec,
    threshold,
)


def _guide(window: str = "5m") -> EmbeddingMigrationSpec:
    """make_spec() with the guide's default criteria and thresholds."""
    analysis = AnalysisSpec(prometheus=PrometheusSpec(url="http://prometheus:9090"), window=window)
    return make_spec().model_copy(update={"analysis": analysis})


# ---- plan_analysis -------------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["5m", "10m", "1h"])
def test_built_in_queries_are_scoped_by_migration_and_window(window: str) -> None:
    spec = _guide(window)
    plan = plan_analysis(spec, migration="team-a/docs")
    assert plan.requests_query == requests_query(
        version="v2", migration="team-a/docs", window=window
    )
    assert {q.criterion for q in plan.queries} == {c.name for _, c in spec.analysis.criteria()}
    for planned in plan.queries:
        assert 'migration="team-a/docs"' in planned.query, planned.criterion
        assert 'version="v2"' in planned.query
        assert 'version="v1"' not in planned.query
        expected = "[24h]" if planned.criterion == "critical-errors" else f"[{window}]"
        assert expected in planned.query, planned.criterion
        assert planned.database_metric is None


def test_v1_is_queried_only_for_max_ratio_to_v1() -> None:
    plan = plan_analysis(_guide(), migration=MIGRATION)
    compared = {q.criterion: q.v1_query for q in plan.queries if q.v1_query is not None}
    assert set(compared) == {"p95-latency-vs-v1", "cost-vs-v1"}
    for query in compared.values():
        assert 'version="v1"' in query and f'migration="{MIGRATION}"' in query


def test_queries_come_from_the_one_place_that_writes_them() -> None:
    spec = _guide()
    plan = plan_analysis(spec, migration=MIGRATION)
    criteria = {c.name: c for _, c in spec.analysis.criteria()}
    for planned in plan.queries:
        metric = criteria[planned.criterion].metric
        assert metric is not None
        assert planned.query == metric_query(
            metric,
            version="v2",
            migration=MIGRATION,
            window="5m",
            provider="openai",
            model="text-embedding-3-small",
        )


def test_cost_compares_each_version_with_its_own_model() -> None:
    plan = plan_analysis(_guide(), migration=MIGRATION)
    [cost] = [q for q in plan.queries if q.criterion == "cost-vs-v1"]
    assert 'model="text-embedding-3-small"' in cost.query
    assert cost.v1_query is not None and 'model="text-embedding-ada-002"' in cost.v1_query


def test_custom_queries_get_their_placeholders_filled() -> None:
    query = (
        'sum(rate(app_errors_total{migration="{{ migration }}",ns="{{namespace}}",'
        'app="{{ name }}"}[{{ window }}]))'
    )
    spec = make_spec(
        analysis={"window": "2m", "successCriteria": [{"name": "app", "query": query, "max": 1}]}
    )
    plan = plan_analysis(spec, migration="team-a/docs")
    [app] = [q for q in plan.queries if q.criterion == "app"]
    assert app.query == (
        'sum(rate(app_errors_total{migration="team-a/docs",ns="team-a",app="docs"}[2m]))'
    )
    assert app.v1_query is None and app.kind is CriterionKind.SUCCESS


def test_follower_lag_is_read_from_the_database() -> None:
    spec = make_spec(
        analysis={"successCriteria": [{"name": "lag", "metric": "follower_lag_seconds", "max": 60}]}
    )
    [lag] = [q for q in plan_analysis(spec, migration=MIGRATION).queries if q.criterion == "lag"]
    assert lag.database_metric == "follower_lag_seconds"
    assert lag.query.startswith("database: ")


# ---- evaluate ------------------------------------------------------------------------------------


def _one(spec: EmbeddingMigrationSpec, name: str, measurement: Measurement | None) -> Any:
    observation = check(spec)
    measurements = dict(observation.measurements)
    if measurement is None:
        del measurements[name]
    else:
        measurements[name] = measurement
    obs = AnalysisObservation(requests=observation.requests, measurements=measurements)
    analysis = evaluate(spec, obs, AnalysisStatus(), now=at())
    return {r.name: r for r in analysis.results}[name]


@pytest.mark.parametrize(
    ("name", "measurement", "verdict", "message"),
    [
        pytest.param("latency", Measurement("q", value=0.5), Verdict.PASS, "", id="under-max"),
        pytest.param("latency", Measurement("q", value=0.8), Verdict.PASS, "", id="max-inclusive"),
        pytest.param("latency", Measurement("q", value=0.81), Verdict.FAIL, "", id="over-max"),
        pytest.param("similarity", Measurement("q", value=0.7), Verdict.PASS, "", id="min-incl"),
        pytest.param("similarity", Measurement("q", value=0.6), Verdict.FAIL, "", id="under-min"),
        pytest.param("latency", Measurement("q"), Verdict.NODATA, "no series", id="empty-series"),
        pytest.param("latency", Measurement("q", value=math.nan), Verdict.NODATA, "NaN", id="nan"),
        pytest.param(
            "latency",
            Measurement("q", error="q: 503 Service Unavailable"),
            Verdict.ERROR,
            "503 Service Unavailable",
            id="query-failed",
        ),
        pytest.param("latency", None, Verdict.ERROR, "not measured", id="not-measured"),
        pytest.param(
            "cost", Measurement("q", value=1.0, v1_value=1.0), Verdict.PASS, "v1 1", id="ratio-eq"
        ),
        pytest.param(
            "cost", Measurement("q", value=1.5, v1_value=1.0), Verdict.FAIL, "v1 1", id="ratio-over"
        ),
        pytest.param(
            "cost",
            Measurement("q", value=1.0),
            Verdict.NODATA,
            "v1 has no data",
            id="ratio-no-v1",
        ),
    ],
)
def test_verdicts(
    name: str, measurement: Measurement | None, verdict: Verdict, message: str
) -> None:
    result = _one(make_spec(), name, measurement)
    assert result.verdict is verdict
    assert message in result.message
    if measurement is not None:
        assert result.query == "q"


@pytest.mark.parametrize(
    ("min_requests", "requests", "requests_error", "verdict", "message"),
    [
        pytest.param(100, 100.0, None, Verdict.PASS, "", id="at-minRequests"),
        pytest.param(100, 99.0, None, Verdict.NODATA, "99 v2 requests in the last 5m", id="below"),
        pytest.param(100, None, None, Verdict.NODATA, "0 v2 requests", id="no-series"),
        pytest.param(0, None, None, Verdict.PASS, "", id="gate-off"),
        pytest.param(
            100, None, "timeout", Verdict.ERROR, "traffic gate failed: timeout", id="gate-error"
        ),
    ],
)
def test_the_traffic_gate_decides_for_every_criterion(
    min_requests: int,
    requests: float | None,
    requests_error: str | None,
    verdict: Verdict,
    message: str,
) -> None:
    spec = make_spec(analysis={"minRequests": min_requests})
    obs = check(spec, requests=requests, requests_error=requests_error)
    analysis = evaluate(spec, obs, AnalysisStatus(), now=at())
    assert {r.verdict for r in analysis.results} == {verdict}
    assert all(message in r.message for r in analysis.results)


@pytest.mark.parametrize(
    ("verdict", "no_data", "on_error", "expected"),
    [
        pytest.param("pass", "hold", "hold", 0, id="pass-resets"),
        pytest.param("fail", "hold", "hold", 3, id="fail-counts"),
        pytest.param("nodata", "hold", "hold", 2, id="nodata-hold"),
        pytest.param("nodata", "fail", "hold", 3, id="nodata-fail"),
        pytest.param("error", "hold", "hold", 2, id="error-hold"),
        pytest.param("error", "hold", "rollback", 3, id="error-rollback"),
        pytest.param("error", "fail", "hold", 2, id="error-not-nodata"),
        pytest.param("nodata", "hold", "rollback", 2, id="nodata-not-error"),
    ],
)
def test_streaks(verdict: str, no_data: str, on_error: str, expected: int) -> None:
    spec = make_spec(analysis={"noData": no_data, "onError": on_error})
    obs = check(
        spec,
        fail=["errors"] if verdict == "fail" else [],
        nodata=["errors"] if verdict == "nodata" else [],
        error=["errors"] if verdict == "error" else [],
    )
    previous = AnalysisStatus(streaks={"errors": 2})
    assert evaluate(spec, obs, previous, now=at()).streaks["errors"] == expected


def test_streaks_of_success_criteria_are_kept_too() -> None:
    spec = make_spec()
    obs = check(spec, fail=["latency"])
    analysis = evaluate(spec, obs, AnalysisStatus(streaks={"latency": 4}), now=at())
    assert analysis.streaks == {"latency": 5, "similarity": 0, "cost": 0, "errors": 0}


@pytest.mark.parametrize(
    ("observation", "expected"),
    [
        pytest.param(lambda s: check(s), 5, id="all-pass"),
        pytest.param(lambda s: check(s, fail=["latency"]), 0, id="one-fails"),
        pytest.param(lambda s: check(s, nodata=["latency"]), 0, id="one-nodata"),
        pytest.param(lambda s: check(s, error=["latency"]), 0, id="one-error"),
        pytest.param(lambda s: check(s, fail=["errors"]), 5, id="threshold-fails"),
    ],
)
def test_consecutive_passes(observation: Any, expected: int) -> None:
    # Only success criteria decide whether a check passed; rollback thresholds act on their own.
    spec = make_spec()
    previous = AnalysisStatus(consecutive_passes=4)
    assert evaluate(spec, observation(spec), previous, now=at()).consecutive_passes == expected


def test_no_success_criteria_never_count_a_pass() -> None:
    spec = make_spec(analysis={"successCriteria": []})
    assert evaluate(spec, all_pass(spec), AnalysisStatus(), now=at()).consecutive_passes == 0


def test_results_record_kind_bound_and_dry_run() -> None:
    spec = make_spec(analysis={"rollbackThresholds": [threshold(dry_run=True)]})
    analysis = evaluate(spec, all_pass(spec), AnalysisStatus(), now=at(minutes=3))
    results = {r.name: r for r in analysis.results}
    assert analysis.time == at(minutes=3)
    assert [r.name for r in analysis.results] == [c["name"] for c in SUCCESS] + ["errors"]
    assert (results["errors"].kind, results["errors"].dry_run) == (CriterionKind.ROLLBACK, True)
    assert results["latency"].bound == "≤ 0.8"
    assert results["similarity"].bound == "≥ 0.7"
    assert results["cost"].bound == "≤ 1 × v1"


# ---- measure -------------------------------------------------------------------------------------


class DictSource:
    """A MetricSource answering from a dict; the queries in ``failing`` raise, as a source
    that times out does. Unknown queries have no data."""

    def __init__(self, answers: Mapping[str, float | None], failing: Collection[str] = ()):
        self.answers = answers
        self.failing = failing
        self.asked: list[str] = []

    async def query(self, promql: str) -> float | None:
        self.asked.append(promql)
        if promql in self.failing:
            raise MetricSourceError(f"{promql[:30]}…: timed out after 10s")
        return self.answers.get(promql)


def _answers(spec: EmbeddingMigrationSpec) -> dict[str, float | None]:
    """Every query of ``spec``'s plan answered with its all-pass value."""
    plan = plan_analysis(spec, migration=MIGRATION)
    passing = all_pass(spec)
    answers: dict[str, float | None] = {plan.requests_query: 500.0}
    for planned in plan.queries:
        m = passing.measurements[planned.criterion]
        answers[planned.query] = m.value
        if planned.v1_query:
            answers[planned.v1_query] = m.v1_value
    return answers


def _lag_spec() -> EmbeddingMigrationSpec:
    return make_spec(
        analysis={
            "successCriteria": [
                *SUCCESS,
                {"name": "lag", "metric": "follower_lag_seconds", "max": 60},
            ]
        }
    )


async def test_measure_asks_every_query_once() -> None:
    spec = _lag_spec()
    plan = plan_analysis(spec, migration=MIGRATION)
    source = DictSource(_answers(spec))
    _: MetricSource = source
    progress = ProgressObservation(total=10, migrated=10, pending=0, oldest_pending_seconds=12.5)
    obs = await measure(source, plan, progress=progress)
    expected = [plan.requests_query] + [
        q for p in plan.queries if p.database_metric is None for q in (p.query, p.v1_query) if q
    ]
    assert sorted(source.asked) == sorted(expected)
    assert obs.requests == Measurement(plan.requests_query, value=500.0)
    assert obs.measurements["cost"].v1_value == 2.0
    assert obs.measurements["lag"].value == 12.5
    analysis = evaluate(spec, obs, AnalysisStatus(), now=at())
    assert {r.verdict for r in analysis.results} == {Verdict.PASS}


async def test_a_failing_query_becomes_an_error_measurement_not_an_exception() -> None:
    spec = make_spec()
    plan = plan_analysis(spec, migration=MIGRATION)
    [cost] = [p for p in plan.queries if p.criterion == "cost"]
    [latency] = [p for p in plan.queries if p.criterion == "latency"]
    assert cost.v1_query is not None
    source = DictSource(_answers(spec), failing={cost.v1_query, latency.query})
    obs = await measure(source, plan, progress=None)
    assert obs.measurements["cost"].value == 1.0  # v2 answered, v1 did not
    assert obs.measurements["cost"].error is not None
    assert "timed out" in obs.measurements["cost"].error
    assert obs.measurements["latency"].error is not None
    assert obs.measurements["similarity"].error is None
    verdicts = {r.name: r.verdict for r in evaluate(spec, obs, AnalysisStatus(), now=at()).results}
    assert verdicts == {
        "latency": Verdict.ERROR,
        "similarity": Verdict.PASS,
        "cost": Verdict.ERROR,
        "errors": Verdict.PASS,
    }


async def test_a_failing_traffic_gate_makes_every_criterion_an_error() -> None:
    spec = make_spec()
    plan = plan_analysis(spec, migration=MIGRATION)
    obs = await measure(
        DictSource(_answers(spec), failing={plan.requests_query}), plan, progress=None
    )
    assert obs.requests.error is not None
    analysis = evaluate(spec, obs, AnalysisStatus(), now=at())
    assert {r.verdict for r in analysis.results} == {Verdict.ERROR}


async def test_prometheus_down_is_all_errors() -> None:
    spec = make_spec()
    plan = plan_analysis(spec, migration=MIGRATION)
    everything = set(_answers(spec))
    obs = await measure(DictSource({}, failing=everything), plan, progress=None)
    assert obs.requests.error is not None
    assert all(m.error is not None for m in obs.measurements.values())


async def test_unanswered_queries_are_no_data() -> None:
    spec = make_spec()
    plan = plan_analysis(spec, migration=MIGRATION)
    obs = await measure(DictSource({plan.requests_query: 500.0}), plan, progress=None)
    assert all(m.value is None and m.error is None for m in obs.measurements.values())
    analysis = evaluate(spec, obs, AnalysisStatus(), now=at())
    assert {r.verdict for r in analysis.results} == {Verdict.NODATA}


@pytest.mark.parametrize(
    ("progress", "value", "error"),
    [
        pytest.param(
            ProgressObservation(total=1, migrated=1, pending=0, oldest_pending_seconds=90.0),
            90.0,
            None,
            id="lagging",
        ),
        pytest.param(
            ProgressObservation(total=1, migrated=1, pending=0), 0.0, None, id="nothing-queued"
        ),
        pytest.param(None, None, "the database was not read this check", id="not-read"),
    ],
)
async def test_follower_lag_comes_from_the_progress_observation(
    progress: ProgressObservation | None, value: float | None, error: str | None
) -> None:
    spec = _lag_spec()
    plan = plan_analysis(spec, migration=MIGRATION)
    obs = await measure(DictSource(_answers(spec)), plan, progress=progress)
    assert (obs.measurements["lag"].value, obs.measurements["lag"].error) == (value, error)
