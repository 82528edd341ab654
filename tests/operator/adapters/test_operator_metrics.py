"""OperatorMetrics: the operator's series, derived from real ``decide()`` outputs and read from
the rendered exposition text, as Prometheus would scrape it."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from embedshift_operator.adapters.operator_metrics import (
    ROLLBACK_REASONS,
    OperatorMetrics,
    added_history,
)
from embedshift_operator.core import Observations
from embedshift_operator.resource import HISTORY_LIMIT, HistoryEntry, MigrationProgress, Phase
from tests.operator.core.builders import (
    MIGRATION,
    T0,
    all_pass,
    at,
    check,
    make_spec,
    status_at,
    tick,
    ticks,
)

OTHER = "search/faq"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> OperatorMetrics:
    return OperatorMetrics(registry=registry)


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def value(registry: CollectorRegistry, sample: str, **labels: str) -> float | None:
    """The value of ``sample`` with exactly ``labels`` in the rendered text; None if absent."""
    for family in text_string_to_metric_families(exposition(registry)):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    return None


def test_a_threshold_breach_is_one_rollback_with_its_reason(
    registry: CollectorRegistry, metrics: OperatorMetrics
) -> None:
    spec = make_spec()
    status = status_at(spec, Phase.PROGRESSING, step=2)  # 50 %
    breach = tick(spec, status, Observations(analysis=check(spec, fail=["errors"])), at(hours=1))
    assert breach.status.phase is Phase.ROLLED_BACK

    metrics.record(MIGRATION, status, breach, seconds=0.05)
    held = tick(spec, breach.status, Observations(analysis=all_pass(spec)), at(hours=2))
    metrics.record(MIGRATION, breach.status, held, seconds=0.05)

    text = exposition(registry)
    assert (
        f'embedshift_operator_rollbacks_total{{migration="{MIGRATION}",'
        f'reason="ThresholdBreached"}} 1.0' in text
    )
    assert (
        f'embedshift_operator_transitions_total{{migration="{MIGRATION}",phase="RolledBack",'
        f'reason="ThresholdBreached"}} 1.0' in text
    )
    assert f'embedshift_operator_percentage{{migration="{MIGRATION}"}} 0.0' in text
    for reason in ROLLBACK_REASONS:  # every reason's series exists from the first tick
        expected = 1.0 if reason == "ThresholdBreached" else 0.0
        rollbacks = "embedshift_operator_rollbacks_total"
        assert value(registry, rollbacks, migration=MIGRATION, reason=reason) == expected


@pytest.mark.parametrize(
    ("spec_parts", "observations", "reason"),
    [
        pytest.param({}, Observations(alerts=("EmbeddingV2HighErrorRate",)), "AlertFiring"),
        pytest.param({"rollout": {"maxPercentage": 0}}, Observations(), "ManualRollback"),
    ],
)
def test_automatic_and_manual_rollbacks_by_reason(
    registry: CollectorRegistry,
    metrics: OperatorMetrics,
    spec_parts: dict[str, dict[str, int]],
    observations: Observations,
    reason: str,
) -> None:
    spec = make_spec(**spec_parts)
    status = status_at(make_spec(), Phase.PROGRESSING, step=1)
    status = status.model_copy(update={"spec_hash": status_at(spec, Phase.PROGRESSING).spec_hash})
    decision = tick(spec, status, observations, at(minutes=5))
    assert decision.status.phase is Phase.ROLLED_BACK

    metrics.record(MIGRATION, status, decision, seconds=0.01)

    assert (
        value(registry, "embedshift_operator_rollbacks_total", migration=MIGRATION, reason=reason)
        == 1.0
    )
    assert (
        value(
            registry,
            "embedshift_operator_transitions_total",
            migration=MIGRATION,
            phase="RolledBack",
            reason=reason,
        )
        == 1.0
    )


def test_verdicts_per_criterion_a_promotion_and_the_percentage(
    registry: CollectorRegistry, metrics: OperatorMetrics
) -> None:
    spec = make_spec()
    status = status_at(spec, Phase.PROGRESSING, step=0, since=T0)  # 10 %
    checks = [check(spec, fail=["latency"]), all_pass(spec), all_pass(spec), all_pass(spec)]
    decisions = ticks(spec, status, checks, start=at(hours=1), every=timedelta(minutes=1))
    for decision in decisions:
        metrics.record(MIGRATION, status, decision, seconds=0.2)
        status = decision.status
    assert status.step_index == 1

    criteria = [c.name for _, c in spec.analysis.criteria()]
    assert set(criteria) == {"latency", "similarity", "cost", "errors"}
    for name in criteria:
        passes = 3.0 if name == "latency" else 4.0
        of = {"migration": MIGRATION, "criterion": name}
        assert value(registry, "embedshift_operator_verdicts_total", **of, verdict="pass") == passes
        assert value(registry, "embedshift_operator_verdicts_total", **of, verdict="nodata") == 0.0
    assert (
        value(
            registry,
            "embedshift_operator_verdicts_total",
            migration=MIGRATION,
            criterion="latency",
            verdict="fail",
        )
        == 1.0
    )
    text = exposition(registry)
    assert (
        f'embedshift_operator_transitions_total{{migration="{MIGRATION}",phase="Progressing",'
        f'reason="StepPromoted"}} 1.0' in text
    )
    assert f'embedshift_operator_percentage{{migration="{MIGRATION}"}} 25.0' in text
    assert "embedshift_operator_tick_seconds_count 4.0" in text
    assert 'embedshift_operator_tick_seconds_bucket{le="0.25"} 4.0' in text
    assert 'reason="ThresholdBreached"} 0.0' in text


def test_a_tick_without_a_check_counts_no_verdict_and_no_transition(
    registry: CollectorRegistry, metrics: OperatorMetrics
) -> None:
    spec = make_spec()
    status = status_at(spec, Phase.PROGRESSING, step=0)
    checked = tick(spec, status, Observations(analysis=all_pass(spec)), at(minutes=1))
    idle = tick(spec, checked.status, Observations(), at(minutes=2))
    metrics.record(MIGRATION, status, checked, seconds=0.1)
    metrics.record(MIGRATION, checked.status, idle, seconds=0.1)

    text = exposition(registry)
    assert "embedshift_operator_transitions_total{" not in text
    assert (
        value(
            registry,
            "embedshift_operator_verdicts_total",
            migration=MIGRATION,
            criterion="errors",
            verdict="pass",
        )
        == 1.0
    )


def test_the_first_tick_of_a_new_resource_is_a_transition(
    registry: CollectorRegistry, metrics: OperatorMetrics
) -> None:
    spec = make_spec()
    status = status_at(spec, Phase.PENDING).model_copy(update={"spec_hash": None, "history": []})
    decision = tick(spec, status)
    metrics.record(OTHER, status, decision, seconds=0.01)
    assert (
        value(
            registry,
            "embedshift_operator_transitions_total",
            migration=OTHER,
            phase="Preparing",
            reason="Started",
        )
        == 1.0
    )
    assert value(registry, "embedshift_operator_percentage", migration=OTHER) == 0.0


def test_errors_by_kind_and_forget(registry: CollectorRegistry, metrics: OperatorMetrics) -> None:
    spec = make_spec()
    status = status_at(spec, Phase.PROGRESSING, step=2)
    metrics.record(MIGRATION, status, tick(spec, status, Observations(alerts=("A",))), seconds=1)
    metrics.record(OTHER, status, tick(spec, status), seconds=1)
    metrics.count_error(MIGRATION, "database")
    metrics.count_error(MIGRATION, "database")
    metrics.count_error(OTHER, "prometheus")
    assert (
        value(registry, "embedshift_operator_errors_total", migration=MIGRATION, kind="database")
        == 2.0
    )

    metrics.forget(MIGRATION)

    text = exposition(registry)
    assert MIGRATION not in text
    assert (
        value(registry, "embedshift_operator_errors_total", migration=OTHER, kind="prometheus")
        == 1.0
    )
    assert value(registry, "embedshift_operator_percentage", migration=OTHER) == 50.0
    metrics.forget(MIGRATION)  # again: nothing left to remove


def test_two_on_one_registry_and_an_empty_migration_are_refused(
    registry: CollectorRegistry, metrics: OperatorMetrics
) -> None:
    with pytest.raises(ValueError, match="Duplicated"):
        OperatorMetrics(registry=registry)
    with pytest.raises(ValueError, match="migration"):
        metrics.count_error("", "database")


def _entry(i: int) -> HistoryEntry:
    return HistoryEntry(
        time=T0 + timedelta(minutes=i), phase=Phase.PROGRESSING, percentage=10, reason=f"R{i}"
    )


def test_added_history_in_a_full_bounded_history() -> None:
    before = [_entry(i) for i in range(HISTORY_LIMIT)]
    after = [*before, _entry(100), _entry(101)][-HISTORY_LIMIT:]
    assert added_history(before, after) == [_entry(100), _entry(101)]
    assert added_history(before, before) == []
    assert added_history([], [_entry(1)]) == [_entry(1)]
    # Not a continuation of before (a status written elsewhere): all of it is new.
    assert added_history(before[:3], [_entry(7), _entry(8)]) == [_entry(7), _entry(8)]


def test_progress_and_the_followers_lag_are_the_status_a_tick_leaves(
    registry: CollectorRegistry, metrics: OperatorMetrics
) -> None:
    spec = make_spec()
    status = status_at(spec, Phase.PROGRESSING, step=1)
    decision = tick(spec, status)
    progress = MigrationProgress(total=4000, migrated=3900, pending=100, oldest_pending_seconds=42)
    behind = replace(decision, status=decision.status.model_copy(update={"migration": progress}))

    metrics.record(MIGRATION, status, behind, seconds=0.1)

    rows = "embedshift_operator_migration_rows"
    assert value(registry, rows, migration=MIGRATION, state="total") == 4000.0
    assert value(registry, rows, migration=MIGRATION, state="migrated") == 3900.0
    assert value(registry, rows, migration=MIGRATION, state="pending") == 100.0
    lag = "embedshift_operator_follower_lag_seconds"
    assert value(registry, lag, migration=MIGRATION) == 42.0

    # The follower drained the queue: no oldest change is a lag of 0, not a stale 42 s.
    caught_up = progress.model_copy(update={"pending": 0, "oldest_pending_seconds": None})
    drained = replace(decision, status=decision.status.model_copy(update={"migration": caught_up}))
    metrics.record(MIGRATION, behind.status, drained, seconds=0.1)
    assert value(registry, lag, migration=MIGRATION) == 0.0
    assert value(registry, rows, migration=MIGRATION, state="pending") == 0.0
