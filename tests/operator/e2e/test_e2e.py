"""End to end: the CRD applied, an EmbeddingMigration created, the real operator (kopf, the
real ``kubernetes`` client, a real PostgreSQL) carrying it through its Jobs to the first step, a
manual rollback, a deletion, and a bad spec refused by the API server.

Which API server ran: the cluster ``KUBECONFIG`` names when it is set, else the stand-in (the
project's API-server emulator on a local port, reached through a kubeconfig written for it);
the pytest header line ``embedshift e2e: against …`` says which. Everything runs on both; on
the stand-in the bad spec is refused by the emulator's rendition of the CRD's CEL rules
(cel-python), on a cluster by Kubernetes itself, which is the real proof. How to run it on kind
or k3d, and what it assumes of the cluster: :mod:`tests.operator.e2e.conftest`.

No Pod runs the Jobs (a ResourceQuota of 0 Pods in the test namespace): each test plays the
Pod's part, the real ``migrate setup`` for the setup Job, and marks every Job complete through
``jobs/status``; the operator sees only what it would see on a cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from embedshift_operator.resource import GROUP, PLURAL, VERSION
from tests.operator.e2e.conftest import WITHIN, Migration, example_manifest
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

    async def preparing() -> bool:
        """phase Preparing"""
        return (await migration.status()).get("phase") == "Preparing"

    await eventually(preparing, within=WITHIN)

    # One Job per shard, never more than `parallelism` at once.
    await migration.set_up()
    await migration.complete(setup_job)
    spec = migration.manifest["spec"]["migration"]
    assert spec["parallelism"] < spec["shards"]

    async def first_shards() -> bool:
        """`parallelism` shard Jobs"""
        return bool(len(await migration.jobs("migrate")) == spec["parallelism"])

    await eventually(first_shards, within=WITHIN)
    await asyncio.sleep(2.0)  # two more ticks (1 s interval): still no more than parallelism
    assert len(await migration.jobs("migrate")) == spec["parallelism"]

    await migration.run_jobs_to_progressing()
    assert len(await migration.jobs("migrate")) == spec["shards"]

    # kubectl wait --for=condition=Migrated / Verified
    await migration.wait_for("Migrated")
    await migration.wait_for("Verified")

    async def first_step() -> dict[str, Any]:
        """Progressing at the first step, in status and in the routing row"""
        status = await migration.status()
        routed = await migration.routing_percentage()
        ok = status.get("phase") == "Progressing" and routed == migration.first_step
        return status if ok else {}

    status = await eventually(first_step, within=WITHIN)
    assert (status["percentage"], status["stepIndex"]) == (migration.first_step, 0)

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
    await migration.run_jobs_to_progressing()

    async def routed() -> bool:
        """the first step routed"""
        return await migration.routing_percentage() == migration.first_step

    await eventually(routed, within=WITHIN)

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
