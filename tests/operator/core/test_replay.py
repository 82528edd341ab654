"""``embedshift_operator.replay``: the core run over a recorded metric series."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from embedshift_operator.replay import (
    ReplayDecision,
    SeriesError,
    parse_series,
    points_from_dicts,
    replay,
    series_from_ranges,
    verified_status,
)
from embedshift_operator.resource import EmbeddingMigrationSpec, Phase, parse_migration
from rag_service.criteria import Verdict

DATA = Path(__file__).parent / "data"
T0 = datetime(2026, 11, 17, 10, 0, tzinfo=UTC)


def make_spec(**analysis: Any) -> EmbeddingMigrationSpec:
    steps = [{"percentage": p, "minDuration": "2m"} for p in (10, 25, 50, 75, 100)]
    raw = {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "metadata": {"name": "docs"},
        "spec": {
            "database": {"table": "documents"},
            "source": {"provider": "local", "model": "hash", "dimensions": 1536},
            "target": {"provider": "local", "model": "hash", "dimensions": 768},
            "migration": {"shards": 3, "parallelism": 2},
            "rollout": {"steps": steps},
            "analysis": {"interval": "30s", **analysis},
        },
    }
    return parse_migration(raw, where="test").spec


HEALTHY: dict[str, Any] = {
    "p95-latency": 0.3,
    "p95-latency-vs-v1": 0.3,
    "p95-latency-vs-v1.v1": 0.35,
    "avg-similarity": 0.78,
    "error-rate": 0.0004,
    "cache-hit-rate": 0.8,
    "critical-errors": 0,
    "cost-vs-v1": 0.0002,
    "cost-vs-v1.v1": 0.001,
    "error-rate-critical": 0.0004,
    "p95-latency-critical": 0.3,
}


def line(seconds: int, **values: Any) -> str:
    at = (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    return json.dumps({"at": at, **values})


def run(spec: EmbeddingMigrationSpec, lines: list[str]) -> list[ReplayDecision]:
    return list(replay(spec, parse_series(spec, lines)))


def test_recorded_series_promotes_on_time_then_rolls_back_at_the_latency_breach() -> None:
    spec = make_spec()
    lines = (DATA / "replay-latency-breach.jsonl").read_text().splitlines()
    decisions = run(spec, lines)

    assert len(decisions) == len(lines) == 13
    transitions = [
        (d.line, d.at - T0, d.phase, d.percentage, d.reason) for d in decisions if d.transition
    ]
    assert transitions == [
        # minDuration 2m and 3 consecutive passes: promoted at the first check after 2 minutes
        (5, timedelta(minutes=2), Phase.PROGRESSING, 25, "StepPromoted"),
        (9, timedelta(minutes=4), Phase.PROGRESSING, 50, "StepPromoted"),
        # line 11: p95 1.45 s > 1.2 s at 50 % -> back to 0 % at once (for: 1)
        (11, timedelta(minutes=5), Phase.ROLLED_BACK, 0, "ThresholdBreached"),
    ]
    assert [d.percentage for d in decisions] == [10] * 4 + [25] * 4 + [50] * 2 + [0] * 3
    breach = decisions[10]
    assert "p95-latency-critical = 1.45 (healthy ≤ 1.2)" in breach.message
    assert breach.verdicts["p95-latency-critical"] is Verdict.FAIL
    assert breach.verdicts["p95-latency"] is Verdict.FAIL
    assert breach.verdicts["error-rate-critical"] is Verdict.PASS
    # holds explain themselves; after the rollback no check is evaluated
    assert decisions[1].reason == "Hold"
    assert "2 of 3 consecutive passes" in decisions[1].message
    assert "minDuration 2m ends at 2026-11-17T10:02:00Z" in decisions[1].message
    assert decisions[-1].phase is Phase.ROLLED_BACK and decisions[-1].results == ()
    assert decisions[-1].message == "RolledBack: holding 0 %"


def test_the_start_is_a_verified_status_the_core_produced_itself() -> None:
    spec = make_spec()
    status = verified_status(spec, T0, name="docs")
    assert (status.phase, status.percentage, status.step_index) == (Phase.PROGRESSING, 10, 0)
    assert status.step_started_at == T0
    assert status.verification is not None and status.verification.ok
    assert [h.reason for h in status.history] == [
        "Started",
        "SetUp",
        "Migrated",
        "Indexed",
        "Verified",
    ]
    assert len([j for j in status.migration.jobs if j.kind.value == "migrate"]) == 3


def test_null_is_nodata_and_holds_the_step() -> None:
    spec = make_spec()
    healthy = [line(30 * i, **HEALTHY) for i in range(4)]
    gaps = [line(30 * i, **{**HEALTHY, "avg-similarity": None}) for i in range(4, 8)]
    back = [line(30 * i, **HEALTHY) for i in range(8, 11)]
    decisions = run(spec, healthy + gaps + back)

    # minDuration ended at 2m (line 5), but nodata never promotes: hold until 3 passes again
    for d in decisions[4:8]:
        assert (d.phase, d.percentage, d.reason) == (Phase.PROGRESSING, 10, "Hold")
        assert d.verdicts["avg-similarity"] is Verdict.NODATA
        assert "not passing: avg-similarity nodata" in d.message
    assert [d.percentage for d in decisions[8:]] == [10, 10, 25]
    assert decisions[10].reason == "StepPromoted"


def test_absent_v1_passes_the_comparison_and_absent_criterion_is_nodata() -> None:
    spec = make_spec()
    values = {k: v for k, v in HEALTHY.items() if not k.endswith(".v1") and k != "cache-hit-rate"}
    (decision,) = run(spec, [line(0, **values)])
    assert decision.verdicts["p95-latency-vs-v1"] is Verdict.PASS
    assert decision.verdicts["cost-vs-v1"] is Verdict.PASS
    assert decision.verdicts["cache-hit-rate"] is Verdict.NODATA


def test_requests_gate_error_and_alert() -> None:
    spec = make_spec(minRequests=100)
    decisions = run(
        spec,
        [
            line(0, **HEALTHY, requests=40),
            line(30, **{**HEALTHY, "error-rate": "error"}, requests=500),
            line(60, **HEALTHY, requests=500, alert=True),
        ],
    )
    low, error, alert = decisions
    assert set(low.verdicts.values()) == {Verdict.NODATA}
    assert "40 v2 requests" in low.results[0].message
    assert error.verdicts["error-rate"] is Verdict.ERROR
    assert error.phase is Phase.PROGRESSING
    assert (alert.phase, alert.percentage, alert.reason) == (Phase.ROLLED_BACK, 0, "AlertFiring")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"at": "2026-11-17T10:00:00Z"', ""], "line 1: not JSON: Expecting ',' delimiter"),
        (["[1, 2]"], "line 1: expected a JSON object, got list"),
        (['{"p95-latency": 0.3}'], 'line 1: field "at" is missing'),
        (['{"at": "yesterday"}'], 'line 1: field "at" must be an RFC 3339 time with an offset'),
        (['{"at": "2026-11-17T10:00:00"}'], "with an offset (Z or ±hh:mm)"),
        (['{"at": 1763373600}'], "with an offset, got 1763373600"),
        (
            ['{"at": "2026-11-17T10:00:30Z"}', "", '{"at": "2026-11-17T10:00:30Z"}'],
            'line 3: field "at": 2026-11-17T10:00:30Z is not after line 1\'s '
            "2026-11-17T10:00:30Z; times must increase",
        ),
        (
            ['{"at": "2026-11-17T10:00:00Z", "p99-latency": 1}'],
            'line 1: unknown field "p99-latency"; known: at, p95-latency, p95-latency-vs-v1, '
            "p95-latency-vs-v1.v1, avg-similarity,",
        ),
        (
            ['{"at": "2026-11-17T10:00:00Z", "error-rate.v1": 1}'],
            "(error-rate does not compare with v1)",
        ),
        (
            ['{"at": "2026-11-17T10:00:00Z", "error-rate": "high"}'],
            'line 1: field "error-rate" must be a number, null or "error", got "high"',
        ),
        (
            ['{"at": "2026-11-17T10:00:00Z", "requests": true}'],
            'line 1: field "requests" must be a number, null or "error", got true',
        ),
        (
            ['{"at": "2026-11-17T10:00:00Z", "alert": "yes"}'],
            'line 1: field "alert" must be true or false, got "yes"',
        ),
        ([" ", ""], "the series has no lines"),
    ],
)
def test_bad_series_lines_say_which_line_and_field(lines: list[str], message: str) -> None:
    with pytest.raises(SeriesError) as raised:
        parse_series(make_spec(), lines)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_series_from_ranges_merges_on_the_step_grid_with_gaps_as_null() -> None:
    step = timedelta(seconds=30)
    at = [T0 + i * step for i in range(4)]
    ranges = {
        "p95-latency": [(at[0], 0.3), (at[1], 0.31), (at[3], float("nan"))],
        "p95-latency-vs-v1.v1": [(at[0], 0.35), (at[3], 0.36)],
        "requests": [(at[1] + timedelta(seconds=2), 400.0)],  # off the grid: nearest slot
        "alert": [(at[2], 1.0), (at[3], 0.0)],
    }
    lines = series_from_ranges(ranges, step)
    assert lines == [
        {"at": "2026-11-17T10:00:00Z", "p95-latency": 0.3, "p95-latency-vs-v1.v1": 0.35,
         "requests": None, "alert": False},
        {"at": "2026-11-17T10:00:30Z", "p95-latency": 0.31, "p95-latency-vs-v1.v1": None,
         "requests": 400.0, "alert": False},
        {"at": "2026-11-17T10:01:00Z", "p95-latency": None, "p95-latency-vs-v1.v1": None,
         "requests": None, "alert": True},
        {"at": "2026-11-17T10:01:30Z", "p95-latency": None, "p95-latency-vs-v1.v1": 0.36,
         "requests": None, "alert": False},
    ]  # fmt: skip
    points = points_from_dicts(make_spec(), lines)
    assert [p.alert for p in points] == [False, False, True, False]
    assert points[0].values["p95-latency"] == 0.3 and points[0].requests is None
    assert series_from_ranges({}, step) == []
    with pytest.raises(ValueError, match="step must be longer than zero"):
        series_from_ranges(ranges, timedelta(0))
