"""Builders for the core's tests: a spec with short steps, one check's numbers, a status already
at a phase, and readers for a Decision's actions. Pure: no I/O, no clock, no fakes.

Everything a test changes is spelled in the resource's own camelCase words
(``make_spec(rollout={"maxPercentage": 30})``), so a row of a table reads like the YAML a user
would commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from embedshift_operator.core import (
    AnalysisObservation,
    Decision,
    EmitEvent,
    JobObservation,
    Measurement,
    Observations,
    RunJob,
    SetPercentage,
    decide,
    job_name,
    plan_analysis,
)
from embedshift_operator.resource import (
    AnalysisStatus,
    Condition,
    ConditionType,
    Criterion,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    HistoryEntry,
    JobKind,
    JobState,
    Phase,
    VerificationStatus,
    spec_hash,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NAME = "docs"
MIGRATION = "default/docs"
STEPS = (10, 25, 50, 75, 100)
STEP = timedelta(hours=1)  # every step's minDuration in make_spec()

ROUTED = (Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED)

# Three success criteria (a max, a min, a comparison with v1) and one rollback threshold.
SUCCESS: list[dict[str, Any]] = [
    {"name": "latency", "metric": "p95_latency_seconds", "max": 0.8},
    {"name": "similarity", "metric": "avg_top_similarity", "min": 0.7},
    {"name": "cost", "metric": "cost_per_1k_queries_usd", "maxRatioToV1": 1.0},
]
ROLLBACK: list[dict[str, Any]] = [{"name": "errors", "metric": "error_rate", "max": 0.1}]

_BASE: dict[str, Any] = {
    "database": {
        "urlSecretRef": {"name": "db", "key": "url"},
        "table": "documents",
        "categoryColumn": "category",
        "sourceEmbeddingColumn": "embedding",
    },
    "source": {"provider": "openai", "model": "text-embedding-ada-002", "dimensions": 1536},
    "target": {"provider": "openai", "model": "text-embedding-3-small", "dimensions": 768},
    "migration": {"batchSize": 100, "shards": 1, "parallelism": 1},
    "rollout": {"steps": [{"percentage": p, "minDuration": "1h"} for p in STEPS]},
    "analysis": {
        "prometheus": {"url": "http://prometheus:9090"},
        "minRequests": 100,
        "successfulChecks": 3,
        "successCriteria": SUCCESS,
        "rollbackThresholds": ROLLBACK,
    },
}


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_spec(**parts: Mapping[str, Any]) -> EmbeddingMigrationSpec:
    """A validated spec: steps 10/25/50/75/100 % of 1 h each, 3 checks to promote, minRequests
    100, the criteria above. ``parts`` are deep-merged (lists replace)."""
    return EmbeddingMigrationSpec.model_validate(_merge(_BASE, parts))


def changed(spec: EmbeddingMigrationSpec, **parts: Mapping[str, Any]) -> EmbeddingMigrationSpec:
    """``spec`` with ``parts`` deep-merged in: the Git commit a user makes."""
    raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return EmbeddingMigrationSpec.model_validate(_merge(raw, parts))


def at(*, hours: float = 0, minutes: float = 0, seconds: float = 0) -> datetime:
    return T0 + timedelta(hours=hours, minutes=minutes, seconds=seconds)


def threshold(name: str = "errors", *, for_: int = 1, dry_run: bool = False) -> dict[str, Any]:
    return {"name": name, "metric": "error_rate", "max": 0.1, "for": for_, "dryRun": dry_run}


# ---- one check's numbers -------------------------------------------------------------------------


def passing_value(criterion: Criterion) -> tuple[float, float | None]:
    """(v2, v1) well inside the bound."""
    bound = criterion.bound
    if bound.min is not None:
        return bound.min + 1.0, None
    if bound.max is not None:
        return bound.max / 2, None
    return 1.0, 2.0  # v2 half of v1


def failing_value(criterion: Criterion) -> tuple[float, float | None]:
    """(v2, v1) clearly outside the bound."""
    bound = criterion.bound
    if bound.min is not None:
        return bound.min - 1.0, None
    if bound.max is not None:
        return bound.max + 1.0, None
    assert bound.max_ratio_to_v1 is not None
    return 4.0 * bound.max_ratio_to_v1, 2.0  # v2 twice what the ratio allows


def check(
    spec: EmbeddingMigrationSpec,
    *,
    fail: Iterable[str] = (),
    nodata: Iterable[str] = (),
    error: Iterable[str] = (),
    requests: float | None = 1000.0,
    requests_error: str | None = None,
) -> AnalysisObservation:
    """One check of ``spec``'s ``plan_analysis``: every criterion passes except those named.

    ``nodata`` criteria answer an empty series; ``error`` ones a failed query; ``requests`` is the
    traffic gate (v2 requests in the window).
    """
    fail, nodata, error = set(fail), set(nodata), set(error)
    criteria = {c.name: c for _, c in spec.analysis.criteria()}
    unknown = (fail | nodata | error) - set(criteria)
    assert not unknown, f"no criterion named {sorted(unknown)}"
    plan = plan_analysis(spec, migration=MIGRATION)
    measurements: dict[str, Measurement] = {}
    for planned in plan.queries:
        name = planned.criterion
        v1_query = planned.v1_query or ""
        if name in error:
            measurements[name] = Measurement(
                planned.query, v1_query=v1_query, error=f"{name}: Prometheus unreachable"
            )
        elif name in nodata:
            measurements[name] = Measurement(planned.query, v1_query=v1_query)
        else:
            value, v1 = (failing_value if name in fail else passing_value)(criteria[name])
            measurements[name] = Measurement(
                planned.query, value=value, v1_value=v1, v1_query=v1_query
            )
    return AnalysisObservation(
        requests=Measurement(plan.requests_query, value=requests, error=requests_error),
        measurements=measurements,
    )


def all_pass(spec: EmbeddingMigrationSpec) -> AnalysisObservation:
    return check(spec)


def low_traffic(spec: EmbeddingMigrationSpec) -> AnalysisObservation:
    """Fewer v2 requests than ``minRequests``: every criterion is nodata."""
    return check(spec, requests=spec.analysis.min_requests - 1)


def prometheus_down(spec: EmbeddingMigrationSpec) -> AnalysisObservation:
    """Every query failed, the traffic gate's too."""
    names = [c.name for _, c in spec.analysis.criteria()]
    return check(spec, error=names, requests=None, requests_error="connection refused")


# ---- statuses ------------------------------------------------------------------------------------


def default_percentage(spec: EmbeddingMigrationSpec, phase: Phase, step: int) -> int:
    if phase in ROUTED:
        return min(spec.rollout.steps[step].percentage, spec.rollout.max_percentage)
    return 100 if phase is Phase.SUCCEEDED else 0


def status_at(
    spec: EmbeddingMigrationSpec,
    phase: Phase,
    *,
    step: int = 0,
    percentage: int | None = None,
    since: datetime = T0,
    passes: int = 0,
    streaks: Mapping[str, int] | None = None,
    reason: str | None = None,
    attempt: int = 1,
) -> EmbeddingMigrationStatus:
    """A status persisted by an earlier tick for ``spec``: in ``phase`` (and at ``step``) since
    ``since``, with the counters given. ``reason`` is the last history entry's (RolledBack:
    ThresholdBreached unless told)."""
    if percentage is None:
        percentage = default_percentage(spec, phase, step)
    if reason is None:
        reason = "ThresholdBreached" if phase is Phase.ROLLED_BACK else phase.value
    verified = phase in (*ROUTED, Phase.SUCCEEDED, Phase.ROLLED_BACK)
    return EmbeddingMigrationStatus(
        phase=phase,
        percentage=percentage,
        step_index=step,
        step_started_at=since,
        phase_started_at=since,
        spec_hash=spec_hash(spec),
        attempt=attempt,
        verification=VerificationStatus(ok=True, time=since) if verified else None,
        analysis=AnalysisStatus(consecutive_passes=passes, streaks=dict(streaks or {})),
        history=[
            HistoryEntry(
                time=since, phase=phase, percentage=percentage, reason=reason, message=reason
            )
        ],
        message=reason,
    )


def job(
    spec: EmbeddingMigrationSpec, kind: JobKind, *, shard: int | None = None, attempt: int = 1
) -> str:
    """The name the core gives ``spec``'s Job."""
    shards = spec.migration.shards if kind is JobKind.MIGRATE else None
    return job_name(
        NAME,
        kind,
        data_hash=spec_hash(spec).data_plane,
        attempt=attempt,
        shard=shard,
        shards=shards,
    )


def seen(states: Mapping[str, JobState], message: str = "") -> dict[str, JobObservation]:
    """What the Job runner reports: ``{name: state}``; failed Jobs carry ``message``."""
    return {
        name: JobObservation(state, message if state is JobState.FAILED else "")
        for name, state in states.items()
    }


# ---- deciding and reading a Decision -------------------------------------------------------------


def tick(
    spec: EmbeddingMigrationSpec,
    status: EmbeddingMigrationStatus,
    observations: Observations | None = None,
    now: datetime = T0,
) -> Decision:
    return decide(spec, status, observations or Observations(), now, name=NAME)


def ticks(
    spec: EmbeddingMigrationSpec,
    status: EmbeddingMigrationStatus,
    checks: Sequence[AnalysisObservation],
    *,
    start: datetime,
    every: timedelta = timedelta(minutes=1),
) -> list[Decision]:
    """One tick per check, ``every`` apart from ``start``, each from the status the last left."""
    decisions = []
    for i, observation in enumerate(checks):
        decision = tick(spec, status, Observations(analysis=observation), start + i * every)
        decisions.append(decision)
        status = decision.status
    return decisions


def run_jobs(decision: Decision) -> list[RunJob]:
    return decision.of_type(RunJob)


def percentages(decision: Decision) -> list[int]:
    """The routing row writes, in order."""
    return [a.percentage for a in decision.of_type(SetPercentage)]


def events(decision: Decision, type_: str | None = None) -> list[EmitEvent]:
    return [e for e in decision.of_type(EmitEvent) if type_ is None or e.type == type_]


def condition(status: EmbeddingMigrationStatus, kind: ConditionType) -> Condition:
    found = [c for c in status.conditions if c.type is kind]
    assert len(found) == 1, f"{kind.value}: {found}"
    return found[0]


def new_history(
    before: EmbeddingMigrationStatus, after: EmbeddingMigrationStatus
) -> list[HistoryEntry]:
    """The transitions one tick added (history is bounded, so compare by the newest old one)."""
    if not before.history or before.history[-1] not in after.history:
        return list(after.history)
    newest = max(i for i, e in enumerate(after.history) if e == before.history[-1])
    return list(after.history[newest + 1 :])
