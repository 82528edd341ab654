"""The kopf operator end to end: the real kopf (in its own thread, as ``KopfRunner`` runs it)
against the API-server emulator, with a real PostgreSQL behind a Secret created through the API.

No kubelet runs the Jobs: the test completes each one by patching its status (and runs the real
``migrate setup`` when it completes the setup Job, so the routing row's table exists).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import pytest
from kopf.testing import KopfRunner
from kubernetes import client

from embedshift_operator import handlers
from embedshift_operator.adapters.kube_jobs import LABEL_KIND
from embedshift_operator.resource import parse_migration
from rag_service.schema import setup
from rag_service.testing.corpus import create_corpus
from tests.operator.kube.conftest import Cluster

NS = "rag"
NAME = "docs"
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


async def routing_percentage(url: str) -> int | None:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT percentage FROM embedshift_rollout WHERE migration = %s", [f"{NS}/{NAME}"]
        )
        row = await cur.fetchone()
        return None if row is None else int(row[0])


@pytest.mark.asyncio
async def test_the_operator_drives_a_migration_and_routes_zero_on_deletion(
    cluster: Cluster, database_url: str
) -> None:
    create_corpus(database_url, table=TABLE, count=20)
    core = client.CoreV1Api(cluster.api)
    batch = client.BatchV1Api(cluster.api)
    objects = client.CustomObjectsApi(cluster.api)
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="rag-db", namespace=NS),
        data={"url": base64.b64encode(database_url.encode()).decode()},
    )
    await call(core.create_namespaced_secret, NS, secret)
    handlers.configure(handlers.OperatorConfig(kube=cluster.api.configuration, operator_image=None))

    async def jobs(kind: str) -> list[client.V1Job]:
        listed = await call(batch.list_namespaced_job, NS)
        return [j for j in listed.items if (j.metadata.labels or {}).get(LABEL_KIND) == kind]

    async def complete(job: client.V1Job) -> None:
        body = {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
        await call(batch.patch_namespaced_job_status, job.metadata.name, NS, body)

    async def resource() -> dict[str, Any]:
        raw: dict[str, Any] = await call(
            objects.get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME
        )
        return raw

    runner = KopfRunner(
        ["run", "--standalone", "--all-namespaces", "-m", "embedshift_operator.handlers"],
        timeout=30,
    )
    await call(runner.__enter__)
    try:
        await call(objects.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, manifest())

        async def setup_job() -> list[client.V1Job]:
            """the setup Job"""
            return await jobs("setup")

        (job,) = await eventually(setup_job)
        container = job.spec.template.spec.containers[0]
        assert container.image == IMAGE
        (owner,) = job.metadata.owner_references
        assert (owner.kind, owner.name, owner.controller) == ("EmbeddingMigration", NAME, True)
        env = {e.name: e for e in container.env}
        ref = env["DATABASE_URL"].value_from.secret_key_ref
        assert (ref.name, ref.key) == ("rag-db", "url")
        assert env["DATABASE_URL"].value is None  # the URL itself is never in a Job

        # What the setup Job would have done, then its completion as the Job controller reports.
        spec = parse_migration(manifest(), where="test").spec
        await setup(database_url, spec.data_plane, migration=f"{NS}/{NAME}")
        await complete(job)

        async def shard_jobs() -> list[client.V1Job]:
            """shard Jobs"""
            return await jobs("migrate")

        first = await eventually(shard_jobs)
        await asyncio.sleep(1.5)  # a few more ticks: still no more than parallelism at once
        assert len(await jobs("migrate")) == 2 == len(first)
        status = (await resource())["status"]
        assert status["phase"] == "Migrating"
        assert "kopf" not in status and "_rollout_loop" not in status  # no handler results

        for _ in range(3):  # complete the running shards until all three have run
            for shard in await jobs("migrate"):
                if not (shard.status and shard.status.succeeded):
                    await complete(shard)

            async def next_shards() -> bool:
                """every shard Job created or the next phase reached"""
                now = await resource()
                return len(await jobs("migrate")) == 3 or now["status"]["phase"] != "Migrating"

            await eventually(next_shards)

        for kind in ("index", "verify"):

            async def single(kind: str = kind) -> list[client.V1Job]:
                """the next single Job"""
                return await jobs(kind)

            (job,) = await eventually(single)
            await complete(job)

        async def progressing() -> bool:
            """Progressing at 10 % in the routing row"""
            now = (await resource())["status"]
            return now["phase"] == "Progressing" and await routing_percentage(database_url) == 10

        await eventually(progressing)

        # Deletion: 0 % first, then the finalizer goes (and with it the resource).
        await call(objects.delete_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME)

        async def gone() -> bool:
            """the resource deleted"""
            try:
                await resource()
            except client.ApiException as exc:
                return exc.status == 404
            return False

        await eventually(gone)
        assert await routing_percentage(database_url) == 0
    finally:
        await call(runner.__exit__, None, None, None)
    assert runner.exception is None
