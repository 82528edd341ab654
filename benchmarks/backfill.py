"""Backfill throughput: ``migrate run`` against a raw binary COPY of the same vectors.

    .venv/bin/python benchmarks/backfill.py [--rows 100000] [--dims 768] [--batch-size 500]

Everything is measured in this run on this machine (shared and noisy), so only ratios are
compared; each baseline is measured before and after the migration and averaged. Two baselines:

- **bare**: one COPY of (id, vector) into an empty ``(id bigint PRIMARY KEY, vector)`` table,
  the fastest way to land these vectors at all (the issue's target: ratio ≥ 0.7);
- **same shape**: one COPY of (id, vector, hash, category) into an empty table shaped like the
  side table (its columns, defaults, primary key and the foreign key that gives ``ON DELETE
  CASCADE``), which separates what the schema costs from what the worker costs.

The migration includes everything a real run does: paging the source, embedding with the
``local`` provider (in a worker process), the hash re-check, the COPY, status rows, checkpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import time

import numpy as np
import psycopg

from rag_service.binary_copy import HEADER, TRAILER, encode_rows
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers.local import HashEmbedder, LocalProvider
from rag_service.schema import setup
from rag_service.spec import DataPlaneSpec, EmbeddingSpec
from rag_service.testing.corpus import create_corpus
from rag_service.testing.postgres import create_database, drop_database, postgres_server

CHUNK = 10_000


def encode_id_vector(ids: list[int], vectors: np.ndarray) -> bytes:
    """Binary COPY rows of (bigint, vector), without header and trailer."""
    count, dims = vectors.shape
    row = np.dtype(
        [("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("vec_len", ">i4"),
         ("dims", ">u2"), ("unused", ">u2"), ("vec", ">f4", (dims,))]
    )  # fmt: skip
    rows = np.empty(count, dtype=row)
    rows["fields"], rows["id_len"], rows["id"] = 2, 8, ids
    rows["vec_len"], rows["dims"], rows["unused"], rows["vec"] = 4 + 4 * dims, dims, 0, vectors
    return rows.tobytes()


def copy_bare(url: str, ids: list[int], vectors: np.ndarray) -> float:
    """Seconds for one binary COPY into an empty (id bigint PK, vector) table."""
    dims = vectors.shape[1]
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS bare_copy")
        conn.execute(f"CREATE TABLE bare_copy (id bigint PRIMARY KEY, embedding vector({dims}))")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY bare_copy FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(HEADER)
            for i in range(0, len(ids), CHUNK):
                copy.write(encode_id_vector(ids[i : i + CHUNK], vectors[i : i + CHUNK]))
            copy.write(TRAILER)
        conn.commit()
        return time.perf_counter() - started


def copy_same_shape(
    url: str, target: str, ids: list[int], vectors: np.ndarray, texts: list[str], cats: list[str]
) -> float:
    """Seconds for one binary COPY into an empty table shaped like the side table."""
    hashes = [hashlib.sha256(t.encode()).digest() for t in texts]
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS shape_copy")
        conn.execute(f'CREATE TABLE shape_copy (LIKE "{target}" INCLUDING ALL)')
        conn.execute(
            "ALTER TABLE shape_copy ADD FOREIGN KEY (id) REFERENCES documents (id) "
            "ON DELETE CASCADE ON UPDATE CASCADE"
        )
        conn.commit()
        started = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY shape_copy (id, embedding, content_hash, category) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            for i in range(0, len(ids), CHUNK):
                block = encode_rows(
                    id_typname="int8",
                    ids=ids[i : i + CHUNK],
                    vectors=vectors[i : i + CHUNK],
                    hashes=hashes[i : i + CHUNK],
                    categories=cats[i : i + CHUNK],
                )
                # One COPY stream: keep the first header and the last trailer only.
                copy.write(block[: -len(TRAILER)] if i == 0 else block[len(HEADER) : -len(TRAILER)])
            copy.write(TRAILER)
        conn.commit()
        conn.execute("DROP TABLE shape_copy")
        conn.commit()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    with postgres_server() as admin:
        name, url = create_database(admin, prefix="bench_backfill")
        try:
            print(f"corpus: {args.rows:,} documents …", flush=True)
            create_corpus(url, table="documents", count=args.rows, source_dimensions=0)
            with psycopg.connect(url) as conn:
                rows = conn.execute(
                    "SELECT id, content, category FROM documents ORDER BY id"
                ).fetchall()
            ids = [r[0] for r in rows]
            texts = [r[1] for r in rows]
            cats = [r[2] for r in rows]
            vectors = HashEmbedder(args.dims, seed="hash").embed(texts)
            spec = DataPlaneSpec.model_validate(
                {
                    "database": {"table": "documents", "categoryColumn": "category"},
                    "target": EmbeddingSpec.parse(f"local:hash@{args.dims}").model_dump(),
                }
            )
            asyncio.run(setup(url, spec, migration="bench/backfill"))
            target = spec.target_table.name

            bare = [copy_bare(url, ids, vectors)]
            shape = [copy_same_shape(url, target, ids, vectors, texts, cats)]
            provider = LocalProvider(model="hash", dimensions=args.dims, processes=1)
            started = time.perf_counter()
            report = asyncio.run(
                run_migration(
                    url,
                    spec,
                    provider=provider,
                    options=RunOptions(batch_size=args.batch_size, concurrency=args.concurrency),
                    migration="bench/backfill",
                )
            )
            migrate_seconds = time.perf_counter() - started
            asyncio.run(provider.aclose())
            assert report.embedded == args.rows, report
            bare.append(copy_bare(url, ids, vectors))
            shape.append(copy_same_shape(url, target, ids, vectors, texts, cats))
        finally:
            drop_database(admin, name)

    def rate(seconds: float) -> float:
        rows: int = args.rows
        return rows / seconds

    migrate_rate = rate(migrate_seconds)
    for label, runs in (("bare", bare), ("same shape", shape)):
        print(
            f"raw COPY, {label:<10}: {rate(statistics.mean(runs)):9,.0f} rows/s  "
            f"({', '.join(f'{s:.2f}s' for s in runs)})"
        )
    print(
        f"migrate run         : {migrate_rate:9,.0f} rows/s  ({migrate_seconds:.2f}s, "
        f"batch {args.batch_size}, concurrency {args.concurrency}, embedding included)"
    )
    print(
        f"ratio vs bare       = {migrate_rate / rate(statistics.mean(bare)):.2f}  (target ≥ 0.70)"
    )
    print(f"ratio vs same shape = {migrate_rate / rate(statistics.mean(shape)):.2f}")


if __name__ == "__main__":
    main()
