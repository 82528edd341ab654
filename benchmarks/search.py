"""Search latency: the real service (v2) against the bare SQL k-NN query it runs, and HNSW recall.

    .venv/bin/python benchmarks/search.py [--rows 100000] [--requests 1000] [--recall-sample 200]

Builds a corpus (``--rows`` documents), migrates it to ``local:hash@768`` and builds the HNSW index
(m=16, ef_construction=64, the spec's defaults), then starts ``embedshift serve`` as a subprocess
(``python -m embedshift_operator.cli serve``: one uvicorn worker in its own process, as
deployed) and measures, all in this run on this machine (shared and noisy, so compare ratios):

- **bare SQL**: ``search_statement(layout, Version.V2, category=False)`` through psycopg with a
  pre-computed query vector, one connection per worker: the floor for a v2 search;
- **service, cached**: ``POST /api/rag/search`` with ``X-Embedding-Version: v2`` (httpx) for
  queries sampled from 200 whose embeddings the service holds in memory after the warm-up;
- **service, uncached**: the same with a query the service has never seen on every request, so
  each also misses the shared cache table, embeds, and queues a write to the table (written
  behind the answer, in batches);
- **HTTP only**: ``GET /api/monitoring/circuit-breaker`` (no database, no embedding), the cost of
  uvicorn + FastAPI + httpx alone.

Queries are member questions in the corpus's vocabulary (≈ 3,800 distinct ones from templates).
Each run at concurrency 1 and 32 with ``k`` = 10; the bare baseline runs before and after the
service runs and both count. The CPU time of the service process and of this process (the load
generator) is reported per request: on 2 cores they compete with each other and PostgreSQL.
Both versions use the ``local`` provider, so embedding costs ≈ nothing and what remains is the
service's own overhead. The v1 column is ``local:hash@32`` (``--source-dims``): v1 is not measured
here, and a 1536-d column would only make building the corpus slower.

Recall@10 of the service's v2 statement against the same statement run as an exact search
(index and bitmap scans disabled in the transaction), over ``--recall-sample`` queries from each
of two sets: member questions (as above) and held-out documents (the corpus generator with another
seed: the standard ANN methodology of queries from the data's own distribution). At the spec's
default ``hnsw.ef_search`` (``target.index.efSearch``, 100; the service and the bare baseline use
it too) and at ``--ef-search`` values (40 is pgvector's server default). The hashing embedder
gives many documents exactly the same similarity to a query, so the exact top 10 is often one
choice among ties:
recall is reported strictly (same ids) and tie-aware (an ANN result counts if it is as similar as
the exact 10th).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from rag_service.indexes import build_index
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers.local import HashEmbedder, LocalProvider
from rag_service.routing import Version
from rag_service.schema import Layout, inspect_source, setup
from rag_service.search import configure_connection, over_fetch, search_statement
from rag_service.service import ServiceSettings
from rag_service.spec import DataPlaneSpec, IndexSpec
from rag_service.testing.corpus import corpus_spec, create_corpus, documents
from rag_service.testing.postgres import create_database, drop_database, postgres_server
from rag_service.testing.service_process import start_serve, wait_healthy

TABLE = "documents"
MIGRATION = "bench/search"
TARGET_DIMS = 768
K = 10
SERVICE_POOL = ServiceSettings.pool_size  # the service's connection pool
DEFAULT_EF_SEARCH = IndexSpec().ef_search  # what the service sets unless told otherwise
RECALL_SEED = 99  # held-out documents: the corpus generator with another seed
ROOT = Path(__file__).resolve().parents[1]

# Questions a member of the sports centre might type, in the corpus's vocabulary.
# fmt: off
_QUESTIONS = {
    "facilities": (
        ["pool", "gym", "sauna", "parking", "locker room", "tennis court", "yoga studio", "cafe",
         "spa", "squash court", "climbing wall"],
        ["when does the {s} open {o}", "is the {s} open {o}", "{s} opening hours {o}",
         "what time does the {s} close {o}", "is the {s} accessible {o}",
         "can I reserve the {s} {o}", "is the {s} being renovated {o}", "is the {s} busy {o}",
         "is the {s} closed {o}"],
        ["on mondays", "at the weekend", "at seven", "before noon", "on sunday morning",
         "after nine", "during the holidays", "on public holidays", "in the evening",
         "from the north entrance", "on level two", "today", "tomorrow", "this week",
         "for wheelchair users", "in winter"],
    ),
    "pricing": (
        ["membership", "day pass", "family plan", "student rate", "parking fee", "towel hire",
         "annual membership", "senior rate", "guest pass", "ten visit card"],
        ["how much is the {s} {o}", "what does the {s} cost {o}",
         "is there a discount on the {s} {o}", "{s} price {o}",
         "can I get a refund on the {s} {o}", "what is included in the {s} {o}",
         "has the {s} gone up {o}", "how do I pay for the {s} {o}"],
        ["for two adults", "this year", "per month", "with a student card", "for one free guest",
         "at half price", "after the price rise", "for children", "on weekdays", "in euros",
         "if I cancel", "for a family of four", "next year", "online"],
    ),
    "events": (
        ["yoga class", "swim meet", "open day", "concert", "tennis cup", "kids camp", "workshop",
         "aqua aerobics", "spinning class", "summer party"],
        ["when does the {s} start {o}", "is the {s} cancelled {o}", "tickets for the {s} {o}",
         "where is the {s} held {o}", "has the {s} been moved {o}",
         "how do I sign up for the {s} {o}", "is there still room in the {s} {o}",
         "who runs the {s} {o}"],
        ["on friday evening", "in the spring", "in june", "in the main hall", "at the outdoor pool",
         "in august", "next week", "this weekend", "for beginners", "for kids", "in the morning",
         "after school", "in the autumn", "on saturday"],
    ),
}
# fmt: on


def realistic_queries(seed: int = 11) -> list[str]:
    """Every distinct question the templates make (≈ 3,800), in a fixed shuffled order. Pure."""
    queries = [
        template.format(s=subject, o=qualifier)
        for subjects, templates, qualifiers in _QUESTIONS.values()
        for subject, template, qualifier in itertools.product(subjects, templates, qualifiers)
    ]
    random.Random(seed).shuffle(queries)
    return queries


@dataclass
class Run:
    label: str
    concurrency: int
    latencies: list[float]  # seconds, per request
    wall: float  # seconds for the whole run
    client_cpu: float  # CPU seconds this process spent (the load generator: httpx or psycopg)
    service_cpu: float | None  # CPU seconds the service process spent, if one was measured

    def p(self, q: float) -> float:
        """The q-th percentile in milliseconds."""
        return float(np.percentile(self.latencies, q)) * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall

    def cpu_ms(self, seconds: float | None) -> str:
        """CPU milliseconds per request, or a dash."""
        return "–" if seconds is None else f"{seconds / len(self.latencies) * 1000:.2f}"

    def __add__(self, other: Run) -> Run:
        """Two runs of the same kind as one."""
        both = None
        if self.service_cpu is not None and other.service_cpu is not None:
            both = self.service_cpu + other.service_cpu
        return Run(
            self.label,
            self.concurrency,
            self.latencies + other.latencies,
            self.wall + other.wall,
            self.client_cpu + other.client_cpu,
            both,
        )


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(
    label: str,
    concurrency: int,
    items: Sequence[Any],
    one: Callable[[int, Any], Awaitable[None]],
    service_pid: int | None = None,
) -> Run:
    """Run ``one(worker, item)`` for every item with ``concurrency`` workers; time each call."""
    queue = iter(items)
    latencies: list[float] = []

    async def worker(index: int) -> None:
        for item in queue:  # a shared iterator: each item is taken by exactly one worker
            started = time.perf_counter()
            await one(index, item)
            latencies.append(time.perf_counter() - started)

    cpu = time.process_time()
    service_cpu = process_cpu(service_pid) if service_pid else None
    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    if service_pid and service_cpu is not None:
        service_cpu = process_cpu(service_pid) - service_cpu
    return Run(label, concurrency, latencies, wall, time.process_time() - cpu, service_cpu)


# ---- the world -----------------------------------------------------------------------------------


def build_world(url: str, spec: DataPlaneSpec, rows: int, source_dims: int) -> None:
    def step(what: str, started: float) -> None:
        print(f"  {what} in {time.perf_counter() - started:.1f}s", flush=True)

    started = time.perf_counter()
    create_corpus(url, table=TABLE, count=rows, source_dimensions=source_dims)
    step(f"corpus of {rows:,} documents", started)

    async def prepare() -> None:
        started = time.perf_counter()
        await setup(url, spec, migration=MIGRATION)
        provider = LocalProvider(model="hash", dimensions=TARGET_DIMS, processes=1)
        try:
            report = await run_migration(
                url,
                spec,
                provider=provider,
                options=RunOptions(batch_size=1000),
                migration=MIGRATION,
            )
        finally:
            await provider.aclose()
        assert report.embedded == rows, report
        step(f"migrated to local:hash@{TARGET_DIMS}", started)
        print("  building the HNSW index (m=16, ef_construction=64) …", flush=True)
        started = time.perf_counter()
        index = await build_index(url, spec)
        step(f"index {index.name} {index.action}", started)

    asyncio.run(prepare())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        # The routing row at 100 %: unforced requests would be v2 too (all of these are forced).
        conn.execute(
            "UPDATE embedshift_rollout SET percentage = 100, updated_at = now() "
            "WHERE migration = %s",
            [MIGRATION],
        )


def serve_flags(source_dims: int) -> list[str]:
    return [
        "--table", TABLE, "--category-column", "category", "--source-column", "embedding",
        "--source", f"local:hash@{source_dims}", "--target", f"local:hash@{TARGET_DIMS}",
        "--migration", MIGRATION, "--allow-version-override",
    ]  # fmt: skip


# The forced v2 searches below need the override's bearer token (the webhook's secret), and so
# does GET /api/monitoring/circuit-breaker (the HTTP-only floor).
BENCH_TOKEN = secrets.token_hex(16)


# ---- the measurements ----------------------------------------------------------------------------


def params(vector: np.ndarray) -> dict[str, Any]:
    """The v2 statement's parameters, as ``rag_service.search.search`` passes them."""
    return {"q": vector, "k": K, "fetch": over_fetch(K), "category": None}


async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """As the service sets up its pool's connections, with the spec's default ef_search."""
    await configure_connection(conn, ef_search=DEFAULT_EF_SEARCH)


async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await configure(conn)
    return conn


async def plan_shape(url: str, layout: Layout, vector: np.ndarray) -> str:
    """What the planner does with the v2 statement: a one-line summary."""
    statement = search_statement(layout, Version.V2, category=False)
    conn = await connect(url)
    async with conn:
        cur = await conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + statement, params(vector)
        )
        explained = (await cur.fetchone() or [[{}]])[0][0]
    nodes: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        name = node.get("Node Type", "?")
        if "Index Name" in node:
            name += f" ({'HNSW' if node['Index Name'] == layout.index_name else 'btree'})"
        if name not in nodes:
            nodes.append(name)
        for child in node.get("Plans", []):
            walk(child)

    walk(explained["Plan"])
    return f"{', '.join(nodes)}; {explained['Execution Time']:.1f} ms"


async def bare_run(
    url: str,
    layout: Layout,
    vectors: np.ndarray,
    concurrency: int,
    n: int,
    seed: int,
    connections: int | None = None,
) -> Run:
    """``concurrency`` workers: one connection each, or a psycopg pool of ``connections``.

    The pool is the service's kind (``psycopg_pool``, which hands a returned connection to the
    longest waiter): a home-made queue lets a worker take back the connection it just returned,
    starves the others and flatters the percentiles.
    """
    statement = search_statement(layout, Version.V2, category=False)
    rng = random.Random(seed)
    picks = [vectors[rng.randrange(len(vectors))] for _ in range(n)]
    if connections:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=connections,
            max_size=connections,
            configure=configure,
            kwargs={"autocommit": True},
            open=False,
        )
        await pool.open(wait=True)

        async def pooled(worker: int, vector: np.ndarray) -> None:
            del worker
            async with pool.connection() as conn:
                cur = await conn.execute(statement, params(vector))
                assert len(await cur.fetchall()) == K

        try:
            return await drive(f"bare SQL, pool {connections}", concurrency, picks, pooled)
        finally:
            await pool.close()
    conns = [await connect(url) for _ in range(concurrency)]
    try:

        async def one(worker: int, vector: np.ndarray) -> None:
            cur = await conns[worker].execute(statement, params(vector))
            assert len(await cur.fetchall()) == K

        return await drive("bare SQL", concurrency, picks, one)
    finally:
        for conn in conns:
            await conn.close()


@dataclass(frozen=True)
class Target:
    """The running service: HTTP clients for it and its process id (for its CPU time).

    One ``httpx.AsyncClient`` (one connection) per load-generating worker: a single client
    shared by 32 workers costs ~3× the client CPU per request (its pool's bookkeeping grows with
    its connections), and on 2 cores the load generator's CPU is taken from the service.
    """

    clients: list[httpx.AsyncClient]
    pid: int


async def service_run(
    service: Target, label: str, concurrency: int, queries: Sequence[str], cached: bool | None
) -> Run:
    async def one(worker: int, query: str) -> None:
        response = await service.clients[worker].post(
            "/api/rag/search",
            json={"query": query, "k": K},
            headers={"X-Embedding-Version": "v2", "Authorization": f"Bearer {BENCH_TOKEN}"},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["version"] == "v2" and len(answer["results"]) == K, answer
        assert cached is None or answer["cache_hit"] is cached, (query, answer["cache_hit"])

    return await drive(label, concurrency, queries, one, service.pid)


async def http_floor_run(service: Target, concurrency: int, n: int) -> Run:
    """The HTTP stack alone: a small JSON endpoint with no database and no embedding."""

    async def one(worker: int, item: int) -> None:
        del item
        response = await service.clients[worker].get(
            "/api/monitoring/circuit-breaker", headers={"Authorization": f"Bearer {BENCH_TOKEN}"}
        )
        assert response.status_code == 200, response.text
        response.json()

    return await drive("HTTP only (no search)", concurrency, range(n), one, service.pid)


@dataclass
class Workload:
    vectors: np.ndarray  # the query vectors the bare baseline samples from
    cached: list[str]  # queries whose embeddings the service holds after the warm-up
    fresh: Iterator[str]  # queries never sent before, each used once


async def measure(
    base: str,
    pid: int,
    url: str,
    layout: Layout,
    work: Workload,
    runs: Sequence[tuple[int, int]],  # (concurrency, requests)
    warm_up: int,
) -> list[list[Run]]:
    """Per concurrency: [bare, service cached, service uncached, HTTP only].

    The bare baseline runs before and after the service runs; both count.
    """
    rng = random.Random(1)
    # Idle connections are dropped after 2 s, before uvicorn closes them (5 s), so a request
    # never races a server-side close between runs.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2)
    results = []
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=base, timeout=600, limits=limits)
            )
            for _ in range(max(c for c, _ in runs))
        ]
        service = Target(clients, pid)
        print(f"  warm-up: {warm_up} requests …", flush=True)
        await service_run(service, "warm-up", 8, work.cached[:warm_up], cached=None)
        await service_run(service, "warm-up", 8, rng.choices(work.cached, k=warm_up), cached=True)
        await http_floor_run(service, 8, warm_up)
        await bare_run(url, layout, work.vectors, 8, warm_up, seed=2)
        for concurrency, n in runs:
            print(f"  concurrency {concurrency}: {n:,} requests per run …", flush=True)
            bare = await bare_run(url, layout, work.vectors, concurrency, n, seed=n)
            pooled = None
            if concurrency > SERVICE_POOL:  # like for like: PostgreSQL sees ≤ 10 at once
                pooled = await bare_run(
                    url, layout, work.vectors, concurrency, n, seed=n, connections=SERVICE_POOL
                )
            picks = rng.choices(work.cached, k=n)
            fresh = list(itertools.islice(work.fresh, n))
            row = [
                await service_run(service, "service, cached", concurrency, picks, True),
                await service_run(service, "service, uncached", concurrency, fresh, False),
                await http_floor_run(service, concurrency, n),
            ]
            bare += await bare_run(url, layout, work.vectors, concurrency, n, seed=n + 1)
            if pooled is not None:
                pooled += await bare_run(
                    url, layout, work.vectors, concurrency, n, seed=n + 1, connections=SERVICE_POOL
                )
                row.insert(0, pooled)
            results.append([bare, *row])
    return results


@dataclass(frozen=True)
class Recall:
    queries: str  # which query set
    ef_search: int
    strict: float  # share of the exact top K that the ANN search returned
    tie_aware: float  # ... counting an ANN result as right if it is as near as the exact K-th
    wrong_cluster: int  # queries whose ANN top hit is of another category than the exact one
    lost: int  # queries that got fewer than half of their exact top K
    p50_ms: float  # the ANN statement's median time at this ef_search (one connection)


async def recall(
    url: str, layout: Layout, query_sets: dict[str, list[str]], ef_values: Sequence[int]
) -> list[Recall]:
    """Recall@K of the v2 statement against exact search, per query set and ``hnsw.ef_search``.

    Nothing is prepared (``prepare=False``): psycopg prepares a statement it has run five times,
    and a plan cached while index scans were off would make every later "ANN" search exact.
    """
    statement = search_statement(layout, Version.V2, category=False)
    conn = await connect(url)  # autocommit: each transaction below is a real one
    results = []
    async with conn:
        for label, texts in query_sets.items():
            vectors = HashEmbedder(TARGET_DIMS, seed="hash").embed(texts)
            exact_rows = []
            for vector in vectors:
                async with conn.transaction():
                    await conn.execute("SET LOCAL enable_indexscan = off")
                    await conn.execute("SET LOCAL enable_bitmapscan = off")
                    cur = await conn.execute(statement, params(vector), prepare=False)
                    exact_rows.append(await cur.fetchall())
            for ef in ef_values:
                strict = tied = total = wrong = lost = 0
                times = []
                for vector, exact in zip(vectors, exact_rows, strict=True):
                    async with conn.transaction():
                        await conn.execute(
                            sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef))
                        )
                        started = time.perf_counter()
                        cur = await conn.execute(statement, params(vector), prepare=False)
                        approx = await cur.fetchall()
                        times.append(time.perf_counter() - started)
                    exact_ids = {r[0] for r in exact}
                    floor = min(r[3] for r in exact) - 1e-6
                    found = sum(r[0] in exact_ids for r in approx)
                    strict += found
                    tied += sum(r[0] in exact_ids or r[3] >= floor for r in approx)
                    total += len(exact)
                    wrong += approx[0][2] != exact[0][2]
                    lost += found < len(exact) / 2
                results.append(
                    Recall(
                        label,
                        ef,
                        strict / total,
                        tied / total,
                        wrong,
                        lost,
                        float(np.median(times)) * 1000,
                    )
                )
    return results


def report(results: list[list[Run]]) -> None:
    """One line per run; a service run's overhead against each bare baseline of its row."""
    header = f"{'':27} {'n':>6} {'p50':>8} {'p95':>8} {'req/s':>7} {'CPU ms/req':>12}"
    print(f"{header}  {'p95 overhead':>12} {'p95 ratio':>9}")
    print(f"{'':59}{'svc':>6} {'client':>6}")
    for row in results:
        baselines = [run for run in row if run.label.startswith("bare")]
        for run in row:
            print(
                f"c={run.concurrency:<3} {run.label:<22} {len(run.latencies):>6} {run.p(50):8.2f}"
                f" {run.p(95):8.2f} {run.rate:7.1f} {run.cpu_ms(run.service_cpu):>6}"
                f" {run.cpu_ms(run.client_cpu):>6}",
                end="",
            )
            if not run.label.startswith("service"):
                print()
                continue
            for i, bare in enumerate(baselines):
                print(
                    f"{'' if i == 0 else ' ' * 73}  {run.p(95) - bare.p(95):+9.1f} ms "
                    f"{run.p(95) / bare.p(95):8.2f}×   (p50 {run.p(50) - bare.p(50):+.1f} ms, "
                    f"{run.p(50) / bare.p(50):.2f}×) vs {bare.label}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--source-dims", type=int, default=32, help="v1 column (not measured)")
    parser.add_argument(
        "--requests", type=int, default=1000, help="per run at concurrency 1; twice at 32"
    )
    parser.add_argument("--cached-queries", type=int, default=200)
    parser.add_argument("--recall-sample", type=int, default=200)
    parser.add_argument(
        "--ef-search",
        type=int,
        nargs="*",
        default=[40, 400],
        help="recall at these too (40 is pgvector's server default)",
    )
    args = parser.parse_args()
    queries = realistic_queries()
    needed = args.cached_queries + 3 * args.requests
    if len(queries) < needed:
        raise SystemExit(f"only {len(queries)} distinct queries; lower --requests (need {needed})")
    spec = corpus_spec(
        TABLE, source_dimensions=args.source_dims, target=f"local:hash@{TARGET_DIMS}"
    )
    work = Workload(
        vectors=HashEmbedder(TARGET_DIMS, seed="hash").embed(queries),  # = local:hash@768's
        cached=queries[: args.cached_queries],
        fresh=iter(queries[args.cached_queries :]),
    )
    runs = [(1, args.requests), (32, 2 * args.requests)]

    with postgres_server() as admin:
        name, url = create_database(admin, prefix="bench_search")
        try:
            print(f"building the world ({args.rows:,} documents) …", flush=True)
            build_world(url, spec, args.rows, args.source_dims)

            async def open_layout() -> Layout:
                conn = await psycopg.AsyncConnection.connect(url)
                async with conn:
                    return await inspect_source(conn, spec)

            layout = asyncio.run(open_layout())
            shape = asyncio.run(plan_shape(url, layout, work.vectors[0]))
            print(f"plan: {shape}", flush=True)
            print(f"recall@{K} over {args.recall_sample} queries per set …", flush=True)
            started = time.perf_counter()
            query_sets = {
                "questions": random.Random(5).sample(queries, args.recall_sample),
                # Same distribution as the corpus but not in it: another seed, and ids (the
                # "Note <id>" word) past the corpus's.
                "held-out documents": [
                    text
                    for _, text, _ in itertools.islice(
                        documents(args.rows + args.recall_sample, seed=RECALL_SEED),
                        args.rows,
                        None,
                    )
                ],
            }
            ef_values = [DEFAULT_EF_SEARCH, *(e for e in args.ef_search if e != DEFAULT_EF_SEARCH)]
            recalls = asyncio.run(recall(url, layout, query_sets, ef_values))
            recall_seconds = time.perf_counter() - started
            log = Path(tempfile.gettempdir()) / f"embedshift-bench-search-{os.getpid()}.log"
            service, base = start_serve(
                serve_flags(args.source_dims),
                env={**os.environ, "DATABASE_URL": url, "ALERT_WEBHOOK_SECRET": BENCH_TOKEN},
                log=log,
            )
            print(f"service at {base} (log {log})", flush=True)
            try:
                wait_healthy(service, base, log)
                results = asyncio.run(measure(base, service.pid, url, layout, work, runs, 300))
            finally:
                service.terminate()
                service.wait(30)
        finally:
            drop_database(admin, name)

    print()
    print(f"v2 search, k={K}, {args.rows:,} documents, {TARGET_DIMS}-d HNSW (milliseconds)")
    print(f"plan: {shape}")
    report(results)
    print("targets: service p95 overhead ≤ 15 ms and p95 ratio ≤ 3× bare")
    print()
    print(
        f"recall@{K} of the v2 statement vs the same statement as an exact search, "
        f"{args.recall_sample} queries per set ({recall_seconds:.0f}s; target ≥ 0.95 at the "
        f"default ef_search, the spec's {DEFAULT_EF_SEARCH})"
    )
    for r in recalls:
        default = " (default)" if r.ef_search == DEFAULT_EF_SEARCH else ""
        print(
            f"  {r.queries:<18} hnsw.ef_search = {r.ef_search:>3}{default:<10}: "
            f"strict {r.strict:.3f}, tie-aware {r.tie_aware:.3f}; top hit from another "
            f"category: {r.wrong_cluster}; under half found: {r.lost}; "
            f"p50 {r.p50_ms:.1f} ms"
        )
    if "HNSW" not in shape:
        print("WARNING: the v2 statement did not use the HNSW index: these are exact searches")


if __name__ == "__main__":
    main()
