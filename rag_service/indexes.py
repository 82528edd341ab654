"""The target's ANN index: built after the backfill, concurrently, and rebuilt if left invalid.

``CREATE INDEX CONCURRENTLY`` does not block writes to the side table, but a crash or a cancel
leaves an INVALID index behind that PostgreSQL keeps maintaining and never uses. ``build_index``
detects that leftover (and an index built with other parameters) and rebuilds it.

The build sizes itself (:func:`plan_build`): pgvector builds an HNSW graph in memory until it
outgrows ``maintenance_work_mem`` and then goes on inserting into the index on disk, several times
slower (its notice "hnsw graph no longer fits into maintenance_work_mem"), so the step asks for
the memory the whole graph needs, within a cap. Parallel workers (pgvector's HNSW and IVFFlat
builds use them) stay at what the server allows a maintenance command,
``max_parallel_maintenance_workers``: the step cannot see the database server's cores, and more
workers than cores is slower, not faster (7 workers on 2 cores built a 1M-row HNSW index 1.2×
slower than 2: docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import re
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
class BuildPlan:
    """The session settings one build runs with, and why."""

    maintenance_work_mem: int  # bytes
    parallel_workers: int
    reason: str


@dataclass(frozen=True)
class IndexReport:
    name: str
    action: str  # created | rebuilt-invalid | rebuilt-changed | unchanged
    seconds: float
    definition: str
    maintenance_work_mem: int | None = None  # bytes; None when nothing was built
    parallel_workers: int | None = None


# PostgreSQL's memory units (case-sensitive, as in postgresql.conf).
_MEMORY_UNITS = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_MEMORY = re.compile(r"\s*(\d+)\s*(B|kB|MB|GB|TB)?\s*")
# A memory setting past this is a typo (PostgreSQL's own maximum for maintenance_work_mem).
MAX_MEMORY = 2**31 * 1024 - 1024
DEFAULT_MEMORY_CAP = 4 * 1024**3
# The in-memory HNSW graph per element, measured on pgvector 0.8.5 from its "no longer fits"
# notice at maintenance_work_mem = 16MB (1,740 bytes an element at 256-d and m = 16, 3,790 at
# 768-d): the vector itself, plus about 112 bytes of element header, plus 16 bytes a neighbour
# slot (2·m on layer 0, m on each upper layer, 1/ln(m) upper layers on average).
_ELEMENT_BYTES = 112
_NEIGHBOUR_BYTES = 16
# What the estimate leaves for what it does not model (allocator rounding, the tuples' headers).
_HEADROOM = 1.15
# IVFFlat needs memory for its k-means sample, not for a graph: pgvector's usual advice.
_IVFFLAT_MEMORY = 512 * 1024**2


def parse_memory(text: str) -> int:
    """Bytes in a PostgreSQL memory setting (``512MB``, ``4GB``, ``65536kB``). Pure.

    Raises ValueError naming the accepted form.
    """
    match = _MEMORY.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: a whole number with one of PostgreSQL's units "
            f"{', '.join(_MEMORY_UNITS)} (case-sensitive), e.g. 512MB or 4GB"
        )
    value = int(match.group(1)) * _MEMORY_UNITS[match.group(2) or "kB"]
    if not 1024 * 1024 <= value <= MAX_MEMORY:
        raise ValueError(f"{text!r} is outside PostgreSQL's range for it (1MB to 2TB)")
    return value


def memory_text(value: int) -> str:
    """``value`` bytes as the largest whole PostgreSQL unit (rounded up to a kB). Pure."""
    kb = math.ceil(value / 1024)
    for unit, size in (("GB", 1024**2), ("MB", 1024)):
        if kb % size == 0:
            return f"{kb // size}{unit}"
    return f"{kb}kB"


def hnsw_graph_bytes(rows: int, *, dimensions: int, m: int, bytes_per_dimension: int) -> int:
    """The memory pgvector's in-memory HNSW build needs for ``rows`` vectors. Pure."""
    neighbour_slots = 2 * m + m / math.log(m)
    per_element = (
        _ELEMENT_BYTES + bytes_per_dimension * dimensions + _NEIGHBOUR_BYTES * neighbour_slots
    )
    return math.ceil(rows * per_element)


def plan_build(
    layout: Layout,
    *,
    rows: int,
    memory: int | None,
    memory_cap: int,
    server_memory: int,
    workers: int | None,
    server_workers: int,
) -> BuildPlan:
    """The build's ``maintenance_work_mem`` and parallel workers. Pure.

    ``memory`` / ``workers`` None means automatic: for HNSW the graph's estimated size (never
    below the server's own setting ``server_memory``, never above ``memory_cap``); workers: the
    server's ``max_parallel_maintenance_workers`` (``server_workers``), of which PostgreSQL takes
    what the table's size warrants.
    """
    spec = layout.target_spec
    index = spec.index
    chosen_workers = server_workers if workers is None else workers
    if memory is not None:
        return BuildPlan(memory, chosen_workers, "maintenance_work_mem as given")
    if index.type != "hnsw":
        wanted = max(_IVFFLAT_MEMORY, server_memory)
        return BuildPlan(min(wanted, max(memory_cap, server_memory)), chosen_workers, "ivfflat")
    graph = hnsw_graph_bytes(
        rows,
        dimensions=spec.dimensions,
        m=index.m,
        bytes_per_dimension=2 if index.halfvec else 4,
    )
    # Whole megabytes: what a person reads in the log and would have typed.
    wanted = max(math.ceil(graph * _HEADROOM / 1024**2) * 1024**2, server_memory)
    if wanted > memory_cap:
        return BuildPlan(
            max(memory_cap, server_memory),
            chosen_workers,
            f"the graph of {rows:,} rows needs about {memory_text(wanted)}, more than the cap "
            f"{memory_text(memory_cap)}: the build spills to disk part way, several times "
            "slower (raise --max-maintenance-work-mem if the database server has the memory)",
        )
    return BuildPlan(
        wanted, chosen_workers, f"sized to the graph of {rows:,} rows ({memory_text(graph)})"
    )


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


async def _plan(
    conn: psycopg.AsyncConnection[Any],
    layout: Layout,
    *,
    memory: int | None,
    memory_cap: int,
    workers: int | None,
) -> BuildPlan:
    # Fresh statistics first: reltuples is then the row count to within ANALYZE's sample, at the
    # cost of that sample, not of a count(*) over millions of rows (and the planner wants them).
    await conn.execute(sql.SQL("ANALYZE {}").format(ident(layout.target)))
    cur = await conn.execute(
        "SELECT greatest(c.reltuples, 0)::bigint,"
        " pg_size_bytes(current_setting('maintenance_work_mem')),"
        " current_setting('max_parallel_maintenance_workers')::int"
        " FROM pg_class c WHERE c.oid = to_regclass(%s)",
        [layout.target.regclass_text],
    )
    row = await cur.fetchone()
    assert row is not None  # the caller checked that the table exists
    rows, server_memory, server_workers = (int(value) for value in row)
    return plan_build(
        layout,
        rows=rows,
        memory=memory,
        memory_cap=memory_cap,
        server_memory=server_memory,
        workers=workers,
        server_workers=server_workers,
    )


async def build_index(
    url: str,
    spec: DataPlaneSpec,
    *,
    maintenance_work_mem: int | None = None,
    max_maintenance_work_mem: int = DEFAULT_MEMORY_CAP,
    parallel_workers: int | None = None,
) -> IndexReport:
    """Build (or repair) the target index. Safe to rerun; safe to interrupt (rerun repairs).

    ``maintenance_work_mem`` (bytes) and ``parallel_workers`` None size the build by itself
    (:func:`plan_build`), within ``max_maintenance_work_mem``.
    """
    conn = await connect(url, autocommit=True)  # CONCURRENTLY cannot run inside a transaction
    # pgvector says when the graph outgrew maintenance_work_mem (the build then slows several
    # times): the person waiting for the build should read it.
    conn.add_notice_handler(lambda notice: log.warning("PostgreSQL: %s", notice.message_primary))
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
        plan = await _plan(
            conn,
            layout,
            memory=maintenance_work_mem,
            memory_cap=max_maintenance_work_mem,
            workers=parallel_workers,
        )
        log.info(
            "building %s with maintenance_work_mem %s and up to %d parallel workers: %s",
            layout.index_name,
            memory_text(plan.maintenance_work_mem),
            plan.parallel_workers,
            plan.reason,
        )
        started = time.monotonic()
        try:
            await conn.execute(
                sql.SQL("SET maintenance_work_mem = {}").format(
                    sql.Literal(memory_text(plan.maintenance_work_mem))
                )
            )
            await conn.execute(
                sql.SQL("SET max_parallel_maintenance_workers = {}").format(
                    sql.Literal(plan.parallel_workers)
                )
            )
            await conn.execute(index_statement(layout))
        except psycopg.errors.DiskFull as exc:
            # A parallel build shares its graph through dynamic shared memory: /dev/shm, which
            # a container often caps at 64MB.
            raise DatabaseError(
                f"building index {layout.index_name} failed: {first_line(exc)} (the database "
                "server's shared memory is smaller than the parallel build's "
                f"{memory_text(plan.maintenance_work_mem)}: rerun `embedshift migrate index` "
                "with --parallel-workers 0, or give the server a larger /dev/shm)"
            ) from None
        except psycopg.Error as exc:
            raise DatabaseError(
                f"building index {layout.index_name} failed: {first_line(exc)} "
                "(rerun `embedshift migrate index` to repair)"
            ) from None
        final = await index_state(conn, layout)
        if not final.valid:
            raise DatabaseError(f"index {layout.index_name} is still invalid after the build")
        return IndexReport(
            layout.index_name,
            action,
            time.monotonic() - started,
            final.definition or "",
            maintenance_work_mem=plan.maintenance_work_mem,
            parallel_workers=plan.parallel_workers,
        )
