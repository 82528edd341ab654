"""The Kubernetes Jobs adapter: pure manifests, then the runner through the real client against
kmock (with apiserver-like metadata, :mod:`tests.operator.kube.emulator`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kmock
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from kubernetes import client

from embedshift_operator.adapters.kube import (
    CONFIG_PATH,
    CONTAINER,
    ClusterError,
    KubeJobs,
    as_model,
    config_map_manifest,
    follower_manifest,
    job_manifest,
)
from embedshift_operator.core.jobs import follower_name, job_name
from embedshift_operator.core.model import EnsureFollower, JobObservation, RunJob
from embedshift_operator.resource import EmbeddingMigration, JobKind, JobState
from rag_service.errors import (
    EXIT_CONFIG,
    EXIT_RETRYABLE,
    EXIT_SCHEMA_REFUSED,
    EXIT_VERIFICATION,
    PERMANENT_EXIT_CODES,
    ConfigError,
    EmbedshiftError,
)
from tests.operator.kube.conftest import Cluster
from tests.operator.kube.harness import (
    NAME,
    Operator,
    env_vars,
    eventually,
    failed_pod,
    job_container,
    meta,
    name_of,
    openai_spec,
    policy_failure,
    secret_key_ref,
)

NS = "rag"
UID = "0f8e6b1a-4c1d-4e53-9d8e-2b7c1f7a9e11"
OPERATOR_IMAGE = "ghcr.io/embedshift/embedshift:0.1.0"
K8S_VERSION = "1.33"  # the schemas kubernetes-validate checks the built-in kinds against
K8S_SERVED = "1.36"  # and the version the suite's control plane runs


def migration(
    name: str = "docs", *, uid: str | None = UID, **migration_spec: Any
) -> EmbeddingMigration:
    raw = {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "metadata": {"name": name, "namespace": NS, "uid": uid},
        "spec": openai_spec(shards=4, **migration_spec),
    }
    return EmbeddingMigration.model_validate(raw)


def migrate_action(resource: EmbeddingMigration, shard: int = 2) -> RunJob:
    name = job_name(
        resource.metadata.name, JobKind.MIGRATE, data_hash="1a2b3c4d5e", shard=shard, shards=4
    )
    return RunJob(
        name=name,
        kind=JobKind.MIGRATE,
        args=("migrate", "run", "--shard", f"{shard}/4"),
        shard=shard,
    )


def follow_action(resource: EmbeddingMigration, data_hash: str = "1a2b3c4d") -> EnsureFollower:
    return EnsureFollower(
        name=follower_name(resource.metadata.name, data_hash=data_hash), args=("migrate", "follow")
    )


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    containers = manifest["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


# ---- the manifests (pure) -----------------------------------------------------------------------


def test_job_runs_embedshift_with_the_mounted_spec_and_the_migration_key() -> None:
    resource = migration()
    action = migrate_action(resource)
    manifest = job_manifest(resource, action, operator_image=OPERATOR_IMAGE)
    c = container(manifest)
    assert c["command"] == ["embedshift"]
    assert c["args"] == [
        "migrate",
        "run",
        "--shard",
        "2/4",
        "--config",
        CONFIG_PATH,
        "--migration",
        "rag/docs",
    ]
    config = config_map_manifest(resource)
    pod = manifest["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": config["metadata"]["name"]}} in pod["volumes"]
    assert {"name": "config", "mountPath": "/etc/embedshift", "readOnly": True} in c["volumeMounts"]
    # The mounted document is what `embedshift migrate --config` reads: the data plane only.
    document = yaml.safe_load(config["data"]["migration.yaml"])
    assert document["metadata"] == {"name": "docs", "namespace": NS}
    assert set(document["spec"]) == {"database", "source", "target", "migration"}


def test_job_spec_limits_and_restart_policy() -> None:
    spec = job_manifest(migration(), migrate_action(migration()), operator_image=OPERATOR_IMAGE)
    spec = spec["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_a_failure_no_retry_mends_fails_the_job_at_once() -> None:
    manifest = job_manifest(migration(), migrate_action(migration()), operator_image=OPERATOR_IMAGE)
    spec = manifest["spec"]
    fail_job, ignore = spec["podFailurePolicy"]["rules"]
    # A refused spec or a failed verification: the Job fails on the first exit, not the third.
    assert fail_job["action"] == "FailJob"
    codes = fail_job["onExitCodes"]
    assert codes["containerName"] == container(manifest)["name"] == CONTAINER
    assert codes["operator"] == "In"
    assert codes["values"] == sorted(PERMANENT_EXIT_CODES)
    assert {EXIT_CONFIG, EXIT_VERIFICATION} <= set(codes["values"])
    # A database that is down (exit 1) is retried by backoffLimit.
    assert EXIT_RETRYABLE not in codes["values"]
    assert spec["backoffLimit"] >= 1
    # A node drain evicting the Pod counts against nothing.
    assert ignore["action"] == "Ignore"
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # The API server refuses a podFailurePolicy on any other restartPolicy.
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_pod_and_container_security() -> None:
    manifest = job_manifest(migration(), migrate_action(migration()), operator_image=OPERATOR_IMAGE)
    pod = manifest["spec"]["template"]["spec"]
    c = container(manifest)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert pod["automountServiceAccountToken"] is False


def test_secrets_are_references_never_values() -> None:
    resource = migration()
    for manifest in (
        job_manifest(resource, migrate_action(resource), operator_image=OPERATOR_IMAGE),
        follower_manifest(resource, follow_action(resource), operator_image=OPERATOR_IMAGE),
    ):
        env = {e["name"]: e for e in container(manifest)["env"]}
        assert env["DATABASE_URL"] == {
            "name": "DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": "rag-db", "key": "url"}},
        }
        for role in ("TARGET", "SOURCE"):
            assert env[f"EMBEDSHIFT_{role}_API_KEY"] == {
                "name": f"EMBEDSHIFT_{role}_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key"}},
            }
        secret_names = {"DATABASE_URL", "EMBEDSHIFT_TARGET_API_KEY", "EMBEDSHIFT_SOURCE_API_KEY"}
        assert all("value" not in env[n] for n in secret_names)


def test_no_database_secret_is_a_config_error() -> None:
    resource = migration()
    raw = resource.model_dump(mode="json", by_alias=True)
    raw["spec"]["database"].pop("urlSecretRef")
    bare = EmbeddingMigration.model_validate(raw)
    with pytest.raises(ConfigError, match=r"urlSecretRef"):
        job_manifest(bare, migrate_action(bare), operator_image=OPERATOR_IMAGE)


def test_owner_reference_and_labels() -> None:
    resource = migration()
    job = job_manifest(resource, migrate_action(resource), operator_image=OPERATOR_IMAGE)
    follower = follower_manifest(resource, follow_action(resource), operator_image=OPERATOR_IMAGE)
    config = config_map_manifest(resource)
    owner = {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "name": "docs",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for manifest in (job, follower, config):
        assert manifest["metadata"]["ownerReferences"] == [owner]
        assert manifest["metadata"]["namespace"] == NS
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/name": "embedshift",
        "app.kubernetes.io/component": "migrate-job",
        "embedshift.io/migration": "docs",
        "embedshift.io/kind": "migrate",
    }
    assert job["spec"]["template"]["metadata"]["labels"] == job["metadata"]["labels"]
    labels = follower["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "follower"
    assert follower["spec"]["selector"]["matchLabels"] == labels
    assert follower["spec"]["replicas"] == 1
    assert follower["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    assert container(follower)["args"][:2] == ["migrate", "follow"]


def test_an_owner_without_uid_is_refused() -> None:
    resource = migration(uid=None)
    with pytest.raises(ConfigError, match="uid"):
        job_manifest(resource, migrate_action(resource), operator_image=OPERATOR_IMAGE)


def test_long_names_fit_63_characters() -> None:
    resource = migration("a" * 120)
    manifests = [
        job_manifest(resource, migrate_action(resource, shard=999), operator_image=OPERATOR_IMAGE),
        follower_manifest(resource, follow_action(resource), operator_image=OPERATOR_IMAGE),
        config_map_manifest(resource),
    ]
    for manifest in manifests:
        assert len(manifest["metadata"]["name"]) <= 63
        assert all(len(v) <= 63 for v in manifest["metadata"]["labels"].values())


def test_resources_come_from_the_spec() -> None:
    resource = migration(
        resources={"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
    )
    c = container(job_manifest(resource, migrate_action(resource), operator_image=OPERATOR_IMAGE))
    assert c["resources"] == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"memory": "1Gi"},
    }
    plain = container(
        job_manifest(migration(), migrate_action(migration()), operator_image=OPERATOR_IMAGE)
    )
    assert "resources" not in plain


def test_image_is_the_specs_else_the_operators() -> None:
    own = migration(image="registry.example/embedshift:pinned")
    assert (
        container(job_manifest(own, migrate_action(own), operator_image=OPERATOR_IMAGE))["image"]
        == "registry.example/embedshift:pinned"
    )
    plain = migration()
    assert (
        container(job_manifest(plain, migrate_action(plain), operator_image=OPERATOR_IMAGE))[
            "image"
        ]
        == OPERATOR_IMAGE
    )
    with pytest.raises(ConfigError, match=r"spec\.migration\.image"):
        job_manifest(plain, migrate_action(plain), operator_image=None)


def test_manifests_pass_the_real_client_and_the_openapi_schemas() -> None:
    resource = migration(resources={"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}})
    pairs: list[tuple[type[Any], dict[str, Any]]] = [
        (
            client.V1Job,
            job_manifest(resource, migrate_action(resource), operator_image=OPERATOR_IMAGE),
        ),
        (
            client.V1Deployment,
            follower_manifest(resource, follow_action(resource), operator_image=OPERATOR_IMAGE),
        ),
        (client.V1ConfigMap, config_map_manifest(resource)),
    ]
    serializer = client.ApiClient()
    for model, manifest in pairs:
        built = as_model(model, manifest)
        # The client's own round trip loses nothing (an unknown field would vanish here).
        sanitized = serializer.sanitize_for_serialization(built)  # type: ignore[no-untyped-call]
        assert sanitized == manifest
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        kubernetes_validate.validate(manifest, K8S_SERVED, strict=True)


# ---- the runner against the emulator ------------------------------------------------------------


async def list_jobs(cluster: Cluster) -> list[client.V1Job]:
    batch = client.BatchV1Api(cluster.api)
    return list((await asyncio.to_thread(batch.list_namespaced_job, namespace=NS)).items)


async def patch_job_status(cluster: Cluster, name: str, status: dict[str, Any]) -> None:
    """The emulator runs no Job controller: the test plays it, through the API."""
    batch = client.BatchV1Api(cluster.api)
    await asyncio.to_thread(
        batch.patch_namespaced_job_status,
        name=name,
        namespace=NS,
        body={"status": status},
        _content_type="application/merge-patch+json",
    )


async def test_run_job_twice_creates_one_job(cluster: Cluster) -> None:
    runner = KubeJobs(cluster.api, operator_image=OPERATOR_IMAGE)
    resource = migration()
    action = migrate_action(resource)
    assert await runner.run_job(resource, action) is True
    assert await runner.run_job(resource, action) is False  # a restarted operator asks again
    jobs = await list_jobs(cluster)
    assert [name_of(j) for j in jobs] == [action.name]
    job = jobs[0]
    assert meta(job).uid and meta(job).resource_version  # set by the emulator
    assert (meta(job).owner_references or [])[0].uid == UID
    cm = await asyncio.to_thread(
        client.CoreV1Api(cluster.api).list_namespaced_config_map, namespace=NS
    )
    assert len(cm.items) == 1  # one spec ConfigMap, shared by the Jobs
    secrets = {n: e for n, e in env_vars(job_container(job)).items() if e.value_from is not None}
    assert set(secrets) == {
        "DATABASE_URL",
        "EMBEDSHIFT_TARGET_API_KEY",
        "EMBEDSHIFT_SOURCE_API_KEY",
    }
    assert all(e.value is None and secret_key_ref(e) for e in secrets.values())


async def test_observe_follows_job_status(cluster: Cluster) -> None:
    runner = KubeJobs(cluster.api, operator_image=OPERATOR_IMAGE)
    resource = migration()
    one, two = migrate_action(resource, 1), migrate_action(resource, 2)
    await runner.run_job(resource, one)
    await runner.run_job(resource, two)
    # Another migration's Job in the same namespace is not ours.
    other = migration("other", uid="9c0d6f3e-1111-4222-8333-444455556666")
    await runner.run_job(other, migrate_action(other, 1))

    assert await runner.observe(resource) == {
        one.name: JobObservation(JobState.RUNNING),
        two.name: JobObservation(JobState.RUNNING),
    }
    await patch_job_status(cluster, one.name, {"active": 1})
    await patch_job_status(
        cluster,
        one.name,
        {"active": None, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
    )
    await patch_job_status(
        cluster,
        two.name,
        {
            "failed": 3,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
        },
    )
    seen = await runner.observe(resource)
    assert seen[one.name] == JobObservation(JobState.SUCCEEDED)
    assert seen[two.name] == JobObservation(
        JobState.FAILED, "BackoffLimitExceeded: Job has reached the specified backoff limit"
    )
    assert set(seen) == {one.name, two.name}


async def test_a_job_failed_by_its_policy_says_why_once(cluster: Cluster) -> None:
    runner = KubeJobs(cluster.api, operator_image=OPERATOR_IMAGE)
    resource = migration()
    action = migrate_action(resource)
    await runner.run_job(resource, action)
    pod = f"{action.name}-x7k2p"
    error = "verification failed: index_recall: recall@10 of docs_v2_idx is 0.61 < 0.9"
    # FallbackToLogsOnError: the log's tail, the CLI's error line last.
    log_tail = "\n".join(
        ["index_recall  ✗  0.61", "verification FAILED", f"embedshift: error: {error}", ""]
    )
    await asyncio.to_thread(
        client.CoreV1Api(cluster.api).create_namespaced_pod,
        namespace=NS,
        body=as_model(
            client.V1Pod, failed_pod(pod, exit_code=EXIT_VERIFICATION, log_tail=log_tail)
        ),
    )
    await patch_job_status(cluster, action.name, policy_failure(pod, EXIT_VERIFICATION))
    seen = (await runner.observe(resource))[action.name]
    assert seen.state is JobState.FAILED
    assert seen.message == f"{error} (pod {NS}/{pod} exited {EXIT_VERIFICATION}, not retried)"
    assert "times" not in seen.message and "\n" not in seen.message


async def test_without_its_pod_a_policy_failure_still_says_what_the_code_means(
    cluster: Cluster,
) -> None:
    """The Pod is gone (or the operator may not read Pods): the exit code still explains."""
    runner = KubeJobs(cluster.api, operator_image=OPERATOR_IMAGE)
    resource = migration()
    action = migrate_action(resource)
    await runner.run_job(resource, action)
    await patch_job_status(cluster, action.name, policy_failure("gone-abcde", EXIT_CONFIG))
    seen = (await runner.observe(resource))[action.name]
    assert seen == JobObservation(
        JobState.FAILED,
        f"the spec was refused (pod {NS}/gone-abcde exited {EXIT_CONFIG}, not retried)",
    )


async def test_the_operator_reads_the_failed_pod_and_says_why_once(operator: Operator) -> None:
    """Through the operator's own client (and so its RBAC, api-calls.yaml): the Pod a FailJob
    exit code failed is read, and the resource fails with the CLI's line, not retried."""
    await operator.create_secret()
    await operator.create_migration()
    job = await operator.job("setup")
    error = "setup refused: public.handler_docs is partitioned (nothing was changed)"
    log_tail = f"embedshift: error: {error}\n"
    pod = await operator.fail_by_policy(job, exit_code=EXIT_SCHEMA_REFUSED, log_tail=log_tail)

    async def failed() -> dict[str, Any]:
        """phase Failed"""
        status = await operator.status()
        return status if status.get("phase") == "Failed" else {}

    status = await eventually(failed, within=5.0)
    assert status["message"] == (
        f"setup Job {name_of(job)} failed: {error} "
        f"(pod {NS}/{pod} exited {EXIT_SCHEMA_REFUSED}, not retried)"
    )

    async def warning() -> list[client.CoreV1Event]:
        """a Warning Event JobFailed"""
        return [
            e
            for e in await operator.events()
            if e.type == "Warning" and e.reason == "JobFailed" and e.involved_object.name == NAME
        ]

    (event,) = await eventually(warning, within=5.0)
    assert event.message == status["message"]


async def test_ensure_follower_creates_one_and_replaces_another(cluster: Cluster) -> None:
    runner = KubeJobs(cluster.api, operator_image=OPERATOR_IMAGE)
    apps = client.AppsV1Api(cluster.api)
    resource = migration()
    first, second = follow_action(resource, "aaaaaaaa"), follow_action(resource, "bbbbbbbb")

    async def names() -> list[str]:
        listed = await asyncio.to_thread(apps.list_namespaced_deployment, namespace=NS)
        return sorted(name_of(d) for d in listed.items)

    assert await runner.ensure_follower(resource, first) is True
    assert await runner.ensure_follower(resource, first) is False
    assert await names() == [first.name]
    assert await runner.ensure_follower(resource, second) is True
    assert await names() == [second.name]


async def test_api_errors_are_one_line_embedshift_errors(cluster: Cluster) -> None:
    runner = KubeJobs(cluster.api, operator_image=OPERATOR_IMAGE)
    resource = migration()

    def forbidden(request: object) -> None:
        raise kmock.KubernetesError(
            status=403, reason="Forbidden", message='jobs.batch is forbidden: User "x"'
        )

    cluster.emulator["post", "/apis/batch/v1/namespaces/rag/jobs"] << forbidden
    with pytest.raises(EmbedshiftError) as caught:
        await runner.run_job(resource, migrate_action(resource))
    assert isinstance(caught.value, ClusterError)
    assert "\n" not in str(caught.value)
    assert "403" in str(caught.value)
    assert "forbidden" in str(caught.value)


async def test_an_unreachable_api_server_is_one_line() -> None:
    configuration = client.Configuration(host="http://127.0.0.1:9")  # discard: nothing listens
    configuration.retries = 0
    with client.ApiClient(configuration) as api:
        runner = KubeJobs(api, operator_image=OPERATOR_IMAGE)
        with pytest.raises(ClusterError, match="cannot reach the API server") as caught:
            await runner.observe(migration())
    assert "\n" not in str(caught.value)


async def test_emulator_assigns_apiserver_metadata(cluster: Cluster) -> None:
    runner = KubeJobs(cluster.api, operator_image=OPERATOR_IMAGE)
    resource = migration()
    action = migrate_action(resource)
    await runner.run_job(resource, action)
    (job,) = await list_jobs(cluster)
    version, generation = int(str(meta(job).resource_version)), meta(job).generation
    assert generation == 1 and meta(job).creation_timestamp is not None
    await patch_job_status(cluster, action.name, {"active": 1})
    (job,) = await list_jobs(cluster)
    assert int(str(meta(job).resource_version)) > version
    assert meta(job).generation == 1  # a status change is no new generation
    batch = client.BatchV1Api(cluster.api)
    await asyncio.to_thread(
        batch.patch_namespaced_job,
        name=action.name,
        namespace=NS,
        body={"spec": {"activeDeadlineSeconds": 60}},
        _content_type="application/merge-patch+json",
    )
    (job,) = await list_jobs(cluster)
    assert meta(job).generation == 2
    # A JSON-Patch whose `test` fails is refused, as kopf's finalizer patch relies on.
    with pytest.raises(client.ApiException) as caught:
        await asyncio.to_thread(
            batch.patch_namespaced_job,
            name=action.name,
            namespace=NS,
            body=[{"op": "test", "path": "/metadata/resourceVersion", "value": "0"}],
            _content_type="application/json-patch+json",
        )
    assert caught.value.status == 422
    assert json.loads(caught.value.body or "{}")["code"] == 422
