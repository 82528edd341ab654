"""The rollout as the kopf operator runs it (see :mod:`tests.operator.kube.harness`): a spec edit
wakes a loop that would otherwise sleep an hour, and a rollout judged by a real Prometheus
scraping the application's metrics (an exporter the test drives) climbs step by step, rolls back
on a breach by itself, and retries to Succeeded after an edit of the resource."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from embedshift_operator.adapters.prometheus import PrometheusSource
from embedshift_operator.resource import (
    ConditionType,
    EmbeddingMigration,
    Phase,
    parse_migration,
)
from rag_service.testing.corpus import create_corpus
from rag_service.testing.prometheus import PrometheusProcess, serving_metrics
from rag_service.testing.traffic import ContractTraffic, VersionTraffic
from tests.operator.kube.harness import KEY, TABLE, Operator, eventually, manifest, name_of
from tests.operator.local.test_rollout_run import HEALTHY
from tests.prometheus_fixtures import PrometheusFactory

INTERVAL = 1.0  # seconds: analysis.interval of the Prometheus-judged rollout
STEPS = ((10, "2s"), (50, "2s"), (100, "1h"))  # the last step long: Promoted holds, guarded


async def routed(operator: Operator, percentage: int) -> bool:
    return await operator.routing_percentage() == percentage


@pytest.mark.asyncio
async def test_a_spec_edit_wakes_a_loop_that_would_sleep_an_hour(operator: Operator) -> None:
    """``maxPercentage: 0`` reaches the routing row within 2 s although the next tick is an hour
    away: the spec edit itself wakes the resource's loop (``on.field("spec")``)."""
    create_corpus(operator.database_url, table=TABLE, count=5)
    await operator.create_secret()
    await operator.create_migration()
    await operator.drive_to_progressing()  # with a 1 s interval: Jobs are noticed by ticks

    await operator.patch_spec({"analysis": {"interval": "1h"}})
    generation = (await operator.resource())["metadata"]["generation"]

    async def observed() -> bool:
        """the 1 h interval observed (status.observedGeneration)"""
        return bool((await operator.status()).get("observedGeneration") == generation)

    await eventually(observed, within=5.0)
    # The edit's wake may land just after a 1 s tick already saw the edit: let it pass.
    await asyncio.sleep(0.5)
    # Asleep: no tick (each patches status) for twice the old interval.
    calls = len(operator.cluster.emulator.calls)
    await asyncio.sleep(2.0)
    assert not await operator.ticked(after=calls), "the loop still ticks every second"
    assert await routed(operator, 10)

    await operator.patch_spec({"rollout": {"maxPercentage": 0}})
    edited = time.monotonic()

    async def zero() -> bool:
        """0 % in the routing row"""
        return await routed(operator, 0)

    await eventually(zero, within=2.0)
    assert time.monotonic() - edited < 2.0
    rolled = await operator.reached(Phase.ROLLED_BACK, within=2.0)
    assert rolled.status.history[-1].reason == "ManualRollback"


@pytest.mark.asyncio
async def test_a_target_edit_routes_zero_and_re_migrates_with_a_new_follower(
    operator: Operator,
) -> None:
    """A data-plane edit (the target's dimensions) while v2 takes traffic: 0 % at once, the
    pipeline again from setup under new Job names, and the follower of the old side table
    replaced by one of the new."""
    create_corpus(operator.database_url, table=TABLE, count=5)
    await operator.create_secret()
    await operator.create_migration()
    await operator.drive_to_progressing()
    (old_follower,) = await operator.deployments()
    old_setup = name_of(await operator.job("setup"))

    document = manifest()
    document["spec"]["target"]["dimensions"] = 512
    await operator.patch_spec({"target": document["spec"]["target"]})

    async def zero() -> bool:
        """0 % in the routing row"""
        return await routed(operator, 0)

    await eventually(zero, within=2.0)
    preparing = await operator.reached(Phase.PREPARING)
    assert preparing.status.history[-1].reason == "DataPlaneChanged"

    async def new_setup() -> list[client.V1Job]:
        """a setup Job under a new name"""
        return [j for j in await operator.jobs("setup") if name_of(j) != old_setup]

    (setup_job,) = await eventually(new_setup)
    await operator.set_up(document)
    await operator.complete(setup_job)
    await operator.reached(Phase.MIGRATING)

    async def replaced() -> list[str]:
        """the old follower replaced by a new one"""
        names = await operator.deployments()
        return names if names and old_follower not in names else []

    (new_follower,) = await eventually(replaced, within=5.0)
    assert new_follower != old_follower
    assert await routed(operator, 0)  # v2 stays off until the new vectors are verified


@dataclass(frozen=True)
class Metrics:
    """The application's metrics for ``KEY`` as a real Prometheus sees them."""

    traffic: ContractTraffic
    prometheus: PrometheusProcess
    v2: VersionTraffic  # v2's healthy traffic


@pytest.fixture
def metrics(prometheus: PrometheusFactory) -> Iterator[Metrics]:
    """Healthy v1 and v2 traffic for ``KEY``, scraped every 500 ms (not yet waited for: the
    test waits without blocking the loop the emulator serves on)."""
    registry = CollectorRegistry()
    spec = parse_migration(manifest(), where=KEY).spec
    # Cost series carry the provider and model of each version, as the service labels them.
    assert spec.source is not None  # the harness's manifest names both models
    v1, v2 = (healthy(e.provider.value, e.model) for e in (spec.source, spec.target))
    traffic = {KEY: {"v1": v1, "v2": v2}}
    with ContractTraffic(registry, traffic) as flowing, serving_metrics(registry) as target:
        yield Metrics(flowing, prometheus(targets=[target], scrape_interval="500ms"), v2)


def healthy(provider: str, model: str) -> VersionTraffic:
    return replace(HEALTHY, provider=provider, model=model)


def percentages(resource: EmbeddingMigration, *, since: int = 0) -> list[int]:
    """The percentages the history entered after entry ``since``, 0 % left out."""
    return [h.percentage for h in resource.status.history[since:] if h.percentage]


@pytest.mark.asyncio
async def test_prometheus_judges_the_rollout_it_rolls_back_on_a_breach_and_retries_by_edit(
    metrics: Metrics, operator: Operator
) -> None:
    await metrics.prometheus.wait_for_scrape_async(timeout=20, scrapes=4)
    document = manifest(
        interval=f"{INTERVAL:g}s",
        steps=STEPS,
        analysis={
            "prometheus": {"url": metrics.prometheus.url},
            "window": "5s",
            "minRequests": 10,
            "successfulChecks": 2,
        },
    )
    create_corpus(operator.database_url, table=TABLE, count=5)
    await operator.create_secret()
    await operator.create_migration(document)
    await operator.drive_to_progressing()

    seen: list[int] = []

    async def climbed_to_100() -> bool:
        """100 % in the routing row, step by step"""
        percentage = await operator.routing_percentage()
        if percentage is not None and (not seen or seen[-1] != percentage):
            seen.append(percentage)
        return percentage == 100

    await eventually(climbed_to_100, within=20.0)
    assert seen == [10, 50, 100]  # no step skipped, none repeated
    promoted = await operator.reached(Phase.PROMOTED, within=2.0)
    assert percentages(promoted) == [10, 50, 100]
    # Every step was promoted on Prometheus's word: the last check passed on real numbers.
    results = {r.name: r for r in promoted.status.analysis.results}
    assert {r.verdict for r in results.values() if not r.dry_run} == {"pass"}
    error_rate = results["error-rate-critical"].query
    assert f'migration="{KEY}"' in error_rate

    async with PrometheusSource(url=metrics.prometheus.url) as source:
        # v2 degrades: half its requests fail. The rollback must follow within one interval
        # (+1 s for the tick and the write) of Prometheus showing the breach.
        metrics.traffic.set_traffic(KEY, "v2", replace(metrics.v2, error_share=0.5))

        async def breach_visible() -> bool:
            """Prometheus showing v2's error rate above 10 %"""
            value = await source.query(error_rate)
            return value is not None and value > 0.10

        await eventually(breach_visible, within=20.0)
        visible = datetime.now(UTC)
        visible_monotonic = time.monotonic()

        async def zero() -> bool:
            """0 % in the routing row"""
            return await routed(operator, 0)

        await eventually(zero, within=INTERVAL + 1.0)
        assert time.monotonic() - visible_monotonic <= INTERVAL + 1.0
        rolled = await operator.reached(Phase.ROLLED_BACK, within=2.0)
        last = rolled.status.history[-1]
        assert (last.phase, last.reason, last.percentage) == (
            Phase.ROLLED_BACK,
            "ThresholdBreached",
            0,
        )
        assert "error-rate-critical" in last.message
        assert last.time - visible <= timedelta(seconds=INTERVAL + 1.0)
        await asyncio.sleep(2 * INTERVAL)  # RolledBack holds 0 % until the spec changes
        assert await routed(operator, 0)

        # The fix ships (healthy traffic again); the retry is an edit of the resource.
        metrics.traffic.set_traffic(KEY, "v2", metrics.v2)

        async def healed() -> bool:
            """v2's error rate back under 0.1 % in Prometheus's window"""
            value = await source.query(error_rate)
            return value is not None and value <= 0.001

        await eventually(healed, within=20.0)

    retried_from = len(rolled.status.history)
    document["spec"]["rollout"]["steps"][-1]["minDuration"] = "2s"  # Promoted → Succeeded soon
    await operator.patch_spec({"rollout": document["spec"]["rollout"]})
    seen.clear()
    await eventually(climbed_to_100, within=20.0)
    assert seen == [0, 10, 50, 100]  # from the rolled-back 0 %, every step again

    done = await operator.reached(Phase.SUCCEEDED, within=10.0)
    assert percentages(done, since=retried_from) == [10, 50, 100, 100]
    assert done.status.history[retried_from].reason == "RolloutChanged"
    ready = next(c for c in done.status.conditions if c.type == ConditionType.READY)
    assert (ready.status, ready.reason) == ("True", "Succeeded")
    assert await routed(operator, 100)
