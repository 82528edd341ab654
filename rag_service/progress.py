"""Where a migration stands, read from the data: ``embedshift migrate status`` and verify's counts.

Counts come from the source and side tables themselves (what is true now), spend and errors from
``embedding_migration_status`` (what the workers did).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from rag_service.errors import DatabaseError
from rag_service.schema import (
    Layout,
    category_filter,
    connect,
    ident,
    inspect_source,
    table_exists,
)
from rag_service.spec import DataPlaneSpec


@dataclass(frozen=True)
class CategoryCounts:
    category: str
    source: int  # embeddable source rows
    current: int  # of those, with a vector of their current text
    stale: int  # vectors of older text
    no_text: int  # source rows with no text (never embedded)

    @property
    def pending(self) -> int:
        return self.source - self.current


@dataclass
class MigrationProgress:
    target: str
    categories: list[CategoryCounts] = field(default_factory=list)
    target_rows: int = 0
    queued: int = 0
    oldest_pending_seconds: float | None = None  # the follower's lag; None: queue empty
    batches: int = 0
    failed_batches: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    tokens_by_category: dict[str, int] = field(default_factory=dict)
    recent_errors: list[dict[str, Any]] = field(default_factory=list)

    def total(self, attribute: str) -> int:
        return sum(int(getattr(c, attribute)) for c in self.categories)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "total": self.total("source"),
            "migrated": self.total("current"),
            "pending": self.total("pending"),
            "stale": self.total("stale"),
            "queued": self.queued,
            "oldestPendingSeconds": self.oldest_pending_seconds,
            "batches": self.batches,
            "failedBatches": self.failed_batches,
            "tokens": self.tokens,
            "costUSD": round(self.cost_usd, 6),
            "byCategory": {
                c.category: {**asdict(c), "pending": c.pending} for c in self.categories
            },
            "recentErrors": self.recent_errors,
        }


async def category_counts(
    conn: psycopg.AsyncConnection[Any], layout: Layout
) -> list[CategoryCounts]:
    """Per-category source, current and stale counts, in one pass over source ⟕ target."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT COALESCE({cat}, '') AS category,\n"
            "  count(*) FILTER (WHERE {embeddable}),\n"
            "  count(t.id) FILTER (WHERE {embeddable} AND t.content_hash = {hash}),\n"
            "  count(t.id) FILTER (WHERE t.content_hash <> {hash}),\n"
            "  count(*) FILTER (WHERE NOT {embeddable})\n"
            "FROM {src} s LEFT JOIN {tgt} t ON t.id = {sid}\n"
            "GROUP BY 1 ORDER BY 1"
        ).format(
            cat=layout.s_category,
            embeddable=layout.s_embeddable,
            hash=layout.s_hash,
            src=ident(layout.source),
            tgt=ident(layout.target),
            sid=layout.s_id,
        )
    )
    return [CategoryCounts(*row) for row in await cur.fetchall()]


async def count_rows(conn: psycopg.AsyncConnection[Any], table: Any) -> int:
    cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(table)))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def open_layout(conn: psycopg.AsyncConnection[Any], spec: DataPlaneSpec) -> Layout:
    """The layout of a migration whose setup has run (else a message saying to run it)."""
    layout = await inspect_source(conn, spec)
    if not await table_exists(conn, layout.target):
        raise DatabaseError(
            f"{layout.target} does not exist: run `embedshift migrate setup` (and `run`) first"
        )
    return layout


async def queue_lag(
    conn: psycopg.AsyncConnection[Any], layout: Layout, categories: Sequence[str] = ()
) -> float | None:
    """Seconds since the oldest queued change a worker would serve was queued; None if none is.

    Filtered like the catch-up's own read, so a change outside ``spec.migration.categories``
    (which no worker serves) does not show as ever-growing lag. ``clock_timestamp()``, not
    ``now()``: ``conn`` may be inside a transaction that started long ago.
    """
    cur = await conn.execute(
        sql.SQL(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(q.enqueued_at))::float8\n"
            "FROM {queue} q LEFT JOIN {src} s ON {sid} = q.id\n"
            "WHERE s.{sid_col} IS NULL OR {cats}"
        ).format(
            queue=ident(layout.queue),
            src=ident(layout.source),
            sid=layout.s_id,
            sid_col=sql.Identifier(layout.id_column),
            cats=category_filter(layout, categories),
        )
    )
    row = await cur.fetchone()
    return None if row is None or row[0] is None else max(0.0, float(row[0]))


async def oldest_pending_seconds(
    conn_or_url: str | psycopg.AsyncConnection[Any], spec: DataPlaneSpec
) -> float | None:
    """The age of the oldest queued change (``status.migration.oldestPendingSeconds``): how far
    ``migrate follow`` is behind the application's writes. None when the queue is empty."""
    if isinstance(conn_or_url, str):
        conn = await connect(conn_or_url, autocommit=True)
        async with conn:
            return await oldest_pending_seconds(conn, spec)
    layout = await open_layout(conn_or_url, spec)
    return await queue_lag(conn_or_url, layout, spec.migration.categories)


async def migration_progress(
    url: str, spec: DataPlaneSpec, *, errors: int = 5
) -> MigrationProgress:
    conn = await connect(url, autocommit=True)
    async with conn:
        layout = await open_layout(conn, spec)
        progress = MigrationProgress(target=layout.migration_target)
        progress.categories = await category_counts(conn, layout)
        progress.target_rows = await count_rows(conn, layout.target)
        progress.queued = await count_rows(conn, layout.queue)
        progress.oldest_pending_seconds = await queue_lag(conn, layout, spec.migration.categories)
        cur = await conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE status = 'done'),"
                " count(*) FILTER (WHERE status = 'failed'),"
                " COALESCE(sum(tokens), 0), COALESCE(sum(cost_usd), 0)"
                " FROM {} WHERE target_table = %s"
            ).format(ident(layout.status)),
            [str(layout.target)],
        )
        row = await cur.fetchone()
        if row:
            progress.batches, progress.failed_batches = int(row[0]), int(row[1])
            progress.tokens, progress.cost_usd = int(row[2]), float(row[3])
        cur = await conn.execute(
            sql.SQL(
                "SELECT finished_at, shard, first_id, last_id, error FROM {} "
                "WHERE target_table = %s AND status = 'failed' ORDER BY id DESC LIMIT %s"
            ).format(ident(layout.status)),
            [str(layout.target), errors],
        )
        progress.recent_errors = [
            {"at": r[0].isoformat(), "shard": r[1], "firstId": r[2], "lastId": r[3], "error": r[4]}
            for r in await cur.fetchall()
        ]
        return progress
