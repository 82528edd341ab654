"""The operator's own Prometheus metrics, derived from each :class:`Decision` the core makes.

Both drivers (the kopf handlers and ``embedshift rollout run``) call :meth:`OperatorMetrics.record`
once per tick with the status the tick started from and the decision it made::

    metrics = OperatorMetrics(registry=CollectorRegistry())
    decision = decide(spec, status, observations, now, name=name)
    metrics.record("default/docs", status, decision, seconds=elapsed)

Everything lives on the registry passed in, never on prometheus_client's global one. Every series
but the tick histogram carries ``migration`` ("namespace/name"). A migration's rollback counters
for the reasons the core knows, and its percentage, exist from its first tick, so
``increase(embedshift_operator_rollbacks_total[1h])`` is 0 rather than no data; verdict counters
exist for all four verdicts of a criterion from its first check. The re-embedding's progress
(rows by state) and the follower's lag are gauges of the status each tick leaves behind, so the
alert rules and the dashboard can see what otherwise only the database and the status show.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from embedshift_operator.core.model import Decision
from embedshift_operator.resource import (
    HISTORY_LIMIT,
    EmbeddingMigrationStatus,
    HistoryEntry,
    Phase,
)
from rag_service.criteria import Verdict

__all__ = [
    "AUTOMATIC_ROLLBACK_REASONS",
    "ROLLBACK_REASONS",
    "ROW_STATES",
    "TICK_BUCKETS",
    "OperatorMetrics",
    "added_history",
]

# The reasons the core records when it enters RolledBack: automatic (an alert, the routing row's
# emergency flag, a breached threshold) and manual (maxPercentage: 0).
ROLLBACK_REASONS = ("AlertFiring", "EmergencyFlag", "ThresholdBreached", "ManualRollback")
AUTOMATIC_ROLLBACK_REASONS = ROLLBACK_REASONS[:3]
# The states of embedshift_operator_migration_rows: status.migration's counts.
ROW_STATES = ("total", "migrated", "pending")
# A tick reads the database and runs a check (queries time out after 5 s): milliseconds to
# seconds; 1 s is a bound, the alert → 0 % goal.
TICK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class OperatorMetrics:
    """The operator's metrics on ``registry``. Two on one registry raise ``ValueError``."""

    def __init__(self, *, registry: CollectorRegistry) -> None:
        self._transitions = Counter(
            "embedshift_operator_transitions_total",
            "Phase transitions by the phase entered and the reason.",
            ["migration", "phase", "reason"],
            registry=registry,
        )
        self._verdicts = Counter(
            "embedshift_operator_verdicts_total",
            "Criterion verdicts (pass, fail, nodata, error), one per criterion per check.",
            ["migration", "criterion", "verdict"],
            registry=registry,
        )
        self._percentage = Gauge(
            "embedshift_operator_percentage",
            "The effective share of searches routed to v2, in percent.",
            ["migration"],
            registry=registry,
        )
        self._rollbacks = Counter(
            "embedshift_operator_rollbacks_total",
            "Rollbacks to 0 % by reason (AlertFiring, EmergencyFlag, ThresholdBreached: "
            "automatic; ManualRollback: maxPercentage 0).",
            ["migration", "reason"],
            registry=registry,
        )
        self._tick = Histogram(
            "embedshift_operator_tick_seconds",
            "Seconds one tick took: observing, deciding, acting and persisting the status.",
            buckets=TICK_BUCKETS,
            registry=registry,
        )
        self._errors = Counter(
            "embedshift_operator_errors_total",
            "Errors a tick met and survived, by kind (database, prometheus, jobs, status, ...).",
            ["migration", "kind"],
            registry=registry,
        )
        self._rows = Gauge(
            "embedshift_operator_migration_rows",
            "Source rows to re-embed by state (total, migrated, pending), as last read.",
            ["migration", "state"],
            registry=registry,
        )
        self._lag = Gauge(
            "embedshift_operator_follower_lag_seconds",
            "Age of the oldest change the follower has not re-embedded yet (0: queue empty).",
            ["migration"],
            registry=registry,
        )
        self._known: set[str] = set()
        self._criteria: set[tuple[str, str]] = set()

    def record(
        self,
        migration: str,
        before: EmbeddingMigrationStatus,
        decision: Decision,
        *,
        seconds: float,
    ) -> None:
        """Count one tick of ``migration``: from status ``before`` to ``decision``, in
        ``seconds``. Transitions and rollbacks are the history entries the tick added, verdicts
        the results of a check that ran this tick."""
        self._track(migration)
        after = decision.status
        for entry in added_history(before.history, after.history):
            self._transitions.labels(migration, entry.phase.value, entry.reason).inc()
            if entry.phase is Phase.ROLLED_BACK:
                self._rollbacks.labels(migration, entry.reason).inc()
        analysis = after.analysis
        if analysis.time is not None and analysis.time != before.analysis.time:
            for result in analysis.results:
                self._track_criterion(migration, result.name)
                self._verdicts.labels(migration, result.name, result.verdict.value).inc()
        self._percentage.labels(migration).set(after.percentage)
        progress = after.migration
        for state, rows in zip(
            ROW_STATES, (progress.total, progress.migrated, progress.pending), strict=True
        ):
            self._rows.labels(migration, state).set(rows)
        self._lag.labels(migration).set(progress.oldest_pending_seconds or 0.0)
        self._tick.observe(seconds)

    def count_error(self, migration: str, kind: str) -> None:
        """One error of ``kind`` in ``migration``'s tick (a condition, retried, never a crash)."""
        self._track(migration)
        self._errors.labels(migration, kind).inc()

    def forget(self, migration: str) -> None:
        """Remove ``migration``'s series (its resource is deleted)."""
        if migration not in self._known:
            return
        self._known.discard(migration)
        for metric in (
            self._transitions,
            self._verdicts,
            self._rollbacks,
            self._errors,
            self._rows,
        ):
            for labels in _label_sets(metric):
                if labels[0] == migration:
                    metric.remove(*labels)
        self._percentage.remove(migration)
        self._lag.remove(migration)
        self._criteria = {c for c in self._criteria if c[0] != migration}

    def _track(self, migration: str) -> None:
        if not migration:
            raise ValueError("migration must name the migration, e.g. 'namespace/name'")
        if migration in self._known:
            return
        self._known.add(migration)
        self._percentage.labels(migration)
        self._lag.labels(migration)
        for state in ROW_STATES:
            self._rows.labels(migration, state)
        for reason in ROLLBACK_REASONS:
            self._rollbacks.labels(migration, reason)

    def _track_criterion(self, migration: str, criterion: str) -> None:
        if (migration, criterion) in self._criteria:
            return
        self._criteria.add((migration, criterion))
        for verdict in Verdict:
            self._verdicts.labels(migration, criterion, verdict.value)


def added_history(
    before: Sequence[HistoryEntry], after: Sequence[HistoryEntry]
) -> list[HistoryEntry]:
    """The entries one tick appended to a history, which keeps only its newest entries. Pure.

    The fewest new entries such that the rest of ``after`` is the newest part of ``before``
    (all of ``after`` when nothing matches, e.g. a status written by someone else).
    """
    for added in range(len(after) + 1):
        kept = list(after[: len(after) - added])
        if len(kept) > len(before):
            continue
        # Fewer kept than before: the oldest were dropped to make room, only in a full history.
        if len(kept) < len(before) and len(after) < HISTORY_LIMIT:
            continue
        if kept == list(before[len(before) - len(kept) :]):
            return list(after[len(after) - added :])
    return list(after)


def _label_sets(metric: Counter | Gauge) -> set[tuple[str, ...]]:
    """The label values of ``metric``'s children, in its label names' order."""
    found = set()
    for family in metric.collect():
        for sample in family.samples:
            found.add(tuple(sample.labels.values()))
    return found
