"""End to end on a real API server: the CRD applied, an EmbeddingMigration created, the real
operator (kopf, the real ``kubernetes`` client, a real PostgreSQL) carrying it through its Jobs
(run by the Pod runner, completed by the real Job controller) to the first step, a manual
rollback, a deletion, and a bad spec refused by the API server.

Which API server ran, and who runs the Pods: :mod:`tests.operator.e2e.conftest`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from embedshift_operator.resource import GROUP, PLURAL, VERSION
from tests.operator.e2e.conftest import PIPELINE, WITHIN, Migration, example_manifest
from tests.operator.e2e.target import Target
from tests.operator.kube.harness import call, eventually, job_container, json_object, meta

NewMigration = Callable[[str], Migration]


@pytest.mark.asyncio
async def test_the_crd_is_served_with_its_printer_columns(
    crd: dict[str, Any], kube_api: client.ApiClient, namespace: str
) -> None:
    """``kubectl apply -f crds/`` then ``kubectl get em``: the resource is served by its names."""
    extensions = client.ApiextensionsV1Api(kube_api)
    served = await call(extensions.read_custom_resource_definition, crd["metadata"]["name"])
    assert served.spec.names.short_names == ["em"]
    (version,) = served.spec.versions
    assert version.additional_printer_columns is not None
    columns = [c.name for c in version.additional_printer_columns]
    assert columns[:5] == ["Phase", "Percentage", "Step", "Migrated", "Age"]
    objects = client.CustomObjectsApi(kube_api)
    listed = await call(objects.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
    assert json_object(listed)["items"] == []


@pytest.mark.asyncio
async def test_a_migration_runs_its_jobs_to_the_first_step_and_deletion_routes_zero(
    new_migration: NewMigration,
) -> None:
    migration = new_migration("docs")
    await migration.create()

    # The setup Job: the spec's image, owned by the resource (it goes when the resource goes).
    setup_job = await migration.job("setup")
    assert job_container(setup_job).image == migration.manifest["spec"]["migration"]["image"]
    (owner,) = meta(setup_job).owner_references or []
    assert (owner.kind, owner.name, owner.controller) == ("EmbeddingMigration", "docs", True)

    # One Job per shard, never more than `parallelism` running at once: watched while the real
    # Jobs run (each shard's Pod is a real `migrate run --shard`).
    spec = migration.manifest["spec"]["migration"]
    assert spec["parallelism"] < spec["shards"]
    most_at_once = 0

    async def progressing() -> dict[str, Any]:
        """Progressing at the first step (shard Jobs counted on the way)"""
        nonlocal most_at_once
        shards = await migration.jobs("migrate")
        running = [j for j in shards if not (j.status and (j.status.succeeded or j.status.failed))]
        most_at_once = max(most_at_once, len(running))
        status = await migration.status()
        routed = await migration.routing_percentage()
        ok = status.get("phase") == "Progressing" and routed == migration.first_step
        return status if ok else {}

    status = await eventually(progressing, within=PIPELINE)
    assert 1 <= most_at_once <= spec["parallelism"]
    assert len(await migration.jobs("migrate")) == spec["shards"]
    for kind in ("setup", "migrate", "index", "verify"):  # completed by the Job controller
        for job in await migration.jobs(kind):
            assert job.status is not None and job.status.succeeded == 1, (kind, job.status)
    assert (status["percentage"], status["stepIndex"]) == (migration.first_step, 0)

    # kubectl wait --for=condition=Migrated / Verified
    await migration.wait_for("Migrated")
    await migration.wait_for("Verified")
    assert status["migration"]["migrated"] == status["migration"]["total"] == 20
    phases = [entry.get("phase") for entry in status["history"]]
    assert phases[: phases.index("Progressing") + 1] == [
        "Preparing",
        "Migrating",
        "Indexing",
        "Verifying",
        "Progressing",
    ], phases

    # Deletion: the finalizer routes 0 % before it lets the resource go; the data is kept.
    await migration.delete()
    await eventually(migration.deleted, within=WITHIN)
    assert await migration.routing_percentage() == 0


@pytest.mark.asyncio
async def test_max_percentage_zero_in_the_spec_rolls_back_by_hand(
    new_migration: NewMigration,
) -> None:
    migration = new_migration("rollback")
    await migration.create()
    await migration.wait_for_progressing()

    await migration.patch_spec({"rollout": {"maxPercentage": 0}})  # the Git commit's edit

    resource = await migration.wait_for("RolledBack")  # kubectl wait --for=condition=RolledBack
    assert resource["status"]["phase"] == "RolledBack"
    assert resource["status"]["percentage"] == 0
    assert resource["status"]["history"][-1]["reason"] == "ManualRollback"
    assert await migration.routing_percentage() == 0

    await migration.delete()
    await eventually(migration.deleted, within=WITHIN)
    assert await migration.routing_percentage() == 0


def _steps_rule_message(crd: dict[str, Any]) -> str:
    """The CRD's own message for steps not increasing (the rule is the CRD's, not ours)."""
    (version,) = crd["spec"]["versions"]
    rollout = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rollout"]
    rules = rollout["properties"]["steps"]["x-kubernetes-validations"]
    (message,) = [r["message"] for r in rules if "percentage >" in r["rule"]]
    return str(message)


@pytest.mark.asyncio
async def test_a_bad_spec_is_refused_by_the_api_server_with_the_crds_message(
    target: Target, crd: dict[str, Any], kube_api: client.ApiClient, namespace: str
) -> None:
    manifest = example_manifest(namespace=namespace, name="bad-steps", table="e2e_bad")
    manifest["spec"]["rollout"]["steps"] = [
        {"percentage": 50, "minDuration": "1h"},
        {"percentage": 25, "minDuration": "1h"},
        {"percentage": 100, "minDuration": "1h"},
    ]
    objects = client.CustomObjectsApi(kube_api)
    with pytest.raises(client.ApiException) as refused:
        await call(
            objects.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, manifest
        )
    assert refused.value.status == 422
    body = str(refused.value.body)
    assert "spec.rollout.steps" in body
    assert _steps_rule_message(crd) in body
