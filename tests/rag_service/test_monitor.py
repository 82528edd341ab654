"""``embedshift monitor`` against a real PostgreSQL + pgvector and the real search service, and
its pure renderer on captured snapshots."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from rich.console import Console

from rag_service.migrate import RunOptions, run_migration
from rag_service.monitor import render_snapshot
from rag_service.providers.local import LocalProvider
from rag_service.routing import bucket
from rag_service.schema import setup
from rag_service.service import ServiceSettings
from rag_service.spec import DataPlaneSpec
from rag_service.testing.corpus import corpus_spec, create_corpus
from tests.helpers import cli, cli_async
from tests.helpers import flags as cli_flags
from tests.service_harness import serving

TABLE = "mon_docs"
MIGRATION = "rag/mon"
SECRET = "monitor-s3cret-token"
DOCUMENTS = 90
MIGRATED = 30
ROOT = Path(__file__).resolve().parents[2]


def rendered(snapshot: dict[str, Any], width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(render_snapshot(snapshot, footer="refreshing every 300 s"))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text


@dataclass(frozen=True)
class World:
    url: str
    spec: DataPlaneSpec
    flags: list[str]


@pytest.fixture(scope="module")
def world(database_url: str) -> Iterator[World]:
    """90 documents, 30 of them migrated to local:hash@768; the routing row at 25 %."""
    create_corpus(database_url, table=TABLE, count=DOCUMENTS, source_dimensions=768)
    spec = corpus_spec(TABLE, source_dimensions=768)

    async def prepare() -> None:
        await setup(database_url, spec, migration=MIGRATION)
        await run_migration(
            database_url,
            spec,
            provider=LocalProvider(model="hash", dimensions=768),
            options=RunOptions(limit=MIGRATED, batch_size=10),
            migration=MIGRATION,
        )

    asyncio.run(prepare())
    flags = [*cli_flags(database_url, TABLE, source="local:hash@768"), "--migration", MIGRATION]
    yield World(database_url, spec, flags)


@pytest.fixture(autouse=True)
def routing_at_25(world: World) -> None:
    set_row(world.url, percentage=25, emergency=False)


def set_row(url: str, *, percentage: int, emergency: bool, reason: str = "") -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE embedshift_rollout SET percentage = %s, emergency = %s, reason = %s, "
            "updated_at = now() WHERE migration = %s",
            [percentage, emergency, reason, MIGRATION],
        )


async def test_one_snapshot_as_json(capsys: pytest.CaptureFixture[str], world: World) -> None:
    result = await cli_async(capsys, "monitor", *world.flags, "--json")
    assert result.code == 0, result.err
    snapshot = json.loads(result.out)
    assert snapshot["migration"] == MIGRATION and snapshot["target"] == "local:hash@768"
    assert snapshot["errors"] == {}
    progress = snapshot["progress"]
    assert progress["total"] == DOCUMENTS
    assert progress["migrated"] == MIGRATED
    assert progress["pending"] == DOCUMENTS - MIGRATED
    assert sum(c["source"] for c in progress["byCategory"].values()) == DOCUMENTS
    routing = snapshot["routing"]
    assert routing["percentage"] == 25 and routing["effectivePercentage"] == 25
    assert routing["emergency"] is False and routing["updatedAt"]
    assert snapshot["service"] is None


async def test_emergency_shows_zero_effective_percentage(
    capsys: pytest.CaptureFixture[str], world: World
) -> None:
    set_row(world.url, percentage=50, emergency=True, reason="alert error_rate critical")
    result = await cli_async(capsys, "monitor", *world.flags, "--json")
    routing = json.loads(result.out)["routing"]
    assert routing == {
        **routing,
        "percentage": 50,
        "effectivePercentage": 0,
        "emergency": True,
        "reason": "alert error_rate critical",
    }
    text = await cli_async(capsys, "monitor", *world.flags)
    assert text.code == 0
    assert "EMERGENCY" in text.out and "alert error_rate critical" in text.out


async def test_monitor_reads_a_running_service(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, world: World
) -> None:
    """With the service's token from ALERT_WEBHOOK_SECRET, as the monitor reads it by default."""
    monkeypatch.setenv("ALERT_WEBHOOK_SECRET", SECRET)
    settings = ServiceSettings(
        database_url=world.url,
        spec=world.spec,
        migration=MIGRATION,
        reread_seconds=0.5,
        webhook_secret=SECRET,
    )
    # Users whose sticky bucket the 25 % route to v1, v2, v1 (a forced version would be
    # counted apart, never in what the dashboard and the criteria read).
    users = {
        version: [u for u in (f"user-{i}" for i in range(400)) if _bucket_version(u) == version]
        for version in ("v1", "v2")
    }
    async with serving(settings) as svc:
        for user in (users["v1"][0], users["v2"][0], users["v1"][1]):
            response = await svc.client.post(
                "/api/rag/search",
                json={"query": "pool opens at seven"},
                headers={"X-User-Id": user},
            )
            assert response.status_code == 200, response.text
        result = await cli_async(
            capsys, "monitor", *world.flags, "--service-url", svc.url, "--range", "1h", "--json"
        )
        assert result.code == 0, result.err
        snapshot = json.loads(result.out)
        assert snapshot["errors"] == {}
        service = snapshot["service"]
        assert service["url"] == svc.url
        assert service["circuitBreaker"]["v1"]["state"] == "closed"
        assert service["circuitBreaker"]["v2"]["state"] == "closed"
        dashboard = service["dashboard"]
        assert dashboard["range"] == "1h" and dashboard["percentage"] == 25
        assert dashboard["versions"]["v1"]["requests"] == 2
        assert dashboard["versions"]["v2"]["requests"] == 1
        text = rendered(snapshot)
        assert "circuit breakers" in text and "closed" in text
        assert "key metrics over 1h (from service)" in text
        assert "the service routes 25 % to v2" in text
        assert SECRET not in result.out + result.err


async def test_monitor_says_what_to_do_when_the_service_refuses_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, world: World
) -> None:
    """No token, a wrong one, a service without ALERT_WEBHOOK_SECRET: each a clear error (exit
    code 1, the rest of the snapshot still shown), the token never printed."""
    monkeypatch.delenv("ALERT_WEBHOOK_SECRET", raising=False)
    settings = ServiceSettings(
        database_url=world.url, spec=world.spec, migration=MIGRATION, webhook_secret=SECRET
    )

    async def service_error(url: str, *flags: str) -> str:
        result = await cli_async(
            capsys, "monitor", *world.flags, "--service-url", url, *flags, "--json"
        )
        assert result.code == 1, result.err
        assert SECRET not in result.out + result.err and "wrong-one" not in result.out
        snapshot = json.loads(result.out)
        assert snapshot["routing"]["effectivePercentage"] == 25  # the rest is still there
        assert snapshot["service"]["circuitBreaker"] is None
        return str(snapshot["errors"]["service"])

    async with serving(settings) as svc:
        missing = await service_error(svc.url)
        assert "GET /api/monitoring/circuit-breaker: HTTP 401" in missing
        assert "the service wants its bearer token: set ALERT_WEBHOOK_SECRET" in missing
        wrong = await service_error(svc.url, "--service-token", "wrong-one")
        assert "HTTP 403: the service refused the token" in wrong
        monkeypatch.setenv("ALERT_WEBHOOK_SECRET", SECRET)
        right = await cli_async(capsys, "monitor", *world.flags, "--service-url", svc.url)
        assert right.code == 0 and "circuit breakers" in right.out, right.out + right.err
        assert SECRET not in right.out + right.err
    async with serving(replace(settings, webhook_secret=None)) as svc:
        off = await service_error(svc.url)
        assert "HTTP 503" in off and "ALERT_WEBHOOK_SECRET is not set on the service" in off
        text = await cli_async(capsys, "monitor", *world.flags, "--service-url", svc.url)
        assert "ALERT_WEBHOOK_SECRET is not set on the service" in " ".join(text.out.split())


def test_monitor_help_says_whether_the_token_is_set_never_what_it_is(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def shown() -> str:
        with pytest.raises(SystemExit):
            cli(capsys, "monitor", "--help")
        return " ".join(capsys.readouterr().out.split())

    monkeypatch.delenv("ALERT_WEBHOOK_SECRET", raising=False)
    assert "(env ALERT_WEBHOOK_SECRET: unset)" in shown()
    monkeypatch.setenv("ALERT_WEBHOOK_SECRET", SECRET)
    text = shown()
    assert "(env ALERT_WEBHOOK_SECRET: set)" in text and SECRET not in text


def _bucket_version(user: str) -> str:
    return "v2" if bucket(migration=MIGRATION, key=user) < 25 else "v1"


async def test_unreachable_service_is_reported_not_fatal(
    capsys: pytest.CaptureFixture[str], world: World
) -> None:
    result = await cli_async(
        capsys, "monitor", *world.flags, "--service-url", "http://127.0.0.1:9", "--json"
    )
    assert result.code == 1  # something could not be read
    snapshot = json.loads(result.out)
    assert "GET /api/monitoring" in snapshot["errors"]["service"]
    assert snapshot["progress"]["total"] == DOCUMENTS  # the rest is still there
    assert snapshot["routing"]["effectivePercentage"] == 25


async def test_mistakes(capsys: pytest.CaptureFixture[str], world: World) -> None:
    bad_url = await cli_async(capsys, "monitor", *world.flags, "--service-url", "localhost:8080")
    assert bad_url.code == 2 and "--service-url" in bad_url.err
    flags = [*world.flags[:-2], "--migration", "rag/other"]
    no_row = await cli_async(capsys, "monitor", *flags, "--json")
    assert no_row.code == 1
    assert "no routing row for 'rag/other'" in json.loads(no_row.out)["errors"]["routing"]


def test_continuous_json_until_ctrl_c(world: World) -> None:
    """Real SIGINT to a real `embedshift` process: one JSON object per refresh, then exit 0."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedshift_operator.cli",
            "monitor",
            *world.flags,
            "--continuous",
            "--interval",
            "0.2",
            "--json",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        snapshots = [json.loads(line) for line in lines]
        assert all(s["progress"]["migrated"] == MIGRATED for s in snapshots)
        assert snapshots[0]["time"] <= snapshots[1]["time"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the pure renderer on captured data --------------------------------------------------------

CAPTURED = {
    "time": "2026-03-01T12:00:00+00:00",
    "migration": "rag/docs",
    "target": "openai:text-embedding-3-small@768",
    "progress": {
        "target": "openai:text-embedding-3-small@768",
        "total": 10000,
        "migrated": 7500,
        "pending": 2500,
        "stale": 12,
        "queued": 3,
        "batches": 75,
        "failedBatches": 1,
        "tokens": 1234567,
        "costUSD": 0.024691,
        "byCategory": {
            "events": {
                "category": "events",
                "source": 3333,
                "current": 3333,
                "stale": 0,
                "no_text": 0,
                "pending": 0,
            },
            "pricing": {
                "category": "pricing",
                "source": 3334,
                "current": 834,
                "stale": 12,
                "no_text": 0,
                "pending": 2500,
            },
        },
        "recentErrors": [
            {
                "at": "2026-03-01T11:00:00+00:00",
                "shard": "0/1",
                "firstId": "17",
                "lastId": "116",
                "error": "rate limited",
            },
        ],
    },
    "routing": {
        "percentage": 25,
        "effectivePercentage": 25,
        "emergency": False,
        "reason": "",
        "updatedAt": "2026-03-01T08:00:00+00:00",
    },
    "service": {
        "url": "http://rag:8080",
        "circuitBreaker": {
            "v1": {
                "state": "closed",
                "recentFailures": 0,
                "failureThreshold": 5,
                "windowSeconds": 30.0,
                "secondsUntilProbe": None,
            },
            "v2": {
                "state": "open",
                "recentFailures": 5,
                "failureThreshold": 5,
                "windowSeconds": 30.0,
                "secondsUntilProbe": 12.4,
            },
        },
        "dashboard": {
            "range": "24h",
            "source": "prometheus",
            "percentage": 25,
            "emergency": False,
            "reason": "",
            "versions": {
                "v1": {
                    "requests": 9000.0,
                    "avg_latency_seconds": 0.21,
                    "p95_latency_seconds": 0.65,
                    "error_rate": 0.0004,
                    "cache_hit_rate": 0.74,
                    "avg_top_similarity": 0.81,
                    "cost_per_1k_queries_usd": 0.05,
                },
                "v2": {
                    "requests": 3000,
                    "avg_latency_seconds": 0.12,
                    "p95_latency_seconds": 0.43,
                    "error_rate": 0.0,
                    "cache_hit_rate": 0.71,
                    "avg_top_similarity": 0.77,
                    "cost_per_1k_queries_usd": None,
                },
            },
        },
        "errors": [],
    },
    "errors": {},
}


def test_render_snapshot_shows_the_key_fields() -> None:
    text = rendered(CAPTURED)
    for expected in (
        "rag/docs → openai:text-embedding-3-small@768 at 2026-03-01T12:00:00+00:00",
        "v2 traffic: 25 % (emergency off",
        "migration to openai:text-embedding-3-small@768",
        "10,000",
        "7,500",
        "75.0 %",  # migrated share
        "25.0 %",  # pricing's share
        "75 batches, 1 failed; 1,234,567 tokens, $0.0247; 3 queued changes",
        "failed 2026-03-01T11:00:00+00:00 shard 0/1 ids 17…116: rate limited",
        "circuit breakers http://rag:8080",
        "open",
        "5/5 in 30.0s",
        "in 12s",
        "key metrics over 24h (from prometheus)",
        "650.0 ms",  # v1 p95
        "430.0 ms",  # v2 p95
        "0.04 %",
        "74.0 %",
        "0.770",
        "the service routes 25 % to v2",
        "cost per 1k queries",
        "$0.050000",
        "refreshing every 300 s",
    ):
        assert expected in text, expected


def test_render_snapshot_with_errors_and_nothing_else() -> None:
    snapshot = {
        "time": "t",
        "migration": "rag/docs",
        "target": "local:hash@768",
        "progress": None,
        "routing": None,
        "service": None,
        "errors": {"progress": "database: connection refused", "routing": "no routing row"},
    }
    text = rendered(snapshot)
    assert "v2 traffic: unknown (no routing row)" in text
    assert "progress: database: connection refused" in text
    assert "routing: no routing row" in text
    assert "migration to" not in text
