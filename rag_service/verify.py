"""``embedshift migrate verify``: is the target complete, current and searchable?

Checks, each with a verdict: source vs target counts overall and per category, dimensions, NULL
vectors, unit norms, stale hashes, pending rows, and the recall of the ANN index against an exact
search over a sample of queries. Any failed check fails the verification (non-zero exit). The
counts are the exact comparison; the control loop's maintained counters are compared with it
(and counted again if they drifted: :func:`rag_service.progress.check_counters`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from rag_service.indexes import index_state, opclass
from rag_service.progress import CategoryCounts, check_counters, count_rows, open_layout
from rag_service.schema import Layout, check_side_table_identity, connect, ident
from rag_service.search import ef_search_for
from rag_service.spec import DataPlaneSpec

NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    value: Any
    detail: str


@dataclass
class Verification:
    target: str
    checks: list[Check] = field(default_factory=list)
    categories: list[CategoryCounts] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
            "categories": [{**asdict(c), "pending": c.pending} for c in self.categories],
        }


def _norm(layout: Layout) -> sql.Composable:
    fn = "l2_norm" if layout.target_spec.vector_type == "halfvec" else "vector_norm"
    return sql.SQL("{}(t.embedding)").format(sql.SQL(fn))


async def verify(
    url: str,
    spec: DataPlaneSpec,
    *,
    sample: int = 50,
    k: int = 10,
    min_recall: float = 0.9,
    ef_search: int | None = None,
) -> Verification:
    conn = await connect(url, autocommit=True)
    async with conn:
        layout = await open_layout(conn, spec)
        # Counts, norms and recall would pass on another identity's vectors: refused instead.
        await check_side_table_identity(conn, layout)
        result = Verification(target=layout.migration_target)
        await _counts(conn, layout, result)
        await _vector_checks(conn, layout, result)
        await _recall(
            conn, layout, result, sample=sample, k=k, min_recall=min_recall, ef_search=ef_search
        )
        return result


async def _counts(conn: psycopg.AsyncConnection[Any], layout: Layout, result: Verification) -> None:
    result.categories, counters = await check_counters(conn, layout)
    source = sum(c.source for c in result.categories)
    current = sum(c.current for c in result.categories)
    stale = sum(c.stale for c in result.categories)
    no_text = sum(c.no_text for c in result.categories)
    target_rows = await count_rows(conn, layout.target)
    queued = await count_rows(conn, layout.queue)
    orphans = target_rows - current - stale
    result.checks += [
        Check(
            "counts",
            source == current and orphans == 0,
            {"source": source, "current": current, "target_rows": target_rows},
            f"{current} of {source} embeddable source rows have a current vector"
            + (f"; {orphans} vectors belong to rows without text" if orphans else ""),
        ),
        Check("stale_hashes", stale == 0, stale, f"{stale} vectors were embedded from older text"),
        Check(
            "pending",
            source - current == 0 and queued == 0,
            {"rows": source - current, "queued": queued},
            f"{source - current} rows still to embed, {queued} entries in the change queue",
        ),
        Check(
            "rows_without_text",
            True,
            no_text,
            f"{no_text} source rows have no text and are not embedded (informational)",
        ),
        # Informational: drift says nothing about the vectors, and it has just been repaired.
        Check(
            "maintained_counts",
            True,
            None if counters is None else counters.as_dict(),
            "no maintained counters (set up by an older embedshift): the control loop counts "
            "by a full comparison until `embedshift migrate setup` runs again"
            if counters is None
            else counters.describe(),
        ),
    ]


async def _vector_checks(
    conn: psycopg.AsyncConnection[Any], layout: Layout, result: Verification
) -> None:
    dims = layout.target_spec.dimensions
    cur = await conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE t.embedding IS NULL),\n"
            "       count(*) FILTER (WHERE vector_dims(t.embedding::vector) <> %s),\n"
            "       count(*) FILTER (WHERE abs({norm} - 1) > %s)\n"
            "FROM {tgt} t"
        ).format(norm=_norm(layout), tgt=ident(layout.target)),
        [dims, NORM_TOLERANCE],
    )
    nulls, wrong_dims, off_norm = await cur.fetchone() or (0, 0, 0)
    result.checks += [
        Check("nulls", nulls == 0, nulls, f"{nulls} NULL vectors"),
        Check("dimensions", wrong_dims == 0, wrong_dims, f"{wrong_dims} vectors are not {dims}-d"),
        Check(
            "unit_norms",
            off_norm == 0,
            off_norm,
            f"{off_norm} vectors are not unit length (±{NORM_TOLERANCE})",
        ),
    ]


async def _recall(
    conn: psycopg.AsyncConnection[Any],
    layout: Layout,
    result: Verification,
    *,
    sample: int,
    k: int,
    min_recall: float,
    ef_search: int | None,
) -> None:
    state = await index_state(conn, layout)
    if not state.exists:
        result.checks.append(
            Check(
                "index_recall",
                True,
                None,
                "no index yet (informational): run `embedshift migrate index` after the backfill",
            )
        )
        return
    if not state.valid:
        result.checks.append(
            Check(
                "index_recall",
                False,
                None,
                f"index {state.name} is INVALID: run `embedshift migrate index` to rebuild it",
            )
        )
        return
    cur = await conn.execute(
        sql.SQL("SELECT id FROM {} ORDER BY random() LIMIT %s").format(ident(layout.target)),
        [sample],
    )
    query_ids = [r[0] for r in await cur.fetchall()]
    if not query_ids:
        result.checks.append(Check("index_recall", True, None, "no vectors to sample"))
        return
    knn = sql.SQL(
        "SELECT t.id FROM {tgt} t ORDER BY t.embedding <=> "
        "(SELECT embedding FROM {tgt} WHERE id = %s) LIMIT %s"
    ).format(tgt=ident(layout.target))
    ef_search = ef_search_for(layout.target_spec, ef_search)  # as the service searches
    hits = total = 0
    for qid in query_ids:
        async with conn.transaction():
            if ef_search is not None:
                await conn.execute(
                    sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef_search))
                )
            await conn.execute("SET LOCAL enable_seqscan = off")
            approx = {r[0] for r in await (await conn.execute(knn, [qid, k])).fetchall()}
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            exact = {r[0] for r in await (await conn.execute(knn, [qid, k])).fetchall()}
        hits += len(approx & exact)
        total += len(exact)
    recall = hits / total if total else 1.0
    result.checks.append(
        Check(
            "index_recall",
            recall >= min_recall,
            round(recall, 4),
            f"recall@{k} of {state.name} ({opclass(layout)}) vs exact search over "
            f"{len(query_ids)} sampled queries: {recall:.3f} (minimum {min_recall})",
        )
    )
