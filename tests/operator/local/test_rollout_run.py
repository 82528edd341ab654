"""``embedshift rollout run``, end to end on real parts: PostgreSQL + pgvector, a real
Prometheus scraping an exporter the test controls (the application's traffic), and the real CLI
with its Jobs and follower as subprocesses. What is asserted is what users see: the routing row
the search replicas follow, the status the driver saves, the Jobs it launched."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from rag_service.progress import migration_progress
from rag_service.testing.corpus import corpus_spec, create_corpus
from rag_service.testing.prometheus import PrometheusProcess, serving_metrics
from rag_service.testing.rollout import driving, manifest, routing, status, write
from rag_service.testing.traffic import ContractTraffic, VersionTraffic
from tests.operator.local.harness import job_states, launches, phase_is, process_alive, wait_for
from tests.prometheus_fixtures import PrometheusFactory

pytestmark = pytest.mark.slow

MAIN = "default/e2e"
QUIET = "default/quiet"
KILLED = "default/killed"
DOCS = 600
HEALTHY = VersionTraffic(
    provider="local", model="hash", requests_per_second=40, cost_usd_per_request=0.0
)
QUIET_V2 = replace(HEALTHY, requests_per_second=0.5)  # ≈ 2.5 requests per 5 s window < 10
PIPELINE = 120  # seconds for setup → run (2 shards) → index → verify, with room for a busy box


@dataclass(frozen=True)
class World:
    url: str
    prometheus: PrometheusProcess
    traffic: ContractTraffic


@pytest.fixture(scope="module")
def world(database_url: str, module_prometheus: PrometheusFactory) -> Iterator[World]:
    create_corpus(database_url, table="docs", count=DOCS, source_dimensions=32)
    registry = CollectorRegistry()
    migrations = {
        key: {"v1": HEALTHY, "v2": QUIET_V2 if key == QUIET else HEALTHY}
        for key in (MAIN, QUIET, KILLED)
    }
    with ContractTraffic(registry, migrations) as traffic, serving_metrics(registry) as target:
        prometheus = module_prometheus(targets=[target], scrape_interval="500ms")
        prometheus.wait_for_scrape(timeout=20, scrapes=4)
        yield World(database_url, prometheus, traffic)


def _prometheus_value(world: World, promql: str) -> float | None:
    import httpx

    answer = httpx.get(f"{world.prometheus.url}/api/v1/query", params={"query": promql}).json()
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _below(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


def _above(value: float | None, bound: float) -> bool:
    return value is not None and value > bound


def _percentages_seen(history: list[dict[str, object]]) -> list[int]:
    return [int(str(h["percentage"])) for h in history]


def test_a_rollout_promotes_step_by_step_rolls_back_on_a_breach_and_retries_by_edit(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "e2e.yaml"
    document = manifest(name="e2e", prometheus_url=world.prometheus.url)
    write(path, document)
    seen: list[int] = []

    def climbing_to(target: int) -> int | None:
        row = routing(world.url, MAIN)
        if row and (not seen or seen[-1] != row[0]):
            seen.append(row[0])
        return row[0] if row and row[0] == target else None

    with driving(path, database_url=world.url, log_dir=tmp_path / "logs", tick=0.3) as driver:
        wait_for(
            "verification",
            phase_is(world.url, MAIN, "Progressing"),
            timeout=PIPELINE,
            driver=driver,
        )
        # Live writes while v2 takes traffic: the follower keeps the side table current.
        with psycopg.connect(world.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO docs (id, content, category) VALUES (100001, 'a new page about "
                "the sauna opening hours', 'facilities')"
            )
            conn.execute("UPDATE docs SET content = content || ' (updated)' WHERE id <= 20")
        wait_for("100 %", lambda: climbing_to(100), timeout=60, driver=driver, every=0.02)
        # Every step in order, none skipped or repeated.
        assert [p for p in seen if p] == [10, 25, 50, 75, 100]
        promoted = wait_for("Promoted", phase_is(world.url, MAIN, "Promoted"), timeout=5)
        assert _percentages_seen(promoted["history"])[-5:] == [10, 25, 50, 75, 100]
        spec = corpus_spec("docs", source_dimensions=32, target="local:hash@16")

        async def pending() -> int:
            progress = await migration_progress(world.url, spec)
            return progress.total("pending") + progress.queued

        import asyncio

        wait_for(
            "the follower to catch up",
            lambda: asyncio.run(pending()) == 0 or None,
            timeout=30,
            driver=driver,
        )

        # v2 degrades: half its requests fail. The breach must act within one interval (1 s)
        # of Prometheus showing it (+1 s for the tick and the write).
        world.traffic.set_traffic(MAIN, "v2", replace(HEALTHY, error_share=0.5))
        error_rate = (
            'sum(rate(embedshift_search_requests_total{migration="default/e2e",version="v2",'
            'outcome=~"error|fallback"}[5s])) / '
            'sum(rate(embedshift_search_requests_total{migration="default/e2e",version="v2"}[5s]))'
        )
        wait_for(
            "Prometheus to see the breach",
            lambda: _above(_prometheus_value(world, error_rate), 0.10),
            timeout=20,
            every=0.05,
        )
        visible = time.monotonic()
        wait_for(
            "the rollback",
            lambda: routing(world.url, MAIN) == (0, False),
            timeout=10,
            driver=driver,
            every=0.02,
        )
        assert time.monotonic() - visible <= 2.5
        rolled = wait_for("RolledBack", phase_is(world.url, MAIN, "RolledBack"), timeout=5)
        assert rolled["history"][-1]["reason"] == "ThresholdBreached"
        assert "error-rate-critical" in rolled["history"][-1]["message"]
        time.sleep(3)  # RolledBack holds 0 % until the spec changes
        assert routing(world.url, MAIN) == (0, False)

        # The fix ships; the retry is an edit of the file (a Git commit, in a cluster).
        world.traffic.set_traffic(MAIN, "v2", HEALTHY)
        wait_for(
            "the window to heal",
            lambda: _below(_prometheus_value(world, error_rate), 0.001),
            timeout=30,
        )
        document["spec"]["rollout"]["steps"][-1]["minDuration"] = "2h"
        write(path, document)
        seen.clear()
        wait_for(
            "the retry at 100 %", lambda: climbing_to(100), timeout=60, driver=driver, every=0.02
        )
        assert [p for p in seen if p] == [10, 25, 50, 75, 100]
        assert "RolloutChanged" in driver.reasons()

        # Manual rollback by editing the file: 0 % within 2 s.
        document["spec"]["rollout"]["maxPercentage"] = 0
        write(path, document)
        edited = time.monotonic()
        wait_for(
            "maxPercentage 0", lambda: routing(world.url, MAIN) == (0, False), timeout=5, every=0.02
        )
        assert time.monotonic() - edited <= 2.0
        manual = wait_for("RolledBack", phase_is(world.url, MAIN, "RolledBack"), timeout=5)
        assert manual["history"][-1]["reason"] == "ManualRollback"
        follower_pid = next(
            pid for kind, state, pid in job_states(world.url, MAIN).values() if kind == "follower"
        )
        assert process_alive(follower_pid)
        assert driver.interrupt() == 130
    # Ctrl-C stopped the follower cleanly, and said so; the state is kept for the next run.
    states = job_states(world.url, MAIN)
    assert {s for k, s, _ in states.values() if k == "follower"} == {"Interrupted"}
    assert not process_alive(follower_pid)
    assert any("run the same command again to resume" in line for line in driver.stderr)
    assert status(world.url, MAIN)["phase"] == "RolledBack"  # type: ignore[index]
    # Every Job ran exactly once (the follower is supervised separately).
    assert set(launches(world.url, MAIN).values()) == {1}
    assert len(launches(world.url, MAIN)) == 5  # setup, 2 shards, index, verify


def test_low_traffic_never_promotes(world: World, tmp_path: Path) -> None:
    path = tmp_path / "quiet.yaml"
    write(path, manifest(name="quiet", prometheus_url=world.prometheus.url, shards=1))
    with driving(path, database_url=world.url, log_dir=tmp_path / "logs", tick=0.3) as driver:
        wait_for(
            "step 1", phase_is(world.url, QUIET, "Progressing"), timeout=PIPELINE, driver=driver
        )
        time.sleep(6)  # six checks, minDuration long past
        current = status(world.url, QUIET)
        assert current is not None
        assert current["phase"] == "Progressing" and current["percentage"] == 10
        results = current["analysis"]["results"]
        assert results and {r["verdict"] for r in results} == {"nodata"}
        assert "minRequests" in results[0]["message"]
        assert routing(world.url, QUIET) == (10, False)


def test_a_killed_driver_resumes_in_every_phase_without_repeating_anything(
    world: World, tmp_path: Path
) -> None:
    # A table of its own, so every phase has real work (and time) in it.
    create_corpus(world.url, table="killed_docs", count=2_000, source_dimensions=32)
    path = tmp_path / "killed.yaml"
    write(path, manifest(name="killed", prometheus_url=world.prometheus.url, table="killed_docs"))
    killed_in: list[str] = []
    phases = ["Preparing", "Migrating", "Indexing", "Verifying", "Progressing"]

    def reached(later: list[str]) -> Callable[[], dict[str, Any] | None]:
        return phase_is(world.url, KILLED, *later)

    for phase in phases:
        with driving(path, database_url=world.url, log_dir=tmp_path / "logs", tick=0.3) as driver:
            current = wait_for(
                f"{phase} (or later)",
                reached(phases[phases.index(phase) :]),
                timeout=PIPELINE,
                driver=driver,
                every=0.02,
            )
            killed_in.append(current["phase"])
            driver.kill()
    assert "Progressing" in killed_in
    assert len(set(killed_in)) >= 3, killed_in  # the kills really landed in different phases
    with driving(path, database_url=world.url, log_dir=tmp_path / "logs", tick=0.3) as driver:
        wait_for(
            "100 %", lambda: routing(world.url, KILLED) == (100, False), timeout=60, driver=driver
        )
    final = status(world.url, KILLED)
    assert final is not None
    steps = [p for p in _percentages_seen(final["history"]) if p]
    assert steps == [10, 25, 50, 75, 100]  # no step skipped or repeated across five kills
    phases_entered = [h["phase"] for h in final["history"]]
    for once in ("Preparing", "Migrating", "Indexing", "Verifying"):
        assert phases_entered.count(once) == 1, phases_entered
    assert set(launches(world.url, KILLED).values()) == {1}  # no Job launched twice
