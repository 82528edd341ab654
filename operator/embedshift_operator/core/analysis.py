"""Analysis: which queries one check runs, and what their numbers mean. Pure, except `measure`.

- :func:`plan_analysis` renders every criterion of ``spec.analysis`` into PromQL scoped to this
  migration and window (built-in metrics through ``rag_service.criteria``; custom queries with
  their placeholders filled), plus the traffic gate: v2 requests in the window.
- :func:`measure` asks a :class:`MetricSource` (one method; the Prometheus adapter implements
  it) for those numbers. It does no I/O itself; the source does.
- :func:`evaluate` turns a check's numbers into verdicts and updates the counters kept in status:
  consecutive all-pass checks (promotion) and per-criterion failure streaks (rollback).

Counting rules (DESIGN.md "Phases"): below ``minRequests`` v2 requests every criterion is
``nodata``. ``nodata`` never passes; with ``noData: hold`` it leaves failure streaks as they were,
with ``noData: fail`` it counts as a failure. An ``error`` (the source failed) never passes; with
``onError: hold`` it leaves streaks as they were, with ``onError: rollback`` it counts as a
failure. A pass resets the criterion's streak. Any check that is not all-pass resets the
consecutive-pass counter, so promotion always rests on ``successfulChecks`` clean checks in a row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from embedshift_operator.core.model import AnalysisObservation, Measurement, ProgressObservation
from embedshift_operator.resource import (
    AnalysisStatus,
    Criterion,
    CriterionKind,
    CriterionResult,
    EmbeddingMigrationSpec,
)
from rag_service.criteria import (
    METRICS,
    Verdict,
    judge,
    metric_query,
    render_custom_query,
    requests_query,
)
from rag_service.criteria import (
    MetricSource as MetricOrigin,
)

__all__ = [
    "AnalysisPlan",
    "MetricSource",
    "MetricSourceError",
    "PlannedQuery",
    "breached_thresholds",
    "evaluate",
    "measure",
    "plan_analysis",
]


class MetricSourceError(Exception):
    """The metric source could not answer: unreachable, timed out, a query error, several
    series. ``str()`` is one line naming the query and the cause (never a credential)."""


class MetricSource(Protocol):
    """Where the analysis reads numbers. One method, as Flagger's metric providers."""

    async def query(self, promql: str) -> float | None:
        """The query's single value now; None when there is no data (empty result or NaN).

        Raises :class:`MetricSourceError` when the source cannot answer.
        """
        ...


@dataclass(frozen=True)
class PlannedQuery:
    criterion: str
    kind: CriterionKind
    query: str  # v2's PromQL, or a description of the observation for database metrics
    v1_query: str | None = None  # set when the criterion compares v2 with v1
    database_metric: str | None = None  # read from the database, not from the metric source


@dataclass(frozen=True)
class AnalysisPlan:
    requests_query: str
    queries: tuple[PlannedQuery, ...]


def plan_analysis(spec: EmbeddingMigrationSpec, *, migration: str) -> AnalysisPlan:
    """Every query one check runs, rendered for ``migration`` ("namespace/name"). Pure."""
    window = spec.analysis.window
    target = spec.target
    source = spec.source
    planned: list[PlannedQuery] = []
    for kind, criterion in spec.analysis.criteria():
        if criterion.metric is not None:
            metric = METRICS[criterion.metric]
            if metric.source is MetricOrigin.DATABASE:
                planned.append(
                    PlannedQuery(
                        criterion.name,
                        kind,
                        f"database: {metric.description}",
                        database_metric=criterion.metric,
                    )
                )
                continue
            v2 = metric_query(
                criterion.metric,
                version="v2",
                migration=migration,
                window=window,
                provider=target.provider.value,
                model=target.model,
            )
            v1 = None
            if criterion.bound.compares_versions:
                v1 = metric_query(
                    criterion.metric,
                    version="v1",
                    migration=migration,
                    window=window,
                    provider=source.provider.value if source else "",
                    model=source.model if source else "",
                )
            planned.append(PlannedQuery(criterion.name, kind, v2, v1_query=v1))
        else:
            assert criterion.query is not None
            query = render_custom_query(criterion.query, migration=migration, window=window)
            planned.append(PlannedQuery(criterion.name, kind, query))
    return AnalysisPlan(
        requests_query=requests_query(version="v2", migration=migration, window=window),
        queries=tuple(planned),
    )


async def measure(
    source: MetricSource, plan: AnalysisPlan, *, progress: ProgressObservation | None
) -> AnalysisObservation:
    """Run one check's queries against ``source`` (concurrently). Never raises for a source
    failure: each failed query becomes a :class:`Measurement` with ``error`` set."""

    async def one(query: str) -> tuple[float | None, str | None]:
        try:
            return await source.query(query), None
        except MetricSourceError as exc:
            return None, str(exc)

    async def criterion(planned: PlannedQuery) -> Measurement:
        if planned.database_metric is not None:
            if progress is None:
                return Measurement(planned.query, error="the database was not read this check")
            return Measurement(planned.query, value=progress.oldest_pending_seconds or 0.0)
        if planned.v1_query is None:
            value, error = await one(planned.query)
            return Measurement(planned.query, value=value, error=error)
        (value, error), (v1_value, v1_error) = await asyncio.gather(
            one(planned.query), one(planned.v1_query)
        )
        return Measurement(
            planned.query,
            value=value,
            v1_value=v1_value,
            v1_query=planned.v1_query,
            error=error or v1_error,
        )

    requests_value, requests_error = await one(plan.requests_query)
    measured = await asyncio.gather(*(criterion(p) for p in plan.queries))
    return AnalysisObservation(
        requests=Measurement(plan.requests_query, value=requests_value, error=requests_error),
        measurements={p.criterion: m for p, m in zip(plan.queries, measured, strict=True)},
    )


def evaluate(
    spec: EmbeddingMigrationSpec,
    observation: AnalysisObservation,
    previous: AnalysisStatus,
    *,
    now: datetime,
) -> AnalysisStatus:
    """One check's verdicts and the counters they update. Pure."""
    analysis = spec.analysis
    gate = _traffic_gate(spec, observation.requests)
    results: list[CriterionResult] = []
    streaks: dict[str, int] = {}
    all_pass = True
    for kind, criterion in analysis.criteria():
        measured = observation.measurements.get(criterion.name)
        result = _result(kind, criterion, measured, gate)
        results.append(result)
        streaks[criterion.name] = _streak(
            result.verdict, previous.streaks.get(criterion.name, 0), spec
        )
        if kind is CriterionKind.SUCCESS and not criterion.dry_run:
            all_pass = all_pass and result.verdict is Verdict.PASS
    has_success = any(not c.dry_run for c in analysis.success_criteria)
    passes = previous.consecutive_passes + 1 if all_pass and has_success else 0
    return AnalysisStatus(time=now, consecutive_passes=passes, streaks=streaks, results=results)


def breached_thresholds(spec: EmbeddingMigrationSpec, analysis: AnalysisStatus) -> list[str]:
    """Names of rollback thresholds (not dry-run) failing for their ``for`` checks. Pure."""
    return [
        c.name
        for c in spec.analysis.rollback_thresholds
        if not c.dry_run and analysis.streaks.get(c.name, 0) >= c.for_
    ]


def all_passing(analysis: AnalysisStatus) -> bool:
    """Whether the last check passed every success criterion that is acted on."""
    acted = [r for r in analysis.results if r.kind is CriterionKind.SUCCESS and not r.dry_run]
    return bool(acted) and all(r.verdict is Verdict.PASS for r in acted)


@dataclass(frozen=True)
class _Gate:
    verdict: Verdict | None  # None: enough traffic, judge each criterion
    message: str = ""


def _traffic_gate(spec: EmbeddingMigrationSpec, requests: Measurement) -> _Gate:
    if requests.error is not None:
        return _Gate(Verdict.ERROR, f"traffic gate failed: {requests.error}")
    minimum = spec.analysis.min_requests
    # NaN is no traffic: a source should say None, but a NaN must never open the gate.
    seen = (
        requests.value if requests.value is not None and requests.value == requests.value else 0.0
    )
    if seen < minimum:
        return _Gate(
            Verdict.NODATA,
            f"{seen:.0f} v2 requests in the last {spec.analysis.window} "
            f"(minRequests {minimum}): too little traffic to judge",
        )
    return _Gate(None)


def _result(
    kind: CriterionKind, criterion: Criterion, measured: Measurement | None, gate: _Gate
) -> CriterionResult:
    bound = criterion.bound

    def result(verdict: Verdict, message: str) -> CriterionResult:
        return CriterionResult(
            name=criterion.name,
            kind=kind,
            query=measured.query if measured else "",
            value=measured.value if measured else None,
            bound=bound.describe(),
            verdict=verdict,
            dry_run=criterion.dry_run,
            message=message,
        )

    if gate.verdict is not None:
        return result(gate.verdict, gate.message)
    if measured is None:
        return result(Verdict.ERROR, "not measured this check")
    if measured.error is not None:
        return result(Verdict.ERROR, measured.error)
    verdict = judge(measured.value, bound, v1_value=measured.v1_value)
    message = ""
    if bound.compares_versions:
        v1 = measured.v1_value
        message = "v1 has no data to compare with" if v1 is None else f"v1 {v1:.6g}"
    elif verdict is Verdict.NODATA:
        message = "no series, or NaN (no data in the window)"
    return result(verdict, message)


def _streak(verdict: Verdict, previous: int, spec: EmbeddingMigrationSpec) -> int:
    if verdict is Verdict.PASS:
        return 0
    if verdict is Verdict.FAIL:
        return previous + 1
    if verdict is Verdict.NODATA:
        return previous + 1 if spec.analysis.no_data == "fail" else previous
    return previous + 1 if spec.analysis.on_error == "rollback" else previous


def results_by_name(analysis: AnalysisStatus) -> Mapping[str, CriterionResult]:
    return {r.name: r for r in analysis.results}
