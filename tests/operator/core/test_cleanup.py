"""cleanup.dropSource: the DROP is asked for, and recorded only once the driver says it committed;
a failure is a Warning Event and a condition, retried with backoff. Tables, no I/O, no clock."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from embedshift_operator.core import (
    Decision,
    DropSource,
    Observations,
    settle_drop,
)
from embedshift_operator.core.cleanup import DROP_RETRY_MAX, drop_retry_after
from embedshift_operator.resource import (
    CleanupStatus,
    ConditionType,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    Phase,
)
from tests.operator.core.builders import at, condition, events, make_spec, status_at, tick

DROP = DropSource(column="embedding")
RETAIN = timedelta(hours=168)  # cleanup.retainSourceFor's default
DUE = at() + RETAIN  # status_at(...) entered Succeeded at at()
LOCKED = "database: canceling statement due to lock timeout"
VIEW = (
    "database: cannot drop column embedding of table documents because other objects depend on it"
)


def _spec(**cleanup: Any) -> EmbeddingMigrationSpec:
    return make_spec(cleanup={"dropSource": True, **cleanup})


def _succeeded(
    spec: EmbeddingMigrationSpec, *, failures: int = 0, failed_at: datetime = DUE
) -> EmbeddingMigrationStatus:
    status = status_at(spec, Phase.SUCCEEDED)
    if failures:
        failed = CleanupStatus(drop_failures=failures, last_failure_at=failed_at, last_error=LOCKED)
        status = status.model_copy(update={"cleanup": failed})
    return tick(spec, status, Observations(), failed_at).status  # conditions as a tick leaves them


def _settle(
    spec: EmbeddingMigrationSpec, status: EmbeddingMigrationStatus, error: str | None, now: datetime
) -> Decision:
    return settle_drop(spec, status, DROP, error=error, now=now)


# ---- the backoff ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "wait"),
    [
        (0, timedelta(0)),
        (1, timedelta(seconds=10)),
        (2, timedelta(seconds=20)),
        (3, timedelta(seconds=40)),
        (8, timedelta(seconds=1280)),
        (9, DROP_RETRY_MAX),  # 2560 s, capped at 30 min
        (1000, DROP_RETRY_MAX),
    ],
)
def test_a_failed_drop_is_retried_after_a_doubling_wait(failures: int, wait: timedelta) -> None:
    assert drop_retry_after(failures) == wait


@pytest.mark.parametrize(
    ("failures", "since_failure", "asks"),
    [
        pytest.param(0, timedelta(0), True, id="never-failed"),
        pytest.param(1, timedelta(seconds=9), False, id="1-failure-9s"),
        pytest.param(1, timedelta(seconds=10), True, id="1-failure-10s"),
        pytest.param(3, timedelta(seconds=39), False, id="3-failures-39s"),
        pytest.param(3, timedelta(seconds=40), True, id="3-failures-40s"),
        pytest.param(20, timedelta(minutes=29), False, id="20-failures-29m"),
        pytest.param(20, timedelta(minutes=30), True, id="20-failures-capped-30m"),
    ],
)
def test_the_drop_is_asked_for_again_only_after_its_backoff(
    failures: int, since_failure: timedelta, asks: bool
) -> None:
    spec = _spec()
    status = _succeeded(spec, failures=failures)
    d = tick(spec, status, Observations(), DUE + since_failure)
    assert d.of_type(DropSource) == ([DROP] if asks else [])
    assert d.status.source_dropped_at is None
    assert events(d) == []  # asking is silent; the outcome speaks


# ---- the outcome ---------------------------------------------------------------------------------


def test_a_drop_that_committed_is_recorded_and_never_asked_for_again() -> None:
    spec = _spec()
    asked = tick(spec, _succeeded(spec), Observations(), DUE)
    assert asked.of_type(DropSource) == [DROP]

    done = _settle(spec, asked.status, None, DUE)

    assert done.status.source_dropped_at == DUE
    assert done.status.cleanup is None
    [event] = events(done)
    assert (event.type, event.reason) == ("Normal", "SourceDropped")
    assert "dropped column embedding, 168h after the migration succeeded" in event.message
    dropped = condition(done.status, ConditionType.SOURCE_DROPPED)
    assert (dropped.status, dropped.reason, dropped.last_transition_time) == (
        "True",
        "SourceDropped",
        DUE,
    )
    later = tick(spec, done.status, Observations(), DUE + timedelta(days=30))
    assert later.of_type(DropSource) == []
    assert condition(later.status, ConditionType.SOURCE_DROPPED) == dropped


@pytest.mark.parametrize(
    ("failures", "error", "retry"),
    [
        pytest.param(0, LOCKED, "10 s", id="first"),
        pytest.param(1, VIEW, "20 s", id="second"),
        pytest.param(5, VIEW, "5 min", id="sixth"),
        pytest.param(12, LOCKED, "30 min", id="capped"),
    ],
)
def test_a_drop_that_failed_is_not_recorded_but_warned_and_counted(
    failures: int, error: str, retry: str
) -> None:
    spec = _spec()
    now = DUE + timedelta(hours=3)
    status = _succeeded(spec, failures=failures, failed_at=DUE)

    failed = _settle(spec, status, error, now)

    assert failed.status.source_dropped_at is None
    assert failed.status.cleanup == CleanupStatus(
        drop_failures=failures + 1, last_failure_at=now, last_error=error
    )
    [event] = events(failed)
    assert (event.type, event.reason) == ("Warning", "DropSourceFailed")
    assert event.message == (
        f"cleanup.dropSource: dropping column embedding failed (attempt {failures + 1}): "
        f"{error}; retrying in {retry}"
    )
    dropped = condition(failed.status, ConditionType.SOURCE_DROPPED)
    assert (dropped.status, dropped.reason) == ("False", "DropSourceFailed")
    assert error in dropped.message
    next_at = now + drop_retry_after(failures + 1)
    assert f"next attempt at {next_at.isoformat(timespec='seconds')}" in dropped.message
    # Everything else the tick decided stands.
    assert failed.status.phase is Phase.SUCCEEDED
    assert [c.type for c in failed.status.conditions] == [c.type for c in status.conditions]


def test_a_later_success_after_failures_is_recorded_and_clears_them() -> None:
    spec = _spec()
    status = _succeeded(spec)
    now = DUE
    for attempt in range(1, 4):
        asked = tick(spec, status, Observations(), now)
        assert asked.of_type(DropSource) == [DROP], attempt
        status = _settle(spec, asked.status, LOCKED, now).status
        assert status.source_dropped_at is None
        assert tick(spec, status, Observations(), now).of_type(DropSource) == []  # backing off
        now += drop_retry_after(attempt)
    asked = tick(spec, status, Observations(), now)
    done = _settle(spec, asked.status, None, now)
    assert done.status.source_dropped_at == now
    assert done.status.cleanup is None
    assert condition(done.status, ConditionType.SOURCE_DROPPED).status == "True"


def test_a_drop_whose_status_was_never_saved_is_asked_for_again() -> None:
    """The DROP committed, the driver died before saving: the saved status still says not done,
    so the next tick asks again (DROP COLUMN IF EXISTS succeeds) and then records it."""
    spec = _spec()
    saved = _succeeded(spec)
    asked = tick(spec, saved, Observations(), DUE)
    again = tick(spec, saved, Observations(), DUE + timedelta(seconds=1))
    assert asked.of_type(DropSource) == again.of_type(DropSource) == [DROP]


# ---- the condition -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cleanup", "database", "shown"),
    [
        pytest.param({}, {}, False, id="default-keeps-the-column"),
        pytest.param({"dropSource": True}, {}, True, id="dropSource"),
        pytest.param(
            {"dropSource": True}, {"sourceEmbeddingColumn": None}, False, id="no-source-column"
        ),
    ],
)
def test_the_source_dropped_condition_is_there_only_with_drop_source(
    cleanup: dict[str, Any], database: dict[str, Any], shown: bool
) -> None:
    spec = make_spec(cleanup=cleanup, database=database)
    for phase in (Phase.MIGRATING, Phase.PROGRESSING, Phase.SUCCEEDED):
        d = tick(spec, status_at(spec, phase), Observations(), at(minutes=1))
        kinds = [c.type for c in d.status.conditions]
        assert (ConditionType.SOURCE_DROPPED in kinds) is shown, phase
        if shown:
            retained = condition(d.status, ConditionType.SOURCE_DROPPED)
            assert (retained.status, retained.reason) == ("False", "SourceRetained")
            assert "kept until 168h after the migration succeeds" in retained.message
