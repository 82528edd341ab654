"""``embedshift rollout run FILE``: the rollout on one machine, no cluster.

The second driver of the core (the kopf operator is the other). Every tick (about a second) it:

1. re-reads FILE — editing it is the local GitOps: ``maxPercentage: 0`` routes 0 % within a
   tick, a new step list restarts at the first step. A file that no longer parses is reported
   and ignored (the last good spec stays in force; nothing is acted on from a broken file);
2. observes: the Jobs (supervised subprocesses, :mod:`.adapters.subprocess_jobs`), the routing
   row, migration progress and the follower's lag (every few seconds), and, every
   ``analysis.interval`` while v2 takes traffic, one analysis check through Prometheus;
3. calls :func:`embedshift_operator.core.decide` and carries out its actions (Jobs, the
   follower, the routing row, events);
4. saves the status in the database (``embedshift_rollout_status``), so a killed driver resumes
   exactly where it was; Jobs it started keep running without it and are adopted on rerun.

Its own statements run under ``statement_timeout`` (``--statement-timeout``, see
:mod:`.adapters.postgres`); its Jobs' do not. A cleanup DROP's outcome is recorded by
:func:`embedshift_operator.core.settle_drop`, as the operator records it.

Secret references resolve from the environment (``rag-db``/``url`` → ``RAG_DB_URL``), falling
back to the usual variables: ``DATABASE_URL``, ``EMBEDSHIFT_TARGET_API_KEY`` / ``OPENAI_API_KEY`` /
``GEMINI_API_KEY``. Children get ``DATABASE_URL`` and ``EMBEDSHIFT_{TARGET,SOURCE}_API_KEY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import psycopg

from embedshift_operator.adapters.postgres import (
    DEFAULT_STATEMENT_TIMEOUT,
    ControlStore,
    control_conninfo,
)
from embedshift_operator.adapters.subprocess_jobs import SubprocessJobs
from embedshift_operator.core import (
    Decision,
    DropSource,
    EmitEvent,
    EnsureFollower,
    Observations,
    ProgressObservation,
    RunJob,
    SetPercentage,
    decide,
    settle_drop,
)
from embedshift_operator.resource import (
    EmbeddingMigration,
    EmbeddingMigrationStatus,
    Phase,
    load_migration,
)
from embedshift_operator.ticking import (
    NO_PROGRESS,
    AnalysisChecker,
    check_due,
    read_database,
    seconds_to_next_tick,
)
from rag_service.errors import ConfigError, DatabaseError, EmbedshiftError
from rag_service.providers import Role, api_key_from_env
from rag_service.schema import connect
from rag_service.spec import EmbeddingSpec, SecretKeyRef

log = logging.getLogger("embedshift.rollout")

__all__ = [
    "LocalDriver",
    "RolloutView",
    "prometheus_token",
    "resolve_environment",
    "seconds_to_next_tick",
    "secret_variable",
]

_PROGRESS_EVERY = timedelta(seconds=3)


def secret_variable(ref: SecretKeyRef) -> str:
    """The environment variable a Secret reference resolves from locally. Pure.

    ``{name: rag-db, key: url}`` → ``RAG_DB_URL``: name and key, upper-cased, joined by ``_``,
    every other character turned into ``_``.
    """
    return re.sub(r"[^A-Z0-9]+", "_", f"{ref.name}_{ref.key}".upper()).strip("_")


def _secret(ref: SecretKeyRef | None, environ: Mapping[str, str]) -> str | None:
    return environ.get(secret_variable(ref)) or None if ref is not None else None


@dataclass(frozen=True)
class Environment:
    database_url: str
    children: dict[str, str]  # the Jobs' environment
    prometheus_token: str | None


def resolve_environment(resource: EmbeddingMigration, environ: Mapping[str, str]) -> Environment:
    """The database URL, the children's environment and the Prometheus token. Pure."""
    spec = resource.spec
    ref = spec.database.url_secret_ref
    url = _secret(ref, environ) or environ.get("DATABASE_URL")
    if not url:
        hint = f"export {secret_variable(ref)} or DATABASE_URL" if ref else "export DATABASE_URL"
        raise ConfigError(f"spec.database: no database URL: {hint}=postgresql://user@host/db")
    children = dict(environ)
    children["DATABASE_URL"] = url
    roles: tuple[tuple[Role, EmbeddingSpec | None], ...] = (
        ("target", spec.target),
        ("source", spec.source),
    )
    for role, model in roles:
        if model is None:
            continue
        key = _secret(model.api_key_secret_ref, environ) or api_key_from_env(model, role, environ)
        if key:
            children[f"EMBEDSHIFT_{role.upper()}_API_KEY"] = key
    return Environment(
        database_url=url, children=children, prometheus_token=prometheus_token(resource, environ)
    )


def prometheus_token(resource: EmbeddingMigration, environ: Mapping[str, str]) -> str | None:
    """The bearer token ``analysis.prometheus.bearerTokenSecretRef`` names, if any. Pure."""
    prometheus = resource.spec.analysis.prometheus
    return _secret(prometheus.bearer_token_secret_ref, environ) if prometheus else None


class RolloutView(Protocol):
    """Where the driver tells people what happens (a live panel, JSON lines, a log)."""

    def update(self, resource: EmbeddingMigration, status: EmbeddingMigrationStatus) -> None: ...

    def event(self, time: datetime, kind: str, reason: str, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


class LocalDriver:
    """Drives one EmbeddingMigration file until ``stop`` is set or ``until`` phases are reached."""

    def __init__(
        self,
        path: Path,
        *,
        view: RolloutView,
        environ: Mapping[str, str],
        command: list[str] | None = None,
        log_dir: Path | None = None,
        tick_seconds: float = 1.0,
        until: frozenset[Phase] = frozenset(),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        self._path = path
        self._view = view
        self._environ = dict(environ)
        self._command = command or [sys.executable, "-m", "embedshift_operator.cli"]
        self._log_dir = log_dir
        self._tick = tick_seconds
        self._until = until
        self._clock = clock
        self._statement_timeout = statement_timeout
        self._resource = load_migration(path)  # a broken file at start is the user's error
        self._env = resolve_environment(self._resource, self._environ)
        # One runner for the driver's life: it keeps the processes it started, to reap them.
        self._runner = self._make_runner()
        self._status: EmbeddingMigrationStatus | None = None
        self._progress: ProgressObservation | None = None
        self._progress_at: datetime | None = None
        self._checker = AnalysisChecker(migration=self.key)
        self._lock: psycopg.AsyncConnection[Any] | None = None

    @property
    def resource(self) -> EmbeddingMigration:
        return self._resource

    @property
    def key(self) -> str:
        return self._resource.key

    def _store(self) -> ControlStore:
        return ControlStore(
            url=self._env.database_url,
            spec=self._resource.spec,
            migration=self.key,
            statement_timeout=self._statement_timeout,
        )

    def _control_url(self) -> str:
        """The database as the driver's own statements reach it: under the statement timeout.
        The Jobs get the URL as it is (``Environment.children``)."""
        return control_conninfo(self._env.database_url, self._statement_timeout)

    def _make_runner(self) -> SubprocessJobs:
        key = self.key
        log_dir = self._log_dir or Path.home() / ".local/state/embedshift" / key.replace("/", "_")
        return SubprocessJobs(
            url=self._control_url(),
            migration=key,
            schema=self._resource.spec.database.table_name.schema,
            command=self._command,
            common_args=["--config", str(self._path.resolve()), "--migration", key],
            env=self._env.children,
            log_dir=log_dir,
        )

    async def run(self, stop: asyncio.Event) -> EmbeddingMigrationStatus:
        """Tick until ``stop`` or an ``until`` phase; Jobs and the follower are stopped on the
        way out (they resume when the driver runs again). Returns the last status."""
        await self._take_lock()
        try:
            await self._store().ensure_tables()
            await self._runner.ensure_table()
            self._status = await self._store().load_status()
            if self._status is not None:
                log.info(
                    "resuming %s at %s (%d %%)",
                    self.key,
                    self._status.phase.value,
                    self._status.percentage,
                )
            while not stop.is_set():
                status = await self.tick()
                if status.phase in self._until:
                    break
                pause = seconds_to_next_tick(
                    self._resource.spec, status, self._clock(), tick=self._tick
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=pause)
        finally:
            with contextlib.suppress(EmbedshiftError):
                await self._runner.stop()
            await self._close()
        assert self._status is not None
        return self._status

    async def tick(self) -> EmbeddingMigrationStatus:
        """One observe → decide → act → save round."""
        self._reload()
        now = self._clock()
        status = self._status or EmbeddingMigrationStatus()
        observations = await self._observe(status, now)
        decision = decide(
            self._resource.spec, status, observations, now, name=self._resource.metadata.name
        )
        status = await self._act(decision, now)
        try:
            await self._store().save_status(status)
        except DatabaseError as exc:
            self._view.warn(f"status not saved this tick ({exc}); retrying next tick")
        self._status = status
        self._view.update(self._resource, status)
        return status

    def _reload(self) -> None:
        try:
            resource = load_migration(self._path)
        except ConfigError as exc:
            self._view.warn(f"{exc} — keeping the last good spec until the file is fixed")
            return
        if resource.key != self._resource.key:
            self._view.warn(
                f"{self._path}: metadata changed from {self._resource.key} to {resource.key}; "
                "a driver follows one migration: stop it and start one for the new name"
            )
            return
        self._resource = resource

    async def _observe(self, status: EmbeddingMigrationStatus, now: datetime) -> Observations:
        errors: list[str] = []
        store = self._store()
        jobs = {}
        try:
            jobs = await self._runner.observe()
        except DatabaseError as exc:
            errors.append(str(exc))
        with_progress = status.phase not in NO_PROGRESS and (
            self._progress_at is None or now - self._progress_at >= _PROGRESS_EVERY
        )
        reading = await read_database(store, with_progress=with_progress)
        errors.extend(reading.errors)
        if reading.progress is not None:
            self._progress, self._progress_at = reading.progress, now
        routing = reading.routing
        analysis = None
        if check_due(self._resource.spec, status, now):
            analysis = await self._checker.check(
                self._resource.spec, token=self._env.prometheus_token, progress=self._progress
            )
        return Observations(
            jobs=jobs,
            progress=self._progress,
            analysis=analysis,
            routing=routing,
            database_error="; ".join(errors) or None,
        )

    async def _act(self, decision: Decision, now: datetime) -> EmbeddingMigrationStatus:
        """Carry out the decision's actions; the status to save (a DROP's outcome changes it)."""
        status = decision.status
        store = self._store()
        jobs = self._runner
        for action in decision.actions:
            try:
                if isinstance(action, RunJob):
                    if await jobs.run_job(action):
                        log.info("started %s: embedshift %s", action.name, " ".join(action.args))
                elif isinstance(action, EnsureFollower):
                    if await jobs.ensure_follower(action):
                        log.info("started the follower %s", action.name)
                elif isinstance(action, SetPercentage):
                    await store.set_percentage(action)
                elif isinstance(action, EmitEvent):
                    self._view.event(now, action.type, action.reason, action.message)
                elif isinstance(action, DropSource):
                    error = await store.drop_source(action.column)
                    settled = settle_drop(self._resource.spec, status, action, error=error, now=now)
                    status = settled.status
                    for event in settled.of_type(EmitEvent):
                        self._view.event(now, event.type, event.reason, event.message)
            except EmbedshiftError as exc:
                # The next tick decides again from the same status: a failed action is retried.
                self._view.warn(f"{type(action).__name__} failed: {exc}; retrying next tick")
        return status

    async def _take_lock(self) -> None:
        """One driver per migration: a session advisory lock held for the driver's life."""
        conn = await connect(self._control_url(), autocommit=True)
        key = int.from_bytes(hashlib.sha256(f"rollout:{self.key}".encode()).digest()[:8], "big")
        key -= 1 << 63 if key >= 1 << 63 else 0
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", [key])
        row = await cur.fetchone()
        if not row or not row[0]:
            await conn.close()
            raise ConfigError(
                f"another `embedshift rollout run` is driving {self.key}; stop it first "
                "(or watch it with `embedshift rollout status`)"
            )
        self._lock = conn

    async def _close(self) -> None:
        await self._checker.aclose()
        if self._lock is not None:
            await self._lock.close()
            self._lock = None
