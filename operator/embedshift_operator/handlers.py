"""The kopf operator: the cluster's driver of the core (``embedshift rollout run`` is the other).

Handlers stay thin. One daemon per ``EmbeddingMigration`` ticks like the local driver:
read the resource → observe (Jobs, the routing row and progress when the database Secret can be
read, an analysis check when due, firing alerts) → :func:`embedshift_operator.core.decide` →
act (Jobs, the follower, the routing row, Events) → patch ``status`` through the API. It ticks
every ``analysis.interval`` and at once when woken: by a spec change (``on.field("spec")``) or
by an alert for this resource. Every counter lives in ``status``, so a restarted operator
decides the same. Handler return values are never written into status (every handler returns
None; kopf's own progress lives in annotations).

A missing database Secret, or a database that cannot be reached, is a status message (and the
core's condition, Ready False DatabaseUnreachable), retried with backoff; never a crash. Without
the Secret the phase holds and nothing is acted on (a Job's Pod could not start without it).
Deletion routes 0 % before the finalizer goes; data is kept.

With ``OperatorConfig.metrics`` set, every tick is recorded (:class:`OperatorMetrics`), every
error a tick survives is counted by kind, and a deleted resource's series are forgotten.

kopf is imported here only. :func:`configure` sets what the process provides (the kubernetes
client's configuration, the operator's image, the alert receiver); ``embedshift operator run``
and the tests call it before kopf starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from embedshift_operator.adapters.alerts import AlertReceiver
from embedshift_operator.adapters.kube import (
    APP,
    COMPONENT_JOB,
    LABEL_COMPONENT,
    LABEL_NAME,
    ClusterError,
    KubeJobs,
    patch_status,
    read_migration,
    read_secret,
)
from embedshift_operator.adapters.operator_metrics import OperatorMetrics
from embedshift_operator.adapters.postgres import DEFAULT_STATEMENT_TIMEOUT, ControlStore
from embedshift_operator.core import (
    Action,
    Allowlist,
    AnalysisObservation,
    Decision,
    DropSource,
    EmitEvent,
    EnsureFollower,
    Observations,
    RunJob,
    SetPercentage,
    decide,
    refusals,
    settle_drop,
)
from embedshift_operator.core.allowlist import REFUSAL_REASONS
from embedshift_operator.resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ConditionType,
    EmbeddingMigration,
    EmbeddingMigrationStatus,
    parse_duration,
    parse_migration,
)
from embedshift_operator.ticking import (
    NO_PROGRESS,
    AnalysisChecker,
    DatabaseReading,
    check_due,
    read_database,
    seconds_to_next_tick,
)
from rag_service import __version__
from rag_service.errors import ConfigError, EmbedshiftError
from rag_service.schema import ROLLOUT_TABLE, check_database_url
from rag_service.spec import SecretKeyRef

__all__ = [
    "GROUP",
    "HANDLER_IDS",
    "PLURAL",
    "USER_AGENT",
    "VERSION",
    "OperatorConfig",
    "configure",
    "held_status",
]

log = logging.getLogger("embedshift.operator")

ANNOTATION_PREFIX = "embedshift.io"
# The User-Agent of the operator's own API calls (the handlers' client; kopf's are kopf's), so an
# API server's audit log, or a test's recording, tells them from anyone else's.
USER_AGENT = f"embedshift-operator/{__version__}"
# Backoff while the database Secret is missing or the database cannot be reached.
_BACKOFF_FIRST = 1.0
_BACKOFF_MAX = 60.0
# Seconds to the tick after one that changed the phase.
_AFTER_TRANSITION = 0.1


@dataclass
class OperatorConfig:
    """What the process gives the handlers. ``kube`` None: in-cluster, else the kubeconfig."""

    kube: client.Configuration | None = None
    operator_image: str | None = None
    receiver: AlertReceiver | None = None
    metrics: OperatorMetrics | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # Seconds a deletion waits for an unreachable database before it lets go (see _deleted).
    deletion_timeout: float = 300.0
    # Seconds each statement of the control loop may run (adapters.postgres); None: no limit.
    statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT
    # The images the Jobs may run and the hosts the spec's URLs may name (core.allowlist); a
    # spec outside is held with ImageNotAllowed/EndpointNotAllowed. `operator run` sets it from
    # --allowed-image/--allowed-endpoint (default there: the operator's own image only).
    allowlist: Allowlist = field(default_factory=Allowlist.unrestricted)


@dataclass
class _Runtime:
    config: OperatorConfig = field(default_factory=OperatorConfig)
    api: client.ApiClient | None = None
    wakers: dict[str, asyncio.Event] = field(default_factory=dict)
    # One SSL context for every resource's Prometheus client: each context holds its own copy
    # of the CA bundle (about 1 MB), which with 50 resources was a third of the operator's RSS.
    tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)


_runtime = _Runtime()


def configure(config: OperatorConfig) -> None:
    """Set the process's configuration (before kopf starts)."""
    _runtime.config = config
    _runtime.api = None
    _runtime.wakers.clear()


def _api() -> client.ApiClient:
    if _runtime.api is None:
        configuration = _runtime.config.kube
        if configuration is None:
            from kubernetes import config as kubeconfig

            try:
                kubeconfig.load_incluster_config()  # type: ignore[no-untyped-call]
            except kubeconfig.ConfigException:
                kubeconfig.load_kube_config()  # type: ignore[no-untyped-call]
            configuration = client.Configuration.get_default_copy()
        api = client.ApiClient(configuration)
        api.user_agent = USER_AGENT
        _runtime.api = api
    return _runtime.api


def _waker(key: str) -> asyncio.Event:
    return _runtime.wakers.setdefault(key, asyncio.Event())


# ---- kopf's settings and login ----------------------------------------------------------------


# kopf keeps a handler's retries and progress in an annotation named after the handler's id
# (ANNOTATION_PREFIX/<id>); by default the id is the function's name, and a name starting with
# "_" is no valid annotation key: the real API server refuses the patch (422), so a deletion
# that must wait for the database never finished. Explicit ids, valid annotation names.
HANDLER_IDS = {"spec": "spec-changed", "loop": "rollout-loop", "delete": "route-zero-on-delete"}


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's own state in annotations, never in status: status is the resource's story only.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    settings.posting.level = logging.WARNING  # our Events are EmitEvent actions, not log lines


@kopf.on.login()
async def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    configuration = _runtime.config.kube
    if configuration is None:
        return kopf.login_via_client(**kwargs)
    return _connection_info(configuration)


def _connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the client's configuration, read as ``kopf.login_via_client``
    reads the default one. The token is asked for on every login (kopf logs in again on a 401)
    through the configuration's refresh hook, so a rotated service-account token or an exec
    plugin's fresh one is used, not the one read at start-up."""
    header = configuration.get_api_key_with_prefix(
        "BearerToken"
    ) or configuration.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


# ---- the per-resource loop ----------------------------------------------------------------------


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec", id=HANDLER_IDS["spec"])
async def _spec_changed(namespace: str | None, name: str | None, **_: Any) -> None:
    """A spec edit wakes the loop at once (``maxPercentage: 0`` must not wait an interval)."""
    _waker(f"{namespace}/{name}").set()


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_NAME: APP, LABEL_COMPONENT: COMPONENT_JOB})
async def _job_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    """A Job of ours that finished wakes its migration's loop: the next step starts now, not
    up to an ``analysis.interval`` later (30 s by default, for each step of the pipeline)."""
    conditions = (body.get("status") or {}).get("conditions") or []
    if not any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions
    ):
        return
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == KIND and owner.get("apiVersion") == API_VERSION:
            waker = _runtime.wakers.get(f"{namespace}/{owner.get('name')}")
            if waker is not None:
                waker.set()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0, id=HANDLER_IDS["loop"])
async def _rollout_loop(
    namespace: str | None, name: str | None, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    key = f"{namespace}/{name}"
    assert namespace is not None and name is not None
    loop = _Loop(namespace=namespace, name=name)
    try:
        await loop.run(stopped=stopped)
    finally:
        await loop.aclose()
        _runtime.wakers.pop(key, None)
        if _runtime.config.receiver is not None:
            _runtime.config.receiver.forget(key)


@kopf.on.delete(GROUP, VERSION, PLURAL, id=HANDLER_IDS["delete"])
async def _deleted(
    body: kopf.Body,
    namespace: str | None,
    name: str | None,
    retry: int,
    runtime: timedelta,
    **_: Any,
) -> None:
    """Route 0 % to v2 before the resource goes. Data is kept (nothing is dropped).

    While the database cannot be reached the deletion waits and retries with backoff, for
    ``OperatorConfig.deletion_timeout``; then it lets go with a Warning Event naming the row
    to reset by hand, rather than hold the resource (and a namespace being deleted, whose
    Secret may already be gone) in Terminating forever.
    """
    resource = parse_migration(dict(body), where=f"{namespace}/{name}")
    metrics = _runtime.config.metrics
    try:
        url = await _read_database_url(resource)
        store = _store(resource, url)
        if await store.routing() is not None:  # None: setup never ran, nothing is routed
            await store.set_percentage(
                SetPercentage(percentage=0, reason="the EmbeddingMigration was deleted")
            )
    except EmbedshiftError as exc:
        if metrics is not None:
            metrics.count_error(resource.key, _error_kind(exc))
        if runtime.total_seconds() < _runtime.config.deletion_timeout:
            raise kopf.TemporaryError(
                f"cannot route 0 % before deletion: {exc}", delay=_backoff(retry + 1)
            ) from None
        kopf.warn(
            body,
            reason="RoutingNotReset",
            message=(
                f"deleted without routing 0 % ({exc}); v2 may still be served: reset it with "
                f"UPDATE {_rollout_table(resource)} SET percentage = 0 "
                f"WHERE migration = '{resource.key}'"
            ),
        )
    else:
        # kopf.event, not kopf.info: info obeys posting.level, which keeps kopf's own log lines
        # out of Events (WARNING), and so never posted this one.
        kopf.event(
            body,
            type="Normal",
            reason="RoutedToV1",
            message="deleted: 0 % to v2; the data is kept",
        )
    if metrics is not None:
        metrics.forget(resource.key)


class _Loop:
    """One resource's ticks: its Jobs runner, analysis checker and the database backoff."""

    def __init__(self, *, namespace: str, name: str) -> None:
        self._namespace = namespace
        self._name = name
        self._key = f"{namespace}/{name}"
        config = _runtime.config
        self._jobs = KubeJobs(
            _api(), operator_image=config.operator_image, allowlist=config.allowlist
        )
        self._checker = AnalysisChecker(
            migration=self._key, tls=_runtime.tls, allowlist=config.allowlist
        )
        self._failures = 0

    async def run(self, *, stopped: kopf.DaemonStopped) -> None:
        receiver = _runtime.config.receiver
        wakers = [_waker(self._key)]
        if receiver is not None:
            wakers.append(receiver.subscribe(self._key))
        while not stopped:
            pause = await self._tick_safely()
            await _sleep(wakers=wakers, seconds=pause, stopped=stopped)

    async def _tick_safely(self) -> float:
        """One tick; returns the seconds until the next. Nothing here ends the loop."""
        try:
            return await self.tick()
        except (EmbedshiftError, ApiException) as exc:
            self._count_error(_error_kind(exc))
            self._failures += 1
            pause = _backoff(self._failures)
            log.warning("%s: tick failed (%s); retrying in %.0f s", self._key, exc, pause)
            return pause

    def _count_error(self, kind: str) -> None:
        if _runtime.config.metrics is not None:
            _runtime.config.metrics.count_error(self._key, kind)

    async def tick(self) -> float:
        started = time.monotonic()
        now = _runtime.config.clock()
        resource = await read_migration(api=_api(), namespace=self._namespace, name=self._name)
        status = resource.status
        database_url: str | None = None
        secret_error: str | None = None
        try:
            database_url = await _read_database_url(resource)
        except ConfigError as exc:
            secret_error = str(exc)
        observations = await self._observe(
            resource=resource, database_url=database_url, secret_error=secret_error, now=now
        )
        decision = decide(resource.spec, status, observations, now, name=self._name)
        interval = parse_duration(resource.spec.analysis.interval).total_seconds()
        if database_url is None:
            # Without the database Secret nothing can be done (a Job would wait for the Secret
            # in a Pod that cannot start): hold the phase, report the problem, retry. A refused
            # spec's Warning (ImageNotAllowed…) is still said: the Ready condition says it too.
            for event in decision.of_type(EmitEvent):
                if event.reason in REFUSAL_REASONS:
                    emit_event(resource=resource, action=event)
            await patch_status(
                api=_api(),
                namespace=self._namespace,
                name=self._name,
                status=held_status(
                    status,
                    decision,
                    message=f"{observations.database_error}; retrying",
                    generation=resource.metadata.generation,
                ),
            )
            self._count_error("database")
            self._failures += 1
            return min(interval, _backoff(self._failures))
        new_status = await self._act(
            resource=resource, decision=decision, database_url=database_url, now=now
        )
        if resource.metadata.generation is not None:
            new_status = new_status.model_copy(
                update={"observed_generation": resource.metadata.generation}
            )
        if observations.database_error:
            new_status = new_status.model_copy(
                update={"message": f"{observations.database_error}; retrying"}
            )
        await patch_status(
            api=_api(), namespace=self._namespace, name=self._name, status=new_status
        )
        if _runtime.config.metrics is not None:
            seconds = time.monotonic() - started
            _runtime.config.metrics.record(self._key, status, decision, seconds=seconds)
        if observations.database_error:
            self._count_error("database")
            self._failures += 1
            return min(interval, _backoff(self._failures))
        self._failures = 0
        if new_status.phase != status.phase:
            # decide() takes one step per call (a new phase, then its Jobs): take the next at
            # once rather than an interval later, as the local driver's 1 s tick does.
            return _AFTER_TRANSITION
        return seconds_to_next_tick(resource.spec, new_status, now, tick=interval)

    async def _observe(
        self,
        *,
        resource: EmbeddingMigration,
        database_url: str | None,
        secret_error: str | None,
        now: datetime,
    ) -> Observations:
        errors: list[str] = [secret_error] if secret_error else []
        status = resource.status
        allowlist = _runtime.config.allowlist
        refused = refusals(resource.spec, allowlist, operator_image=_runtime.config.operator_image)

        async def database_then_analysis() -> tuple[
            DatabaseReading | None, AnalysisObservation | None
        ]:
            reading = None
            if database_url is not None:
                store = _store(resource, database_url)
                reading = await read_database(store, with_progress=status.phase not in NO_PROGRESS)
            receiver = _runtime.config.receiver
            if not check_due(resource.spec, status, now) or (
                receiver is not None and receiver.firing(resource.key)
            ):
                # A firing alert rolls back whatever Prometheus says: act without asking it.
                return reading, None
            token = None
            prometheus = resource.spec.analysis.prometheus
            if prometheus is not None and not allowlist.url_allowed(prometheus.url):
                return reading, None  # refused (EndpointNotAllowed): no token read, nothing sent
            if prometheus is not None and prometheus.bearer_token_secret_ref is not None:
                with contextlib.suppress(ConfigError):
                    token = await read_secret(
                        api=_api(),
                        namespace=self._namespace,
                        ref=prometheus.bearer_token_secret_ref,
                    )
            progress = reading.progress if reading is not None else None
            return reading, await self._checker.check(resource.spec, token=token, progress=progress)

        # The API server and the database/Prometheus answer independently: ask them at once, so
        # a tick (and an alert's rollback waiting for it) costs the slower, not the sum.
        jobs, (reading, analysis) = await asyncio.gather(
            self._jobs.observe(resource), database_then_analysis()
        )
        routing = reading.routing if reading is not None else None
        progress = reading.progress if reading is not None else None
        if reading is not None:
            errors.extend(reading.errors)
        receiver = _runtime.config.receiver
        return Observations(
            jobs=jobs,
            progress=progress,
            analysis=analysis,
            alerts=receiver.firing(resource.key) if receiver is not None else (),
            routing=routing,
            database_error="; ".join(errors) or None,
            refusals=refused,
        )

    async def _act(
        self,
        *,
        resource: EmbeddingMigration,
        decision: Decision,
        database_url: str | None,
        now: datetime,
    ) -> EmbeddingMigrationStatus:
        """Carry out the decision's actions; the status to write (a DROP's outcome changes it)."""
        status = decision.status
        store = _store(resource, database_url) if database_url is not None else None
        for action in decision.actions:
            try:
                if isinstance(action, RunJob):
                    if await self._jobs.run_job(resource, action):
                        log.info("%s: created Job %s", resource.key, action.name)
                elif isinstance(action, EnsureFollower):
                    if await self._jobs.ensure_follower(resource, action):
                        log.info("%s: created the follower %s", resource.key, action.name)
                elif isinstance(action, SetPercentage):
                    if store is None:
                        raise ConfigError("no database URL: the routing row cannot be written")
                    await store.set_percentage(action)
                elif isinstance(action, EmitEvent):
                    emit_event(resource=resource, action=action)
                elif isinstance(action, DropSource):
                    if store is None:
                        raise ConfigError("no database URL: the source column cannot be dropped")
                    error = await store.drop_source(action.column)
                    settled = settle_drop(resource.spec, status, action, error=error, now=now)
                    status = settled.status
                    for event in settled.of_type(EmitEvent):
                        emit_event(resource=resource, action=event)
            except EmbedshiftError as exc:
                # The next tick decides again from the same status: a failed action is retried.
                self._count_error(_action_error_kind(action))
                log.warning(
                    "%s: %s failed: %s; retrying next tick",
                    resource.key,
                    type(action).__name__,
                    exc,
                )
        return status

    async def aclose(self) -> None:
        await self._checker.aclose()


# ---- keyword-only helpers -----------------------------------------------------------------------


def _backoff(failures: int) -> float:
    return float(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** max(0, failures - 1)))


def _error_kind(exc: Exception) -> str:
    """The ``kind`` label of a tick's error: the API server or the database."""
    if isinstance(exc, (ApiException, ClusterError)):
        return "kubernetes"
    if isinstance(exc, ConfigError):
        return "config"
    return "database"


def _action_error_kind(action: Action) -> str:
    if isinstance(action, (RunJob, EnsureFollower)):
        return "jobs"
    if isinstance(action, EmitEvent):
        return "events"
    return "database"


def held_status(
    status: EmbeddingMigrationStatus,
    decision: Decision,
    *,
    message: str,
    generation: int | None,
) -> EmbeddingMigrationStatus:
    """What a tick that cannot act (no database) writes: ``status`` unchanged but for
    ``message``, the decision's Ready condition (DatabaseUnreachable) and Stalled condition, and
    ``generation`` as observedGeneration, as the normal path writes it: the spec was read and the
    conditions say why nothing moves (kstatus and the Argo CD health check read a status whose
    observedGeneration is behind as not having seen the spec at all).

    Stalled is the decision's, made on the observed spec (a spec edit after Failed is no longer
    stalled), unless it is True for a phase the decision could not enter (a rollback not yet
    written to the routing row): that one keeps the previous Stalled.
    """
    decided = {c.type: c for c in decision.status.conditions}
    taken = {ConditionType.READY}
    stalled = decided.get(ConditionType.STALLED)
    if stalled is not None and (stalled.status != "True" or decision.status.phase == status.phase):
        taken.add(ConditionType.STALLED)
    kept = {c.type: c for c in status.conditions if c.type not in taken}
    conditions = [
        decided[kind] if kind in taken else kept[kind]
        for kind in decided  # the decision's order
        if kind in taken or kind in kept
    ]
    update: dict[str, object] = {"message": message, "conditions": conditions}
    if generation is not None:
        update["observed_generation"] = generation
    return status.model_copy(update=update)


async def _read_database_url(resource: EmbeddingMigration) -> str:
    """The database URL from the resource's Secret; ConfigError naming the Secret, never its
    value, when it is missing or is no PostgreSQL URL libpq can use."""
    ref = _db_ref(resource)
    url = await read_secret(api=_api(), namespace=resource.metadata.namespace, ref=ref)
    where = f"the Secret {resource.metadata.namespace}/{ref.name} (key {ref.key!r})"
    check_database_url(url, source=where)
    return url


def _store(resource: EmbeddingMigration, url: str) -> ControlStore:
    return ControlStore(
        url=url,
        spec=resource.spec,
        migration=resource.key,
        statement_timeout=_runtime.config.statement_timeout,
    )


def _rollout_table(resource: EmbeddingMigration) -> str:
    schema = resource.spec.database.table_name.schema
    return f"{schema}.{ROLLOUT_TABLE}" if schema else ROLLOUT_TABLE


def _db_ref(resource: EmbeddingMigration) -> SecretKeyRef:
    ref = resource.spec.database.url_secret_ref
    if ref is None:
        raise ConfigError(
            f"{resource.key}: spec.database.urlSecretRef is not set: the operator reads the "
            "database URL from a Secret"
        )
    return ref


async def _sleep(
    *, wakers: list[asyncio.Event], seconds: float, stopped: kopf.DaemonStopped
) -> None:
    """Sleep ``seconds``, or less when a waker is set (and clear it) or the daemon is stopped
    (the operator is shutting down or the resource is deleted: exit now, not after a tick)."""

    async def stopping() -> None:
        await stopped.wait()

    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(w.wait()) for w in wakers]
    waits.append(asyncio.ensure_future(stopping()))
    try:
        await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        for waker in wakers:
            waker.clear()


def emit_event(*, resource: EmbeddingMigration, action: EmitEvent) -> None:
    """A Kubernetes Event on the resource (kopf posts it in the background)."""
    target: dict[str, Any] = {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {
            "name": resource.metadata.name,
            "namespace": resource.metadata.namespace,
            "uid": resource.metadata.uid,
        },
    }
    kopf.event(
        kopf.Body(cast("kopf.RawBody", target)),
        type=action.type,
        reason=action.reason,
        message=action.message,
    )
