"""How close to a tokens-per-minute limit does a long backfill run, and how often is it refused?

Starts the local embedding API as a subprocess with a TPM limit and latency, drives one
``OpenAIProvider`` as a backfill does (several workers embedding batch after batch, sharing the
provider and its pacer, concurrency > 1), then reads the server's own record of every request:

- steady-state throughput ÷ limit, measured after the initial full bucket has been spent
  (target ≥ 0.95; 1.0 is the ceiling a token bucket allows);
- the share of requests answered 429 over the whole run (target < 1 %).

    .venv/bin/python benchmarks/ratelimit.py [--tpm 1000000 --duration 70 --providers 1 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_service.providers.base import Purpose
from rag_service.providers.openai import OpenAIProvider

API_KEY = "benchmark-key"
# fmt: off
WORDS = [
    "vector", "index", "query", "document", "embedding", "model", "migration", "postgres",
    "shard", "batch", "latency", "cosine", "similarity", "rollout", "traffic", "percentage",
    "canary", "cache", "token", "budget", "retry", "limit", "window", "bucket", "header",
    "operator", "kubernetes", "job", "worker", "corpus", "category", "search", "rank",
]
# fmt: on


def corpus(count: int, seed: int) -> list[str]:
    """Texts of 10–110 words, like chunked documents of uneven length."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 110))) + f". Row {seed}-{i}."
        for i in range(count)
    ]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rag_service.testing.embedding_server",
            "--port",
            "0",
            "--tpm",
            str(args.tpm),
            "--latency",
            str(args.latency),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "EMBEDDING_SERVER_API_KEY": API_KEY},
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def server_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_stats", timeout=30) as response:  # noqa: S310
        stats: dict[str, Any] = json.load(response)
    return stats


async def backfill(args: argparse.Namespace, url: str) -> dict[str, Any]:
    # One provider is one pacer: --providers > 1 models separate Jobs sharing one API key.
    providers = [
        OpenAIProvider(
            model="text-embedding-3-small",
            dimensions=args.dimensions,
            api_key=API_KEY,
            base_url=f"{url}/v1",
            concurrency=args.concurrency,
        )
        for _ in range(args.providers)
    ]
    deadline = time.monotonic() + args.duration
    embedded = 0

    async def worker(shard: int) -> None:
        nonlocal embedded
        provider = providers[shard % len(providers)]
        batch_number = 0
        while time.monotonic() < deadline:
            batch = corpus(args.batch, seed=shard * 1_000_000 + batch_number)
            result = await provider.embed(batch, Purpose.DOCUMENT)
            embedded += len(result.vectors)
            batch_number += 1
            await asyncio.sleep(0.02)  # the database write between batches

    started = time.monotonic()
    try:
        await asyncio.gather(*(worker(shard) for shard in range(args.workers)))
    finally:
        for provider in providers:
            await provider.aclose()
    return {
        "elapsed": time.monotonic() - started,
        "embedded": embedded,
        "ratio": providers[0].pacer.ratio,
    }


def steady_state(
    records: list[dict[str, Any]], limit: int, warmup: float, empty: float = 0.02
) -> dict[str, float]:
    """Tokens admitted per minute once the initial full bucket is spent.

    The server's bucket holds a minute of tokens, so a window that starts with some banked and
    ends with none would credit the client with the bank. The window therefore runs between
    two admissions that left the bucket nearly empty (``empty`` × limit), and counts what was
    admitted in (t0, t1]: the refill in between paid for exactly that.
    """
    ok = [r for r in records if r["status"] == 200]
    spent, drained_at = 0, None
    for record in ok:
        spent += record["tokens"]
        if spent >= limit:
            drained_at = record["time"]
            break
    if drained_at is None:
        raise SystemExit("the run never spent the initial bucket: raise --duration")
    low = [
        r
        for r in ok
        if r["time"] >= drained_at + warmup and (r["tokens_left"] or 0.0) <= empty * limit
    ]
    if len(low) < 2 or low[-1]["time"] - low[0]["time"] < 20:
        raise SystemExit("no steady state of 20 s or more: raise --duration")
    t0, t1 = low[0]["time"], low[-1]["time"]
    tokens = sum(r["tokens"] for r in ok if t0 < r["time"] <= t1)
    return {
        "start": t0,
        "end": t1,
        "tokens": tokens,
        "per_minute": tokens / (t1 - t0) * 60,
        "left_start": low[0]["tokens_left"],
        "left_end": low[-1]["tokens_left"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpm", type=int, default=1_000_000, help="server tokens-per-minute limit")
    parser.add_argument("--duration", type=float, default=70.0, help="seconds of backfill")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds skipped after drain")
    parser.add_argument("--workers", type=int, default=4, help="backfill loops sharing a provider")
    parser.add_argument("--batch", type=int, default=250, help="texts per embed() call")
    parser.add_argument("--concurrency", type=int, default=4, help="provider concurrency")
    parser.add_argument(
        "--providers", type=int, default=1, help="independent providers (pacers) on one key"
    )
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    parser.add_argument("--dimensions", type=int, default=256)
    args = parser.parse_args()

    process, url = start_server(args)
    try:
        run = asyncio.run(backfill(args, url))
        stats = server_stats(url)
    finally:
        process.terminate()
        process.wait(timeout=10)

    records: list[dict[str, Any]] = stats["records"]
    steady = steady_state(records, args.tpm, args.warmup)
    refused = sum(1 for r in records if r["status"] == 429)
    share_429 = refused / len(records)
    in_window = [r for r in records if steady["start"] <= r["time"] <= steady["end"]]
    refused_steady = sum(1 for r in in_window if r["status"] == 429)
    achieved = steady["per_minute"] / args.tpm
    print(
        f"limit {args.tpm:,} TPM, {args.workers} workers × batch {args.batch} on "
        f"{args.providers} provider(s), concurrency {args.concurrency}, "
        f"latency {args.latency * 1000:.0f} ms"
    )
    print(
        f"run {run['elapsed']:.1f} s: {run['embedded']:,} texts, {len(records)} requests, "
        f"{stats['ok_tokens']:,} tokens; estimate ratio learned {run['ratio']:.2f}"
    )
    print(
        f"steady state {steady['end'] - steady['start']:.1f} s "
        f"(t={steady['start']:.1f}–{steady['end']:.1f} s, bucket at "
        f"{steady['left_start']:,.0f} and {steady['left_end']:,.0f} tokens): "
        f"{steady['per_minute']:,.0f} tokens/min"
    )
    print(f"achieved / limit: {achieved:.3f} (target >= 0.95)")
    print(
        f"429 share: {share_429:.2%} ({refused} of {len(records)}) (target < 1 %); "
        f"in the steady state {refused_steady} of {len(in_window)}"
    )
    return 0 if achieved >= 0.95 and share_429 < 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
