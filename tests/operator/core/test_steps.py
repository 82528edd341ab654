"""The steps: minDuration, successfulChecks, nodata, errors, rollback thresholds and their
``for``, dryRun, and Promoted → Succeeded."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from embedshift_operator.core import AnalysisObservation, DropSource, Observations, SetPercentage
from embedshift_operator.resource import (
    CriterionKind,
    EmbeddingMigrationSpec,
    JobKind,
    JobState,
    Phase,
)
from rag_service.criteria import Verdict
from tests.operator.core.builders import (
    STEP,
    SUCCESS,
    all_pass,
    at,
    check,
    events,
    job,
    low_traffic,
    make_spec,
    percentages,
    prometheus_down,
    seen,
    status_at,
    threshold,
    tick,
    ticks,
)

DUE = at(hours=1)  # the first step's minDuration has passed


def _progressing(spec: EmbeddingMigrationSpec, **kwargs: Any) -> Any:
    return status_at(spec, Phase.PROGRESSING, **kwargs)


# ---- minDuration and successfulChecks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "passes_before", "promoted"),
    [
        pytest.param(timedelta(minutes=59), 10, False, id="59m-many-passes"),
        pytest.param(timedelta(hours=1), 1, False, id="1h-2nd-pass"),
        pytest.param(timedelta(hours=1), 2, True, id="1h-3rd-pass"),
        pytest.param(timedelta(hours=5), 2, True, id="5h-3rd-pass"),
        pytest.param(timedelta(hours=5), 0, False, id="5h-1st-pass"),
    ],
)
def test_promotion_needs_min_duration_and_successful_checks(
    elapsed: timedelta, passes_before: int, promoted: bool
) -> None:
    spec = make_spec()
    now = at() + elapsed
    d = tick(
        spec, _progressing(spec, passes=passes_before), Observations(analysis=all_pass(spec)), now
    )
    if promoted:
        assert (d.status.phase, d.status.step_index, d.status.percentage) == (
            Phase.PROGRESSING,
            1,
            25,
        )
        assert d.of_type(SetPercentage) == [
            SetPercentage(percentage=25, reason=d.status.history[-1].message)
        ]
        assert d.status.history[-1].reason == "StepPromoted"
        assert d.status.step_started_at == now
        assert d.status.analysis.consecutive_passes == 0  # the next step counts afresh
    else:
        assert (d.status.phase, d.status.step_index, d.status.percentage) == (
            Phase.PROGRESSING,
            0,
            10,
        )
        assert percentages(d) == []
        assert d.status.analysis.consecutive_passes == passes_before + 1


def test_before_min_duration_even_many_passes_do_not_promote() -> None:
    spec = make_spec()
    d = tick(
        spec, _progressing(spec, passes=5), Observations(analysis=all_pass(spec)), at(minutes=20)
    )
    assert percentages(d) == []
    assert (d.status.phase, d.status.step_index) == (Phase.PROGRESSING, 0)


@pytest.mark.parametrize("needed", [1, 3, 5])
def test_the_nth_consecutive_pass_promotes(needed: int) -> None:
    spec = make_spec(analysis={"successfulChecks": needed})
    ds = ticks(spec, _progressing(spec), [all_pass(spec)] * needed, start=DUE)
    assert [d.status.step_index for d in ds] == [0] * (needed - 1) + [1]


def test_a_step_without_a_check_this_tick_is_not_promoted() -> None:
    spec = make_spec()
    d = tick(spec, _progressing(spec, passes=9), Observations(), at(hours=3))
    assert (d.status.step_index, percentages(d)) == (0, [])


NOT_PASSING: list[Any] = [
    pytest.param(lambda s: check(s, fail=["latency"]), id="one-fails"),
    pytest.param(lambda s: check(s, nodata=["similarity"]), id="one-nodata"),
    pytest.param(lambda s: check(s, error=["cost"]), id="one-error"),
    pytest.param(low_traffic, id="below-minRequests"),
    pytest.param(lambda s: check(s, requests=None), id="no-request-series"),
    pytest.param(prometheus_down, id="prometheus-down"),
]


@pytest.mark.parametrize("bad", NOT_PASSING)
def test_a_check_that_does_not_pass_resets_the_count(bad: Any) -> None:
    spec = make_spec()
    good = all_pass(spec)
    ds = ticks(spec, _progressing(spec), [good, good, bad(spec), good, good, good], start=DUE)
    assert [d.status.analysis.consecutive_passes for d in ds] == [1, 2, 0, 1, 2, 0]
    assert [d.status.step_index for d in ds] == [0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize(
    "nodata",
    [
        pytest.param(low_traffic, id="below-minRequests"),
        pytest.param(lambda s: check(s, nodata=[c["name"] for c in SUCCESS]), id="empty-series"),
        pytest.param(lambda s: check(s, requests=None), id="no-traffic-series"),
    ],
)
def test_nodata_never_promotes(nodata: Any) -> None:
    spec = make_spec()
    ds = ticks(spec, _progressing(spec), [nodata(spec)] * 30, start=DUE, every=STEP)
    assert {d.status.step_index for d in ds} == {0}
    assert {d.status.phase for d in ds} == {Phase.PROGRESSING}
    assert all(d.status.analysis.consecutive_passes == 0 for d in ds)
    verdicts = {
        r.verdict for r in ds[-1].status.analysis.results if r.kind is CriterionKind.SUCCESS
    }
    assert verdicts == {Verdict.NODATA}


def test_below_min_requests_every_criterion_says_why() -> None:
    spec = make_spec()
    d = tick(spec, _progressing(spec), Observations(analysis=low_traffic(spec)), DUE)
    for result in d.status.analysis.results:
        assert result.verdict is Verdict.NODATA
        assert "99 v2 requests" in result.message and "minRequests 100" in result.message


# ---- nodata and errors against rollback thresholds -----------------------------------------------


@pytest.mark.parametrize(
    ("no_data", "streak_after", "phase"),
    [
        pytest.param("hold", 1, Phase.PROGRESSING, id="hold-leaves-streak"),
        pytest.param("fail", 2, Phase.ROLLED_BACK, id="fail-counts"),
    ],
)
def test_no_data_policy_on_rollback_streaks(no_data: str, streak_after: int, phase: Phase) -> None:
    spec = make_spec(analysis={"noData": no_data, "rollbackThresholds": [threshold(for_=2)]})
    d = tick(
        spec,
        _progressing(spec, streaks={"errors": 1}),
        Observations(analysis=low_traffic(spec)),
        at(minutes=5),
    )
    assert d.status.analysis.streaks["errors"] == streak_after
    assert d.status.phase is phase


def test_no_data_hold_keeps_a_streak_across_a_quiet_spell() -> None:
    # fail, nodata, nodata, fail: with for 2 and noData hold, the breach is two real failures.
    spec = make_spec(analysis={"rollbackThresholds": [threshold(for_=2)]})
    bad, quiet = check(spec, fail=["errors"]), low_traffic(spec)
    ds = ticks(spec, _progressing(spec), [bad, quiet, quiet, bad], start=at(minutes=1))
    assert [d.status.analysis.streaks["errors"] for d in ds[:3]] == [1, 1, 1]
    assert [d.status.phase for d in ds] == [Phase.PROGRESSING] * 3 + [Phase.ROLLED_BACK]


def test_prometheus_down_holds_by_default() -> None:
    spec = make_spec(analysis={"rollbackThresholds": [threshold(for_=1)]})
    ds = ticks(spec, _progressing(spec, passes=2), [prometheus_down(spec)] * 10, start=DUE)
    assert {(d.status.phase, d.status.step_index, d.status.percentage) for d in ds} == {
        (Phase.PROGRESSING, 0, 10)
    }
    assert ds[-1].status.analysis.streaks == {
        "latency": 0,
        "similarity": 0,
        "cost": 0,
        "errors": 0,
    }
    assert {r.verdict for r in ds[-1].status.analysis.results} == {Verdict.ERROR}


def test_on_error_rollback_rolls_back_after_for_checks() -> None:
    spec = make_spec(analysis={"onError": "rollback", "rollbackThresholds": [threshold(for_=2)]})
    ds = ticks(spec, _progressing(spec, step=2), [prometheus_down(spec)] * 2, start=at(minutes=1))
    assert [d.status.phase for d in ds] == [Phase.PROGRESSING, Phase.ROLLED_BACK]
    assert percentages(ds[1]) == [0]
    assert ds[1].status.history[-1].reason == "ThresholdBreached"
    assert "error: " in ds[1].status.history[-1].message


def test_on_error_rollback_counts_a_failed_query_of_one_threshold() -> None:
    spec = make_spec(analysis={"onError": "rollback"})
    d = tick(
        spec,
        _progressing(spec),
        Observations(analysis=check(spec, error=["errors"])),
        at(minutes=1),
    )
    assert d.status.phase is Phase.ROLLED_BACK


# ---- rollback thresholds and `for` ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdicts", "rolled_back_at"),
    [
        pytest.param("FFF", 3, id="3-breaches"),
        pytest.param("FF", None, id="2-breaches-hold"),
        pytest.param("FFPFF", None, id="a-pass-resets"),
        pytest.param("FPFFF", 5, id="3-after-a-pass"),
        pytest.param("PPPPP", None, id="healthy"),
        pytest.param("FFNF", 4, id="nodata-holds-the-streak"),
    ],
)
def test_a_threshold_needs_for_consecutive_breaches(
    verdicts: str, rolled_back_at: int | None
) -> None:
    spec = make_spec(analysis={"rollbackThresholds": [threshold(for_=3)]})
    by_letter = {
        "F": check(spec, fail=["errors"]),
        "P": all_pass(spec),
        "N": check(spec, nodata=["errors"]),
    }
    start = _progressing(spec, step=1)
    ds = ticks(spec, start, [by_letter[v] for v in verdicts], start=at(minutes=1))
    phases = [d.status.phase for d in ds]
    if rolled_back_at is None:
        assert Phase.ROLLED_BACK not in phases
    else:
        assert phases.index(Phase.ROLLED_BACK) == rolled_back_at - 1
        rolled = ds[rolled_back_at - 1]
        assert rolled.status.percentage == 0
        assert percentages(rolled) == [0]
        assert "errors = 1.1 (healthy ≤ 0.1)" in rolled.status.history[-1].message
        assert [e.reason for e in events(rolled, "Warning")] == ["ThresholdBreached"]


def test_a_breach_rolls_back_even_when_promotion_is_due() -> None:
    spec = make_spec()
    obs = Observations(analysis=check(spec, fail=["errors"]))
    d = tick(spec, _progressing(spec, passes=10), obs, at(hours=9))
    assert (d.status.phase, d.status.percentage) == (Phase.ROLLED_BACK, 0)


def test_a_failing_success_criterion_never_rolls_back() -> None:
    spec = make_spec()
    ds = ticks(spec, _progressing(spec), [check(spec, fail=["latency"])] * 20, start=DUE)
    assert {d.status.phase for d in ds} == {Phase.PROGRESSING}


# ---- dryRun --------------------------------------------------------------------------------------


def test_a_dry_run_success_criterion_is_recorded_but_does_not_block_promotion() -> None:
    success = [*SUCCESS[:2], {**SUCCESS[2], "dryRun": True}]
    spec = make_spec(analysis={"successCriteria": success})
    ds = ticks(spec, _progressing(spec), [check(spec, fail=["cost"])] * 3, start=DUE)
    assert ds[-1].status.step_index == 1
    [cost] = [r for r in ds[1].status.analysis.results if r.name == "cost"]
    assert (cost.verdict, cost.dry_run) == (Verdict.FAIL, True)


def test_a_dry_run_threshold_is_recorded_but_never_rolls_back() -> None:
    spec = make_spec(analysis={"rollbackThresholds": [threshold(dry_run=True)]})
    ds = ticks(spec, _progressing(spec), [check(spec, fail=["errors"])] * 10, start=at(minutes=1))
    assert {d.status.phase for d in ds} == {Phase.PROGRESSING}
    last = ds[-1].status.analysis
    assert last.streaks["errors"] == 10
    [errors] = [r for r in last.results if r.name == "errors"]
    assert (errors.verdict, errors.dry_run) == (Verdict.FAIL, True)
    # The step still promotes: a dry-run threshold is not a success criterion either.
    assert ds[-1].status.step_index == 0  # minDuration not over yet at 10 checks a minute apart
    later = ticks(spec, ds[-1].status, [check(spec, fail=["errors"])] * 3, start=DUE)
    assert later[-1].status.step_index == 1


def test_only_dry_run_success_criteria_never_promote() -> None:
    success = [{**c, "dryRun": True} for c in SUCCESS]
    spec = make_spec(analysis={"successCriteria": success})
    ds = ticks(spec, _progressing(spec), [all_pass(spec)] * 10, start=DUE)
    assert {d.status.step_index for d in ds} == {0}


# ---- Promoted and Succeeded ----------------------------------------------------------------------


def test_promotion_to_the_last_step_is_promoted_at_100() -> None:
    spec = make_spec()
    d = tick(spec, _progressing(spec, step=3, passes=2), Observations(analysis=all_pass(spec)), DUE)
    assert (d.status.phase, d.status.step_index, d.status.percentage) == (Phase.PROMOTED, 4, 100)
    assert percentages(d) == [100]
    assert d.status.history[-1].reason == "Promoted"


@pytest.mark.parametrize(
    ("elapsed", "phase"),
    [
        pytest.param(timedelta(minutes=59), Phase.PROMOTED, id="59m"),
        pytest.param(timedelta(hours=1), Phase.SUCCEEDED, id="1h"),
        pytest.param(timedelta(hours=30), Phase.SUCCEEDED, id="30h"),
    ],
)
def test_promoted_holds_the_last_min_duration_then_succeeds(
    elapsed: timedelta, phase: Phase
) -> None:
    spec = make_spec()
    d = tick(spec, status_at(spec, Phase.PROMOTED, step=4), Observations(), at() + elapsed)
    assert (d.status.phase, d.status.percentage) == (phase, 100)
    assert percentages(d) == []
    if phase is Phase.SUCCEEDED:
        assert d.status.history[-1].reason == "Succeeded"


def test_rollback_thresholds_still_act_in_promoted() -> None:
    spec = make_spec()
    obs = Observations(analysis=check(spec, fail=["errors"]))
    d = tick(spec, status_at(spec, Phase.PROMOTED, step=4), obs, at(minutes=30))
    assert (d.status.phase, d.status.percentage) == (Phase.ROLLED_BACK, 0)
    assert percentages(d) == [0]


def test_a_single_step_rollout_is_promoted_at_once() -> None:
    spec = make_spec(rollout={"steps": [{"percentage": 100, "minDuration": "1h"}]})
    status = status_at(spec, Phase.VERIFYING)
    name = job(spec, JobKind.VERIFY)
    d = tick(spec, status, Observations(jobs=seen({name: JobState.SUCCEEDED})), at())
    assert (d.status.phase, d.status.percentage) == (Phase.PROMOTED, 100)


def test_the_whole_schedule_10_25_50_75_100_then_succeeded() -> None:
    spec = make_spec()
    status = _progressing(spec)
    writes: list[int] = []
    for minute in range(0, 7 * 60, 20):
        d = tick(spec, status, Observations(analysis=all_pass(spec)), at(minutes=minute))
        writes += percentages(d)
        status = d.status
    assert writes == [25, 50, 75, 100]
    assert status.phase is Phase.SUCCEEDED
    assert [(e.phase.value, e.percentage, e.reason) for e in status.history[1:]] == [
        ("Progressing", 25, "StepPromoted"),
        ("Progressing", 50, "StepPromoted"),
        ("Progressing", 75, "StepPromoted"),
        ("Promoted", 100, "Promoted"),
        ("Succeeded", 100, "Succeeded"),
    ]


def test_a_check_records_every_criterion_with_its_rendered_query() -> None:
    spec = make_spec()
    observation: AnalysisObservation = all_pass(spec)
    d = tick(spec, _progressing(spec), Observations(analysis=observation), at(minutes=1))
    results = {r.name: r for r in d.status.analysis.results}
    assert set(results) == {"latency", "similarity", "cost", "errors"}
    for name, result in results.items():
        assert result.query == observation.measurements[name].query
        assert result.verdict is Verdict.PASS
    assert results["cost"].message == "v1 2"
    assert d.status.analysis.time == at(minutes=1)


# ---- cleanup after Succeeded ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cleanup", "database", "elapsed", "dropped"),
    [
        pytest.param({}, {}, timedelta(hours=500), False, id="default-never-drops"),
        pytest.param({"dropSource": True}, {}, timedelta(hours=167), False, id="before-168h"),
        pytest.param({"dropSource": True}, {}, timedelta(hours=168), True, id="after-168h"),
        pytest.param(
            {"dropSource": True, "retainSourceFor": "1h"}, {}, timedelta(hours=1), True, id="1h"
        ),
        pytest.param(
            {"dropSource": True},
            {"sourceEmbeddingColumn": None},
            timedelta(hours=500),
            False,
            id="no-source-column",
        ),
    ],
)
def test_cleanup_drops_the_source_column_only_when_asked(
    cleanup: dict[str, Any], database: dict[str, Any], elapsed: timedelta, dropped: bool
) -> None:
    spec = make_spec(cleanup=cleanup, database=database)
    status = status_at(spec, Phase.SUCCEEDED)
    d = tick(spec, status, Observations(), at() + elapsed)
    assert d.status.phase is Phase.SUCCEEDED
    assert d.of_type(DropSource) == ([DropSource(column="embedding")] if dropped else [])
    # Asking is not doing: nothing is recorded until the driver says the DROP committed
    # (tests/operator/core/test_cleanup.py).
    assert d.status.source_dropped_at is None
    assert events(d) == []
