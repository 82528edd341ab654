"""Safety and the user's levers: alerts, the emergency flag, maxPercentage, paused, RolledBack
holding, spec-hash restarts, and the routing row kept at the effective percentage."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from embedshift_operator.core import Observations, RoutingObservation, SetPercentage
from embedshift_operator.resource import (
    ConditionType,
    EmbeddingMigrationSpec,
    JobKind,
    Phase,
    spec_hash,
)
from tests.operator.core.builders import (
    SUCCESS,
    all_pass,
    at,
    changed,
    check,
    condition,
    events,
    job,
    make_spec,
    percentages,
    run_jobs,
    status_at,
    threshold,
    tick,
    ticks,
)

ALERT = Observations(alerts=("EmbeddingV2HighErrorRate",))
EMERGENCY = Observations(routing=RoutingObservation(50, emergency=True, reason="webhook: p95"))


def _at(phase: Phase, spec: EmbeddingMigrationSpec | None = None, **kwargs: Any) -> Any:
    spec = spec or make_spec(rollout={"paused": phase is Phase.PAUSED})
    step = {Phase.PROMOTED: 4, Phase.SUCCEEDED: 4}.get(phase, 2)
    return spec, status_at(spec, phase, step=kwargs.pop("step", step), **kwargs)


# ---- alerts and the emergency flag ---------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED])
@pytest.mark.parametrize(
    ("obs", "reason"),
    [
        pytest.param(ALERT, "AlertFiring", id="alert"),
        pytest.param(EMERGENCY, "EmergencyFlag", id="emergency"),
    ],
)
def test_an_alert_or_the_emergency_flag_rolls_back_at_once(
    phase: Phase, obs: Observations, reason: str
) -> None:
    spec, status = _at(phase, passes=10)
    # Even a check that would promote this very tick does not get to.
    d = tick(spec, status, replace(obs, analysis=all_pass(spec)), at(hours=5))
    assert (d.status.phase, d.status.percentage) == (Phase.ROLLED_BACK, 0)
    assert percentages(d) == [0]
    assert d.status.history[-1].reason == reason
    assert [e.reason for e in events(d, "Warning")] == [reason]
    rolled = condition(d.status, ConditionType.ROLLED_BACK)
    assert (rolled.status, rolled.reason) == ("True", reason)


def test_the_alert_and_the_emergency_reason_are_in_the_message() -> None:
    spec, status = _at(Phase.PROGRESSING)
    assert "EmbeddingV2HighErrorRate" in tick(spec, status, ALERT).status.message
    assert "webhook: p95" in tick(spec, status, EMERGENCY).status.message


@pytest.mark.parametrize(
    "phase",
    [Phase.PREPARING, Phase.MIGRATING, Phase.INDEXING, Phase.VERIFYING],
    ids=lambda p: p.value,
)
@pytest.mark.parametrize("obs", [ALERT, EMERGENCY], ids=["alert", "emergency"])
def test_alerts_are_ignored_before_the_rollout_starts(phase: Phase, obs: Observations) -> None:
    spec = make_spec()
    d = tick(spec, status_at(spec, phase), obs, at(minutes=1))
    assert d.status.phase is phase
    assert not events(d, "Warning")
    assert all(p == 0 for p in percentages(d))


# ---- maxPercentage -------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED])
def test_max_percentage_caps_at_once(phase: Phase) -> None:
    spec, status = _at(phase)
    capped = changed(spec, rollout={"maxPercentage": 30})
    d = tick(capped, status, Observations(), at(minutes=1))
    assert (d.status.phase, d.status.percentage) == (phase, 30)
    assert percentages(d) == [30]
    assert d.status.step_index == status.step_index  # a cap is not a restart
    assert d.status.spec_hash == status.spec_hash


def test_a_capped_step_is_not_promoted() -> None:
    spec = changed(make_spec(), rollout={"maxPercentage": 30})
    status = status_at(spec, Phase.PROGRESSING, step=2)  # 50 % capped to 30 %
    ds = ticks(spec, status, [all_pass(spec)] * 10, start=at(hours=3))
    assert {(d.status.step_index, d.status.percentage) for d in ds} == {(2, 30)}


def test_checks_under_a_cap_do_not_count_once_it_is_lifted() -> None:
    # Checks taken at 30 % say nothing about the step's 50 %: after the cap is lifted the step
    # needs successfulChecks checks of its own before it is promoted.
    spec = changed(make_spec(), rollout={"maxPercentage": 30})
    capped = ticks(
        spec, status_at(spec, Phase.PROGRESSING, step=2), [all_pass(spec)] * 5, start=at(hours=3)
    )
    lifted = changed(spec, rollout={"maxPercentage": 100})
    ds = ticks(lifted, capped[-1].status, [all_pass(lifted)] * 3, start=at(hours=4))
    assert percentages(ds[0]) == [50]
    assert [d.status.step_index for d in ds] == [2, 2, 3]


def test_a_cap_above_the_step_changes_nothing_and_caps_the_next_step() -> None:
    spec = changed(make_spec(), rollout={"maxPercentage": 60})
    status = status_at(spec, Phase.PROGRESSING, step=2, passes=2)
    d = tick(spec, status, Observations(analysis=all_pass(spec)), at(hours=1))
    assert (d.status.step_index, d.status.percentage) == (3, 60)
    assert percentages(d) == [60]


def test_raising_the_cap_restores_the_step() -> None:
    spec = make_spec()
    status = status_at(changed(spec, rollout={"maxPercentage": 30}), Phase.PROGRESSING, step=2)
    d = tick(spec, status, Observations(), at(minutes=1))
    assert (d.status.percentage, percentages(d)) == (50, [50])


def test_a_capped_promoted_does_not_succeed() -> None:
    # Promoted holds 100 % for the last minDuration, then Succeeded: held at 40 % it has not.
    spec = changed(make_spec(), rollout={"maxPercentage": 40})
    d = tick(spec, status_at(spec, Phase.PROMOTED, step=4), Observations(), at(hours=5))
    assert (d.status.phase, d.status.percentage) == (Phase.PROMOTED, 40)


@pytest.mark.parametrize(
    "phase", [Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED, Phase.SUCCEEDED]
)
def test_max_percentage_zero_is_a_manual_rollback(phase: Phase) -> None:
    spec, status = _at(phase)
    zero = changed(spec, rollout={"maxPercentage": 0})
    d = tick(zero, status, Observations(), at(minutes=1))
    assert (d.status.phase, d.status.percentage) == (Phase.ROLLED_BACK, 0)
    assert percentages(d) == [0]
    assert d.status.history[-1].reason == "ManualRollback"
    assert [e.reason for e in events(d, "Warning")] == ["ManualRollback"]
    assert condition(d.status, ConditionType.ROLLED_BACK).reason == "ManualRollback"
    # It holds while maxPercentage stays 0 …
    held = tick(zero, d.status, Observations(routing=RoutingObservation(0)), at(hours=9))
    assert (held.status.phase, percentages(held)) == (Phase.ROLLED_BACK, [])
    assert held.status.history == d.status.history


@pytest.mark.parametrize(("cap", "percentage"), [(100, 10), (5, 5)])
def test_raising_max_percentage_after_a_manual_rollback_restarts_at_step_one(
    cap: int, percentage: int
) -> None:
    spec, status = _at(Phase.PROGRESSING)
    zero = changed(spec, rollout={"maxPercentage": 0})
    rolled = tick(zero, status, Observations(), at(minutes=1)).status
    again = changed(spec, rollout={"maxPercentage": cap})
    d = tick(again, rolled, Observations(routing=RoutingObservation(0)), at(hours=1))
    assert (d.status.phase, d.status.step_index, d.status.percentage) == (
        Phase.PROGRESSING,
        0,
        percentage,
    )
    assert d.of_type(SetPercentage) == [
        SetPercentage(percentage, reason=d.status.history[-1].message, clear_emergency=True)
    ]
    assert d.status.history[-1].reason == "Retrying"
    assert d.status.step_started_at == at(hours=1)
    assert d.status.analysis.consecutive_passes == 0


def test_raising_max_percentage_does_not_undo_an_automatic_rollback() -> None:
    spec = make_spec()
    rolled = status_at(spec, Phase.ROLLED_BACK, reason="ThresholdBreached")
    d = tick(changed(spec, rollout={"maxPercentage": 100}), rolled, Observations(), at(hours=1))
    assert d.status.phase is Phase.ROLLED_BACK
    assert percentages(d) == []


# ---- paused --------------------------------------------------------------------------------------


def test_paused_holds_the_step() -> None:
    spec = make_spec()
    status = status_at(spec, Phase.PROGRESSING, step=1, passes=5)
    paused = changed(spec, rollout={"paused": True})
    ds = ticks(paused, status, [all_pass(spec)] * 5, start=at(hours=3))
    assert [d.status.phase for d in ds] == [Phase.PAUSED] * 5
    assert {(d.status.step_index, d.status.percentage) for d in ds} == {(1, 25)}
    assert [e.reason for e in ds[0].status.history[-1:]] == ["Paused"]
    assert all(percentages(d) == [] for d in ds)
    assert len(ds[-1].status.history) == len(ds[0].status.history)  # paused once, not 5 times


@pytest.mark.parametrize("step", [1, 4], ids=["progressing", "promoted"])
def test_a_breach_rolls_back_while_paused(step: int) -> None:
    spec = make_spec(rollout={"paused": True})
    status = status_at(spec, Phase.PAUSED, step=step)
    d = tick(spec, status, Observations(analysis=check(spec, fail=["errors"])), at(minutes=1))
    assert (d.status.phase, d.status.percentage) == (Phase.ROLLED_BACK, 0)


def test_paused_promoted_does_not_succeed() -> None:
    spec = make_spec(rollout={"paused": True})
    d = tick(spec, status_at(spec, Phase.PAUSED, step=4), Observations(), at(hours=9))
    assert (d.status.phase, d.status.percentage) == (Phase.PAUSED, 100)


@pytest.mark.parametrize(
    ("step", "resting", "promoted_to"),
    [
        pytest.param(1, Phase.PROGRESSING, 2, id="progressing"),
        pytest.param(4, Phase.SUCCEEDED, None, id="promoted"),
    ],
)
def test_unpausing_resumes(step: int, resting: Phase, promoted_to: int | None) -> None:
    spec = make_spec()
    status = status_at(changed(spec, rollout={"paused": True}), Phase.PAUSED, step=step, passes=5)
    d = tick(spec, status, Observations(analysis=all_pass(spec)), at(hours=3))
    reasons = [e.reason for e in d.status.history[1:]]
    assert reasons[0] == "Resumed"
    assert d.status.phase is resting
    if promoted_to is not None:
        assert d.status.step_index == promoted_to


def test_unpausing_before_min_duration_resumes_without_promoting() -> None:
    spec = make_spec()
    status = status_at(changed(spec, rollout={"paused": True}), Phase.PAUSED, step=1)
    d = tick(spec, status, Observations(analysis=all_pass(spec)), at(minutes=10))
    assert (d.status.phase, d.status.step_index) == (Phase.PROGRESSING, 1)
    assert [e.reason for e in d.status.history[1:]] == ["Resumed"]


# ---- RolledBack holds; spec hashes restart -------------------------------------------------------


def test_rolled_back_holds_zero_until_the_spec_changes() -> None:
    spec = make_spec()
    rolled = tick(spec, status_at(spec, Phase.PROGRESSING, step=2), ALERT, at()).status
    status = rolled
    for hour in range(1, 6):
        obs = Observations(analysis=all_pass(spec), routing=RoutingObservation(0))
        d = tick(spec, status, obs, at(hours=hour))
        assert (d.status.phase, d.status.percentage, percentages(d)) == (
            Phase.ROLLED_BACK,
            0,
            [],
        )
        assert d.status.history == rolled.history
        status = d.status


ROLLOUT_CHANGES = [
    pytest.param({"rollout": {"steps": [{"percentage": 20}, {"percentage": 100}]}}, id="steps"),
    pytest.param({"analysis": {"rollbackThresholds": [threshold(for_=3)]}}, id="threshold-for"),
    pytest.param(
        {"analysis": {"successCriteria": [{**SUCCESS[0], "max": 0.9}, *SUCCESS[1:]]}},
        id="success-bound",
    ),
    pytest.param({"analysis": {"window": "10m"}}, id="window"),
]


@pytest.mark.parametrize("change", ROLLOUT_CHANGES)
@pytest.mark.parametrize(
    "phase", [Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED, Phase.ROLLED_BACK]
)
def test_a_rollout_change_restarts_at_step_one(phase: Phase, change: dict[str, Any]) -> None:
    spec, status = _at(phase, passes=2, streaks={"errors": 0})
    new = changed(spec, **change)
    d = tick(new, status, Observations(), at(hours=2))
    first = new.rollout.steps[0].percentage
    assert (d.status.step_index, d.status.percentage) == (0, first)
    expected = Phase.PAUSED if new.rollout.paused else Phase.PROGRESSING
    assert d.status.phase is expected
    assert d.of_type(SetPercentage)[0] == SetPercentage(
        first, reason=d.of_type(SetPercentage)[0].reason, clear_emergency=True
    )
    assert any(e.reason == "RolloutChanged" for e in d.status.history)
    assert d.status.step_started_at == at(hours=2)
    assert (d.status.analysis.consecutive_passes, d.status.analysis.streaks) == (0, {})
    assert d.status.spec_hash == spec_hash(new)
    assert run_jobs(d) == []  # the data is not touched


def test_a_retry_commit_after_an_emergency_is_not_undone_by_the_flag_it_clears() -> None:
    # The flag was read before this tick's SetPercentage(clear_emergency=True) clears it: the
    # user's commit is the retry DESIGN asks for, so the stale flag must not roll back again.
    spec = make_spec()
    emergency = Observations(routing=RoutingObservation(25, emergency=True))
    rolled = tick(spec, status_at(spec, Phase.PROGRESSING, step=1), emergency, at()).status
    assert rolled.phase is Phase.ROLLED_BACK
    retry = changed(spec, analysis={"rollbackThresholds": [threshold(for_=2)]})
    still_flagged = Observations(routing=RoutingObservation(0, emergency=True))
    d = tick(retry, rolled, still_flagged, at(hours=1))
    assert (d.status.phase, d.status.percentage) == (Phase.PROGRESSING, 10)
    assert d.of_type(SetPercentage) == [
        SetPercentage(10, reason=d.status.history[-1].message, clear_emergency=True)
    ]
    # A flag set again after the clear is a new emergency.
    again = tick(retry, d.status, still_flagged, at(hours=1, minutes=1))
    assert again.status.phase is Phase.ROLLED_BACK


def test_a_retry_commit_while_the_alert_still_fires_rolls_back_again() -> None:
    spec = make_spec()
    rolled = tick(spec, status_at(spec, Phase.PROGRESSING), ALERT, at()).status
    retry = changed(spec, analysis={"minRequests": 50})
    d = tick(retry, rolled, ALERT, at(hours=1))
    assert (d.status.phase, d.status.percentage) == (Phase.ROLLED_BACK, 0)


@pytest.mark.parametrize(
    "phase",
    [
        Phase.MIGRATING,
        Phase.VERIFYING,
        Phase.PROGRESSING,
        Phase.PROMOTED,
        Phase.ROLLED_BACK,
        Phase.SUCCEEDED,
    ],
)
def test_a_new_target_re_migrates_from_preparing_at_zero(phase: Phase) -> None:
    spec, status = _at(phase)
    other = changed(spec, target={"provider": "google", "model": "gemini-embedding-001"})
    d = tick(other, status, Observations(), at(hours=2))
    assert (d.status.phase, d.status.percentage) == (Phase.PREPARING, 0)
    assert d.status.history[-1].reason == "DataPlaneChanged"
    assert percentages(d) == ([0] if status.percentage else [])
    assert [r.name for r in run_jobs(d)] == [job(other, JobKind.SETUP)]
    assert job(other, JobKind.SETUP) != job(spec, JobKind.SETUP)
    assert (d.status.attempt, d.status.verification, d.status.step_index) == (1, None, 0)
    assert d.status.migration.jobs[0].name == job(other, JobKind.SETUP)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"rollout": {"paused": True}}, id="paused"),
        pytest.param({"rollout": {"maxPercentage": 80}}, id="maxPercentage"),
        pytest.param({"rollout": {"stickyKey": "X-Tenant"}}, id="stickyKey"),
        pytest.param({"cleanup": {"dropSource": True}}, id="cleanup"),
    ],
)
def test_levers_that_do_not_restart(change: dict[str, Any]) -> None:
    spec = make_spec()
    status = status_at(spec, Phase.PROGRESSING, step=2, passes=2, streaks={"errors": 1})
    new = changed(spec, **change)
    d = tick(new, status, Observations(), at(minutes=10))
    assert d.status.step_index == 2
    assert d.status.percentage == 50
    assert d.status.analysis.consecutive_passes == 2
    assert d.status.analysis.streaks == {"errors": 1}
    assert not any(e.reason == "RolloutChanged" for e in d.status.history)


def test_a_rollout_change_before_the_rollout_changes_nothing_yet() -> None:
    spec = make_spec()
    status = tick(spec, status_at(spec, Phase.MIGRATING)).status
    new = changed(spec, analysis={"successfulChecks": 5})
    d = tick(new, status, Observations(), at(minutes=1))
    assert d.status.phase is Phase.MIGRATING
    assert d.status.history == status.history
    assert d.status.spec_hash == spec_hash(new)


# ---- routing repair ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "row", "expected"),
    [
        pytest.param(Phase.PROGRESSING, 40, [50], id="progressing-drifted"),
        pytest.param(Phase.PROGRESSING, 50, [], id="progressing-in-step"),
        pytest.param(Phase.PROMOTED, 0, [100], id="promoted-reset-to-0"),
        pytest.param(Phase.ROLLED_BACK, 10, [0], id="rolled-back-drifted"),
        pytest.param(Phase.MIGRATING, 5, [0], id="migrating-drifted"),
        pytest.param(Phase.SUCCEEDED, 90, [100], id="succeeded-drifted"),
    ],
)
def test_a_drifted_routing_row_is_set_back(phase: Phase, row: int, expected: list[int]) -> None:
    spec, status = _at(phase)
    d = tick(spec, status, Observations(routing=RoutingObservation(row)), at(minutes=1))
    assert d.status.phase is phase
    assert percentages(d) == expected
    if expected:
        [write] = d.of_type(SetPercentage)
        assert f"said {row} %" in write.reason and not write.clear_emergency


def test_an_unread_routing_row_is_not_written() -> None:
    spec, status = _at(Phase.PROGRESSING)
    assert percentages(tick(spec, status, Observations(routing=None), at(minutes=1))) == []
