"""The e2e suite's cluster, namespace, operator and migrations.

Which API server
    The real one: the session's control plane (:mod:`tests.kube_cluster`: etcd,
    kube-apiserver and kube-controller-manager v1.36.2 from ``../shared/kube``), or the cluster
    ``KUBECONFIG`` names (kind, k3d; refused unless throwaway or confirmed with
    ``EMBEDSHIFT_E2E_CONTEXT``, see :mod:`tests.operator.e2e.target`). The pytest header says
    which. The project's emulator is no longer used here: every claim of this suite is about
    what Kubernetes does.

Who runs the Pods
    The control plane has no scheduler and no kubelet; the Pod runner (:mod:`tests.kubelet`)
    plays the kubelet for the test namespace: it binds each Pod the Job controller (or the
    follower's ReplicaSet) creates to its node, runs the Pod's command (``embedshift migrate
    …``, from this venv) with the Pod's environment (the database URL from the Secret), and
    reports ``pods/status``. The real Job controller then completes or fails the Jobs by its
    own rules; nothing here writes ``jobs/status``.

What the tests assume of the cluster
    - The kubeconfig's user may create or replace the CRD (cluster-scoped; it is left in place
      afterwards: deleting it would delete every EmbeddingMigration in the cluster) and create
      and delete namespaces, and in them Secrets, Jobs, Deployments, ConfigMaps, Events and
      EmbeddingMigrations.
    - The operator runs HERE (kopf in this process, ``--namespace`` the test's own), not in the
      cluster; the chart's operator, run as the Pod its Deployment creates, is
      :mod:`tests.cluster`'s subject. The database (fixture ``database_url``, a private
      PostgreSQL on this machine) must be reachable from here and from the Pods, which are
      this machine's processes. On a kind/k3d cluster the Pods would be run by its own kubelet
      instead, in ``migration.image``, which must then reach that database.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes import config as kubeconfig

from embedshift_operator import handlers
from embedshift_operator.adapters.kube import LABEL_KIND
from embedshift_operator.resource import GROUP, PLURAL, VERSION
from rag_service.testing.corpus import create_corpus
from tests.cluster.apiserver import apply_crd
from tests.helpers import routed_percentage
from tests.kubelet import PodRunner
from tests.operator.e2e.target import Target
from tests.operator.kube.harness import (
    IMAGE,
    call,
    eventually,
    gone,
    json_object,
    meta,
)

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_PATH = REPO / "examples" / "migration.yaml"
DB_SECRET = "rag-db"  # the example's spec.database.urlSecretRef
# Generous for a real cluster (Pods are this machine's processes, a second or two each).
WITHIN = 30.0
# setup, 3 shards 2 at a time, index and verify, each a Pod that starts Python.
PIPELINE = 120.0


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
def crd(kube_api: client.ApiClient) -> dict[str, Any]:
    """``crds/`` applied and Established (:func:`tests.cluster.apiserver.apply_crd`)."""
    return apply_crd(kube_api)


@pytest.fixture(scope="module")
def namespace(
    kube_api: client.ApiClient, crd: dict[str, Any], database_url: str, pod_runner: PodRunner
) -> Iterator[str]:
    """A namespace of this module's own, with the database Secret; the Pod runner runs its
    Pods (the Jobs' and the follower's) as this machine's processes."""
    core = client.CoreV1Api(kube_api)
    name = f"embedshift-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_secret(
        name,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=DB_SECRET),
            data={"url": base64.b64encode(database_url.encode()).decode()},
        ),
    )
    pod_runner.serve(name)
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
    its namespace, name and table; the offline ``local`` models (v1 is the test corpus'
    ``local:hash@1536`` column; no API key); 3 shards 2 at a time (several shard Jobs to
    observe); a 1 s interval (the operator ticks at it); no Prometheus (nothing can pass, so the
    rollout holds its first step)."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE_PATH.read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    spec = manifest["spec"]
    spec["database"]["table"] = f"public.{table}"
    spec["source"] = {"provider": "local", "model": "hash", "dimensions": 1536}
    spec["target"] = {"provider": "local", "model": "hash", "dimensions": 256}
    spec["migration"].update({"image": IMAGE, "shards": 3, "parallelism": 2})
    spec["analysis"]["interval"] = "1s"
    del spec["analysis"]["prometheus"]
    return manifest


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

    async def routing_percentage(self) -> int | None:
        """The routing row every search replica follows (None before setup created it)."""
        return await asyncio.to_thread(routed_percentage, self.database_url, self.key)

    async def wait_for_progressing(self) -> dict[str, Any]:
        """The real Jobs (run by the Pod runner, completed by the Job controller) carry the
        migration to its first step: the status then, as the routing row agrees."""

        async def first_step() -> dict[str, Any]:
            """Progressing at the first step, in status and in the routing row"""
            status = await self.status()
            routed = await self.routing_percentage()
            ok = status.get("phase") == "Progressing" and routed == self.first_step
            return status if ok else {}

        result: dict[str, Any] = await eventually(first_step, within=PIPELINE)
        return result


@pytest.fixture()
def new_migration(
    operator: KopfRunner, kube_api: client.ApiClient, namespace: str, database_url: str
) -> Callable[[str], Migration]:
    """Make Migrations (not yet created) in the test namespace, with the operator running."""

    def make(name: str) -> Migration:
        return Migration(api=kube_api, namespace=namespace, name=name, database_url=database_url)

    return make
