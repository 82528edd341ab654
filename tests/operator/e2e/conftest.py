"""The e2e suite's cluster, namespace, operator and migrations.

Which API server
    With ``KUBECONFIG`` set, the suite runs against the cluster it names (its current context);
    without it, against the stand-in (:mod:`tests.operator.e2e.target`): the project's API-server
    emulator on a local port with a kubeconfig written for it, so the suite's code runs in every
    ``make test``. The pytest header says which one ran. A real cluster is the real proof; the
    stand-in keeps the suite from rotting. The stand-in refuses a bad spec with the CRD's CEL rules
    evaluated by cel-python; only a real API server proves Kubernetes' own CEL (its functions and
    cost limits).

Running it against a kind or k3d cluster
    ::

        kind create cluster --name embedshift          # or: k3d cluster create embedshift
        kind get kubeconfig --name embedshift > /tmp/embedshift.kubeconfig
        KUBECONFIG=/tmp/embedshift.kubeconfig make test PYTEST_ARGS=tests/operator/e2e

    A context whose name does not start with ``kind-``, ``k3d-``, ``minikube``,
    ``docker-desktop``, ``rancher-desktop`` or ``colima`` is refused unless
    ``EMBEDSHIFT_E2E_CONTEXT`` names it: a KUBECONFIG left pointing at a shared cluster does not
    get test namespaces and a replaced CRD from a ``make test``.

What the tests assume of the cluster
    - The kubeconfig's user may create or replace the CRD (cluster-scoped; it is left in place
      afterwards: deleting it would delete every EmbeddingMigration in the cluster) and create
      and delete namespaces, and in them Secrets, ResourceQuotas, Jobs, Deployments,
      ConfigMaps, Events and EmbeddingMigrations (kind's and k3d's admin user may).
    - The operator runs HERE (kopf in this process, ``--namespace`` the test's own), not in the
      cluster; so the database (fixture ``database_url``, a private PostgreSQL on this machine)
      needs to be reachable from here only. The namespace is ``embedshift-e2e-<random>``,
      deleted at the end.
    - No Job's Pod ever runs. The Jobs' work is ``embedshift migrate …`` against a database
      the cluster cannot reach, and in an image the cluster may not have; so the namespace
      gets a ResourceQuota of 0 Pods: where a kubelet runs, the Job controller (and the
      follower's ReplicaSet) can create no Pod, so nothing is scheduled, pulled or run, and
      nothing fails on its own. (A harmless ``migration.image`` cannot do this: the container
      runs ``embedshift``, so any other image fails its Pods and then the Job. Suspending the
      Jobs is not ours to do: the operator creates them, and the controller would have
      started Pods before a test could patch ``suspend``.) The test then does what the Pod
      would have: runs the real ``migrate setup`` for the setup Job, and marks each Job
      complete through the ``jobs/status`` subresource with a status a real API server accepts
      (start and completion times, ``SuccessCriteriaMet`` and ``Complete``). Where no kubelet
      runs at all (the stand-in, a control-plane-only cluster) the same holds.
"""

from __future__ import annotations

import base64
import datetime
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes import config as kubeconfig

from embedshift_operator import handlers
from embedshift_operator.adapters.kube import LABEL_KIND, as_model
from embedshift_operator.resource import GROUP, PLURAL, VERSION, parse_migration
from rag_service.schema import setup
from rag_service.testing.corpus import create_corpus
from tests.operator.e2e.target import Target
from tests.operator.kube.harness import (
    IMAGE,
    call,
    eventually,
    gone,
    json_object,
    meta,
    name_of,
)

REPO = Path(__file__).resolve().parents[3]
CRD_PATH = REPO / "crds" / "embeddingmigrations.embedshift.io.yaml"
EXAMPLE_PATH = REPO / "examples" / "migration.yaml"
DB_SECRET = "rag-db"  # the example's spec.database.urlSecretRef
# Generous for a real cluster; the stand-in answers in well under a second per step.
WITHIN = 30.0


def condition_true(obj: dict[str, Any], kind: str) -> bool:
    """``kubectl wait --for=condition=KIND``: status.conditions[type=KIND].status == "True"."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


async def wait_for_condition(
    read: Callable[[], Awaitable[dict[str, Any]]], kind: str, *, within: float = WITHIN
) -> dict[str, Any]:
    """Poll the object through the API until condition ``kind`` is True, as kubectl wait does;
    the object as it was then."""

    async def met() -> dict[str, Any]:
        obj = await read()
        return obj if condition_true(obj, kind) else {}

    met.__doc__ = f"condition {kind}=True"
    result: dict[str, Any] = await eventually(met, within=within)
    return result


# ---- the cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def target(kube_cluster: Target) -> Target:
    """The real API server: the session's control plane, or the cluster KUBECONFIG names."""
    return kube_cluster


@pytest.fixture(scope="session")
def kube_configuration(target: Target) -> client.Configuration:
    """The real client's configuration, loaded from the kubeconfig as any tool loads it."""
    configuration = client.Configuration()
    kubeconfig.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=target.kubeconfig, client_configuration=configuration
    )
    return configuration


@pytest.fixture(scope="session")
def kube_api(kube_configuration: client.Configuration) -> Iterator[client.ApiClient]:
    with client.ApiClient(kube_configuration) as api:
        yield api


@pytest.fixture(scope="session")
def crd(target: Target, kube_api: client.ApiClient) -> dict[str, Any]:
    """``crds/`` applied (created, or replaced when it exists); Established on a real cluster.

    The stand-in already serves the resource and sets no conditions: nothing to wait for there.
    """
    manifest: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    extensions = client.ApiextensionsV1Api(kube_api)
    name = manifest["metadata"]["name"]
    try:
        # The client validates a dict body into this model anyway; built here, it is typed.
        extensions.create_custom_resource_definition(
            as_model(client.V1CustomResourceDefinition, manifest)
        )
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        current = extensions.read_custom_resource_definition(name)
        manifest["metadata"]["resourceVersion"] = meta(current).resource_version
        extensions.replace_custom_resource_definition(
            name, as_model(client.V1CustomResourceDefinition, manifest)
        )
    if target.real:  # kubectl wait --for=condition=Established, before anything uses it
        deadline = time.monotonic() + WITHIN
        while not condition_true(
            kube_api.sanitize_for_serialization(  # type: ignore[no-untyped-call]
                extensions.read_custom_resource_definition(name)
            ),
            "Established",
        ):
            assert time.monotonic() < deadline, f"CRD {name} not Established within {WITHIN} s"
            time.sleep(0.2)
    return manifest


@pytest.fixture(scope="module")
def namespace(kube_api: client.ApiClient, crd: dict[str, Any], database_url: str) -> Iterator[str]:
    """A namespace of this module's own, with the database Secret and a quota of 0 Pods."""
    core = client.CoreV1Api(kube_api)
    name = f"embedshift-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_resource_quota(
        name,
        client.V1ResourceQuota(
            metadata=client.V1ObjectMeta(name="no-pods"),
            spec=client.V1ResourceQuotaSpec(hard={"pods": "0"}),
        ),
    )
    core.create_namespaced_secret(
        name,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=DB_SECRET),
            data={"url": base64.b64encode(database_url.encode()).decode()},
        ),
    )
    try:
        yield name
    finally:
        # A test that failed half-way may leave a resource whose finalizer no operator will
        # remove any more; let it go, or the namespace would stay Terminating.
        objects = client.CustomObjectsApi(kube_api)
        listed = objects.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)
        left = json_object(listed)["items"]
        for item in left:
            body = {"metadata": {"finalizers": None}}
            objects.patch_namespaced_custom_object(
                GROUP, VERSION, name, PLURAL, item["metadata"]["name"], body
            )
        core.delete_namespace(name)


@pytest.fixture(scope="module")
def operator(namespace: str, kube_configuration: client.Configuration) -> Iterator[KopfRunner]:
    """The real operator (kopf in its thread) watching the test namespace, configured with the
    kubeconfig's client configuration."""
    handlers.configure(handlers.OperatorConfig(kube=kube_configuration))
    runner = KopfRunner(
        [
            "run",
            "-m",
            "embedshift_operator.handlers",
            "--namespace",
            namespace,
            "--standalone",
        ],
        timeout=60,
    )
    with runner:
        yield runner
    handlers.configure(handlers.OperatorConfig())
    assert runner.exception is None


# ---- one migration ------------------------------------------------------------------------------


def example_manifest(*, namespace: str, name: str, table: str) -> dict[str, Any]:
    """``examples/migration.yaml`` as a user applies it, but for what this environment needs:
    its namespace, name and table; an image no Pod pulls; 3 shards 2 at a time (several shard
    Jobs to observe); a 1 s interval (the operator ticks at it); no Prometheus (nothing can
    pass, so the rollout holds its first step)."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE_PATH.read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    spec = manifest["spec"]
    spec["database"]["table"] = f"public.{table}"
    spec["migration"].update({"image": IMAGE, "shards": 3, "parallelism": 2})
    spec["analysis"]["interval"] = "1s"
    del spec["analysis"]["prometheus"]
    return manifest


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Migration:
    """One EmbeddingMigration in the test namespace, its database and the steps a user takes."""

    api: client.ApiClient
    namespace: str
    name: str
    database_url: str

    def __post_init__(self) -> None:
        self.table = f"e2e_{self.name.replace('-', '_')}"
        self.manifest = example_manifest(namespace=self.namespace, name=self.name, table=self.table)
        self.key = f"{self.namespace}/{self.name}"
        self.objects = client.CustomObjectsApi(self.api)
        self.batch = client.BatchV1Api(self.api)

    @property
    def first_step(self) -> int:
        return int(self.manifest["spec"]["rollout"]["steps"][0]["percentage"])

    async def create(self) -> None:
        create_corpus(self.database_url, table=self.table, count=20)
        await call(
            self.objects.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.manifest,
        )

    async def resource(self) -> dict[str, Any]:
        raw = await call(
            self.objects.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.name,
        )
        return json_object(raw)

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = (await self.resource()).get("status") or {}
        return status

    async def wait_for(self, condition: str) -> dict[str, Any]:
        return await wait_for_condition(self.resource, condition)

    async def patch_spec(self, spec: dict[str, Any]) -> None:
        """A merge patch of ``spec``, as ``kubectl patch --type=merge`` sends."""
        await call(
            self.objects.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.name,
            {"spec": spec},
        )

    async def delete(self) -> None:
        await call(
            self.objects.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.name,
        )

    async def deleted(self) -> bool:
        """the resource gone (404)"""
        return await gone(self.resource)

    async def jobs(self, kind: str) -> list[client.V1Job]:
        """This migration's Jobs of ``kind`` (setup, migrate, index, verify)."""
        listed = await call(self.batch.list_namespaced_job, self.namespace)
        return [
            job
            for job in listed.items
            if (meta(job).labels or {}).get(LABEL_KIND) == kind
            and any(o.name == self.name for o in meta(job).owner_references or [])
        ]

    async def job(self, kind: str) -> client.V1Job:
        """The one Job of ``kind``, once the operator has created it."""

        async def created() -> list[client.V1Job]:
            return await self.jobs(kind)

        created.__doc__ = f"the {kind} Job of {self.key}"
        (job,) = await eventually(created, within=WITHIN)
        assert isinstance(job, client.V1Job)
        return job

    async def complete(self, job: client.V1Job) -> None:
        """What the Job controller writes when the Job's Pod succeeds, through ``jobs/status``.

        A real API server validates it: a finished Job needs a startTime (the controller sets it
        when it first syncs the Job; not before: we set it), a completionTime not before it,
        no active Pods, and SuccessCriteriaMet beside Complete.
        """
        name = name_of(job)
        for _ in range(5):
            current = await call(self.batch.read_namespaced_job_status, name, self.namespace)
            started = current.status.start_time if current.status else None
            now = _now()
            status: dict[str, Any] = {
                "active": 0,
                "ready": 0,
                "succeeded": 1,
                "completionTime": now,
                "conditions": [
                    {"type": kind, "status": "True", "lastTransitionTime": now}
                    for kind in ("SuccessCriteriaMet", "Complete")
                ],
            }
            if started is None:
                status["startTime"] = now
            else:  # the cluster's clock may run ahead of ours
                status["completionTime"] = max(now, started.strftime("%Y-%m-%dT%H:%M:%SZ"))
            try:
                await call(
                    self.batch.patch_namespaced_job_status,
                    name,
                    self.namespace,
                    {"status": status},
                )
            except client.ApiException as exc:
                if exc.status not in (409, 422):  # the controller wrote in between: again
                    raise
                continue
            return
        raise AssertionError(f"Job {self.namespace}/{name} could not be marked complete")

    async def set_up(self) -> None:
        """What the setup Job's Pod would have run: the real ``migrate setup``."""
        spec = parse_migration(self.manifest, where="e2e").spec
        await setup(self.database_url, spec.data_plane, migration=self.key)

    async def routing_percentage(self) -> int | None:
        """The routing row every search replica follows (None before setup created it)."""
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            cur = await conn.execute(
                "SELECT percentage FROM embedshift_rollout WHERE migration = %s", [self.key]
            )
            row = await cur.fetchone()
            return None if row is None else int(row[0])

    async def run_jobs_to_progressing(self) -> None:
        """Play the Pods' part for every Job the operator creates, in order, until the rollout
        routes its first step."""
        await self.set_up()
        await self.complete(await self.job("setup"))

        async def migrated() -> bool:
            """every shard Job completed (the rest are created as slots free up)"""
            for shard in await self.jobs("migrate"):
                if not (shard.status and shard.status.succeeded):
                    await self.complete(shard)
            return (await self.status()).get("phase") not in (None, "Preparing", "Migrating")

        await eventually(migrated, within=WITHIN)
        for kind in ("index", "verify"):
            await self.complete(await self.job(kind))


@pytest.fixture()
def new_migration(
    operator: KopfRunner, kube_api: client.ApiClient, namespace: str, database_url: str
) -> Callable[[str], Migration]:
    """Make Migrations (not yet created) in the test namespace, with the operator running."""

    def make(name: str) -> Migration:
        return Migration(api=kube_api, namespace=namespace, name=name, database_url=database_url)

    return make
