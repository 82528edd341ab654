"""The kopf operator under test: the real kopf (in its own thread, as ``KopfRunner`` runs it)
against the API-server emulator, with a real PostgreSQL behind a Secret created through the API.

No kubelet runs the Jobs: tests complete (or fail) each one by patching its status, and run the
real ``migrate setup`` when they complete the setup Job, so the routing row's table exists.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from kubernetes import client
from prometheus_client import CollectorRegistry, generate_latest

from embedshift_operator import handlers
from embedshift_operator.adapters.kube import LABEL_KIND
from embedshift_operator.adapters.operator_metrics import OperatorMetrics
from embedshift_operator.resource import parse_migration
from rag_service.schema import setup
from tests.operator.kube.conftest import Cluster

NS = "rag"
NAME = "docs"
KEY = f"{NS}/{NAME}"
IMAGE = "ghcr.io/embedshift/embedshift:test"
TABLE = "handler_docs"
GROUP, VERSION, PLURAL = handlers.GROUP, handlers.VERSION, handlers.PLURAL

_T = TypeVar("_T")


def manifest() -> dict[str, Any]:
    return {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "database": {"urlSecretRef": {"name": "rag-db", "key": "url"}, "table": TABLE},
            "source": {"provider": "openai", "model": "text-embedding-ada-002", "dimensions": 1536},
            "target": {"provider": "openai", "model": "text-embedding-3-small", "dimensions": 256},
            "migration": {"shards": 3, "parallelism": 2, "image": IMAGE},
            "rollout": {
                "steps": [
                    {"percentage": 10, "minDuration": "1h"},
                    {"percentage": 100, "minDuration": "1h"},
                ]
            },
            "analysis": {"interval": "1s"},
        },
    }


async def call(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """A blocking client call off the loop the emulator serves on."""
    return await asyncio.to_thread(fn, *args, **kwargs)


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

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.cluster.api)
        self.batch = client.BatchV1Api(self.cluster.api)
        self.objects = client.CustomObjectsApi(self.cluster.api)
        self.metrics = OperatorMetrics(registry=self.registry)
        # What the operator runs with; a test may change a field before the step it concerns.
        self.config = handlers.OperatorConfig(
            kube=self.cluster.api.configuration, metrics=self.metrics
        )

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    async def create_secret(self) -> None:
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name="rag-db", namespace=NS),
            data={"url": base64.b64encode(self.database_url.encode()).decode()},
        )
        await call(self.core.create_namespaced_secret, NS, secret)

    async def create_migration(self) -> None:
        await call(
            self.objects.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, manifest()
        )

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
        try:
            await self.resource()
        except client.ApiException as exc:
            return exc.status == 404
        return False

    async def resource(self) -> dict[str, Any]:
        raw: dict[str, Any] = await call(
            self.objects.get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME
        )
        return raw

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = (await self.resource()).get("status") or {}
        return status

    async def jobs(self, kind: str | None = None) -> list[client.V1Job]:
        listed = await call(self.batch.list_namespaced_job, NS)
        return [
            j
            for j in listed.items
            if kind is None or (j.metadata.labels or {}).get(LABEL_KIND) == kind
        ]

    async def job(self, kind: str) -> client.V1Job:
        """The one Job of ``kind``, once it exists."""

        async def created() -> list[client.V1Job]:
            return await self.jobs(kind)

        created.__doc__ = f"the {kind} Job"
        (job,) = await eventually(created)
        return job

    async def complete(self, job: client.V1Job) -> None:
        body = {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
        await call(self.batch.patch_namespaced_job_status, job.metadata.name, NS, body)

    async def fail(self, job: client.V1Job, message: str) -> None:
        condition = {
            "type": "Failed",
            "status": "True",
            "reason": "BackoffLimitExceeded",
            "message": message,
        }
        body = {"status": {"failed": 1, "conditions": [condition]}}
        await call(self.batch.patch_namespaced_job_status, job.metadata.name, NS, body)

    async def set_up(self) -> None:
        """What the setup Job would have done (the side table, the routing row's table)."""
        spec = parse_migration(manifest(), where="test").spec
        await setup(self.database_url, spec.data_plane, migration=KEY)

    async def events(self) -> list[client.CoreV1Event]:
        listed = await call(self.core.list_namespaced_event, NS)
        return list(listed.items)

    async def routing_percentage(self) -> int | None:
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            cur = await conn.execute(
                "SELECT percentage FROM embedshift_rollout WHERE migration = %s", [KEY]
            )
            row = await cur.fetchone()
            return None if row is None else int(row[0])

    async def drive_to_progressing(self) -> None:
        """Complete every Job of the pipeline until the rollout routes its first step, 10 %."""
        await self.set_up()
        await self.complete(await self.job("setup"))

        async def migrated() -> bool:
            """every shard Job completed (the rest are created as slots free up)"""
            for shard in await self.jobs("migrate"):
                if not (shard.status and shard.status.succeeded):
                    await self.complete(shard)
            return (await self.status()).get("phase") not in (None, "Preparing", "Migrating")

        await eventually(migrated)
        for kind in ("index", "verify"):
            await self.complete(await self.job(kind))

        async def progressing() -> bool:
            """Progressing at 10 % in the routing row"""
            phase = (await self.status()).get("phase")
            return phase == "Progressing" and await self.routing_percentage() == 10

        await eventually(progressing)
