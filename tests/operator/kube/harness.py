"""The kopf operator under test: the real kopf (in its own thread, as ``KopfRunner`` runs it)
against the API-server emulator, with a real PostgreSQL behind a Secret created through the API.

No kubelet runs the Jobs: tests complete (or fail) each one by patching its status, and run the
real ``migrate setup`` when they complete the setup Job, so the routing row's table exists.
:meth:`Operator.restart` replaces the running operator with a new one; the emulator's record
of requests tells when the operator ticked and how often each Job was created.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from kopf.testing import KopfRunner
from kubernetes import client
from prometheus_client import CollectorRegistry, generate_latest

from embedshift_operator import handlers
from embedshift_operator.adapters.kube import CONTAINER, LABEL_KIND, as_model
from embedshift_operator.adapters.operator_metrics import OperatorMetrics
from embedshift_operator.resource import EmbeddingMigration, Phase, parse_migration
from rag_service.schema import setup
from tests.api_calls import is_operator
from tests.operator.kube.conftest import Cluster

NS = "rag"
NAME = "docs"
KEY = f"{NS}/{NAME}"
IMAGE = "ghcr.io/embedshift/embedshift:test"
TABLE = "handler_docs"
GROUP, VERSION, PLURAL = handlers.GROUP, handlers.VERSION, handlers.PLURAL

_T = TypeVar("_T")


def openai_spec(**migration: Any) -> dict[str, Any]:
    """``spec`` of a migration from ada-002 to 3-small@768 on the table ``documents``, the keys
    from Secrets; ``migration`` is ``spec.migration``."""
    key = {"name": "openai", "key": "api-key"}
    return {
        "database": {"urlSecretRef": {"name": "rag-db", "key": "url"}, "table": "documents"},
        "source": {
            "provider": "openai",
            "model": "text-embedding-ada-002",
            "dimensions": 1536,
            "apiKeySecretRef": key,
        },
        "target": {
            "provider": "openai",
            "model": "text-embedding-3-small",
            "dimensions": 768,
            "apiKeySecretRef": key,
        },
        "migration": migration,
    }


def manifest(
    *,
    interval: str = "1s",
    steps: tuple[tuple[int, str], ...] = ((10, "1h"), (100, "1h")),
    analysis: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The resource the tests apply: checks every ``interval``, ``steps`` as (percentage,
    minDuration); ``analysis`` adds keys to ``spec.analysis`` (a Prometheus, a window...)."""
    return {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "database": {"urlSecretRef": {"name": "rag-db", "key": "url"}, "table": TABLE},
            "source": {"provider": "openai", "model": "text-embedding-ada-002", "dimensions": 1536},
            "target": {"provider": "openai", "model": "text-embedding-3-small", "dimensions": 256},
            "migration": {"shards": 3, "parallelism": 2, "image": IMAGE},
            "rollout": {"steps": [{"percentage": p, "minDuration": d} for p, d in steps]},
            "analysis": {"interval": interval, **(analysis or {})},
        },
    }


def failed_pod(name: str, *, exit_code: int, log_tail: str) -> dict[str, Any]:
    """A Job's Pod whose container exited ``exit_code``, as a kubelet reports it: under
    ``FallbackToLogsOnError`` the termination message is the log's tail (the CLI's line last)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"containers": [{"name": CONTAINER, "image": IMAGE}]},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": CONTAINER,
                    "image": IMAGE,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Error",
                            "message": log_tail,
                        }
                    },
                }
            ],
        },
    }


def policy_failure(pod: str, code: int) -> dict[str, Any]:
    """The Job status the Job controller writes when a FailJob rule of the podFailurePolicy
    matched ``pod``'s exit ``code`` (its wording, Kubernetes 1.31-1.36)."""
    message = (
        f"Container {CONTAINER} for pod {NS}/{pod} failed with exit code {code} "
        "matching FailJob rule at index 0"
    )
    return {
        "failed": 1,
        "conditions": [
            {"type": kind, "status": "True", "reason": "PodFailurePolicy", "message": message}
            for kind in ("FailureTarget", "Failed")
        ],
    }


# The client types every field of its models Optional; an object the API server returns has
# them. These read one, asserting it is there, so tests read as plainly as the YAML.


def meta(obj: Any) -> client.V1ObjectMeta:
    """The metadata of a client model (``V1Job``, ``V1Deployment``, ...)."""
    metadata = obj.metadata
    assert isinstance(metadata, client.V1ObjectMeta)
    return metadata


def name_of(obj: Any) -> str:
    """A client model's ``metadata.name``."""
    name = meta(obj).name
    assert name is not None
    return name


def job_container(job: client.V1Job) -> client.V1Container:
    """The Job's one container."""
    assert job.spec is not None and job.spec.template.spec is not None
    (container,) = job.spec.template.spec.containers
    assert isinstance(container, client.V1Container)
    return container


def env_vars(container: client.V1Container) -> dict[str, client.V1EnvVar]:
    return {var.name: var for var in container.env or []}


def secret_key_ref(var: client.V1EnvVar) -> client.V1SecretKeySelector:
    """The Secret key an env var comes from (it must come from one)."""
    assert var.value_from is not None and var.value_from.secret_key_ref is not None
    ref = var.value_from.secret_key_ref
    assert isinstance(ref, client.V1SecretKeySelector)
    return ref


def json_object(raw: object) -> dict[str, Any]:
    """A JSON object the client hands back untyped (``CustomObjectsApi`` returns ``object``)."""
    assert isinstance(raw, dict)
    return raw


async def call(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """A blocking client call off the loop the emulator serves on."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def gone(read: Callable[[], Awaitable[object]]) -> bool:
    """Whether ``read`` of an object answers 404 (it was deleted, finalizers and all)."""
    try:
        await read()
    except client.ApiException as exc:
        return bool(exc.status == 404)
    return False


async def eventually(check: Callable[[], Any], *, within: float = 15.0) -> Any:
    """Poll ``check`` (async) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within} s: {check.__doc__ or check}")
        await asyncio.sleep(0.1)


@dataclass
class Operator:
    """The cluster, the database and the operator's metrics, with the steps tests take."""

    cluster: Cluster
    database_url: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _runner: KopfRunner | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.cluster.api)
        self.batch = client.BatchV1Api(self.cluster.api)
        self.apps = client.AppsV1Api(self.cluster.api)
        self.objects = client.CustomObjectsApi(self.cluster.api)
        self.metrics = OperatorMetrics(registry=self.registry)
        # What the operator runs with; a test may change a field before the step it concerns.
        self.config = handlers.OperatorConfig(
            kube=self.cluster.api.configuration, metrics=self.metrics
        )

    # ---- the operator process ----

    async def start(self) -> None:
        """Start kopf in its thread, configured afresh (a new process's state: no wakers, no
        API client, nothing remembered but what the cluster and the database hold)."""
        assert self._runner is None, "the operator is already running"
        handlers.configure(self.config)
        runner = KopfRunner(
            ["run", "--standalone", "--all-namespaces", "-m", "embedshift_operator.handlers"],
            timeout=30,
        )
        await call(runner.__enter__)
        self._runner = runner

    async def stop(self) -> None:
        """Stop kopf (its daemons are told to stop, then cancelled) and fail on its errors."""
        runner, self._runner = self._runner, None
        assert runner is not None, "the operator is not running"
        try:
            await call(runner.__exit__, None, None, None)
        finally:
            handlers.configure(handlers.OperatorConfig())
        assert runner.exception is None

    async def restart(self) -> None:
        """Stop the operator and start a new one, as a rolled Deployment's new Pod would."""
        await self.stop()
        await self.start()

    def job_creations(self) -> dict[str, int]:
        """How many times each Job was created (accepted, not refused as existing)."""
        counts: dict[str, int] = {}
        for created in self.cluster.emulator.created:
            if created.resource == "jobs" and created.name is not None:
                counts[created.name] = counts.get(created.name, 0) + 1
        return counts

    async def ticked(self, *, after: int) -> bool:
        """the operator patched the status after call number ``after``"""
        return any(
            c.resource == PLURAL and c.subresource == "status" and c.verb == "patch"
            for c in self.cluster.emulator.calls[after:]
            if is_operator(c)
        )

    async def next_tick(self, *, within: float = 5.0) -> None:
        """Wait for the operator's next tick (from now)."""
        calls = len(self.cluster.emulator.calls)

        async def ticked() -> bool:
            """a tick of the operator (its status patch)"""
            return await self.ticked(after=calls)

        await eventually(ticked, within=within)

    # ---- the cluster, through the API ----

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    async def create_secret(self) -> None:
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name="rag-db", namespace=NS),
            data={"url": base64.b64encode(self.database_url.encode()).decode()},
        )
        await call(self.core.create_namespaced_secret, NS, secret)

    async def create_migration(self, document: dict[str, Any] | None = None) -> None:
        """Apply ``document`` (default :func:`manifest`)."""
        body = manifest() if document is None else document
        await call(self.objects.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, body)

    async def patch_spec(self, spec: dict[str, Any]) -> None:
        """A merge patch of ``spec`` through the API, as ``kubectl patch --type=merge`` sends."""
        await call(
            self.objects.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            NAME,
            {"spec": spec},
        )

    async def delete_migration(self) -> None:
        await call(self.objects.delete_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME)

    async def deleted(self) -> bool:
        """the resource deleted (404)"""
        return await gone(self.resource)

    async def resource(self) -> dict[str, Any]:
        raw = await call(
            self.objects.get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME
        )
        return json_object(raw)

    async def migration(self) -> EmbeddingMigration:
        """The resource as the operator's typed model (times as datetimes, phases as enums)."""
        return parse_migration(await self.resource(), where=KEY)

    async def reached(self, phase: Phase, *, within: float = 15.0) -> EmbeddingMigration:
        """The resource once its status says ``phase``."""

        async def in_phase() -> EmbeddingMigration | None:
            resource = await self.migration()
            return resource if resource.status.phase == phase else None

        in_phase.__doc__ = f"phase {phase.value}"
        resource = await eventually(in_phase, within=within)
        assert isinstance(resource, EmbeddingMigration)
        return resource

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = (await self.resource()).get("status") or {}
        return status

    async def jobs(self, kind: str | None = None) -> list[client.V1Job]:
        listed = await call(self.batch.list_namespaced_job, NS)
        return [
            j
            for j in listed.items
            if kind is None or (meta(j).labels or {}).get(LABEL_KIND) == kind
        ]

    async def job(self, kind: str) -> client.V1Job:
        """The one Job of ``kind``, once it exists."""

        async def created() -> list[client.V1Job]:
            return await self.jobs(kind)

        created.__doc__ = f"the {kind} Job"
        (job,) = await eventually(created)
        assert isinstance(job, client.V1Job)
        return job

    async def complete(self, job: client.V1Job) -> None:
        body = {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
        await call(self.batch.patch_namespaced_job_status, name_of(job), NS, body)

    async def fail(self, job: client.V1Job, message: str) -> None:
        condition = {
            "type": "Failed",
            "status": "True",
            "reason": "BackoffLimitExceeded",
            "message": message,
        }
        body = {"status": {"failed": 1, "conditions": [condition]}}
        await call(self.batch.patch_namespaced_job_status, name_of(job), NS, body)

    async def fail_by_policy(self, job: client.V1Job, *, exit_code: int, log_tail: str) -> str:
        """Fail ``job`` as the Job controller does when its Pod exited with a FailJob code: the
        failed Pod (its termination message ``log_tail``), then the Job's conditions. The Pod's
        name."""
        pod = f"{name_of(job)}-x7k2p"
        body = as_model(client.V1Pod, failed_pod(pod, exit_code=exit_code, log_tail=log_tail))
        await call(self.core.create_namespaced_pod, NS, body)
        await call(
            self.batch.patch_namespaced_job_status,
            name_of(job),
            NS,
            {"status": policy_failure(pod, exit_code)},
        )
        return pod

    async def set_up(self, document: dict[str, Any] | None = None) -> None:
        """What the setup Job would have done (the side table, the routing row's table) for
        ``document`` (default :func:`manifest`)."""
        spec = parse_migration(manifest() if document is None else document, where="test").spec
        await setup(self.database_url, spec.data_plane, migration=KEY)

    async def deployments(self) -> list[str]:
        """The Deployments' names (the follower is one)."""
        listed = await call(self.apps.list_namespaced_deployment, NS)
        return sorted(name_of(d) for d in listed.items)

    async def events(self) -> list[client.CoreV1Event]:
        listed = await call(self.core.list_namespaced_event, NS)
        return list(listed.items)

    async def routing_percentage(self) -> int | None:
        """The routing row's percentage; None before setup created the row (or its table)."""
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            cur = await conn.execute("SELECT to_regclass('embedshift_rollout')")
            exists = await cur.fetchone()
            if exists is None or exists[0] is None:
                return None
            cur = await conn.execute(
                "SELECT percentage FROM embedshift_rollout WHERE migration = %s", [KEY]
            )
            row = await cur.fetchone()
            return None if row is None else int(row[0])

    async def complete_shards(self) -> None:
        """Complete every shard Job, as the operator creates them, until Migrating is over."""

        async def migrated() -> bool:
            """every shard Job completed (the rest are created as slots free up)"""
            for shard in await self.jobs("migrate"):
                if not (shard.status and shard.status.succeeded):
                    await self.complete(shard)
            return (await self.status()).get("phase") not in (None, "Preparing", "Migrating")

        await eventually(migrated)

    async def drive_to_progressing(self) -> None:
        """Complete every Job of the pipeline until the rollout routes its first step, 10 %."""
        await self.set_up()
        await self.complete(await self.job("setup"))
        await self.complete_shards()
        for kind in ("index", "verify"):
            await self.complete(await self.job(kind))

        async def progressing() -> bool:
            """Progressing at 10 % in the routing row"""
            phase = (await self.status()).get("phase")
            return phase == "Progressing" and await self.routing_percentage() == 10

        await eventually(progressing)
