"""A restarted operator decides the same (see :mod:`tests.operator.kube.harness`): the operator is
stopped and a new one started (fresh ``handlers.configure``: nothing remembered in memory) in
every phase, and what it reports and runs carries on where the old one stood.

No Job is created twice: creations are counted per Job name from the emulator's record of
accepted creates, not from the final list, since kmock replays every object as ADDED on each new
watch, which is what could make a restarted operator create a Job again.
"""

from __future__ import annotations

from typing import Any

import pytest

from embedshift_operator.resource import EmbeddingMigration, Phase
from rag_service.testing.corpus import create_corpus
from tests.operator.kube.harness import TABLE, Operator, name_of


def story(resource: EmbeddingMigration) -> dict[str, Any]:
    """What a restart must not change: phase, percentage, step and when it started, and the
    transitions recorded (a restart is no transition)."""
    status = resource.status
    return {
        "phase": status.phase,
        "percentage": status.percentage,
        "step": status.step_index,
        "step started": status.step_started_at,
        "history": [(h.phase, h.reason, h.percentage) for h in status.history],
    }


async def restart_and_compare(operator: Operator, phase: Phase) -> None:
    """Restart the operator in ``phase``; after the new one's first ticks, nothing moved."""
    before = await operator.reached(phase)
    routed = await operator.routing_percentage()
    await operator.restart()
    await operator.next_tick()
    await operator.next_tick()
    after = await operator.migration()
    assert story(after) == story(before), f"the restart in {phase.value} changed the status"
    assert await operator.routing_percentage() == routed
    creations = operator.job_creations()
    assert creations and set(creations.values()) == {1}, creations


@pytest.mark.asyncio
async def test_a_restarted_operator_carries_on_in_every_phase(operator: Operator) -> None:
    create_corpus(operator.database_url, table=TABLE, count=5)
    await operator.create_secret()
    await operator.create_migration()

    await operator.job("setup")
    await restart_and_compare(operator, Phase.PREPARING)

    await operator.set_up()
    await operator.complete(await operator.job("setup"))
    await restart_and_compare(operator, Phase.MIGRATING)
    # Still no more shards at once than spec.migration.parallelism (2 of 3).
    assert len(await operator.jobs("migrate")) == 2

    await operator.complete_shards()
    await operator.job("index")
    await restart_and_compare(operator, Phase.INDEXING)

    await operator.complete(await operator.job("index"))
    await operator.job("verify")
    await restart_and_compare(operator, Phase.VERIFYING)

    await operator.complete(await operator.job("verify"))
    await restart_and_compare(operator, Phase.PROGRESSING)
    assert await operator.routing_percentage() == 10

    await operator.patch_spec({"rollout": {"maxPercentage": 0}})
    await restart_and_compare(operator, Phase.ROLLED_BACK)
    assert await operator.routing_percentage() == 0

    # Every Job of the pipeline, each created once; one follower Deployment.
    names = sorted(name_of(j) for j in await operator.jobs())
    assert sorted(operator.job_creations()) == names
    assert len(names) == 6  # setup, 3 shards, index, verify
    followers = [c for c in operator.cluster.emulator.created if c.resource == "deployments"]
    assert len(followers) == 1
