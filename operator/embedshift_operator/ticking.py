"""What both drivers of the core share, whatever runs their Jobs: when a tick checks the
analysis, when it sleeps, and the check itself through Prometheus.

``embedshift rollout run`` (:mod:`.local`) and the kopf operator (:mod:`.handlers`) tick the same
way: observe → :func:`embedshift_operator.core.decide` → act → save. The pieces here hold no
driver's state of their own beyond the metric source a checker keeps between ticks.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta

from embedshift_operator.adapters.postgres import ControlStore
from embedshift_operator.adapters.prometheus import PrometheusSource
from embedshift_operator.core import (
    AnalysisObservation,
    MetricSource,
    MetricSourceError,
    ProgressObservation,
    RoutingObservation,
    measure,
    plan_analysis,
)
from embedshift_operator.core.allowlist import Allowlist
from embedshift_operator.resource import (
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    Phase,
    parse_duration,
)
from rag_service.errors import ConfigError, EmbedshiftError

__all__ = [
    "CHECKED",
    "NO_PROGRESS",
    "AnalysisChecker",
    "DatabaseReading",
    "NoPrometheus",
    "check_due",
    "read_database",
    "seconds_to_next_tick",
]

# The phases whose ticks run an analysis check (Succeeded routes v2 but judges nothing more).
CHECKED = (Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED)
# The phases with nothing to count yet (no side table) or any more (failed): progress is not read.
NO_PROGRESS = (Phase.PENDING, Phase.PREPARING, Phase.FAILED)
_MIN_PAUSE = 0.05  # never spin, whatever the clock says
_EARLY = timedelta(milliseconds=200)  # a tick woken a little early still checks


def seconds_to_next_tick(
    spec: EmbeddingMigrationSpec, status: EmbeddingMigrationStatus, now: datetime, *, tick: float
) -> float:
    """How long the driver sleeps after a tick: ``tick``, or less when an analysis check falls
    due sooner. Pure.

    Waking only every ``tick`` would run a check at the first tick after it is due: with a 2 s
    interval and 0.5 s ticks, every 2.0-2.5 s plus each tick's own work, so a breach could wait
    longer than one interval. Waking when it is due keeps checks ``analysis.interval`` apart.
    """
    last = status.analysis.time
    if status.phase not in CHECKED or last is None:
        return tick
    due = last + parse_duration(spec.analysis.interval)
    return min(tick, max(_MIN_PAUSE, (due - now).total_seconds()))


def check_due(
    spec: EmbeddingMigrationSpec, status: EmbeddingMigrationStatus, now: datetime
) -> bool:
    """Whether this tick runs an analysis check. Pure."""
    if status.phase not in CHECKED:
        return False
    last = status.analysis.time
    return last is None or now - last >= parse_duration(spec.analysis.interval) - _EARLY


class NoPrometheus:
    """The metric source when Prometheus cannot be asked (``spec.analysis.prometheus`` missing,
    or a token no header can carry): every check says why, and nothing promotes."""

    def __init__(
        self,
        why: str = "spec.analysis.prometheus is not set: nothing can be measured, so nothing "
        "promotes",
    ) -> None:
        self._why = why

    async def query(self, promql: str) -> float | None:
        raise MetricSourceError(self._why)

    async def aclose(self) -> None:
        return None


class AnalysisChecker:
    """One migration's analysis checks; keeps its Prometheus client while URL and token hold.

    ``tls``: the SSL context its clients use (one per process when many checkers run);
    ``allowlist``: the operator's (a Prometheus outside its endpoints is never asked)."""

    def __init__(
        self,
        *,
        migration: str,
        tls: ssl.SSLContext | None = None,
        allowlist: Allowlist | None = None,
    ) -> None:
        self._migration = migration
        self._tls = tls
        self._allowlist = allowlist
        self._source: MetricSource | None = None
        self._key: tuple[str | None, str | None] | None = None

    async def check(
        self,
        spec: EmbeddingMigrationSpec,
        *,
        token: str | None,
        progress: ProgressObservation | None,
    ) -> AnalysisObservation:
        prometheus = spec.analysis.prometheus
        key = (prometheus.url if prometheus else None, token)
        if self._source is None or self._key != key:
            await self.aclose()
            try:
                self._source = (
                    PrometheusSource(
                        url=prometheus.url,
                        bearer_token=token,
                        tls=self._tls,
                        allowlist=self._allowlist,
                    )
                    if prometheus
                    else NoPrometheus()
                )
            except ConfigError as exc:  # its words never quote the URL's password or the token
                self._source = NoPrometheus(f"{exc}: nothing can be measured, so nothing promotes")
            self._key = key
        plan = plan_analysis(spec, migration=self._migration)
        return await measure(self._source, plan, progress=progress)

    async def aclose(self) -> None:
        if self._source is not None:
            closer = getattr(self._source, "aclose", None)
            if closer is not None:
                await closer()
            self._source = None
            self._key = None


@dataclass(frozen=True)
class DatabaseReading:
    """What a tick read from the database; each failed read is one line in ``errors``."""

    routing: RoutingObservation | None
    progress: ProgressObservation | None
    errors: tuple[str, ...]


async def read_database(store: ControlStore, *, with_progress: bool) -> DatabaseReading:
    """The routing row and, when asked, migration progress. Never raises for the database: a
    failed read becomes an error line (the core turns it into a condition) and the tick goes on.
    """
    errors: list[str] = []
    routing = progress = None
    try:
        routing = await store.routing()
    except EmbedshiftError as exc:
        errors.append(str(exc))
    if with_progress:
        try:
            progress = await store.progress()
        except EmbedshiftError as exc:
            errors.append(str(exc))
    return DatabaseReading(routing=routing, progress=progress, errors=tuple(errors))
