"""How a Job fails on a real cluster, by the real Job controller: a failure no rerun mends fails
the Job at once (its ``podFailurePolicy``), and the EmbeddingMigration says why once, with the
CLI's own line; a transient one is retried ``backoffLimit`` times first.

Both run the real operator (kopf here) against the session's control plane, the Pods run by the
Pod runner as ``embedshift`` processes of this venv: see :mod:`tests.operator.e2e.conftest`.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from embedshift_operator.adapters.kube import BACKOFF_LIMIT, CONTAINER, cli_error_line
from rag_service.errors import EXIT_CONFIG, EXIT_RETRYABLE, PERMANENT_EXIT_CODES
from tests.operator.e2e.conftest import PIPELINE, Migration
from tests.operator.kube.harness import call, eventually, meta, name_of

NewMigration = Callable[[str], Migration]

# The Job controller labels each Pod with its Job's uid (batch/v1, Kubernetes ≥ 1.27).
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
# The Job controller's Pod back-off starts at 10 s and doubles: three Pods take ~40 s.
RETRIED = 150.0
# After the EmbeddingMigration failed: long enough for a second Event, had a tick posted one.
SETTLE = 3.0


async def _failed(migration: Migration, *, within: float) -> dict[str, Any]:
    """The status once the phase is Failed."""

    async def failed() -> dict[str, Any]:
        status = await migration.status()
        return status if status.get("phase") == "Failed" else {}

    failed.__doc__ = f"{migration.key} Failed"
    status: dict[str, Any] = await eventually(failed, within=within)
    return status


async def _job_failed(migration: Migration, kind: str, *, within: float) -> client.V1Job:
    """The one Job of ``kind`` once the Job controller set its Failed condition."""

    async def failed() -> client.V1Job | None:
        jobs = await migration.jobs(kind)  # none until the operator created it
        assert len(jobs) <= 1, [name_of(j) for j in jobs]
        return jobs[0] if jobs and _condition(jobs[0], "Failed") is not None else None

    failed.__doc__ = f"the {kind} Job of {migration.key} Failed"
    job = await eventually(failed, within=within)
    assert isinstance(job, client.V1Job)
    return job


def _condition(job: client.V1Job, kind: str) -> client.V1JobCondition | None:
    conditions = job.status.conditions if job.status is not None else None
    found = [c for c in conditions or [] if c.type == kind and c.status == "True"]
    return found[0] if found else None


async def _pods(migration: Migration, job: client.V1Job) -> list[client.V1Pod]:
    """Every Pod the Job controller created for ``job`` (found by its uid label)."""
    core = client.CoreV1Api(migration.api)
    listed = await call(
        core.list_namespaced_pod,
        migration.namespace,
        label_selector=f"{CONTROLLER_UID}={meta(job).uid}",
    )
    return list(listed.items)


def _terminated(pod: client.V1Pod) -> client.V1ContainerStateTerminated:
    """The embedshift container's terminated state, as the Pod runner reported it."""
    assert pod.status is not None
    (container,) = [c for c in pod.status.container_statuses or [] if c.name == CONTAINER]
    assert container.state is not None and container.state.terminated is not None
    terminated = container.state.terminated
    assert isinstance(terminated, client.V1ContainerStateTerminated)
    return terminated


async def _warnings(migration: Migration, reason: str) -> list[client.CoreV1Event]:
    core = client.CoreV1Api(migration.api)
    listed = await call(
        core.list_namespaced_event,
        migration.namespace,
        field_selector=f"involvedObject.name={migration.name}",
    )
    return [e for e in listed.items if e.type == "Warning" and e.reason == reason]


@pytest.mark.asyncio
async def test_a_category_no_row_has_fails_its_shard_job_at_once_and_says_why_once(
    new_migration: NewMigration,
) -> None:
    migration = new_migration("no-such-category")
    # The CRD accepts any category name; `migrate run` refuses one no row has (exit 2). One
    # shard: one Job, whose Pods are counted.
    migration.manifest["spec"]["migration"].update(
        {"categories": ["no-such-category"], "shards": 1, "parallelism": 1}
    )
    await migration.create()

    status = await _failed(migration, within=PIPELINE)
    await asyncio.sleep(SETTLE)

    # Setup does not read the categories: it succeeded; the shard Job is the one refused.
    (setup,) = await migration.jobs("setup")
    assert setup.status is not None and setup.status.succeeded == 1, setup.status
    job = await _job_failed(migration, "migrate", within=PIPELINE)
    failed = _condition(job, "Failed")
    assert failed is not None and failed.reason == "PodFailurePolicy", failed

    # Exactly one Pod: the Job controller did not retry it.
    (pod,) = await _pods(migration, job)
    terminated = _terminated(pod)
    assert terminated.exit_code == EXIT_CONFIG and EXIT_CONFIG in PERMANENT_EXIT_CODES
    refusal = cli_error_line(terminated.message or "")
    assert refusal.startswith("spec.migration.categories: no row of "), terminated.message
    assert "'no-such-category'" in refusal

    # The resource says why once, with the CLI's line, and that it ran once.
    message = str(status["message"])
    assert status["history"][-1]["reason"] == "JobFailed"
    assert message.count(refusal) == 1, message
    assert name_of(job) in message and "not retried" in message
    assert f"pod {migration.namespace}/{name_of(pod)} exited {EXIT_CONFIG}" in message
    assert "times" not in message and "past its retries" not in message
    assert "\n" not in message

    (event,) = await _warnings(migration, "JobFailed")
    assert event.message == message
    assert (event.count or 1) == 1


UNREACHABLE_SECRET = "rag-db-unreachable"
# A socket directory that does not exist: psycopg fails at once, in the operator as in the Pods.
UNREACHABLE = "postgresql://embedshift@/rag?host=/nonexistent-embedshift-socket-dir"


@pytest.mark.asyncio
async def test_an_unreachable_database_is_retried_backoff_limit_times(
    new_migration: NewMigration, kube_api: client.ApiClient, namespace: str
) -> None:
    """Through the real operator: its database Secret names a database nobody serves, so the
    setup Job's `migrate setup` exits 1 (transient), and the Job controller retries it."""
    core = client.CoreV1Api(kube_api)
    await call(
        core.create_namespaced_secret,
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=UNREACHABLE_SECRET),
            data={"url": base64.b64encode(UNREACHABLE.encode()).decode()},
        ),
    )
    migration = new_migration("unreachable")
    migration.manifest["spec"]["database"]["urlSecretRef"] = {
        "name": UNREACHABLE_SECRET,
        "key": "url",
    }
    await migration.create()

    job = await _job_failed(migration, "setup", within=RETRIED)
    failed = _condition(job, "Failed")
    assert failed is not None and failed.reason == "BackoffLimitExceeded", failed
    pods = await _pods(migration, job)
    assert len(pods) == BACKOFF_LIMIT + 1, [name_of(p) for p in pods]
    for pod in pods:
        terminated = _terminated(pod)
        assert terminated.exit_code == EXIT_RETRYABLE, terminated
        assert "nonexistent-embedshift-socket-dir" in cli_error_line(terminated.message or "")

    status = await _failed(migration, within=PIPELINE)
    # The status message says the database cannot be reached (the operator cannot either);
    # the transition to Failed tells the Job's story.
    last = status["history"][-1]
    assert (last["phase"], last["reason"]) == ("Failed", "JobFailed")
    assert name_of(job) in last["message"] and "BackoffLimitExceeded" in last["message"]
    assert "not retried" not in last["message"]
