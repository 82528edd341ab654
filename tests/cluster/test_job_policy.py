"""The Jobs adapter's manifest, podFailurePolicy included, as the real API server (v1.36) takes
it: created with strict field validation and read back unchanged. Whether a Pod exiting with a
permanent code then fails the Job at once needs Pods that run (a kubelet), not this server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from embedshift_operator.adapters.kube import CONTAINER, as_model, job_manifest
from embedshift_operator.core.jobs import job_name
from embedshift_operator.core.model import RunJob
from embedshift_operator.resource import JobKind, parse_migration
from rag_service.errors import EXIT_CONFIG, EXIT_RETRYABLE, EXIT_VERIFICATION
from tests.cluster.apiserver import apply_crd, create_migration, namespace, real_client
from tests.operator.e2e.target import Target


@pytest.fixture(scope="module")
def api(kube_cluster: Target) -> Iterator[client.ApiClient]:
    with real_client(kube_cluster) as api:
        apply_crd(api)
        yield api


def test_the_api_server_keeps_the_jobs_pod_failure_policy(api: client.ApiClient) -> None:
    with namespace(api, "embedshift-jobs") as ns:
        # A real owner, so the garbage collector keeps the Job while the test reads it.
        raw = create_migration(api, ns, "docs")
        resource = parse_migration(raw, where="the API server's EmbeddingMigration")
        action = RunJob(
            name=job_name("docs", JobKind.VERIFY, data_hash="1a2b3c4d5e"),
            kind=JobKind.VERIFY,
            args=("migrate", "verify"),
        )
        manifest = job_manifest(resource, action, operator_image=None)
        batch = client.BatchV1Api(api)
        # Strict: a field the server does not know is refused, not silently dropped.
        batch.create_namespaced_job(ns, as_model(client.V1Job, manifest), field_validation="Strict")
        stored: dict[str, Any] = api.sanitize_for_serialization(  # type: ignore[no-untyped-call]
            batch.read_namespaced_job(action.name, ns)
        )
    spec = stored["spec"]
    assert spec["podFailurePolicy"] == manifest["spec"]["podFailurePolicy"]
    fail_job, ignore = spec["podFailurePolicy"]["rules"]
    assert fail_job["action"] == "FailJob"
    assert fail_job["onExitCodes"]["containerName"] == CONTAINER
    assert EXIT_CONFIG in fail_job["onExitCodes"]["values"]
    assert EXIT_VERIFICATION in fail_job["onExitCodes"]["values"]
    assert EXIT_RETRYABLE not in fail_job["onExitCodes"]["values"]  # retried by backoffLimit
    assert ignore == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert spec["backoffLimit"] == manifest["spec"]["backoffLimit"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert [c["name"] for c in spec["template"]["spec"]["containers"]] == [CONTAINER]
