"""Emergency switch: how long from the alert webhook to every replica serving v1?

    .venv/bin/python benchmarks/emergency.py [--trials 20] [--rows 2000]

Two replicas of ``embedshift serve`` (subprocesses, ``--reread-seconds 5``) on one database, the
routing row at 100 % and ``ALERT_WEBHOOK_SECRET`` set. Each trial:

1. resets the routing row (percentage 100, emergency off, NOTIFY) and waits until both replicas
   serve v2 to a fixed user, then waits a random 0–0.5 s;
2. POSTs the guide's critical alert to replica A
   (``{"type":"error_rate","severity":"critical","value":0.5,"threshold":0.1}``, bearer token)
   and at the same moment starts polling both replicas in a tight loop (one search after
   another, no sleep) with the same user;
3. records, per replica, the time from the start of the webhook call to the end of the first
   search that answered ``version: v1``; the trial's figure is the later of the two.

A switches itself while handling the webhook; B follows the routing row, which A sets with a
NOTIFY (the 5 s re-read is only the fallback for a lost notification). Target: p95 ≤ 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg

from rag_service.indexes import build_index
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers.local import LocalProvider
from rag_service.schema import setup
from rag_service.spec import DataPlaneSpec
from rag_service.testing.corpus import corpus_spec, create_corpus
from rag_service.testing.postgres import create_database, drop_database, postgres_server
from rag_service.testing.service_process import start_serve, wait_healthy

TABLE = "documents"
MIGRATION = "bench/emergency"
USER = "user-42"
QUERY = "when does the pool open on mondays"
ALERT = {"type": "error_rate", "severity": "critical", "value": 0.5, "threshold": 0.1}
ROOT = Path(__file__).resolve().parents[1]


def build_world(url: str, rows: int) -> DataPlaneSpec:
    spec = corpus_spec(TABLE, source_dimensions=32)
    create_corpus(url, table=TABLE, count=rows, source_dimensions=32)

    async def prepare() -> None:
        await setup(url, spec, migration=MIGRATION)
        provider = LocalProvider(model="hash", dimensions=768)
        try:
            await run_migration(
                url,
                spec,
                provider=provider,
                options=RunOptions(batch_size=500),
                migration=MIGRATION,
            )
        finally:
            await provider.aclose()
        await build_index(url, spec)

    asyncio.run(prepare())
    return spec


def reset_row(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE embedshift_rollout SET percentage = 100, emergency = false, reason = '', "
            "updated_at = now() WHERE migration = %s",
            [MIGRATION],
        )
        conn.execute("SELECT pg_notify('embedshift_rollout', %s)", [MIGRATION])


def start_replica(url: str, secret: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    flags = [
        "--table", TABLE, "--category-column", "category", "--source-column", "embedding",
        "--source", "local:hash@32", "--target", "local:hash@768", "--migration", MIGRATION,
        "--reread-seconds", "5",
    ]  # fmt: skip
    env = {**os.environ, "DATABASE_URL": url, "ALERT_WEBHOOK_SECRET": secret}
    return start_serve(flags, env=env, log=log)


async def version_of(client: httpx.AsyncClient) -> str:
    response = await client.post(
        "/api/rag/search", json={"query": QUERY, "k": 5}, headers={"X-User-Id": USER}
    )
    assert response.status_code == 200, response.text
    version: str = response.json()["version"]
    return version


async def until_v1(client: httpx.AsyncClient, started: float) -> float:
    """Search in a tight loop until the answer is v1; seconds since ``started``."""
    while await version_of(client) != "v1":
        pass
    return time.perf_counter() - started


async def webhook(client: httpx.AsyncClient, secret: str, started: float) -> float:
    """The guide's critical alert; seconds from ``started`` until it was answered."""
    response = await client.post(
        "/api/alerts/webhook", json=ALERT, headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.json() == {"accepted": 1, "emergency": True}, response.text
    return time.perf_counter() - started


async def trials(url: str, bases: list[str], secret: str, count: int) -> list[dict[str, float]]:
    results: list[dict[str, float]] = []
    rng = random.Random(3)
    clients = [httpx.AsyncClient(base_url=b, timeout=30) for b in bases]
    try:
        for client in clients:
            await version_of(client)  # the query's embedding is cached from here on
        for trial in range(count):
            reset_row(url)
            deadline = time.monotonic() + 15
            while not all([await version_of(c) == "v2" for c in clients]):
                if time.monotonic() > deadline:
                    raise SystemExit(f"trial {trial + 1}: the replicas did not return to v2")
                await asyncio.sleep(0.02)
            await asyncio.sleep(rng.uniform(0, 0.5))

            started = time.perf_counter()

            hook, a, b = await asyncio.gather(
                webhook(clients[0], secret, started),
                until_v1(clients[0], started),
                until_v1(clients[1], started),
            )
            # Switched for good, not a flicker.
            assert [await version_of(c) for c in clients] == ["v1", "v1"]
            results.append({"both": max(a, b), "a": a, "b": b, "webhook": hook})
            print(
                f"  trial {trial + 1:2}: both on v1 after {max(a, b) * 1000:6.1f} ms "
                f"(A {a * 1000:5.1f}, B {b * 1000:5.1f}, webhook answered {hook * 1000:5.1f})",
                flush=True,
            )
    finally:
        for client in clients:
            await client.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    secret = secrets.token_urlsafe(16)

    with postgres_server() as admin:
        name, url = create_database(admin, prefix="bench_emergency")
        replicas: list[subprocess.Popen[bytes]] = []
        try:
            print(f"corpus of {args.rows:,} documents, migrated and indexed …", flush=True)
            build_world(url, args.rows)
            reset_row(url)
            logs = [
                Path(tempfile.gettempdir()) / f"embedshift-bench-emergency-{os.getpid()}-{x}.log"
                for x in "ab"
            ]
            started = [start_replica(url, secret, log) for log in logs]
            replicas = [process for process, _ in started]
            bases = [base for _, base in started]
            for (process, base), log in zip(started, logs, strict=True):
                wait_healthy(process, base, log)
            print(f"replicas A {bases[0]} and B {bases[1]}; {args.trials} trials …", flush=True)
            results = asyncio.run(trials(url, bases, secret, args.trials))
        finally:
            for process in replicas:
                process.terminate()
            for process in replicas:
                process.wait(30)
            drop_database(admin, name)

    print()
    print(f"webhook → replicas on v1, {args.trials} trials (milliseconds)")
    print(f"{'':26} {'p50':>7} {'p95':>7} {'max':>7}")
    for key, label in (
        ("both", "both replicas on v1"),
        ("a", "A (took the webhook)"),
        ("b", "B (follows the row)"),
        ("webhook", "webhook answered"),
    ):
        values = np.array([r[key] for r in results]) * 1000
        print(
            f"{label:<26} {np.percentile(values, 50):7.1f} {np.percentile(values, 95):7.1f}"
            f" {values.max():7.1f}"
        )
    print("target: both replicas on v1 within 1 s at p95")


if __name__ == "__main__":
    main()
