"""The data plane at a million rows (issue 17 §2): backfill, index, verify and search.

    .venv/bin/python -m benchmarks.million [--rows 1000000] [--dimensions 256]
        [--stages prepare,backfill,index,verify,search] [--vecshift-rows 0]
        [--data-dir /var/tmp/embedshift-million]

One corpus, kept between runs on a PostgreSQL of its own under ``--data-dir`` (building a million
60–120-word documents and their v1 vectors takes minutes, and each stage is run and re-run
apart): ``documents(id, content, category, embedding vector(d))``, the v1 vectors from
``local:hash@d`` (the sample corpus, :data:`rag_service.testing.corpus.CHUNK_SIZED`). The target
is ``openai:text-embedding-3-small@d`` on the local embedding API (no rate limit), reached
through the real ``openai`` SDK; every embedshift step runs as its CLI subprocess, as a Job would.
256-d rather than 1536-d: the disk and the hour this session has force it (a 1536-d million
is 6 GB of vectors and an HNSW build several times as long).

Stages (each prints its table; ratios are taken within the stage, back to back):

- **prepare**: the corpus (skipped when it is already there) and the v1 column's HNSW index
  (the application's, built like the hand-tuned one below).
- **backfill**: ``migrate setup`` + ``migrate run`` (spec defaults), the worker's and the API
  server's RSS sampled each second; then the same vectors read back and landed by one raw
  binary COPY into an empty ``(id bigint PRIMARY KEY, vector)`` table (the ceiling for landing
  them at all) and into a table shaped like the side table (its columns, keys and foreign key).
  With ``--vecshift-rows N``: vecshift 0.4 at its defaults on a copy of the first N rows
  (``benchmarks.vecshift_baseline``), through the same server.
- **index**: a hand-tuned ``CREATE INDEX … USING hnsw`` (maintenance_work_mem 8GB, the graph fits;
  max_parallel_maintenance_workers = cores; not CONCURRENTLY, the fastest way), dropped, then
  ``migrate index`` at its defaults (it sizes itself, and builds CONCURRENTLY so writes go on);
  recall@10 of the index at the spec's ef_search (100) against exact search (numpy over all
  vectors) for 200 held-out documents embedded by the API.
- **verify**: ``migrate verify`` at its defaults, timed.
- **search**: the service's v1 and v2 statements (``rag_service.search.search_statement``) on one
  connection, 300 held-out queries each after 50 warm-up, k = 10, ef_search 100: p50/p95; the
  indexes' sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.backfill import copy_bare, copy_same_shape  # noqa: E402
from benchmarks.vecshift_baseline import embedding_server, run_vecshift  # noqa: E402
from rag_service.routing import Version  # noqa: E402
from rag_service.schema import layout_for  # noqa: E402
from rag_service.search import search_statement  # noqa: E402
from rag_service.spec import DatabaseSpec, DataPlaneSpec, EmbeddingSpec  # noqa: E402
from rag_service.testing.corpus import CHUNK_SIZED, create_corpus, documents  # noqa: E402
from rag_service.testing.postgres import database_url, postgres_server  # noqa: E402

API_KEY = "million-bench-key"
MODEL = "text-embedding-3-small"
EF_SEARCH = 100
HELD_OUT_SEED = 99


@dataclass
class Rss:
    """VmRSS of a process, sampled every second on a thread: (seconds since start, bytes)."""

    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        started = time.monotonic()
        while not stop.wait(1.0):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append((time.monotonic() - started, int(line.split()[1]) * 1024))

    def at(self, share: float) -> int:
        """RSS at ``share`` of the run (0.1 = a tenth of the way)."""
        return self.samples[min(len(self.samples) - 1, int(share * len(self.samples)))][1]

    def line(self, name: str) -> str:
        if not self.samples:
            return f"{name}: no samples"
        mib = [self.at(s) / 2**20 for s in (0.1, 0.5, 0.9)]
        peak = max(b for _, b in self.samples) / 2**20
        return (
            f"{name} RSS at 10 % / 50 % / 90 % of the run: {mib[0]:.0f} / {mib[1]:.0f} / "
            f"{mib[2]:.0f} MiB, peak {peak:.0f} MiB ({len(self.samples)} samples)"
        )


@contextmanager
def sampled(*pids: int) -> Iterator[list[Rss]]:
    stop = threading.Event()
    samplers = [Rss(pid) for pid in pids]
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in samplers]
    for thread in threads:
        thread.start()
    try:
        yield samplers
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def spec(dimensions: int, base_url: str) -> DataPlaneSpec:
    return DataPlaneSpec(
        database=DatabaseSpec(
            table="documents", category_column="category", source_embedding_column="embedding"
        ),
        source=EmbeddingSpec.parse(f"local:hash@{dimensions}"),
        target=EmbeddingSpec.parse(f"openai:{MODEL}@{dimensions}").model_copy(
            update={"base_url": base_url}
        ),
    )


def cli_flags(url: str, dimensions: int, base_url: str) -> list[str]:
    return [
        "--database-url", url, "--table", "documents", "--category-column", "category",
        "--source-column", "embedding", "--source", f"local:hash@{dimensions}",
        "--target", f"openai:{MODEL}@{dimensions}", "--target-base-url", base_url,
    ]  # fmt: skip


def embedshift(*args: str, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "embedshift_operator.cli", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "EMBEDSHIFT_TARGET_API_KEY": API_KEY},
    )


def run_step(*args: str, log: Path) -> float:
    """Run an embedshift command to its end; its wall seconds. Fails loudly."""
    started = time.perf_counter()
    code = embedshift(*args, log=log).wait()
    if code != 0:
        raise SystemExit(f"`embedshift {' '.join(args[:2])}` exited {code}: see {log}")
    return time.perf_counter() - started


def held_out_queries(base_url: str, dimensions: int, count: int) -> list[np.ndarray]:
    """Documents the corpus does not hold (another seed), embedded by the API through the SDK."""
    import openai

    client = openai.OpenAI(api_key=API_KEY, base_url=base_url)
    texts = [
        text for _, text, _ in documents(count, seed=HELD_OUT_SEED, sentence_count=CHUNK_SIZED)
    ]
    vectors: list[np.ndarray] = []
    for start in range(0, len(texts), 100):
        answer = client.embeddings.create(
            model=MODEL, input=texts[start : start + 100], dimensions=dimensions
        )
        vectors += [np.asarray(item.embedding, dtype=np.float32) for item in answer.data]
    return vectors


def as_array(value: object) -> np.ndarray:
    # pgvector's loader gives numpy for text results and a Vector for binary ones.
    return value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)


def read_vectors(url: str, table: str) -> tuple[list[int], np.ndarray]:
    with psycopg.connect(url) as conn:
        register_vector(conn)
        with conn.cursor(name="vectors") as cur:
            cur.itersize = 20_000
            cur.execute(
                sql.SQL("SELECT id, embedding FROM {} ORDER BY id").format(sql.Identifier(table))
            )
            rows = cur.fetchall()
    return [r[0] for r in rows], np.stack([as_array(r[1]) for r in rows]).astype(np.float32)


def hand_tuned_index(url: str, table: str, name: str) -> float:
    """Seconds for the fastest CREATE INDEX a person would write for this table."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute("SET maintenance_work_mem = '8GB'")
        conn.execute(
            sql.SQL("SET max_parallel_maintenance_workers = {}").format(
                sql.Literal(os.cpu_count() or 1)
            )
        )
        started = time.perf_counter()
        conn.execute(
            sql.SQL(
                "CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops) "
                "WITH (m = 16, ef_construction = 64)"
            ).format(sql.Identifier(name), sql.Identifier(table))
        )
        return time.perf_counter() - started


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, base_url: str) -> None:
        self.args = args
        self.url = url
        self.base_url = base_url
        self.spec = spec(args.dimensions, base_url)
        self.layout = layout_for(self.spec, id_type="bigint")
        self.flags = cli_flags(url, args.dimensions, base_url)
        self.log = Path(args.data_dir) / "million.log"
        self.target = self.layout.target.name
        self.server_pid = child_pid("rag_service.testing.embedding_server")

    def prepare(self) -> None:
        with psycopg.connect(self.url) as conn:
            present = conn.execute("SELECT to_regclass('documents') IS NOT NULL").fetchone()
            rows = (
                conn.execute("SELECT count(*) FROM documents").fetchone()
                if present and present[0]
                else (0,)
            )
        if rows and rows[0] == self.args.rows:
            print(f"prepare: the corpus of {self.args.rows:,} rows is there")
        else:
            started = time.perf_counter()
            create_corpus(
                self.url,
                count=self.args.rows,
                source_dimensions=self.args.dimensions,
                sentence_count=CHUNK_SIZED,
                chunk=20_000,
            )
            print(
                f"prepare: corpus of {self.args.rows:,} rows "
                f"in {time.perf_counter() - started:.0f}s"
            )
        with psycopg.connect(self.url) as conn:
            has_v1_index = conn.execute(
                "SELECT to_regclass('documents_v1_hnsw') IS NOT NULL"
            ).fetchone()
        if not (has_v1_index and has_v1_index[0]):
            seconds = hand_tuned_index(self.url, "documents", "documents_v1_hnsw")
            print(f"prepare: v1 HNSW index in {seconds:.0f}s")

    def backfill(self) -> None:
        # A fresh start: every table setup made (side table, queue, status, checkpoint, routing).
        with psycopg.connect(self.url, autocommit=True) as conn:
            for (table,) in conn.execute(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname LIKE 'embedshift%'"
            ).fetchall():
                conn.execute(
                    sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table))
                )
        run_step("migrate", "setup", *self.flags, log=self.log)
        started = time.perf_counter()
        worker = embedshift("migrate", "run", *self.flags, log=self.log)
        with sampled(worker.pid, self.server_pid) as (worker_rss, server_rss):
            code = worker.wait()
        migrate_seconds = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"migrate run exited {code}: see {self.log}")
        ids, vectors = read_vectors(self.url, self.target)
        if len(ids) != self.args.rows:
            raise SystemExit(f"the side table holds {len(ids):,} rows, not {self.args.rows:,}")
        with psycopg.connect(self.url) as conn:
            texts_cats = conn.execute(
                "SELECT content, category FROM documents ORDER BY id"
            ).fetchall()
        texts = [t for t, _ in texts_cats]
        cats = [c for _, c in texts_cats]
        bare = copy_bare(self.url, ids, vectors)
        shape = copy_same_shape(self.url, self.target, ids, vectors, texts, cats)
        rows = self.args.rows
        rate = rows / migrate_seconds
        print(f"\nbackfill of {rows:,} rows ({self.args.dimensions}-d), {date()}")
        print(
            f"  migrate run (openai SDK → local API)  {rate:9,.0f} rows/s  ({migrate_seconds:.0f}s)"
        )
        print(
            f"  raw COPY, bare (id, vector)          {rows / bare:9,.0f} rows/s  ({bare:.1f}s)  "
            f"ratio {bare / migrate_seconds:.3f}"
        )
        print(
            f"  raw COPY, side table's shape         {rows / shape:9,.0f} rows/s  ({shape:.1f}s)  "
            f"ratio {shape / migrate_seconds:.3f}"
        )
        print("  " + worker_rss.line("worker"))
        print("  " + server_rss.line("embedding API"))
        if self.args.vecshift_rows:
            self.vecshift(rate)

    def vecshift(self, ours: float) -> None:
        rows = self.args.vecshift_rows
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS vecshift_docs")
            conn.execute(
                "CREATE TABLE vecshift_docs AS SELECT id, content, category FROM documents "
                "WHERE id <= %s",
                [rows],
            )
            conn.execute("ALTER TABLE vecshift_docs ADD PRIMARY KEY (id)")
        run = run_vecshift(
            database_url=self.url,
            table="vecshift_docs",
            text_column="content",
            id_column="id",
            base_url=self.base_url,
            api_key=API_KEY,
            model=MODEL,
            dimensions=self.args.dimensions,
            workdir=Path(self.args.data_dir),
        )
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP TABLE vecshift_docs")
        print(
            f"  vecshift 0.4 apply, {rows:,} rows      {run.rows_per_second:9,.0f} rows/s  "
            f"({run.seconds:.0f}s backfill, {run.total_seconds:.0f}s with its index)  "
            f"embedshift ÷ vecshift = {ours / run.rows_per_second:.1f}× (goal ≥ 5×)"
        )

    def index(self) -> None:
        hand = hand_tuned_index(self.url, self.target, "bench_hand_tuned")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP INDEX bench_hand_tuned")
            conn.execute(
                sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(self.layout.index_name))
            )
        started = time.perf_counter()
        run_step("migrate", "index", *self.flags, "--json", log=self.log)
        ours = time.perf_counter() - started
        report = json.loads(self.log.read_text().strip().splitlines()[-1])
        recall = self.recall()
        print(
            f"\nindex over {self.args.rows:,} rows ({self.args.dimensions}-d, m 16, "
            f"ef_construction 64), {date()}"
        )
        print(f"  hand-tuned CREATE INDEX (8GB, {os.cpu_count()} workers)  {hand:7.0f}s")
        print(
            f"  migrate index (CONCURRENTLY, {report['maintenance_work_mem'] / 2**20:.0f} MiB, "
            f"up to "
            f"{report['parallel_workers']} workers)  {ours:7.0f}s  (build {report['seconds']:.0f}s)"
        )
        print(f"  speed ratio hand ÷ ours = {hand / ours:.2f} (goal ≥ 0.9)")
        print(f"  recall@10 at ef_search {EF_SEARCH}, 200 held-out documents: {recall:.3f}")

    def recall(self) -> float:
        ids, vectors = read_vectors(self.url, self.target)
        id_array = np.asarray(ids)
        queries = held_out_queries(self.base_url, self.args.dimensions, 200)
        found = 0
        with psycopg.connect(self.url, prepare_threshold=None) as conn:
            register_vector(conn)
            conn.execute(f"SET hnsw.ef_search = {EF_SEARCH}")
            for query in queries:
                exact = set(id_array[np.argsort(-(vectors @ query))[:10]].tolist())
                ann = conn.execute(
                    sql.SQL("SELECT id FROM {} ORDER BY embedding <=> %s LIMIT 10").format(
                        sql.Identifier(self.target)
                    ),
                    [query],
                ).fetchall()
                found += len(exact & {r[0] for r in ann})
        return found / (10 * len(queries))

    def verify(self) -> None:
        seconds = run_step("migrate", "verify", *self.flags, "--json", log=self.log)
        checks = json.loads(self.log.read_text().strip().splitlines()[-1])
        print(f"\nverify over {self.args.rows:,} rows, {date()}: {seconds:.0f}s")
        for check in checks.get("checks", []):
            print(f"  {check['name']}: ok={check['ok']} {check.get('detail', '')}")

    def search(self) -> None:
        queries = held_out_queries(self.base_url, self.args.dimensions, 350)
        print(f"\nsearch over {self.args.rows:,} rows, k 10, one connection, {date()}")
        with psycopg.connect(self.url) as conn:
            register_vector(conn)
            conn.execute(f"SET hnsw.ef_search = {EF_SEARCH}")
            for version in (Version.V1, Version.V2):
                statement = search_statement(self.layout, version, category=False)
                times = []
                for i, query in enumerate(queries):
                    started = time.perf_counter()
                    conn.execute(statement, {"q": query, "k": 10, "fetch": 10}).fetchall()
                    if i >= 50:
                        times.append(time.perf_counter() - started)
                print(
                    f"  {version.value}: p50 {1000 * statistics.median(times):.1f} ms, "
                    f"p95 {1000 * percentile(times, 0.95):.1f} ms"
                )
            for name in ("documents_v1_hnsw", self.layout.index_name):
                size = conn.execute("SELECT pg_relation_size(to_regclass(%s))", [name]).fetchone()
                print(f"  index {name}: {(size[0] if size else 0) / 2**20:,.0f} MiB")


def child_pid(module: str) -> int:
    """The pid of this process's child running ``python -m module``."""
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and module in (proc / "cmdline").read_text()
                and int((proc / "stat").read_text().split(") ")[1].split()[1]) == os.getpid()
            ):
                return int(proc.name)
        except OSError:
            continue
    raise RuntimeError(f"no child process runs {module}")


def date() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimensions", type=int, default=256)
    parser.add_argument("--stages", default="prepare,backfill,index,verify,search")
    parser.add_argument("--vecshift-rows", type=int, default=0, help="0: vecshift not run")
    parser.add_argument("--data-dir", default="/var/tmp/embedshift-million")  # noqa: S108 (kept)
    args = parser.parse_args()
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    with postgres_server(Path(args.data_dir) / "pg") as admin:
        name = f"million_{args.rows}"
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = database_url(admin, name)
        with embedding_server(API_KEY) as base_url:
            bench = Bench(args, url, base_url)
            for stage in args.stages.split(","):
                getattr(bench, stage)()


if __name__ == "__main__":
    main()
