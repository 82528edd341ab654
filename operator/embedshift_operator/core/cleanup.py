"""``cleanup.dropSource``: when the v1 column is dropped, and what its outcome records. Pure.

After ``retainSourceFor`` in Succeeded, :func:`embedshift_operator.core.decide` asks for a
:class:`DropSource`. Nothing is recorded then: the driver runs the DROP and hands its outcome to
:func:`embedshift_operator.core.settle_drop` (both drivers, the same function), which records
``sourceDroppedAt`` only once the DROP committed. A failure (a lock the DROP could not take
within its ``lock_timeout``, a view that depends on the column, a missing privilege) is a Warning
Event ``DropSourceFailed`` and the ``SourceDropped`` condition False with the error, and is
retried with backoff (:func:`drop_retry_after`) counted from ``status.cleanup``, so a restarted
driver waits the same. A DROP that committed but whose status was never saved is asked for again
and succeeds (``DROP COLUMN IF EXISTS``), and then recorded.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from embedshift_operator.core.model import DropSource
from embedshift_operator.resource import (
    CleanupStatus,
    ConditionType,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    parse_duration,
)

__all__ = [
    "DROP_RETRY_FIRST",
    "DROP_RETRY_MAX",
    "drop_due",
    "drop_outcome",
    "drop_retry_after",
    "source_condition",
]

# The first retry of a failed DROP, doubling with each failure up to DROP_RETRY_MAX: a lock held
# a moment is retried within seconds, a dependent view (a person must act) about twice an hour.
DROP_RETRY_FIRST = timedelta(seconds=10)
DROP_RETRY_MAX = timedelta(minutes=30)
_MAX_ERROR = 300  # characters of the last error kept in status

Wanted = tuple[ConditionType, str, str, str]  # type, status, reason, message


def drop_retry_after(failures: int) -> timedelta:
    """How long after its ``failures``-th consecutive failure the DROP is tried again."""
    if failures <= 0:
        return timedelta(0)
    doublings = min(failures - 1, 16)  # 10 s · 2**16 is far past the cap already
    wait: timedelta = DROP_RETRY_FIRST * (1 << doublings)
    return min(DROP_RETRY_MAX, wait)


def _column(spec: EmbeddingMigrationSpec) -> str | None:
    """The column cleanup drops; None when it drops none."""
    return spec.database.source_embedding_column if spec.cleanup.drop_source else None


def drop_due(
    spec: EmbeddingMigrationSpec, status: EmbeddingMigrationStatus, now: datetime
) -> DropSource | None:
    """The DROP to ask for in Succeeded: once ``retainSourceFor`` is over, until one commits,
    each failure's backoff waited out."""
    column = _column(spec)
    if column is None or status.source_dropped_at is not None:
        return None
    since = status.phase_started_at or now
    if now < since + parse_duration(spec.cleanup.retain_source_for):
        return None
    retry = _next_attempt(status.cleanup)
    if retry is not None and now < retry:
        return None
    return DropSource(column=column)


def _next_attempt(failed: CleanupStatus | None) -> datetime | None:
    """When the DROP is tried again after the failures recorded; None: at once."""
    if failed is None or failed.last_failure_at is None:
        return None
    return failed.last_failure_at + drop_retry_after(failed.drop_failures)


def drop_outcome(
    spec: EmbeddingMigrationSpec,
    status: EmbeddingMigrationStatus,
    action: DropSource,
    *,
    error: str | None,
    now: datetime,
) -> tuple[EmbeddingMigrationStatus, str, str]:
    """``status`` once the DROP ran (``error`` None: it committed), and the Event's reason and
    message (a failure's is a Warning)."""
    if error is None:
        updated = status.model_copy(update={"source_dropped_at": now, "cleanup": None})
        message = (
            f"cleanup.dropSource: dropped column {action.column}, "
            f"{spec.cleanup.retain_source_for} after the migration succeeded"
        )
        return updated, "SourceDropped", message
    error = " ".join(error.split())[:_MAX_ERROR]
    failures = (status.cleanup.drop_failures if status.cleanup else 0) + 1
    cleanup = CleanupStatus(drop_failures=failures, last_failure_at=now, last_error=error)
    updated = status.model_copy(update={"cleanup": cleanup})
    message = (
        f"cleanup.dropSource: dropping column {action.column} failed (attempt {failures}): "
        f"{error}; retrying in {_seconds(drop_retry_after(failures))}"
    )
    return updated, "DropSourceFailed", message


def source_condition(
    spec: EmbeddingMigrationSpec, status: EmbeddingMigrationStatus
) -> Wanted | None:
    """The SourceDropped condition; None without ``cleanup.dropSource``."""
    column = _column(spec)
    if column is None:
        return None
    kind = ConditionType.SOURCE_DROPPED
    if status.source_dropped_at is not None:
        return (kind, "True", "SourceDropped", f"column {column} dropped")
    failed = status.cleanup
    retry = _next_attempt(failed)
    if failed is not None and retry is not None:
        return (
            kind,
            "False",
            "DropSourceFailed",
            f"dropping column {column} failed {failed.drop_failures} time(s), last: "
            f"{failed.last_error}; next attempt at {retry.isoformat(timespec='seconds')}",
        )
    return (
        kind,
        "False",
        "SourceRetained",
        f"column {column} is kept until {spec.cleanup.retain_source_for} after the migration "
        "succeeds (cleanup.retainSourceFor)",
    )


def _seconds(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"
