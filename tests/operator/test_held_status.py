"""What the kopf handler writes when it cannot act (the database Secret or the database is
missing): ``handlers.held_status``, pure. kstatus (Flux) and the chart's Argo CD health check
take a status whose observedGeneration is behind the spec's generation as not having seen the
spec, so the held status carries the generation it observed, and conditions that say why nothing
moves."""

from __future__ import annotations

from embedshift_operator.core import Decision, Observations
from embedshift_operator.handlers import held_status
from embedshift_operator.resource import (
    ConditionType,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    JobKind,
    JobState,
    Phase,
)
from tests.operator.core.builders import (
    at,
    changed,
    condition,
    job,
    make_spec,
    seen,
    status_at,
    tick,
)

DOWN = Observations(database_error="Secret rag/rag-db not found")
MESSAGE = "Secret rag/rag-db not found; retrying"


def _held(
    spec: EmbeddingMigrationSpec,
    status: EmbeddingMigrationStatus,
    *,
    generation: int | None,
    minutes: float = 5,
) -> EmbeddingMigrationStatus:
    """As the handler's tick does: decide on what it observed, then hold."""
    decision: Decision = tick(spec, status, DOWN, at(minutes=minutes))
    return held_status(status, decision, message=MESSAGE, generation=generation)


def _failed(spec: EmbeddingMigrationSpec) -> EmbeddingMigrationStatus:
    started = tick(spec, EmbeddingMigrationStatus())
    obs = Observations(jobs=seen({job(spec, JobKind.SETUP): JobState.FAILED}, "no such table"))
    failed = tick(spec, started.status, obs, at(minutes=1)).status
    assert failed.phase is Phase.FAILED
    return failed.model_copy(update={"observed_generation": 1})


def test_a_held_status_carries_the_generation_it_observed() -> None:
    held = _held(make_spec(), EmbeddingMigrationStatus(), generation=3)
    assert held.observed_generation == 3
    assert (held.phase, held.message) == (Phase.PENDING, MESSAGE)
    ready = condition(held, ConditionType.READY)
    assert (ready.status, ready.reason) == ("False", "DatabaseUnreachable")
    assert condition(held, ConditionType.STALLED).status == "False"
    # Nothing else of the decision is taken: the phase, history and hashes wait for the database.
    assert held.spec_hash is None and held.history == []


def test_without_a_generation_the_last_observed_one_is_kept() -> None:
    spec = make_spec()
    before = status_at(spec, Phase.PROGRESSING).model_copy(update={"observed_generation": 4})
    assert _held(spec, before, generation=None).observed_generation == 4


def test_a_failed_migration_stays_stalled_while_the_database_is_down() -> None:
    spec = make_spec()
    failed = _failed(spec)
    held = _held(spec, failed, generation=1)
    stalled = condition(held, ConditionType.STALLED)
    assert (stalled.status, stalled.reason) == ("True", "JobFailed")
    assert (
        stalled.last_transition_time
        == condition(failed, ConditionType.STALLED).last_transition_time
    )
    assert [c.type for c in held.conditions] == [c.type for c in failed.conditions]


def test_a_retry_commit_while_the_database_is_down_is_no_longer_stalled() -> None:
    spec = make_spec()
    failed = _failed(spec)
    retry = changed(spec, migration={"batchSize": 50})
    held = _held(retry, failed, generation=2)
    # Seen (generation 2) but not acted on: still Failed with the old hashes, so the retry
    # happens once the database answers; meanwhile it is in progress, not stalled.
    assert (held.phase, held.spec_hash, held.observed_generation) == (
        Phase.FAILED,
        failed.spec_hash,
        2,
    )
    assert condition(held, ConditionType.STALLED).status == "False"
    assert condition(held, ConditionType.READY).reason == "DatabaseUnreachable"
    # What the decision could not carry out does not leak in: Migrated is the old status's.
    assert condition(held, ConditionType.MIGRATED) == condition(failed, ConditionType.MIGRATED)


def test_a_rollback_the_database_cannot_take_is_not_reported_stalled() -> None:
    spec = make_spec()
    progressing = status_at(spec, Phase.PROGRESSING)
    progressing = progressing.model_copy(
        update={"conditions": tick(spec, progressing).status.conditions}
    )
    zero = changed(spec, rollout={"maxPercentage": 0})
    assert tick(zero, progressing, DOWN, at(minutes=5)).status.phase is Phase.ROLLED_BACK
    held = _held(zero, progressing, generation=2)
    # v2 still has its traffic (the routing row cannot be written): not RolledBack yet.
    assert held.phase is Phase.PROGRESSING
    assert condition(held, ConditionType.STALLED) == condition(progressing, ConditionType.STALLED)
