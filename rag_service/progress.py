"""Where a migration stands: ``embedshift migrate status``, the control loop's observation, and
verify's counts.

Two ways to count the same figures (per category: embeddable source rows, of those the ones with
a current vector, stale vectors, rows without text):

- **maintained** (``migrate status``, and every tick of the operator and ``rollout run``): costs
  O(changes), never O(corpus). The counters ``setup`` installs (:func:`rag_service.schema.
  counter_statements`) hold, per category, the source rows with and without text and the side
  table's rows; the change queue holds every row whose vector may not be current. Every vector
  of a row that is *not* queued is current and carries the row's category, because each change
  that could make it otherwise (an insert, a new text or category) queues the row in the
  writer's own transaction, and a worker removes a queue entry only in the transaction that
  settles it (hash-guarded). So::

      current(c) = vectors(c) - queued rows with a vector whose copy says c
                              + queued rows in c whose vector is current

  and stale is counted over the queued rows alone. The queue is read row by row through the
  primary keys (``OFFSET 0`` keeps the planner from turning that into a hash join that would
  read the whole source), so a tick reads the counters, the queue and nothing of the corpus.
- **exact** (``migrate verify``, ``migrate status --exact``): one pass over source ⟕ target,
  compared with the maintained figures of the same snapshot; on a difference the counters are
  counted again and any vector the queue should hold is queued (:func:`check_counters`).

Spend and errors come from ``embedding_migration_status`` (what the workers did).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql

from rag_service.errors import DatabaseError
from rag_service.schema import (
    Layout,
    category_filter,
    connect,
    counter_lock,
    ident,
    inspect_source,
    seed_counters,
    table_exists,
)
from rag_service.spec import DataPlaneSpec

log = logging.getLogger(__name__)

CountsKind = Literal["maintained", "exact"]
# Counter rows a fold would remove before a reader folds them (one short statement): few enough
# that summing them costs nothing, many enough that a busy source is not folded on every tick.
COMPACT_AFTER = 200
# What ``as_dict`` reports, and how each figure was obtained when the counts are maintained:
# read from counters and the queue, or read directly (these are exact whatever the mode).
MAINTAINED_FIGURES = ("total", "migrated", "pending", "stale", "byCategory")
EXACT_FIGURES = (
    "queued",
    "oldestPendingSeconds",
    "batches",
    "failedBatches",
    "tokens",
    "costUSD",
    "recentErrors",
)
_FIGURES = ("source", "current", "stale", "no_text")


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


@dataclass(frozen=True)
class MaintainedCounts:
    """The counters' reading (:func:`maintained_counts`)."""

    categories: list[CategoryCounts]
    vectors: int  # side-table rows
    seeded_at: datetime  # when they were last counted whole
    foldable: int  # counter rows a fold would remove


@dataclass(frozen=True)
class CountersCheck:
    """The maintained figures against the full comparison of the same snapshot."""

    drift: dict[str, dict[str, list[int]]]  # category → figure → [maintained, exact]
    requeued: int = 0  # vectors found not current yet not queued, queued by the re-seed

    @property
    def agreed(self) -> bool:
        return not self.drift

    def as_dict(self) -> dict[str, Any]:
        return {
            "agreed": self.agreed,
            "drift": self.drift,
            "reseeded": not self.agreed,
            "requeued": self.requeued,
        }

    def describe(self) -> str:
        if self.agreed:
            return "the maintained counters agree with the full comparison"
        figures = "; ".join(
            f"{category or '(none)'} {name} {values[0]} vs {values[1]}"
            for category, names in self.drift.items()
            for name, values in names.items()
        )
        return (
            f"the maintained counters had drifted ({figures}: maintained vs exact); counted again"
            + (
                f", and {self.requeued} vectors that were not current but not queued were queued"
                if self.requeued
                else ""
            )
        )


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
    counts: CountsKind = "exact"  # how the per-category figures were obtained
    counted_since: datetime | None = None  # maintained: when the counters were last seeded
    counters: CountersCheck | None = None  # exact: the maintained figures compared
    note: str | None = None  # why the counts are exact when maintained ones were asked for

    def total(self, attribute: str) -> int:
        return sum(int(getattr(c, attribute)) for c in self.categories)

    def as_dict(self) -> dict[str, Any]:
        maintained = self.counts == "maintained"
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
            "counts": self.counts,
            "figures": {
                "maintained": list(MAINTAINED_FIGURES) if maintained else [],
                "exact": list(EXACT_FIGURES if maintained else MAINTAINED_FIGURES + EXACT_FIGURES),
            },
            "countersSeededAt": self.counted_since.isoformat() if self.counted_since else None,
            "countersCheck": self.counters.as_dict() if self.counters else None,
            "countsNote": self.note,
        }


async def category_counts(
    conn: psycopg.AsyncConnection[Any], layout: Layout
) -> list[CategoryCounts]:
    """Per-category source, current and stale counts, in one pass over source ⟕ target: the
    exact comparison, O(corpus)."""
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


def _maintained_query(layout: Layout) -> sql.Composed:
    """Per category: the counters summed, corrected by the queued rows (module docstring).
    Reads the counter rows of this target and, through the primary keys, each queued row's
    source and side-table row. Pure."""
    return sql.SQL(
        "WITH queued AS (\n"
        "    SELECT src.category AS s_category, COALESCE(vec.category, '') AS t_category,\n"
        "        vec.content_hash IS NOT NULL AS has_vector,\n"
        "        src.embeddable AND vec.content_hash = src.content_hash AS current,\n"
        "        vec.content_hash <> src.content_hash AS stale\n"
        "    FROM {queue} q\n"
        "    JOIN LATERAL (\n"
        "        SELECT COALESCE({cat}, '') AS category, {embeddable} AS embeddable,\n"
        "            {hash} AS content_hash\n"
        "        FROM {src} s WHERE {sid} = q.id OFFSET 0\n"
        "    ) src ON true\n"
        "    LEFT JOIN LATERAL (\n"
        "        SELECT t.category, t.content_hash FROM {tgt} t WHERE t.id = q.id OFFSET 0\n"
        "    ) vec ON true\n"
        "), parts AS (\n"
        "    SELECT category, embeddable, no_text, vectors, 0 AS corrected, 0 AS stale,\n"
        "        1 AS counter_rows, seeded_at\n"
        "    FROM {counts} WHERE target_table = {target}\n"
        "    UNION ALL SELECT t_category, 0, 0, 0, -1, 0, 0, NULL FROM queued WHERE has_vector\n"
        "    UNION ALL SELECT s_category, 0, 0, 0, 1, 0, 0, NULL FROM queued WHERE current\n"
        "    UNION ALL SELECT s_category, 0, 0, 0, 0, 1, 0, NULL FROM queued WHERE stale\n"
        ")\n"
        "SELECT category, sum(embeddable)::bigint, (sum(vectors) + sum(corrected))::bigint,\n"
        "    sum(stale)::bigint, sum(no_text)::bigint, sum(vectors)::bigint,\n"
        "    sum(counter_rows)::bigint, max(seeded_at)\n"
        "FROM parts GROUP BY category ORDER BY category"
    ).format(
        queue=ident(layout.queue),
        cat=layout.s_category,
        embeddable=layout.s_embeddable,
        hash=layout.s_hash,
        src=ident(layout.source),
        sid=layout.s_id,
        tgt=ident(layout.target),
        counts=ident(layout.counts),
        target=sql.Literal(str(layout.target)),
    )


async def maintained_counts(
    conn: psycopg.AsyncConnection[Any], layout: Layout
) -> MaintainedCounts | None:
    """The per-category figures from the counters and the queue, O(changes); None when the
    counters were never seeded (a setup by an older embedshift)."""
    if not await table_exists(conn, layout.counts):
        return None
    cur = await conn.execute(_maintained_query(layout))
    rows = await cur.fetchall()
    seeded = [r[7] for r in rows if r[7] is not None]
    if not seeded:
        return None
    return MaintainedCounts(
        # A category no source row has any more (its counters net to zero) is not shown, as
        # the exact comparison, which groups the source's rows, does not show it.
        categories=[CategoryCounts(*r[:5]) for r in rows if r[1] or r[4]],
        vectors=sum(int(r[5]) for r in rows),
        seeded_at=max(seeded),
        foldable=sum(int(r[6]) for r in rows) - sum(1 for r in rows if r[6]),
    )


async def compact_counters(conn: psycopg.AsyncConnection[Any], layout: Layout) -> None:
    """Fold this target's counter rows into one per category, in one short transaction.

    Its DELETE takes only the committed rows it sees and the INSERT adds back their sums, so a
    writer adding rows meanwhile is neither waited for nor lost, and two folds at once each
    move only what they deleted. A seed running (:func:`rag_service.schema.seed_counters`, which
    replaces every row) holds the counter lock: this fold skips its turn. Best effort: a
    read-only session (a replica, a read-only role) leaves it to the next reader that can
    write. ``conn`` must be in autocommit mode.
    """
    try:
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", [counter_lock(layout)]
            )
            locked = await cur.fetchone()
            if not locked or not locked[0]:
                return
            await conn.execute(
                sql.SQL(
                    "WITH moved AS (\n"
                    "    DELETE FROM {counts} WHERE target_table = {target}\n"
                    "    RETURNING category, embeddable, no_text, vectors, seeded_at\n"
                    ")\n"
                    "INSERT INTO {counts} (target_table, category, embeddable, no_text, vectors, "
                    "seeded_at)\n"
                    "SELECT {target}, category, sum(embeddable), sum(no_text), sum(vectors), "
                    "max(seeded_at)\n"
                    "FROM moved GROUP BY category\n"
                    "HAVING sum(embeddable) <> 0 OR sum(no_text) <> 0 OR sum(vectors) <> 0\n"
                    "    OR max(seeded_at) IS NOT NULL"
                ).format(counts=ident(layout.counts), target=sql.Literal(str(layout.target)))
            )
    except (
        psycopg.errors.ReadOnlySqlTransaction,
        psycopg.errors.InsufficientPrivilege,
        psycopg.errors.ObjectNotInPrerequisiteState,  # a hot standby refuses advisory locks
        psycopg.errors.FeatureNotSupported,
    ) as exc:
        log.debug("counters of %s not folded: %s", layout.target, exc)


# Successful batch rows older than this are folded into one row per shard, phase and hour: the
# last hour keeps each batch (which rows, which worker), and a follower that writes ~17 rows a
# second at 100 changes/s leaves a few rows an hour, not 1.5 million a day.
FOLD_BATCHES_AFTER = timedelta(hours=1)


def _fold_query(layout: Layout, older_than: timedelta) -> sql.Composed:
    """Delete this target's unfolded successful batch rows finished before ``older_than`` ago and
    insert their sums back, one row per (migration, target, shard, phase, hour), with ``worker``
    NULL (a folded row) and ``batches`` the count. Pure."""
    group = sql.SQL("migration, target, shard, phase, date_trunc('hour', finished_at)")
    return sql.SQL(
        "WITH moved AS (\n"
        "    DELETE FROM {status}\n"
        "    WHERE target_table = {target} AND status = 'done' AND worker IS NOT NULL\n"
        "        AND finished_at < now() - {age}\n"
        "    RETURNING migration, target, shard, phase, rows, skipped, tokens, cost_usd,\n"
        "        by_category, batches, started_at, finished_at\n"
        "), categories AS (\n"
        "    SELECT migration, target, shard, phase, hour,\n"
        "        jsonb_object_agg(key, n) AS by_category\n"
        "    FROM (\n"
        "        SELECT migration, target, shard, phase,\n"
        "            date_trunc('hour', finished_at) AS hour, c.key, sum(c.value::bigint) AS n\n"
        "        FROM moved, jsonb_each_text(by_category) AS c\n"
        "        GROUP BY migration, target, shard, phase, date_trunc('hour', finished_at), c.key\n"
        "    ) per_category\n"
        "    GROUP BY migration, target, shard, phase, hour\n"
        ")\n"
        "INSERT INTO {status} (migration, target_table, target, shard, phase, status, rows,\n"
        "    skipped, tokens, cost_usd, by_category, batches, worker, started_at, finished_at)\n"
        "SELECT m.migration, {target}, m.target, m.shard, m.phase, 'done', m.rows, m.skipped,\n"
        "    m.tokens, m.cost_usd, COALESCE(c.by_category, '{{}}'), m.batches, NULL,\n"
        "    m.started_at, m.finished_at\n"
        "FROM (\n"
        "    SELECT migration, target, shard, phase, date_trunc('hour', finished_at) AS hour,\n"
        "        sum(rows) AS rows, sum(skipped) AS skipped, sum(tokens) AS tokens,\n"
        "        sum(cost_usd) AS cost_usd, sum(batches) AS batches,\n"
        "        min(started_at) AS started_at, max(finished_at) AS finished_at\n"
        "    FROM moved GROUP BY {group}\n"
        ") m LEFT JOIN categories c USING (migration, target, shard, phase, hour)"
    ).format(
        status=ident(layout.status),
        target=sql.Literal(str(layout.target)),
        age=sql.Literal(older_than),
        group=group,
    )


async def fold_batch_rows(
    conn: psycopg.AsyncConnection[Any],
    layout: Layout,
    *,
    older_than: timedelta = FOLD_BATCHES_AFTER,
) -> None:
    """Fold this target's successful batch rows older than ``older_than`` (:func:`_fold_query`),
    so the status table grows with the hours a migration runs, not with its batches. Failed
    batches are kept one by one (status lists them and counts them).

    Every sum a reader takes (batches, rows, tokens, cost, per category) is the same before and
    after. One statement: it deletes only the committed rows it sees and inserts their sums, so
    a worker writing rows meanwhile is neither waited for nor lost, and two folds at once each
    move only what they deleted. Best effort, like :func:`compact_counters`: a session that may
    not write, or a table an older setup made (no ``batches`` column until setup runs again),
    leaves the rows as they are. ``conn`` must be in autocommit mode.
    """
    try:
        await conn.execute(_fold_query(layout, older_than))
    except (
        psycopg.errors.ReadOnlySqlTransaction,
        psycopg.errors.InsufficientPrivilege,
        psycopg.errors.UndefinedColumn,
    ) as exc:
        log.debug("batch rows of %s not folded: %s", layout.target, exc)


def counts_drift(
    maintained: Sequence[CategoryCounts], exact: Sequence[CategoryCounts]
) -> dict[str, dict[str, list[int]]]:
    """Category → figure → [maintained, exact] for every figure that differs. Pure."""
    zero = CategoryCounts("", 0, 0, 0, 0)
    mine = {c.category: c for c in maintained}
    theirs = {c.category: c for c in exact}
    drift: dict[str, dict[str, list[int]]] = {}
    for category in sorted(mine.keys() | theirs.keys()):
        a, b = mine.get(category, zero), theirs.get(category, zero)
        differs = {
            name: [getattr(a, name), getattr(b, name)]
            for name in _FIGURES
            if getattr(a, name) != getattr(b, name)
        }
        if differs:
            drift[category] = differs
    return drift


async def check_counters(
    conn: psycopg.AsyncConnection[Any], layout: Layout
) -> tuple[list[CategoryCounts], CountersCheck | None]:
    """The exact per-category counts, and how the maintained ones compare (None: the counters
    were never seeded). One REPEATABLE READ snapshot for both, so a concurrent write cannot
    pass for drift. On drift, the counters are counted again and any vector the queue should
    hold is queued (:func:`rag_service.schema.seed_counters`), and the check says so.
    ``conn`` must be in autocommit mode."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        exact = await category_counts(conn, layout)
        maintained = await maintained_counts(conn, layout)
    if maintained is None:
        return exact, None
    drift = counts_drift(maintained.categories, exact)
    if not drift:
        return exact, CountersCheck(drift={})
    requeued = await seed_counters(conn, layout, repair=True)
    check = CountersCheck(drift=drift, requeued=requeued)
    log.warning("%s: %s", layout.target, check.describe())
    return exact, check


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
    (which no worker serves) does not show as ever-growing lag. Each queued row's category is
    looked up by its key (a scalar subquery, never turned into a join that reads the source
    whole). ``clock_timestamp()``, not ``now()``: ``conn`` may be inside a transaction that
    started long ago.
    """
    served = (
        sql.SQL("COALESCE((SELECT ({cats}) IS TRUE FROM {src} s WHERE {sid} = q.id), true)").format(
            cats=category_filter(layout, categories), src=ident(layout.source), sid=layout.s_id
        )
        if categories
        else sql.SQL("true")
    )
    cur = await conn.execute(
        sql.SQL(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(q.enqueued_at))::float8\n"
            "FROM {queue} q WHERE {served}"
        ).format(queue=ident(layout.queue), served=served)
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


async def failed_batches(conn: psycopg.AsyncConnection[Any], layout: Layout) -> int:
    """Failed batches recorded for this target (an index-only count: (target_table, status))."""
    cur = await conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE target_table = %s AND status = 'failed'").format(
            ident(layout.status)
        ),
        [str(layout.target)],
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _spend(conn: psycopg.AsyncConnection[Any], layout: Layout) -> tuple[int, int, float]:
    """(successful batches, tokens, cost) of this target: a pass over its status rows, which
    the follower folds by the hour (:func:`fold_batch_rows`)."""
    query = (
        "SELECT COALESCE(sum({batches}) FILTER (WHERE status = 'done'), 0),"
        " COALESCE(sum(tokens), 0), COALESCE(sum(cost_usd), 0)"
        " FROM {status} WHERE target_table = %s"
    )
    try:
        cur = await conn.execute(
            sql.SQL(query).format(batches=sql.SQL("batches"), status=ident(layout.status)),
            [str(layout.target)],
        )
    except psycopg.errors.UndefinedColumn:
        # Made by an older setup (no folded rows yet): one row per batch.
        cur = await conn.execute(
            sql.SQL(query).format(batches=sql.SQL("1"), status=ident(layout.status)),
            [str(layout.target)],
        )
    row = await cur.fetchone()
    return (int(row[0]), int(row[1]), float(row[2])) if row else (0, 0, 0.0)


async def migration_progress(
    url: str,
    spec: DataPlaneSpec,
    *,
    errors: int = 5,
    exact: bool = False,
    spend: bool = True,
) -> MigrationProgress:
    """Where the migration stands. Maintained counts unless ``exact`` (module docstring); a
    target whose counters were never seeded is counted exactly, and ``note`` says why.

    ``spend``: also sum the batches' tokens and cost (a pass over this target's status rows, one
    per batch; the control loop's observation needs only the failed ones). ``errors``: how many
    recent failures to list.
    """
    conn = await connect(url, autocommit=True)
    async with conn:
        layout = await open_layout(conn, spec)
        progress = MigrationProgress(target=layout.migration_target)
        maintained = None if exact else await maintained_counts(conn, layout)
        if maintained is not None:
            progress.counts = "maintained"
            progress.categories = maintained.categories
            progress.target_rows = maintained.vectors
            progress.counted_since = maintained.seeded_at
            if maintained.foldable >= COMPACT_AFTER:
                await compact_counters(conn, layout)
        else:
            progress.categories, progress.counters = await check_counters(conn, layout)
            progress.target_rows = await count_rows(conn, layout.target)
            if not exact:
                progress.note = (
                    f"{layout.target} has no maintained counters (set up by an older "
                    "embedshift): counted by a full comparison; run `embedshift migrate setup` "
                    "again to install them"
                )
        progress.queued = await count_rows(conn, layout.queue)
        progress.oldest_pending_seconds = await queue_lag(conn, layout, spec.migration.categories)
        progress.failed_batches = await failed_batches(conn, layout)
        if spend:
            progress.batches, progress.tokens, progress.cost_usd = await _spend(conn, layout)
        if errors > 0:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT finished_at, shard, first_id, last_id, error FROM {} "
                    "WHERE target_table = %s AND status = 'failed' ORDER BY id DESC LIMIT %s"
                ).format(ident(layout.status)),
                [str(layout.target), errors],
            )
            progress.recent_errors = [
                {
                    "at": r[0].isoformat(),
                    "shard": r[1],
                    "firstId": r[2],
                    "lastId": r[3],
                    "error": r[4],
                }
                for r in await cur.fetchall()
            ]
        return progress
