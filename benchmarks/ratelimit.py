"""How close to a rate limit does a long backfill run, and how often is it refused, on any limiter?

Starts the local embedding API as a subprocess with a tokens-per-minute limit enforced as a token
bucket, a sliding window or a fixed window (``--limiter``, ``--window``, ``--reset-report``),
drives one or more ``OpenAIProvider`` (``--providers``: independent pacers on one key, like
separate Jobs) as a backfill does (several workers embedding batch after batch), then reads the
server's own record of every request:

- the budget used: tokens admitted ÷ the most the limiter could admit over the run
  (target ≥ 0.95). The run starts at the first admission and ends when the backfill stops
  taking new batches (``--duration``; the batches under way then finish, with less and less
  demand, and are not counted). Bucket
  (capacity = LIMIT, refilled LIMIT per window, full at the start): LIMIT + LIMIT/window × the
  run's length, admissions over the whole run. Sliding window: LIMIT per whole window, over the
  whole windows from the first admission (``[t0, t0 + k·W)``), which is exactly the most a
  sliding window admits there. Fixed window: LIMIT per whole period, over the whole periods after
  the first admission (the server's own boundaries). A window's LIMIT is TPM × W / 60, so every
  style has the same per-minute budget; partial windows are left out on both sides of the ratio
  (``Limiter.budget`` in ``rag_service.testing.embedding_server`` is the definition);
- the share of requests answered 429 over the whole run (target < 1 %).

    .venv/bin/python benchmarks/ratelimit.py [--tpm 1000000 --duration 70 --providers 1 ...]
    .venv/bin/python benchmarks/ratelimit.py --limiter sliding --window 10 --reset-report empty
    .venv/bin/python benchmarks/ratelimit.py --matrix [--jobs 3]   # every cell, one table
    .venv/bin/python benchmarks/ratelimit.py --foreign openai --window 4 [--rpw 40]
    .venv/bin/python benchmarks/ratelimit.py --foreign-matrix   # issue 17 §3's limiters

``--foreign`` runs against ``rag_service.testing.foreign_limiter`` instead: a sliding window
written apart from the pacer (its own tokenizer, OpenAI's or Azure's header conventions). The
budget there is tokens admitted in the whole windows from the
first admission ÷ LIMIT per window × windows, for the tokens (the requests' share is printed
too: a requests limit spent with tokens to spare is budget left unused).
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_service.providers.base import Purpose
from rag_service.providers.openai import OpenAIProvider
from rag_service.testing.embedding_server import Limiter, make_limiter

API_KEY = "benchmark-key"
ROOT = Path(__file__).resolve().parents[1]
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
            "--limiter",
            args.limiter,
            "--window",
            str(args.window),
            "--reset-report",
            args.reset_report,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
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
        await asyncio.gather(*(worker(shard) for shard in range(max(args.workers, args.providers))))
    finally:
        for provider in providers:
            await provider.aclose()
    return {
        "deadline": deadline,
        "elapsed": time.monotonic() - started,
        "embedded": embedded,
        "ratio": providers[0].pacer.ratio,
        "styles": sorted({provider.pacer.style.value for provider in providers}),
    }


def steady_state(
    records: list[dict[str, Any]], limit: int, warmup: float, empty: float = 0.02
) -> dict[str, float] | None:
    """A bucket's tokens admitted per minute once the initial full bucket is spent.

    The window runs between two admissions that left the bucket nearly empty (``empty`` ×
    limit) and counts what was admitted in (t0, t1]: the refill in between paid for exactly
    that. None when the run has no such window of 20 s or more.
    """
    ok = [r for r in records if r["status"] == 200]
    spent, drained_at = 0, None
    for record in ok:
        spent += record["tokens"]
        if spent >= limit:
            drained_at = record["time"]
            break
    if drained_at is None:
        return None
    low = [
        r
        for r in ok
        if r["time"] >= drained_at + warmup and (r["tokens_left"] or 0.0) <= empty * limit
    ]
    if len(low) < 2 or low[-1]["time"] - low[0]["time"] < 20:
        return None
    t0, t1 = low[0]["time"], low[-1]["time"]
    tokens = sum(r["tokens"] for r in ok if t0 < r["time"] <= t1)
    return {"start": t0, "end": t1, "per_minute": tokens / (t1 - t0) * 60}


def backfill_against(
    start: Callable[[argparse.Namespace], tuple[subprocess.Popen[str], str]],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a server with ``start``, backfill through it, and return the run and the server's
    own record of it; the server is stopped whatever happens."""
    process, url = start(args)
    try:
        run = asyncio.run(backfill(args, url))
        stats = server_stats(url)
    finally:
        process.terminate()
        process.wait(timeout=10)
    return run, stats


def budget_from_record(
    stats: dict[str, Any], *, tpm: int, deadline: float, args: argparse.Namespace
) -> tuple[Limiter, float, int]:
    """From the server's record: the limiter rebuilt as the server started it, the share of its
    budget admitted from the first admission to ``deadline`` (``time.monotonic()``), and the
    requests refused (429)."""
    records: list[dict[str, Any]] = stats["records"]
    limiter = make_limiter(
        tpm,
        stats["tokens_limiter_started"],
        style=args.limiter,
        window=args.window,
        reset_report=args.reset_report,
    )
    # Sorted: a record is appended when its answer is sent, so a request admitted first may be
    # recorded second, and share_of_budget takes the first pair as the run's start.
    admitted = sorted((r["time"], r["tokens"]) for r in records if r["status"] == 200)
    refused = sum(1 for r in records if r["status"] == 429)
    end = deadline - stats["monotonic_origin"]  # on the records' clock
    budget = limiter.share_of_budget(admitted, end) if admitted else 0.0
    return limiter, budget, refused


def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    """One run: start the server, backfill, measure from the server's record."""
    run, stats = backfill_against(start_server, args)
    records: list[dict[str, Any]] = stats["records"]
    limiter, budget, refused = budget_from_record(
        stats, tpm=args.tpm, deadline=run["deadline"], args=args
    )
    steady = steady_state(records, limiter.limit, args.warmup) if args.limiter == "bucket" else None
    return {
        "limiter": args.limiter,
        "window": args.window,
        "reset_report": args.reset_report,
        "providers": args.providers,
        "tpm": args.tpm,
        "limit": limiter.limit,
        "elapsed": run["elapsed"],
        "embedded": run["embedded"],
        "ratio": run["ratio"],
        "learned": run["styles"],
        "requests": len(records),
        "refused": refused,
        "ok_tokens": stats["ok_tokens"],
        "budget": budget,
        "refused_share": refused / len(records),
        "steady_per_minute": steady["per_minute"] if steady else None,
    }


def start_foreign(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    flags = [
        f"--tokens={max(1, round(args.tpm * args.window / 60))}",
        f"--window={args.window}",
        f"--headers={args.foreign}",
        f"--reset-format={args.reset_format}",
        f"--latency={args.latency}",
    ]
    if args.rpw:
        flags.append(f"--rpw={args.rpw}")
    process = subprocess.Popen(
        [sys.executable, "-m", "rag_service.testing.foreign_limiter", "--port=0", *flags],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def run_foreign(args: argparse.Namespace) -> dict[str, Any]:
    """One run against the foreign limiter; the budget is the binding limit's (see above)."""
    run, stats = backfill_against(start_foreign, args)
    records: list[dict[str, Any]] = stats["records"]
    admitted = [r for r in records if r["status"] == 200]
    window = stats["window"]
    t0 = admitted[0]["time"]
    end = run["deadline"] - stats["monotonic_origin"]
    windows = int((end - t0) // window)
    counted = [r for r in admitted if r["time"] < t0 + windows * window]
    tokens_share = sum(r["tokens"] for r in counted) / (stats["tokens_limit"] * windows)
    requests_share = (
        len(counted) / (stats["requests_limit"] * windows) if stats["requests_limit"] else 0.0
    )
    refused = sum(1 for r in records if r["status"] == 429)
    return {
        "limiter": f"foreign {args.foreign}",
        "window": window,
        "reset_report": args.reset_format,
        "rpw": args.rpw,
        "providers": args.providers,
        "tpm": args.tpm,
        "limit": stats["tokens_limit"],
        "elapsed": run["elapsed"],
        "embedded": run["embedded"],
        "ratio": run["ratio"],
        "learned": run["styles"],
        "requests": len(records),
        "refused": refused,
        "ok_tokens": sum(r["tokens"] for r in admitted),
        # The tokens are what a backfill needs: a requests limit reached with tokens to spare
        # is budget left unused (the pacer's requests were too small), not a limit met.
        "budget": tokens_share,
        "tokens_share": tokens_share,
        "requests_share": requests_share,
        "refused_share": refused / len(records),
        "steady_per_minute": None,
    }


def foreign_cells(args: argparse.Namespace) -> list[list[str]]:
    """Issue 17 §3's limiters: 4-s sliding window, OpenAI's headers in both reset formats, with
    the requests limit off and binding, and Azure's headers; one provider each."""
    common = [
        "--window=4",
        f"--duration={args.duration:g}",
        f"--tpm={args.tpm}",
        f"--latency={args.latency}",
        f"--batch={args.batch}",
        f"--dimensions={args.dimensions}",
        f"--concurrency={args.concurrency}",
        f"--workers={args.workers}",
    ]
    # 40 requests per 4 s binds together with the tokens: the pacer's requests are about a
    # fortieth of the token limit.
    shapes = [
        ["--foreign=openai", "--reset-format=go"],
        ["--foreign=openai", "--reset-format=seconds"],
        ["--foreign=openai", "--reset-format=go", "--rpw=40"],
        ["--foreign=openai", "--reset-format=seconds", "--rpw=40"],
        ["--foreign=azure"],
        ["--foreign=azure", "--rpw=40"],
    ]
    return [[*shape, *common] for shape in shapes]


def cell_name(cell: dict[str, Any]) -> str:
    if cell["limiter"].startswith("foreign"):
        binding = f", {cell['rpw']} req/window" if cell.get("rpw") else ""
        fmt = f", reset {cell['reset_report']}" if cell["limiter"] == "foreign openai" else ""
        return f"{cell['limiter']} sliding {cell['window']:g} s{fmt}{binding}"
    if cell["limiter"] == "bucket":
        return f"bucket {cell['window']:g} s"
    report = f" (reset={cell['reset_report']})" if cell["limiter"] == "sliding" else ""
    return f"{cell['limiter']} {cell['window']:g} s{report}"


def met(cell: dict[str, Any]) -> bool:
    return bool(cell["budget"] >= 0.95 and cell["refused_share"] < 0.01)


def print_cell(cell: dict[str, Any]) -> None:
    print(
        f"{cell_name(cell)}, limit {cell['limit']:,} tokens per {cell['window']:g} s "
        f"({cell['tpm']:,} TPM), {cell['providers']} provider(s); learned {cell['learned']}"
    )
    print(
        f"run {cell['elapsed']:.1f} s: {cell['embedded']:,} texts, {cell['requests']} requests, "
        f"{cell['ok_tokens']:,} tokens; estimate ratio learned {cell['ratio']:.2f}"
    )
    if cell["steady_per_minute"] is not None:
        print(
            f"bucket steady state: {cell['steady_per_minute']:,.0f} tokens/min = "
            f"{cell['steady_per_minute'] / cell['tpm']:.3f} of the limit"
        )
    print(f"budget used over the run: {cell['budget']:.3f} (target >= 0.95)")
    print(
        f"429 share: {cell['refused_share']:.2%} ({cell['refused']} of {cell['requests']}) "
        "(target < 1 %)"
    )


def matrix_cells(args: argparse.Namespace) -> list[list[str]]:
    """Every cell as command-line flags: the bucket, then each window style × 4, 10, 60 s, each
    with 1, 2 and 4 providers. A cell lasts long enough for whole windows to dominate."""
    shapes: list[tuple[str, float, str]] = [("bucket", 60.0, "first")]
    for window in (4.0, 10.0, 60.0):
        shapes += [
            ("sliding", window, "first"),
            ("sliding", window, "empty"),
            ("fixed", window, "first"),
        ]
    cells = []
    for limiter, window, report in shapes:
        duration = 70.0 if limiter == "bucket" else max(45.0, 3 * window + 10)
        for providers in (1, 2, 4):
            cells.append(
                [
                    f"--limiter={limiter}",
                    f"--window={window:g}",
                    f"--reset-report={report}",
                    f"--providers={providers}",
                    f"--duration={duration:g}",
                    f"--tpm={args.tpm}",
                    f"--latency={args.latency}",
                    f"--batch={args.batch}",
                    f"--dimensions={args.dimensions}",
                    f"--concurrency={args.concurrency}",
                    f"--workers={args.workers}",
                ]
            )
    return cells


def run_matrix(args: argparse.Namespace) -> int:
    cells = foreign_cells(args) if args.foreign_matrix else matrix_cells(args)

    def one(flags: list[str]) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, __file__, "--json", *flags],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        if done.returncode not in (0, 1):
            raise SystemExit(f"cell {' '.join(flags)} failed:\n{done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {cell_name(result)}, {result['providers']} provider(s): done", flush=True)
        return result

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, cells))
    print(
        f"\n{len(results)} cells in {(time.monotonic() - started) / 60:.1f} min; "
        f"{args.tpm:,} TPM, latency {args.latency * 1000:.0f} ms, {args.jobs} cell(s) at once\n"
    )
    print("| limiter | providers | run | requests | budget used | 429s | met |")
    print("|---|---|---|---|---|---|---|")
    for cell in results:
        print(
            f"| {cell_name(cell)} | {cell['providers']} | {cell['elapsed']:.0f} s | "
            f"{cell['requests']} | {cell['budget']:.3f} | {cell['refused']} "
            f"({cell['refused_share']:.2%}) | {'yes' if met(cell) else '**no**'} |"
        )
    missed = [cell for cell in results if not met(cell)]
    print(f"\n{len(results) - len(missed)} of {len(results)} cells met both targets")
    return 0 if not missed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpm", type=int, default=1_000_000, help="server tokens-per-minute limit")
    parser.add_argument(
        "--limiter",
        choices=("bucket", "sliding", "fixed"),
        default="bucket",
        help="how the server enforces the limit (default: bucket)",
    )
    parser.add_argument(
        "--window", type=float, default=60.0, help="seconds per window; LIMIT = TPM × window / 60"
    )
    parser.add_argument(
        "--reset-report",
        choices=("first", "empty"),
        default="first",
        help="a sliding window's reset header: until the first room frees, or until empty",
    )
    parser.add_argument("--duration", type=float, default=70.0, help="seconds of backfill")
    parser.add_argument("--warmup", type=float, default=5.0, help="bucket: seconds after drain")
    parser.add_argument("--workers", type=int, default=4, help="backfill loops (at least one each)")
    parser.add_argument("--batch", type=int, default=250, help="texts per embed() call")
    parser.add_argument("--concurrency", type=int, default=4, help="provider concurrency")
    parser.add_argument(
        "--providers", type=int, default=1, help="independent providers (pacers) on one key"
    )
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    parser.add_argument("--dimensions", type=int, default=256)
    parser.add_argument("--matrix", action="store_true", help="run every cell and print a table")
    parser.add_argument("--jobs", type=int, default=1, help="--matrix: cells run at once")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument(
        "--foreign",
        choices=("openai", "azure"),
        default=None,
        help="run against rag_service.testing.foreign_limiter with these headers",
    )
    parser.add_argument("--reset-format", choices=("go", "seconds"), default="go")
    parser.add_argument("--rpw", type=int, default=None, help="--foreign: requests per window")
    parser.add_argument("--foreign-matrix", action="store_true", help="every foreign cell")
    args = parser.parse_args()

    if args.matrix or args.foreign_matrix:
        return run_matrix(args)
    cell = run_foreign(args) if args.foreign else run_cell(args)
    if args.json:
        print(json.dumps(cell))
    else:
        print_cell(cell)
    return 0 if met(cell) else 1


if __name__ == "__main__":
    sys.exit(main())
