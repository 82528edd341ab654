"""The two searches the service routes between: v1 over the source column, v2 over the side table.

v2 never serves a stale vector: results are joined to the source and kept only where the content
hash still matches the text. The nearest-neighbour scan itself must touch the side table alone —
with the join inside it, PostgreSQL's planner never chooses the HNSW index and every search is an
exact scan — so it over-fetches (stale rows are rare and caught up within seconds) and the join
filters afterwards. A category filter stays inside the scan, where
``hnsw.iterative_scan = relaxed_order`` keeps scanning until ``k`` rows pass; materialised CTEs
re-sort what relaxed order returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from rag_service.errors import ConfigError
from rag_service.providers.base import Vectors
from rag_service.routing import Version
from rag_service.schema import Layout, Query, ident
from rag_service.spec import EmbeddingSpec


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    category: str | None
    similarity: float


def search_statement(layout: Layout, version: Version, *, category: bool) -> Query:
    """The k-NN query for ``version``: cosine similarity, best first. Pure."""
    where = sql.SQL("AND {} = %(category)s").format(
        sql.SQL("t.category") if version is Version.V2 else layout.s_category
    )
    if version is Version.V2:
        vtype = sql.SQL(layout.target_spec.vector_type)
        return sql.SQL(
            "WITH nearest AS MATERIALIZED (\n"
            "  SELECT t.id, t.category, t.content_hash,"
            " t.embedding <=> CAST(%(q)s AS {vtype}) AS distance\n"
            "  FROM {tgt} t WHERE true {where}\n"
            "  ORDER BY t.embedding <=> CAST(%(q)s AS {vtype}) LIMIT %(fetch)s\n"
            "), fresh AS MATERIALIZED (\n"
            "  SELECT n.id, {text} AS text, n.category, n.distance FROM nearest n\n"
            "  JOIN {src} s ON {sid} = n.id WHERE n.content_hash = {hash}\n"
            ")\n"
            # id breaks ties, so equally near documents come back in the same order every time.
            "SELECT id::text, text, category, 1 - distance FROM fresh ORDER BY distance, id"
            " LIMIT %(k)s"
        ).format(
            text=layout.s_text,
            vtype=vtype,
            tgt=ident(layout.target),
            src=ident(layout.source),
            sid=layout.s_id,
            hash=layout.s_hash,
            where=where if category else sql.SQL(""),
        )
    if layout.source_embedding_column is None:
        raise ConfigError(
            "spec.database.sourceEmbeddingColumn: v1 search needs the column holding the v1 "
            "vectors; set it (or --source-column)"
        )
    column = sql.SQL("s.{}").format(sql.Identifier(layout.source_embedding_column))
    return sql.SQL(
        "WITH nearest AS MATERIALIZED (\n"
        "  SELECT {sid} AS id, {text} AS text, {cat} AS category, {col} <=> CAST(%(q)s AS vector)"
        " AS distance\n"
        "  FROM {src} s WHERE {col} IS NOT NULL {where}\n"
        "  ORDER BY {col} <=> CAST(%(q)s AS vector) LIMIT %(k)s\n"
        ")\n"
        "SELECT id::text, text, category, 1 - distance FROM nearest ORDER BY distance, id"
    ).format(
        sid=layout.s_id,
        text=layout.s_text,
        cat=layout.s_category,
        col=column,
        src=ident(layout.source),
        where=where if category else sql.SQL(""),
    )


def over_fetch(k: int) -> int:
    """Neighbours to fetch so that ``k`` remain after dropping stale ones. Pure."""
    return k + max(10, k // 2)


async def search(
    conn: psycopg.AsyncConnection[Any],
    layout: Layout,
    version: Version,
    vector: Vectors,
    *,
    k: int,
    category: str | None = None,
    min_similarity: float | None = None,
) -> list[Hit]:
    cur = await conn.execute(
        search_statement(layout, version, category=category is not None),
        {"q": vector, "k": k, "fetch": over_fetch(k), "category": category},
    )
    hits = [Hit(str(r[0]), str(r[1]), r[2], float(r[3])) for r in await cur.fetchall()]
    if min_similarity is not None:
        hits = [h for h in hits if h.similarity >= min_similarity]
    return hits


def ef_search_for(target: EmbeddingSpec, override: int | None) -> int | None:
    """The ``hnsw.ef_search`` a search session sets: ``override``, else the target index's. Pure.

    ``None`` (leave the server's setting) for an ivfflat index, which ef_search does not touch.
    """
    if override is not None:
        return override
    return target.index.ef_search if target.index.type == "hnsw" else None


async def configure_connection(
    conn: psycopg.AsyncConnection[Any], *, ef_search: int | None
) -> None:
    """Per pooled connection: pgvector types, iterative scans, and the recall/latency knob."""
    from pgvector.psycopg import register_vector_async

    await register_vector_async(conn)
    await conn.execute("SET hnsw.iterative_scan = relaxed_order")
    if ef_search is not None:
        await conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef_search)))
    await conn.commit()
