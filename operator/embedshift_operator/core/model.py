"""What the core reads (observations) and what it asks for (actions). Frozen, pure data.

The drivers (kopf handlers, ``embedshift rollout run``) gather :class:`Observations` through the
adapters, call :func:`embedshift_operator.core.decide`, and carry out the :data:`Action` list it
returns. Actions are idempotent by construction: a Job has a deterministic name (creating one that
exists is success), the follower is *ensured*, the percentage is *set*.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from embedshift_operator.core.allowlist import Refusal
from embedshift_operator.resource import CountsKind, EmbeddingMigrationStatus, JobKind, JobState


@dataclass(frozen=True)
class JobObservation:
    """A Job as its runner sees it. A Job the runner does not know is simply absent."""

    state: JobState
    message: str = ""  # the last error line of a failed Job


@dataclass(frozen=True)
class Measurement:
    """One number one criterion needs, as the metric source answered it.

    ``value`` None is no data (an empty result or NaN); ``error`` says the source failed.
    ``v1_value`` is v1's figure for a criterion that compares the versions.
    """

    query: str
    value: float | None = None
    v1_value: float | None = None
    v1_query: str = ""
    error: str | None = None


@dataclass(frozen=True)
class AnalysisObservation:
    """One check: the traffic gate (v2 requests in the window) and each criterion's numbers."""

    requests: Measurement
    measurements: Mapping[str, Measurement]  # by criterion name


@dataclass(frozen=True)
class RoutingObservation:
    """The routing row as last read (``None`` in :class:`Observations`: not read this tick)."""

    percentage: int
    emergency: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ProgressObservation:
    """Migration counts read from the database."""

    total: int
    migrated: int
    pending: int
    failed_batches: int = 0
    oldest_pending_seconds: float | None = None
    by_category: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # (total, migrated)
    counts: CountsKind = CountsKind.MAINTAINED
    counted_since: datetime | None = None  # maintained: when the counters were last counted


@dataclass(frozen=True)
class Observations:
    """Everything the drivers saw this tick. Absent parts are simply not known this tick."""

    jobs: Mapping[str, JobObservation] = field(default_factory=dict)  # by Job name
    progress: ProgressObservation | None = None
    analysis: AnalysisObservation | None = None  # None: no check ran this tick
    alerts: tuple[str, ...] = ()  # firing alerts labelled with this migration
    routing: RoutingObservation | None = None
    database_error: str | None = None  # the database could not be read (a condition, not a crash)
    # What the spec names and the operator may not use (core.allowlist): the spec is held.
    refusals: tuple[Refusal, ...] = ()


# ---- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    """Run ``embedshift <args>`` as a Job named ``name`` (creating an existing one is success)."""

    name: str
    kind: JobKind
    args: tuple[str, ...]
    shard: int | None = None


@dataclass(frozen=True)
class EnsureFollower:
    """Keep exactly one ``embedshift migrate follow`` running under this name (stop others)."""

    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class SetPercentage:
    """Write the routing row (and NOTIFY). ``clear_emergency`` only when a rollout (re)starts."""

    percentage: int
    reason: str
    clear_emergency: bool = False


@dataclass(frozen=True)
class EmitEvent:
    """Tell people: a Kubernetes Event, a line in ``rollout run``'s view."""

    type: str  # Normal | Warning
    reason: str  # CamelCase
    message: str


@dataclass(frozen=True)
class DropSource:
    """Cleanup: drop the v1 embedding column (only with ``cleanup.dropSource``)."""

    column: str


Action = RunJob | EnsureFollower | SetPercentage | EmitEvent | DropSource


_A = TypeVar("_A")


@dataclass(frozen=True)
class Decision:
    status: EmbeddingMigrationStatus
    actions: tuple[Action, ...]

    def of_type(self, kind: type[_A]) -> list[_A]:
        return [a for a in self.actions if isinstance(a, kind)]
