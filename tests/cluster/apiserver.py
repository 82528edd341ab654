"""The session's real API server (:func:`tests.kube_cluster.kube_cluster`) for tests that check
what Kubernetes accepts: a client, the CRD applied and Established, a namespace of a test's own
in which no Pod can start (the control plane has no kubelet, and a quota of 0 Pods keeps the Job
controller from creating any)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml
from kubernetes import client
from kubernetes import config as kubeconfig

from embedshift_operator.adapters.kube import as_model
from embedshift_operator.crd import DEFAULT_PATH as CRD_PATH
from embedshift_operator.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION
from tests.operator.e2e.target import Target
from tests.operator.kube.harness import openai_spec

__all__ = ["apply_crd", "create_migration", "namespace", "real_client"]

ESTABLISHED_WITHIN = 30.0  # seconds; a CRD is Established in well under one on an idle server


@contextmanager
def real_client(target: Target) -> Iterator[client.ApiClient]:
    """The official client, configured from the target's kubeconfig as any tool would be."""
    configuration = client.Configuration()
    kubeconfig.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=target.kubeconfig, context=target.context, client_configuration=configuration
    )
    with client.ApiClient(configuration) as api:
        yield api


def apply_crd(api: client.ApiClient) -> dict[str, Any]:
    """``crds/`` created, or replaced when it exists (a kind cluster may hold an older one), and
    Established before anything uses it (``kubectl wait --for=condition=Established``); the
    manifest applied."""
    manifest: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    extensions = client.ApiextensionsV1Api(api)
    name = manifest["metadata"]["name"]
    try:
        extensions.create_custom_resource_definition(
            as_model(client.V1CustomResourceDefinition, manifest)
        )
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        current = extensions.read_custom_resource_definition(name)
        replacement = {**manifest, "metadata": {**manifest["metadata"]}}
        assert current.metadata is not None
        replacement["metadata"]["resourceVersion"] = current.metadata.resource_version
        extensions.replace_custom_resource_definition(
            name, as_model(client.V1CustomResourceDefinition, replacement)
        )
    deadline = time.monotonic() + ESTABLISHED_WITHIN
    while True:
        crd = extensions.read_custom_resource_definition(name)
        conditions = (crd.status.conditions if crd.status is not None else None) or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return manifest
        assert time.monotonic() < deadline, f"CRD {name} not Established in {ESTABLISHED_WITHIN}s"
        time.sleep(0.2)


@contextmanager
def namespace(api: client.ApiClient, prefix: str) -> Iterator[str]:
    """A fresh namespace with a quota of 0 Pods; deleted afterwards."""
    core = client.CoreV1Api(api)
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_resource_quota(
        name,
        client.V1ResourceQuota(
            metadata=client.V1ObjectMeta(name="no-pods"),
            spec=client.V1ResourceQuotaSpec(hard={"pods": "0"}),
        ),
    )
    try:
        yield name
    finally:
        core.delete_namespace(name)


def create_migration(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    """An EmbeddingMigration as the API server stored it (uid, generation, defaults)."""
    body = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": ns},
        "spec": openai_spec(image="ghcr.io/embedshift/embedshift:0.1.0"),
    }
    created = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, body
    )
    assert isinstance(created, dict)  # the client types custom objects as object
    return created
