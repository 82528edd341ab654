"""The target's ANN index: built after the backfill, concurrently, and rebuilt if left invalid.

``CREATE INDEX CONCURRENTLY`` does not block writes to the side table, but a crash or a cancel
leaves an INVALID index behind that PostgreSQL keeps maintaining and never uses. ``build_index``
detects that leftover (and an index built with other parameters) and rebuilds it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from rag_service.errors import DatabaseError
from rag_service.schema import (
    Layout,
    Query,
    connect,
    first_line,
    ident,
    inspect_source,
    table_exists,
)
from rag_service.spec import DataPlaneSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexState:
    name: str
    exists: bool
    valid: bool
    definition: str | None


@dataclass(frozen=True)
class IndexReport:
    name: str
    action: str  # created | rebuilt-invalid | rebuilt-changed | unchanged
    seconds: float
    definition: str


def opclass(layout: Layout) -> str:
    """Cosine distance: vectors are unit length, so similarity = 1 - distance. Pure."""
    return f"{layout.target_spec.vector_type}_cosine_ops"


def index_statement(layout: Layout) -> Query:
    """The CREATE INDEX for the spec's index parameters. Pure."""
    index = layout.target_spec.index
    if index.type == "hnsw":
        params = sql.SQL("m = {}, ef_construction = {}").format(
            sql.Literal(index.m), sql.Literal(index.ef_construction)
        )
    else:
        params = sql.SQL("lists = {}").format(sql.Literal(index.lists))
    return sql.SQL(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {tgt} USING {method} "
        "(embedding {ops}) WITH ({params})"
    ).format(
        name=sql.Identifier(layout.index_name),
        tgt=ident(layout.target),
        method=sql.SQL(index.type),
        ops=sql.SQL(opclass(layout)),
        params=params,
    )


async def index_state(conn: psycopg.AsyncConnection[Any], layout: Layout) -> IndexState:
    cur = await conn.execute(
        """
        SELECT i.indisvalid, pg_get_indexdef(c.oid)
        FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
        WHERE c.oid = to_regclass(%s)
        """,
        [layout.target.sibling(layout.index_name).regclass_text],
    )
    row = await cur.fetchone()
    if row is None:
        return IndexState(layout.index_name, exists=False, valid=False, definition=None)
    return IndexState(layout.index_name, exists=True, valid=bool(row[0]), definition=str(row[1]))


def _matches(definition: str, layout: Layout) -> bool:
    """Does an existing index's definition carry the spec's method, opclass and parameters?"""
    index = layout.target_spec.index
    wanted = [f"USING {index.type}", opclass(layout)] + (
        [f"m='{index.m}'", f"ef_construction='{index.ef_construction}'"]
        if index.type == "hnsw"
        else [f"lists='{index.lists}'"]
    )
    return all(part in definition for part in wanted)


async def build_index(
    url: str, spec: DataPlaneSpec, *, maintenance_work_mem: str = "512MB"
) -> IndexReport:
    """Build (or repair) the target index. Safe to rerun; safe to interrupt (rerun repairs)."""
    conn = await connect(url, autocommit=True)  # CONCURRENTLY cannot run inside a transaction
    async with conn:
        layout = await inspect_source(conn, spec)
        if not await table_exists(conn, layout.target):
            raise DatabaseError(
                f"{layout.target} does not exist: run `embedshift migrate setup` and "
                "`embedshift migrate run` first"
            )
        state = await index_state(conn, layout)
        action = "created"
        drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            ident(layout.target.sibling(layout.index_name))
        )
        if state.exists and not state.valid:
            log.warning("index %s is INVALID (an interrupted build); rebuilding", state.name)
            await conn.execute(drop)
            action = "rebuilt-invalid"
        elif state.exists and state.definition and not _matches(state.definition, layout):
            log.warning("index %s has other parameters than the spec; rebuilding", state.name)
            await conn.execute(drop)
            action = "rebuilt-changed"
        elif state.exists:
            return IndexReport(state.name, "unchanged", 0.0, state.definition or "")
        started = time.monotonic()
        try:
            await conn.execute(
                sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(maintenance_work_mem))
            )
            await conn.execute(index_statement(layout))
        except psycopg.Error as exc:
            raise DatabaseError(
                f"building index {layout.index_name} failed: {first_line(exc)} "
                "(rerun `embedshift migrate index` to repair)"
            ) from None
        # Fresh statistics, so the planner sizes the side table right for the first searches.
        await conn.execute(sql.SQL("ANALYZE {}").format(ident(layout.target)))
        final = await index_state(conn, layout)
        if not final.valid:
            raise DatabaseError(f"index {layout.index_name} is still invalid after the build")
        return IndexReport(
            layout.index_name, action, time.monotonic() - started, final.definition or ""
        )
