"""Backfill throughput: ``migrate run`` against a raw binary COPY of the same vectors.

    .venv/bin/python benchmarks/backfill.py [--rows 100000] [--dims 768]

Both are measured in this run on this machine (shared and noisy), so only their ratio is compared:
the raw COPY is measured before and after the migration and averaged. The migration includes
everything a real run does: reading pages, embedding with the ``local`` provider, binary COPY
into staging, the hash-guarded upsert, status rows and checkpoints. Target: ratio ≥ 0.7.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from rag_service.binary_copy import HEADER, TRAILER
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers.local import HashEmbedder, LocalProvider
from rag_service.schema import setup
from rag_service.spec import DataPlaneSpec, EmbeddingSpec
from rag_service.testing.corpus import create_corpus
from rag_service.testing.postgres import create_database, drop_database, postgres_server


def encode_id_vector(ids: list[int], vectors: np.ndarray) -> bytes:
    """Binary COPY rows of (bigint, vector), without the worker's hash column."""
    count, dims = vectors.shape
    row = np.dtype(
        [("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("vec_len", ">i4"),
         ("dims", ">u2"), ("unused", ">u2"), ("vec", ">f4", (dims,))]
    )  # fmt: skip
    rows = np.empty(count, dtype=row)
    rows["fields"], rows["id_len"], rows["id"] = 2, 8, ids
    rows["vec_len"], rows["dims"], rows["unused"], rows["vec"] = 4 + 4 * dims, dims, 0, vectors
    return rows.tobytes()


def raw_copy(url: str, ids: list[int], vectors: np.ndarray, dims: int) -> float:
    """Seconds to binary-COPY ``vectors`` into an empty (id bigint PK, vector) table."""
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute("DROP TABLE IF EXISTS raw_copy")
        conn.execute(f"CREATE TABLE raw_copy (id bigint PRIMARY KEY, embedding vector({dims}))")
        conn.commit()
        started = time.perf_counter()
        # The same numpy encoder the worker uses, so the baseline is as fast as we know how.
        with (
            conn.cursor() as cur,
            cur.copy("COPY raw_copy (id, embedding) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.write(HEADER)
            for start in range(0, len(ids), 10_000):
                copy.write(
                    encode_id_vector(ids[start : start + 10_000], vectors[start : start + 10_000])
                )
            copy.write(TRAILER)
        conn.commit()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    with postgres_server() as admin:
        name, url = create_database(admin, prefix="bench_backfill")
        try:
            print(f"corpus: {args.rows} documents …", flush=True)
            create_corpus(url, table="documents", count=args.rows, source_dimensions=0)
            with psycopg.connect(url) as conn:
                rows = conn.execute("SELECT id, content FROM documents ORDER BY id").fetchall()
            ids = [r[0] for r in rows]
            vectors = HashEmbedder(args.dims, seed="hash").embed([r[1] for r in rows])

            copies = [raw_copy(url, ids, vectors, args.dims)]
            spec = DataPlaneSpec.model_validate(
                {
                    "database": {"table": "documents", "categoryColumn": "category"},
                    "target": EmbeddingSpec.parse(f"local:hash@{args.dims}").model_dump(),
                }
            )
            asyncio.run(setup(url, spec, migration="bench/backfill"))
            started = time.perf_counter()
            report = asyncio.run(
                run_migration(
                    url,
                    spec,
                    provider=LocalProvider(model="hash", dimensions=args.dims, processes=1),
                    options=RunOptions(batch_size=args.batch_size, concurrency=args.concurrency),
                    migration="bench/backfill",
                )
            )
            migrate_seconds = time.perf_counter() - started
            assert report.embedded == args.rows, report
            copies.append(raw_copy(url, ids, vectors, args.dims))
        finally:
            drop_database(admin, name)

    copy_seconds = statistics.mean(copies)
    copy_rate = args.rows / copy_seconds
    migrate_rate = args.rows / migrate_seconds
    print(
        f"raw binary COPY : {copy_rate:10,.0f} rows/s  ({', '.join(f'{c:.2f}s' for c in copies)})"
    )
    print(
        f"migrate run     : {migrate_rate:10,.0f} rows/s  ({migrate_seconds:.2f}s, "
        f"batch {args.batch_size}, concurrency {args.concurrency}, embedding included)"
    )
    print(f"ratio migrate/COPY = {migrate_rate / copy_rate:.2f}  (target ≥ 0.70)")


if __name__ == "__main__":
    main()
