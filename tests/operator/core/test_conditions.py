"""What ``kubectl describe`` shows: conditions, the bounded history, events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from embedshift_operator.core import (
    Decision,
    EmitEvent,
    Observations,
    RoutingObservation,
    RunJob,
)
from embedshift_operator.resource import (
    HISTORY_LIMIT,
    ConditionType,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    HistoryEntry,
    JobKind,
    JobState,
    Phase,
)
from tests.operator.core.builders import (
    all_pass,
    at,
    changed,
    check,
    condition,
    events,
    job,
    make_spec,
    new_history,
    seen,
    status_at,
    tick,
)

R, M, V, A, B, S = (
    ConditionType.READY,
    ConditionType.MIGRATED,
    ConditionType.VERIFIED,
    ConditionType.ANALYSIS_PASSING,
    ConditionType.ROLLED_BACK,
    ConditionType.STALLED,
)


def _preparing() -> Decision:
    spec = make_spec()
    return tick(spec, EmbeddingMigrationStatus())


def _migrating() -> Decision:
    spec = make_spec()
    return tick(spec, status_at(spec, Phase.MIGRATING))


def _progressing_passing() -> Decision:
    spec = make_spec()
    obs = Observations(analysis=all_pass(spec))
    return tick(spec, status_at(spec, Phase.PROGRESSING), obs, at(minutes=1))


def _progressing_failing() -> Decision:
    spec = make_spec()
    obs = Observations(analysis=check(spec, fail=["latency"], nodata=["cost"]))
    return tick(spec, status_at(spec, Phase.PROGRESSING), obs, at(minutes=1))


def _rolled_back() -> Decision:
    spec = make_spec()
    obs = Observations(analysis=check(spec, fail=["errors"]))
    return tick(spec, status_at(spec, Phase.PROGRESSING), obs, at(minutes=1))


def _succeeded() -> Decision:
    spec = make_spec()
    return tick(spec, status_at(spec, Phase.PROMOTED, step=4), Observations(), at(hours=2))


def _verification_failed() -> Decision:
    spec = make_spec()
    obs = Observations(jobs=seen({job(spec, JobKind.VERIFY): JobState.FAILED}, "recall 0.5"))
    return tick(spec, status_at(spec, Phase.VERIFYING), obs, at(minutes=1))


def _setup_failed() -> Decision:
    spec = make_spec()
    started = tick(spec, EmbeddingMigrationStatus())
    obs = Observations(jobs=seen({job(spec, JobKind.SETUP): JobState.FAILED}, "no such table"))
    return tick(spec, started.status, obs, at(minutes=1))


def _manual_rollback() -> Decision:
    spec = make_spec()
    zero = changed(spec, rollout={"maxPercentage": 0})
    return tick(zero, status_at(spec, Phase.PROGRESSING), Observations(), at(minutes=1))


def _retried_after_failure() -> Decision:
    spec = make_spec()
    failed = _setup_failed().status
    return tick(changed(spec, migration={"batchSize": 50}), failed, Observations(), at(minutes=2))


def _failed_database_down() -> Decision:
    spec = make_spec()
    obs = Observations(database_error="connection refused: db:5432")
    return tick(spec, _setup_failed().status, obs, at(minutes=2))


def _database_down() -> Decision:
    spec = make_spec()
    obs = Observations(database_error="connection refused: db:5432")
    return tick(spec, status_at(spec, Phase.PROGRESSING), obs, at(minutes=1))


# (situation, {condition: (status, reason)})
CONDITIONS: list[Any] = [
    pytest.param(
        _preparing,
        {
            R: ("False", "Preparing"),
            M: ("False", "Preparing"),
            V: ("Unknown", "NotVerified"),
            A: ("Unknown", "NoCheck"),
            B: ("False", "NotRolledBack"),
            S: ("False", "NotStalled"),
        },
        id="preparing",
    ),
    pytest.param(
        _migrating,
        {
            R: ("False", "Migrating"),
            M: ("False", "Migrating"),
            V: ("Unknown", "NotVerified"),
            S: ("False", "NotStalled"),
        },
        id="migrating",
    ),
    pytest.param(
        _progressing_passing,
        {
            R: ("False", "Progressing"),
            M: ("True", "Migrated"),
            V: ("True", "Verified"),
            A: ("True", "AllPassing"),
            B: ("False", "NotRolledBack"),
            S: ("False", "NotStalled"),
        },
        id="progressing-passing",
    ),
    pytest.param(
        _progressing_failing,
        {A: ("False", "NotPassing"), B: ("False", "NotRolledBack"), S: ("False", "NotStalled")},
        id="progressing-not-passing",
    ),
    pytest.param(
        _rolled_back,
        {
            R: ("False", "RolledBack"),
            M: ("True", "Migrated"),
            V: ("True", "Verified"),
            B: ("True", "ThresholdBreached"),
            S: ("True", "ThresholdBreached"),
        },
        id="rolled-back",
    ),
    pytest.param(
        _succeeded,
        {
            R: ("True", "Succeeded"),
            M: ("True", "Migrated"),
            B: ("False", "NotRolledBack"),
            S: ("False", "NotStalled"),
        },
        id="succeeded",
    ),
    pytest.param(
        _verification_failed,
        {
            R: ("False", "Failed"),
            V: ("False", "VerificationFailed"),
            S: ("True", "VerificationFailed"),
        },
        id="verification-failed",
    ),
    pytest.param(
        _setup_failed,
        {R: ("False", "Failed"), M: ("False", "Failed"), S: ("True", "JobFailed")},
        id="job-failed",
    ),
    pytest.param(
        _manual_rollback,
        {R: ("False", "RolledBack"), B: ("True", "ManualRollback"), S: ("True", "ManualRollback")},
        id="manual-rollback",
    ),
    pytest.param(
        _retried_after_failure,
        {R: ("False", "Preparing"), S: ("False", "NotStalled")},
        id="retried-after-failure",
    ),
    pytest.param(
        # Only a spec change moves a Failed migration on, whether or not the database answers.
        _failed_database_down,
        {R: ("False", "DatabaseUnreachable"), S: ("True", "JobFailed")},
        id="failed-database-down",
    ),
    pytest.param(
        _database_down,
        {R: ("False", "DatabaseUnreachable"), S: ("False", "NotStalled")},
        id="database-down",
    ),
]


@pytest.mark.parametrize(("situation", "expected"), CONDITIONS)
def test_conditions_in_each_phase(
    situation: Callable[[], Decision], expected: dict[ConditionType, tuple[str, str]]
) -> None:
    status = situation().status
    assert [c.type for c in status.conditions] == [R, M, V, A, B, S]
    for kind, (state, reason) in expected.items():
        found = condition(status, kind)
        assert (found.status, found.reason) == (state, reason), kind.value


def test_not_passing_names_the_criteria_and_their_verdicts() -> None:
    found = condition(_progressing_failing().status, A)
    assert found.message == "latency: fail, cost: nodata"


def test_the_rolled_back_condition_carries_the_rollback_message() -> None:
    status = _rolled_back().status
    assert condition(status, B).message == status.message
    assert "errors = 1.1" in status.message


def test_the_stalled_condition_says_why_and_what_moves_it_on() -> None:
    for situation in (_rolled_back, _setup_failed):
        status = situation().status
        stalled = condition(status, S)
        assert (
            stalled.message
            == f"{status.phase.value}: {status.message} (held until the spec changes)"
        )
    assert "no such table" in condition(_setup_failed().status, S).message
    retried = _retried_after_failure().status
    assert condition(retried, S).last_transition_time == at(minutes=2)


def _kstatus(status: EmbeddingMigrationStatus, *, generation: int = 1) -> str:
    """kstatus' verdict on a custom resource, as Flux's health checks read it: a stale
    observedGeneration, then Reconciling and Stalled (sigs.k8s.io/cli-utils pkg/kstatus/status,
    generic.go), then the Ready fallback of its README ("The Ready Condition")."""
    if status.observed_generation is not None and status.observed_generation != generation:
        return "InProgress"
    found = {c.type.value: c.status for c in status.conditions}
    if found.get("Reconciling") == "True":
        return "InProgress"
    if found.get("Stalled") == "True":
        return "Failed"
    return {"True": "Current", "False": "InProgress"}.get(found.get("Ready", ""), "Current")


@pytest.mark.parametrize(
    ("situation", "verdict"),
    [
        (_migrating, "InProgress"),
        (_progressing_passing, "InProgress"),
        (_succeeded, "Current"),
        (_rolled_back, "Failed"),
        (_manual_rollback, "Failed"),
        (_setup_failed, "Failed"),
        (_verification_failed, "Failed"),
        (_retried_after_failure, "InProgress"),
    ],
)
def test_kstatus_reads_the_end_of_each_road(
    situation: Callable[[], Decision], verdict: str
) -> None:
    """Failed and RolledBack wait for a commit: kstatus must say Failed, not InProgress."""
    status = situation().status.model_copy(update={"observed_generation": 1})
    assert _kstatus(status) == verdict


def test_last_transition_time_changes_only_when_the_status_flips() -> None:
    spec = make_spec()
    first = tick(spec, status_at(spec, Phase.PROGRESSING), Observations(analysis=all_pass(spec)))
    assert {c.last_transition_time for c in first.status.conditions} == {at()}
    # A later tick where nothing flips (a message may change) keeps every time.
    obs = Observations(analysis=all_pass(spec))
    same = tick(spec, first.status, obs, at(minutes=1))
    assert {c.last_transition_time for c in same.status.conditions} == {at()}
    # A breach flips AnalysisPassing (True → False), RolledBack and Stalled (False → True), and
    # Ready's reason changes but not its status (False): only the three flipped move.
    breach = Observations(analysis=check(spec, fail=["errors", "latency"]))
    rolled = tick(spec, same.status, breach, at(minutes=2))
    times = {c.type: c.last_transition_time for c in rolled.status.conditions}
    assert times == {
        R: at(),
        M: at(),
        V: at(),
        A: at(minutes=2),
        B: at(minutes=2),
        S: at(minutes=2),
    }
    assert condition(rolled.status, R).reason == "RolledBack"


# ---- history and events --------------------------------------------------------------------------


def test_history_keeps_the_newest_entries_up_to_the_limit() -> None:
    spec = make_spec()
    full = [
        HistoryEntry(time=at(minutes=i), phase=Phase.PROGRESSING, percentage=10, reason=f"R{i}")
        for i in range(HISTORY_LIMIT)
    ]
    status = status_at(spec, Phase.PROGRESSING).model_copy(update={"history": full})
    d = tick(spec, status, Observations(alerts=("Down",)), at(hours=2))
    assert len(d.status.history) == HISTORY_LIMIT
    assert d.status.history[0].reason == "R1"
    assert d.status.history[-1].reason == "AlertFiring"
    # And it stays a valid status (the model refuses more than the limit).
    EmbeddingMigrationStatus.model_validate(d.status.model_dump(by_alias=True))


def _play(
    story: list[tuple[EmbeddingMigrationSpec, Observations]],
) -> list[tuple[EmbeddingMigrationStatus, Decision]]:
    """Tick through ``story`` half an hour apart; every Job the core asks for succeeds by the
    next tick unless the story says otherwise."""
    status = EmbeddingMigrationStatus()
    out = []
    runner: dict[str, JobState] = {}
    for i, (spec, obs) in enumerate(story):
        if not obs.jobs:
            obs = replace(obs, jobs=seen(runner))
        d = tick(spec, status, obs, at(minutes=i * 30))
        runner.update({r.name: JobState.SUCCEEDED for r in d.of_type(RunJob)})
        out.append((status, d))
        status = d.status
    return out


PIPELINE = ["Started", "SetUp", "Migrated", "Indexed", "Verified"]


def _stories() -> list[Any]:
    spec = make_spec(analysis={"successfulChecks": 1})
    ok = Observations(analysis=all_pass(spec))
    quiet = Observations()
    paused = changed(spec, rollout={"paused": True})
    zero = changed(spec, rollout={"maxPercentage": 0})
    retry = changed(spec, analysis={"minRequests": 10})
    flagged = Observations(routing=RoutingObservation(10, emergency=True))
    pipeline = [(spec, quiet)] * 8  # the Jobs, a tick each, then step 1
    return [
        pytest.param(
            [*pipeline, (spec, ok), (spec, ok), (paused, ok), *[(spec, ok)] * 8],
            [
                "StepPromoted",
                "Paused",
                "Resumed",
                "StepPromoted",
                "StepPromoted",
                "Promoted",
                "Succeeded",
            ],
            id="to-succeeded-with-a-pause",
        ),
        pytest.param(
            [*pipeline, (spec, Observations(analysis=check(spec, fail=["errors"]))), (retry, ok)],
            ["ThresholdBreached", "RolloutChanged"],
            id="threshold-then-retry",
        ),
        pytest.param(
            [*pipeline, (spec, Observations(alerts=("A",))), (retry, quiet)],
            ["AlertFiring", "RolloutChanged"],
            id="alert-then-retry",
        ),
        pytest.param(
            [*pipeline, (spec, flagged), (retry, flagged)],
            ["EmergencyFlag", "RolloutChanged"],
            id="emergency-then-retry",
        ),
        pytest.param(
            [*pipeline, (zero, ok), (zero, ok), (spec, ok)],
            ["ManualRollback", "Retrying"],
            id="manual-then-raise",
        ),
        pytest.param(
            [
                (spec, quiet),
                (spec, Observations(jobs=seen({job(spec, JobKind.SETUP): JobState.FAILED}))),
                (changed(spec, migration={"budgetUSD": 9.0}), quiet),
            ],
            ["Started", "JobFailed", "Retrying"],
            id="failed-then-retry",
        ),
    ]


@pytest.mark.parametrize(("story", "reasons"), _stories())
def test_every_transition_says_why_and_is_told(
    story: list[tuple[EmbeddingMigrationSpec, Observations]], reasons: list[str]
) -> None:
    seen_reasons = []
    for before, d in _play(story):
        added = new_history(before, d.status)
        told = [(e.reason, e.message) for e in events(d)]
        for entry in added:
            seen_reasons.append(entry.reason)
            assert entry.reason and entry.reason[0].isupper() and " " not in entry.reason
            assert entry.message
            assert entry.time == d.status.history[-1].time
            assert (entry.reason, entry.message) in told
        if added:
            assert d.status.message == added[-1].message
            assert d.status.history[-1].percentage == d.status.percentage
        warnings = {(e.reason, e.message) for e in d.of_type(EmitEvent) if e.type == "Warning"}
        for entry in added:
            if entry.phase in (Phase.ROLLED_BACK, Phase.FAILED):
                assert (entry.reason, entry.message) in warnings
            if entry.phase is Phase.ROLLED_BACK:
                assert entry.percentage == 0
    expected = reasons if reasons[0] == "Started" else PIPELINE + reasons
    assert seen_reasons == expected
