"""The kopf operator end to end (see :mod:`tests.operator.kube.harness`): the real kopf against
the API-server emulator, a real PostgreSQL behind a Secret, Jobs completed by the test."""

from __future__ import annotations

import asyncio
import time

import pytest
from kubernetes import client

from embedshift_operator.handlers import HANDLER_IDS
from rag_service.testing.corpus import create_corpus
from tests.operator.kube.harness import (
    IMAGE,
    KEY,
    NAME,
    NS,
    TABLE,
    Operator,
    env_vars,
    eventually,
    job_container,
    manifest,
    meta,
    secret_key_ref,
)


@pytest.mark.asyncio
async def test_the_operator_drives_a_migration_and_routes_zero_on_deletion(
    operator: Operator,
) -> None:
    create_corpus(operator.database_url, table=TABLE, count=20)
    await operator.create_secret()
    await operator.create_migration()

    job = await operator.job("setup")
    container = job_container(job)
    assert container.image == IMAGE
    (owner,) = meta(job).owner_references or []
    assert (owner.kind, owner.name, owner.controller) == ("EmbeddingMigration", NAME, True)
    env = env_vars(container)
    ref = secret_key_ref(env["DATABASE_URL"])
    assert (ref.name, ref.key) == ("rag-db", "url")
    assert env["DATABASE_URL"].value is None  # the URL itself is never in a Job

    await operator.set_up()
    await operator.complete(job)

    async def shard_jobs() -> list[client.V1Job]:
        """two shard Jobs (one tick creates them one after another: a poll may see one)"""
        jobs = await operator.jobs("migrate")
        return jobs if len(jobs) >= 2 else []

    await eventually(shard_jobs)
    await asyncio.sleep(1.5)  # a few more ticks: still no more than parallelism at once
    assert len(await operator.jobs("migrate")) == 2
    status = await operator.status()
    assert status["phase"] == "Migrating"
    # No handler results in status (kopf keeps them in annotations).
    assert "kopf" not in status and not set(HANDLER_IDS.values()) & set(status)

    await operator.drive_to_progressing()

    # The operator's metrics: the transitions counted, the percentage gauge at the step's 10 %.
    exposition = operator.exposition()
    labels = f'migration="{KEY}",phase="Progressing",reason="Verified"'
    assert f"embedshift_operator_transitions_total{{{labels}}} 1.0" in exposition
    assert f'embedshift_operator_percentage{{migration="{KEY}"}} 10.0' in exposition
    assert "embedshift_operator_tick_seconds_count" in exposition

    # Deletion: 0 % first, then the finalizer goes (and with it the resource).
    await operator.delete_migration()

    await eventually(operator.deleted)
    assert await operator.routing_percentage() == 0
    assert f'migration="{KEY}"' not in operator.exposition()  # forgotten


@pytest.mark.asyncio
async def test_max_percentage_zero_routes_zero_within_two_seconds(operator: Operator) -> None:
    create_corpus(operator.database_url, table=TABLE, count=5)
    await operator.create_secret()
    await operator.create_migration()
    await operator.drive_to_progressing()

    await operator.patch_spec({"rollout": {"maxPercentage": 0}})
    started = time.monotonic()

    async def routed_zero() -> bool:
        """0 % in the routing row"""
        return await operator.routing_percentage() == 0

    await eventually(routed_zero, within=2.0)
    assert time.monotonic() - started < 2.0

    async def rolled_back() -> dict[str, object]:
        """RolledBack (ManualRollback) in status"""
        status = await operator.status()
        return status if status.get("phase") == "RolledBack" else {}

    status = await eventually(rolled_back, within=2.0)
    last = status["history"][-1]
    assert (last["phase"], last["reason"]) == ("RolledBack", "ManualRollback")


@pytest.mark.asyncio
async def test_a_failed_job_fails_the_migration_with_its_message_and_a_warning(
    operator: Operator,
) -> None:
    await operator.create_secret()
    await operator.create_migration()
    await operator.fail(await operator.job("setup"), "relation handler_docs does not exist")

    async def failed() -> dict[str, object]:
        """phase Failed"""
        status = await operator.status()
        return status if status.get("phase") == "Failed" else {}

    status = await eventually(failed, within=5.0)
    assert "relation handler_docs does not exist" in str(status["message"])

    async def warning() -> list[client.CoreV1Event]:
        """a Warning Event JobFailed"""
        return [
            e
            for e in await operator.events()
            if e.type == "Warning" and e.reason == "JobFailed" and e.involved_object.name == NAME
        ]

    (event,) = await eventually(warning, within=5.0)
    assert "relation handler_docs does not exist" in event.message


@pytest.mark.asyncio
async def test_a_missing_secret_is_reported_and_recovered_from(operator: Operator) -> None:
    await operator.create_migration()

    async def reported() -> dict[str, object]:
        """the missing Secret in status"""
        status = await operator.status()
        return status if f"Secret {NS}/rag-db not found" in str(status.get("message")) else {}

    status = await eventually(reported, within=5.0)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "DatabaseUnreachable")
    await asyncio.sleep(1.0)  # a tick more
    assert await operator.jobs() == []

    await operator.create_secret()
    await operator.job("setup")  # within the backoff (at most the 1 s interval)


@pytest.mark.asyncio
async def test_a_deletion_waits_for_the_database_then_lets_go_with_a_warning(
    operator: Operator,
) -> None:
    """No Secret, so 0 % cannot be written: the finalizer holds for the deletion timeout, then
    the resource goes with a Warning naming the row to reset by hand."""
    operator.config.deletion_timeout = 2.0
    await operator.create_migration()
    await asyncio.sleep(0.5)
    await operator.delete_migration()
    await asyncio.sleep(1.0)
    assert (await operator.resource())["metadata"]["deletionTimestamp"]  # still held

    await eventually(operator.deleted, within=10.0)
    (event,) = [e for e in await operator.events() if e.reason == "RoutingNotReset"]
    assert event.type == "Warning"
    assert f"Secret {NS}/rag-db not found" in str(event.message)
    assert f"WHERE migration = '{KEY}'" in str(event.message)


@pytest.mark.asyncio
async def test_a_finished_job_starts_the_next_step_without_waiting_an_interval(
    operator: Operator,
) -> None:
    """An hour between checks: only the Job's completion can have woken the loop."""
    create_corpus(operator.database_url, table=TABLE, count=5)
    await operator.create_secret()
    await operator.create_migration(manifest(interval="1h"))
    setup_job = await operator.job("setup")  # the first tick, at the loop's start
    await operator.set_up()
    await operator.complete(setup_job)
    started = time.monotonic()

    async def shard_jobs() -> list[client.V1Job]:
        """shard Jobs after the setup Job completed"""
        return await operator.jobs("migrate")

    await eventually(shard_jobs, within=5.0)
    assert time.monotonic() - started < 5.0
