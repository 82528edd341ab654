"""The re-embedding worker (``embedshift migrate run``): backfill, then catch up on the queue.

Safe to kill at any instant. Each batch is one transaction: binary COPY of the vectors into a temp
staging table, one upsert into the side table guarded by the content hash (a row re-worded while
it was being embedded is not stored), the queue entries it served, its status row and the
checkpoint. Whatever was not committed is simply found again by the next run: pending rows are
defined by the data (no vector, or a vector whose hash is not the text's), never by a counter.

Two phases, one pipeline:

1. **backfill** pages the source by primary key from the last checkpoint, skipping rows that
   already have a current vector. A completed pass is recorded, so later runs skip it.
2. **catch-up** drains the queue the trigger fills (rows inserted or re-worded since setup),
   so work after the backfill is proportional to what changed.

Embedding requests run ``concurrency`` batches ahead of the writer; batches are written in order
on one connection, which keeps the checkpoint contiguous.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector_async
from psycopg import sql

from rag_service import binary_copy
from rag_service.errors import (
    BudgetExceeded,
    ConfigError,
    DatabaseError,
    DatabaseUnavailable,
    EmbedshiftError,
    ProviderError,
    WorkerBusy,
)
from rag_service.providers.base import (
    EmbeddingProvider,
    Embeddings,
    Purpose,
    Usage,
    request_watch,
)
from rag_service.providers.pricing import PriceTable
from rag_service.schema import (
    Layout,
    Query,
    category_filter,
    check_categories,
    check_side_table_identity,
    check_target_compatible,
    connect,
    first_line,
    ident,
    inspect_source,
    table_exists,
)
from rag_service.spec import DataPlaneSpec

log = logging.getLogger(__name__)

Phase = Literal["backfill", "catchup"]


@dataclass(frozen=True)
class Shard:
    """Rows whose id hashes to ``index`` modulo ``count``; one worker (advisory lock) per shard."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, value: str) -> Shard:
        """``I/N`` with 0 ≤ I < N. Pure."""
        try:
            index_text, count_text = value.split("/")
            shard = cls(index=int(index_text), count=int(count_text))
        except ValueError:
            raise ConfigError(f"--shard: {value!r} must be I/N, e.g. 0/4") from None
        if not 0 <= shard.index < shard.count:
            raise ConfigError(f"--shard: {value!r} needs 0 ≤ I < N, e.g. 0/4 … 3/4")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class RunOptions:
    limit: int | None = None
    categories: tuple[str, ...] = ()
    shard: Shard = field(default_factory=Shard)
    batch_size: int = 100
    concurrency: int = 4
    budget_usd: float | None = None
    rescan: bool = False
    max_catchup_passes: int = 20
    # Where ``categories`` and ``budget_usd`` came from, named when they are refused: the spec,
    # unless the command line's flags set them.
    categories_from: str = "spec.migration.categories"
    budget_from: str = "spec.migration.budgetUSD"


@dataclass(frozen=True)
class SourceRow:
    id: Any
    text: str
    category: str | None
    content_hash: bytes


@dataclass(frozen=True)
class Batch:
    """Rows to embed, plus queue entries to settle without embedding (already current or gone)."""

    phase: Phase
    rows: tuple[SourceRow, ...]
    queue_entries: tuple[tuple[Any, int], ...] = ()  # (id, seq) read from the queue
    unembeddable_ids: tuple[Any, ...] = ()  # text became empty: drop their vectors
    recategorised_ids: tuple[Any, ...] = ()  # same text, new category: refresh the copy only
    checkpoint_id: Any = None


@dataclass
class RunReport:
    target: str
    embedded: int = 0
    changed_while_embedding: int = 0
    settled_from_queue: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    batches: int = 0
    seconds: float = 0.0
    pending: int = 0
    stopped_by: str | None = None  # "limit" (--limit ended it early) or "signal" (stop was set)

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


class ProgressSink(Protocol):
    """Where a run reports progress: a progress bar, JSON lines, or nothing."""

    def started(self, *, total: int, target: str, phase: Phase) -> None: ...

    def advanced(self, *, rows: int, tokens: int, cost_usd: float) -> None: ...

    def finished(self, report: RunReport) -> None: ...


class NullProgress:
    def started(self, *, total: int, target: str, phase: Phase) -> None:
        return None

    def advanced(self, *, rows: int, tokens: int, cost_usd: float) -> None:
        return None

    def finished(self, report: RunReport) -> None:
        return None


@dataclass
class _InFlight:
    """A batch being embedded: its task (None: nothing to embed), its estimated cost, when it
    started, and (as the provider's :class:`RequestWatch`) its requests out and its spend."""

    batch: Batch
    task: asyncio.Task[Embeddings] | None
    estimate: float
    started: datetime
    changed: asyncio.Event  # shared by the pipeline's batches: a request went out or came back
    requests_out: int = 0
    spent: Usage = field(default_factory=Usage)

    def sent(self) -> None:
        self.requests_out += 1
        self.changed.set()

    def answered(self, usage: Usage | None) -> None:
        self.requests_out -= 1
        if usage is not None:
            self.spent += usage
        self.changed.set()

    @property
    def embedding(self) -> bool:
        return self.task is not None and not self.task.done()


async def _until_done_or_set(tasks: Sequence[asyncio.Task[Any]], event: asyncio.Event) -> None:
    """Until one of ``tasks`` is done or ``event`` is set, whichever is first (at once if one
    already is, or if there is no task)."""
    if not tasks or any(task.done() for task in tasks) or event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def shard_filter(column: sql.Composable, shard: Shard) -> sql.Composable:
    """SQL true for ids in ``shard``; stable across processes (PostgreSQL's own hash). Pure."""
    if shard.count == 1:
        return sql.SQL("true")
    # mod(), not %: a literal % would clash with psycopg's placeholders.
    return sql.SQL("mod(mod(hashtextextended({col}::text, 0), {n}) + {n}, {n}) = {i}").format(
        col=column, n=sql.Literal(shard.count), i=sql.Literal(shard.index)
    )


def pending_query(layout: Layout, options: RunOptions) -> Query:
    """Embeddable source rows with no vector or a stale one, within shard and categories. Pure."""
    return sql.SQL(
        "SELECT count(*) FROM {src} s LEFT JOIN {tgt} t ON t.id = {sid}\n"
        "WHERE {embeddable} AND {shard} AND {cats}\n"
        "  AND (t.id IS NULL OR t.content_hash <> {hash})"
    ).format(
        src=ident(layout.source),
        tgt=ident(layout.target),
        sid=layout.s_id,
        embeddable=layout.s_embeddable,
        shard=shard_filter(layout.s_id, options.shard),
        cats=category_filter(layout, options.categories),
        hash=layout.s_hash,
    )


async def _scalar(conn: psycopg.AsyncConnection[Any], query: Query, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return row[0] if row else None


class _Checkpoint:
    """The backfill cursor of one (target, shard, category set); an optimisation, not a truth."""

    def __init__(self, layout: Layout, options: RunOptions) -> None:
        self._layout = layout
        self.key = (
            str(layout.target),
            options.shard.index,
            options.shard.count,
            ",".join(sorted(options.categories)),
        )

    async def read(self, conn: psycopg.AsyncConnection[Any]) -> tuple[str | None, bool]:
        cur = await conn.execute(
            sql.SQL(
                "SELECT last_id, completed_at IS NOT NULL FROM {} WHERE target_table = %s "
                "AND shard_index = %s AND shard_count = %s AND categories = %s"
            ).format(ident(self._layout.checkpoint)),
            self.key,
        )
        row = await cur.fetchone()
        return (row[0], bool(row[1])) if row else (None, False)

    def write(self, *, last_id: Any, completed: bool) -> tuple[Query, tuple[Any, ...]]:
        return (
            sql.SQL(
                "INSERT INTO {} (target_table, shard_index, shard_count, categories, last_id, "
                "completed_at, updated_at) VALUES (%s, %s, %s, %s, %s, "
                "CASE WHEN %s THEN now() END, now())\n"
                "ON CONFLICT (target_table, shard_index, shard_count, categories) DO UPDATE SET "
                "last_id = COALESCE(EXCLUDED.last_id, {}.last_id), "
                "completed_at = EXCLUDED.completed_at, updated_at = now()"
            ).format(ident(self._layout.checkpoint), sql.Identifier(self._layout.checkpoint.name)),
            (*self.key, None if last_id is None else str(last_id), completed),
        )


class Worker:
    """One run of one shard. Holds three connections: lock+reads, writes, and nothing else."""

    def __init__(
        self,
        *,
        layout: Layout,
        provider: EmbeddingProvider,
        prices: PriceTable,
        options: RunOptions,
        migration: str,
        progress: ProgressSink,
        reader: psycopg.AsyncConnection[Any],
        writer: psycopg.AsyncConnection[Any],
    ) -> None:
        self.layout = layout
        self.provider = provider
        self.prices = prices
        self.options = options
        self.migration = migration
        self.progress = progress
        self.reader = reader
        self.writer = writer
        self.report = RunReport(target=layout.migration_target)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._checkpoint = _Checkpoint(layout, options)
        self._spent_before = 0.0
        self._launched = 0
        self._id_typname = "text"
        self._id_type = sql.SQL(layout.id_type)
        self._price_key = (layout.target_spec.provider.value, layout.target_spec.model)

    # ---- reading -------------------------------------------------------------------------

    async def _backfill_batches(self, after: str | None) -> AsyncIterator[Batch]:
        layout = self.layout
        cursor: Any = after
        first = True
        query = sql.SQL(
            "SELECT {sid}, {text}, {cat}, {hash} FROM {src} s\n"
            # The redundant bound on t.id lets a merge join start at the cursor instead of
            # rescanning the side table's index from its first row on every page (O(n²)).
            "LEFT JOIN {tgt} t ON t.id = {sid} AND ({t_after})\n"
            "WHERE ({after}) AND {embeddable} AND {shard} AND {cats}\n"
            "  AND (t.id IS NULL OR t.content_hash <> {hash})\n"
            "ORDER BY {sid} LIMIT %(limit)s"
        )
        while True:
            after_clause = (
                sql.SQL("true")
                if cursor is None
                else sql.SQL("{} > CAST(%(after)s AS {})").format(layout.s_id, self._id_type)
            )
            t_after = (
                sql.SQL("true")
                if cursor is None
                else sql.SQL("t.id > CAST(%(after)s AS {})").format(self._id_type)
            )
            limit = self._room(self.options.batch_size)
            if limit == 0:
                return
            cur = await self.reader.execute(
                query.format(
                    sid=layout.s_id,
                    text=layout.s_text,
                    cat=layout.s_category,
                    hash=layout.s_hash,
                    src=ident(layout.source),
                    tgt=ident(layout.target),
                    after=after_clause,
                    t_after=t_after,
                    embeddable=layout.s_embeddable,
                    shard=shard_filter(layout.s_id, self.options.shard),
                    cats=category_filter(layout, self.options.categories),
                ),
                {"after": None if cursor is None else str(cursor), "limit": limit},
            )
            rows = [SourceRow(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()]
            if not rows:
                return
            if first and after is not None:
                log.info("backfill: resuming %s after id %s", self.options.shard, after)
            first = False
            cursor = rows[-1].id
            self._launched += len(rows)
            yield Batch(phase="backfill", rows=tuple(rows), checkpoint_id=cursor)

    async def _catchup_batches(self) -> AsyncIterator[Batch]:
        """One pass over the queue in id order."""
        layout = self.layout
        cursor: Any = None
        query = sql.SQL(
            "SELECT q.id, q.seq, {text}, {cat}, {hash}, s.{sid_col} IS NOT NULL AND {embeddable},"
            " t.content_hash IS NOT DISTINCT FROM {hash}, t.category IS NOT DISTINCT FROM {cat}\n"
            "FROM {queue} q LEFT JOIN {src} s ON {sid} = q.id LEFT JOIN {tgt} t ON t.id = q.id\n"
            "WHERE ({after}) AND {shard} AND (s.{sid_col} IS NULL OR {cats})\n"
            "ORDER BY q.id LIMIT %(limit)s"
        )
        while True:
            after_clause = (
                sql.SQL("true")
                if cursor is None
                else sql.SQL("q.id > CAST(%(after)s AS {})").format(self._id_type)
            )
            cur = await self.reader.execute(
                query.format(
                    text=layout.s_text,
                    cat=layout.s_category,
                    hash=layout.s_hash,
                    sid_col=sql.Identifier(layout.id_column),
                    sid=layout.s_id,
                    embeddable=layout.s_embeddable,
                    queue=ident(layout.queue),
                    src=ident(layout.source),
                    tgt=ident(layout.target),
                    after=after_clause,
                    shard=shard_filter(sql.SQL("q.id"), self.options.shard),
                    cats=category_filter(layout, self.options.categories),
                ),
                {
                    "after": None if cursor is None else str(cursor),
                    "limit": self.options.batch_size,
                },
            )
            found = await cur.fetchall()
            if not found:
                return
            cursor = found[-1][0]
            rows: list[SourceRow] = []
            unembeddable: list[Any] = []
            recategorised: list[Any] = []
            settled: list[tuple[Any, int]] = []
            for qid, seq, text, cat, digest, embeddable, current, same_category in found:
                if not embeddable:
                    unembeddable.append(qid)
                elif current:
                    if not same_category:
                        recategorised.append(qid)
                elif self._room(len(rows) + 1) > len(rows):
                    rows.append(SourceRow(qid, text, cat, digest))
                else:
                    continue  # --limit reached: this entry stays queued
                settled.append((qid, seq))
            self._launched += len(rows)
            yield Batch(
                phase="catchup",
                rows=tuple(rows),
                queue_entries=tuple(settled),
                unembeddable_ids=tuple(unembeddable),
                recategorised_ids=tuple(recategorised),
            )
            if self.options.limit is not None and self._launched >= self.options.limit:
                return

    def _room(self, wanted: int) -> int:
        """How many more rows ``--limit`` allows (``wanted`` when there is no limit)."""
        if self.options.limit is None:
            return wanted
        return max(0, min(wanted, self.options.limit - self._launched))

    # ---- embedding and writing -----------------------------------------------------------

    def _estimate_cost(self, rows: Sequence[SourceRow]) -> float:
        if not rows:
            return 0.0
        tokens = self.provider.estimate_tokens([r.text for r in rows])
        return self.prices.cost(*self._price_key, tokens)

    async def _pipeline(
        self, batches: AsyncIterator[Batch], stop: asyncio.Event | None = None
    ) -> None:
        """Read ahead, embed ``concurrency`` batches at once, write them in order.

        The reader runs as its own task on its own connection, so paging the source overlaps
        the writes instead of waiting between them. Once ``stop`` is set no batch is started;
        the ones already embedding are still written, since their tokens are paid for.
        """
        ahead: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=self.options.concurrency)

        async def read_ahead() -> None:
            try:
                async for batch in batches:
                    await ahead.put(batch)
            except asyncio.CancelledError:
                # Nobody reads any more: an end marker put into a full queue would wait forever.
                raise
            except BaseException:
                await ahead.put(None)
                raise
            await ahead.put(None)

        reader = asyncio.create_task(read_ahead())
        inflight: deque[_InFlight] = deque()
        reserved = 0.0  # estimated cost of the batches still embedding, for the budget check

        changed = asyncio.Event()
        abandoned = False  # a batch was given up on stop: later ones keep the checkpoint

        async def write_oldest() -> None:
            nonlocal reserved, abandoned
            if stop is not None:
                oldest = inflight[0].task
                await _until_done_or_set([oldest] if oldest else [], stop)
                if stop.is_set():
                    await self._give_up_waiting(inflight, changed)
            entry = inflight.popleft()
            reserved -= entry.estimate
            if entry.task is not None and entry.task.cancelled():
                abandoned = True
                await self._record_abandoned(entry)
                return
            batch = replace(entry.batch, checkpoint_id=None) if abandoned else entry.batch
            await self._write(batch, entry.task, entry.started)

        try:
            while (batch := await ahead.get()) is not None:
                if stop is not None and stop.is_set():
                    break
                estimate = self._estimate_cost(batch.rows)
                budget = self.options.budget_usd
                spent = self._spent_before + self.report.cost_usd
                if budget is not None and batch.rows and spent + reserved + estimate > budget:
                    while inflight:
                        await write_oldest()
                    raise BudgetExceeded(
                        f"--budget-usd: ${self._spent_before + self.report.cost_usd:.4f} of "
                        f"${budget:.4f} spent on {self.layout.migration_target}; the next batch "
                        f"(≈${estimate:.4f}) would exceed it. Progress is saved; raise the "
                        "budget (spec.migration.budgetUSD) and rerun to continue"
                    )
                inflight.append(self._launch(batch, estimate, changed))
                reserved += estimate
                while len(inflight) >= self.options.concurrency:
                    await write_oldest()
            while inflight:
                await write_oldest()
            if stop is None or not stop.is_set() or reader.done():
                await reader  # surfaces a reading error; a stopped one is cancelled below
        finally:
            reader.cancel()
            for entry in inflight:
                if entry.task is not None:
                    entry.task.cancel()
            # Let a reader cancelled mid-query unwind before its connection is used or closed.
            await asyncio.wait([reader])
            if not reader.cancelled():
                reader.exception()  # retrieved: the error that matters is the one propagating

    def _launch(self, batch: Batch, estimate: float, changed: asyncio.Event) -> _InFlight:
        """Start embedding ``batch``, the entry watching its requests."""
        entry = _InFlight(
            batch=batch, task=None, estimate=estimate, started=datetime.now(UTC), changed=changed
        )
        if batch.rows:
            context = contextvars.copy_context()
            context.run(request_watch.set, entry)
            entry.task = asyncio.create_task(
                self.provider.embed([r.text for r in batch.rows], Purpose.DOCUMENT),
                context=context,
            )
        return entry

    async def _give_up_waiting(self, inflight: deque[_InFlight], changed: asyncio.Event) -> None:
        """On stop: once no batch still embedding has a request out (each answered request is
        paid for and kept), cancel those still embedding. They are waiting for the pacer's
        room or to retry, which a tight rate limit can make longer than a pod's grace period,
        and a request is never cut off mid-way. Their rows stay pending."""
        while any(e.embedding and e.requests_out > 0 for e in inflight):
            changed.clear()
            await _until_done_or_set([e.task for e in inflight if e.embedding and e.task], changed)
        given_up = [e for e in inflight if e.embedding]
        for entry in given_up:
            assert entry.task is not None
            entry.task.cancel()
        await asyncio.gather(*(e.task for e in given_up if e.task), return_exceptions=True)
        if given_up:
            log.info(
                "stop: %d batches (%d rows) given up while waiting for room; they stay pending",
                len(given_up),
                sum(len(e.batch.rows) for e in given_up),
            )

    async def _record_abandoned(self, entry: _InFlight) -> None:
        """A batch given up on stop: nothing stored, nothing settled, but what its answered
        requests cost is recorded (a successful row of 0 rows: spend and budget stay exact)."""
        spent = entry.spent
        if spent.requests == 0:
            return
        self.report.tokens += spent.tokens
        self.report.cost_usd += spent.cost_usd
        async with self.writer.transaction():
            await self._record_batch(
                entry.batch, entry.started, skipped=len(entry.batch.rows), spent=entry.spent
            )

    async def _write(
        self,
        batch: Batch,
        task: asyncio.Task[Embeddings] | None,
        started: datetime,
    ) -> None:
        embeddings: Embeddings | None = None
        if task is not None:
            try:
                embeddings = await task
            except EmbedshiftError as exc:
                await self._record_failure(batch, started, exc)
                raise
        layout = self.layout
        stored_ids: list[Any] = []
        async with self.writer.transaction():
            if embeddings is not None and batch.rows:
                stored_ids = await self._store(batch, embeddings)
            if batch.recategorised_ids:
                await self.writer.execute(
                    sql.SQL(
                        "UPDATE {tgt} t SET category = {cat} FROM {src} s "
                        "WHERE {sid} = t.id AND t.id = ANY(CAST(%s AS {idt}[]))"
                    ).format(
                        tgt=ident(layout.target),
                        cat=layout.s_category,
                        src=ident(layout.source),
                        sid=layout.s_id,
                        idt=self._id_type,
                    ),
                    [list(batch.recategorised_ids)],
                )
            if batch.unembeddable_ids:
                await self.writer.execute(
                    sql.SQL(
                        "DELETE FROM {tgt} t WHERE t.id = ANY(CAST(%s AS {idt}[])) AND NOT EXISTS "
                        "(SELECT 1 FROM {src} s WHERE {sid} = t.id AND {embeddable})"
                    ).format(
                        tgt=ident(layout.target),
                        idt=self._id_type,
                        src=ident(layout.source),
                        sid=layout.s_id,
                        embeddable=layout.s_embeddable,
                    ),
                    [list(batch.unembeddable_ids)],
                )
            if batch.queue_entries:
                # Only the (id, seq) pairs we read: a change since then renewed seq and stays.
                await self.writer.execute(
                    sql.SQL(
                        "DELETE FROM {queue} q USING unnest(CAST(%s AS {idt}[]), "
                        "CAST(%s AS bigint[])) AS served(id, seq) "
                        "WHERE q.id = served.id AND q.seq = served.seq"
                    ).format(queue=ident(layout.queue), idt=self._id_type),
                    [[e[0] for e in batch.queue_entries], [e[1] for e in batch.queue_entries]],
                )
            usage = embeddings.usage if embeddings is not None else None
            tokens = usage.tokens if usage else 0
            cost = usage.cost_usd if usage else 0.0
            stored = set(stored_ids)
            by_category = Counter(r.category or "" for r in batch.rows if r.id in stored)
            await self._record_batch(
                batch,
                started,
                rows=len(stored_ids),
                skipped=len(batch.rows) - len(stored_ids),
                spent=Usage(tokens=tokens, cost_usd=cost),
                by_category=dict(by_category),
            )
            if batch.checkpoint_id is not None:
                query, params = self._checkpoint.write(last_id=batch.checkpoint_id, completed=False)
                await self.writer.execute(query, params)
        self.report.batches += 1
        self.report.embedded += len(stored_ids)
        self.report.changed_while_embedding += len(batch.rows) - len(stored_ids)
        self.report.settled_from_queue += len(batch.queue_entries)
        self.report.tokens += tokens
        self.report.cost_usd += cost
        self.progress.advanced(rows=len(batch.rows), tokens=tokens, cost_usd=cost)

    async def _store(self, batch: Batch, embeddings: Embeddings) -> list[Any]:
        """Write a batch's vectors; return the ids stored (rows changed meanwhile are not)."""
        layout = self.layout
        if embeddings.vectors.shape != (len(batch.rows), layout.target_spec.dimensions):
            raise DatabaseError(
                f"internal: {embeddings.vectors.shape} vectors for {len(batch.rows)} rows; "
                "nothing was stored"
            )
        if batch.phase == "backfill" and binary_copy.supports(self._id_typname):
            try:
                async with self.writer.transaction():  # a savepoint inside the batch
                    return await self._copy_new_rows(batch.rows, embeddings)
            except (psycopg.errors.UniqueViolation, psycopg.errors.ForeignKeyViolation):
                log.debug("a row was written or deleted meanwhile; using the upsert")
        return await self._upsert(batch.rows, embeddings)

    async def _copy_new_rows(self, rows: Sequence[SourceRow], embeddings: Embeddings) -> list[Any]:
        """Backfill rows have no vector yet: re-check them, then COPY them straight in.

        Half the work of staging + upsert. The re-read is the hash guard: a row re-worded while
        it was being embedded is left out (it stays pending); one re-worded after the re-read
        was queued by the trigger with a new seq, exactly as with the upsert. A row that got a
        vector meanwhile (another worker) or lost its source row makes the COPY raise, and the
        caller falls back to the upsert.
        """
        layout = self.layout
        cur = await self.writer.execute(
            sql.SQL("SELECT {sid}, {hash}, {cat} FROM {src} s WHERE {sid} = ANY(%s)").format(
                sid=layout.s_id, hash=layout.s_hash, cat=layout.s_category, src=ident(layout.source)
            ),
            [[r.id for r in rows]],
        )
        now = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}  # hash is NULL if text is
        keep = [i for i, r in enumerate(rows) if r.id in now and now[r.id][0] == r.content_hash]
        if not keep:
            return []
        kept = [rows[i] for i in keep]
        async with self.writer.cursor().copy(
            sql.SQL(
                "COPY {} (id, embedding, content_hash, category) FROM STDIN (FORMAT BINARY)"
            ).format(ident(layout.target))
        ) as copy:
            await copy.write(
                binary_copy.encode_rows(
                    id_typname=self._id_typname,
                    ids=[r.id for r in kept],
                    vectors=embeddings.vectors[keep],
                    hashes=[r.content_hash for r in kept],
                    halfvec=layout.target_spec.index.halfvec,
                    categories=[now[r.id][1] for r in kept],
                )
            )
        return [r.id for r in kept]

    async def _upsert(self, rows: Sequence[SourceRow], embeddings: Embeddings) -> list[Any]:
        layout = self.layout
        vectors = embeddings.vectors
        cur = self.writer.cursor()
        halfvec = layout.target_spec.index.halfvec
        async with cur.copy(
            "COPY embedshift_staging (id, embedding, content_hash) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            if binary_copy.supports(self._id_typname):
                await copy.write(
                    binary_copy.encode_rows(
                        id_typname=self._id_typname,
                        ids=[r.id for r in rows],
                        vectors=vectors,
                        hashes=[r.content_hash for r in rows],
                        halfvec=halfvec,
                    )
                )
            else:
                copy.set_types([self._id_typname, layout.target_spec.vector_type, "bytea"])
                # pgvector's binary dumper takes numpy for vector, only HalfVector for halfvec.
                wrap: Any = HalfVector if halfvec else (lambda v: v)
                for row, vector in zip(rows, vectors, strict=True):
                    await copy.write_row((row.id, wrap(vector), row.content_hash))
        # FOR KEY SHARE waits out a concurrent delete (the row then drops out) and re-reads a row
        # updated meanwhile, so the hash compared is the text as of this statement.
        cur = await self.writer.execute(
            sql.SQL(
                "WITH src AS (\n"
                "  SELECT {sid} AS id, {hash} AS content_hash, {cat} AS category FROM {src} s\n"
                "  WHERE {sid} = ANY(CAST(%(ids)s AS {idt}[])) FOR KEY SHARE OF s\n"
                ")\n"
                "INSERT INTO {tgt} (id, embedding, content_hash, category)\n"
                "SELECT st.id, st.embedding, st.content_hash, src.category\n"
                "FROM embedshift_staging st JOIN src ON src.id = st.id "
                "AND src.content_hash = st.content_hash\n"
                "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding, "
                "content_hash = EXCLUDED.content_hash, category = EXCLUDED.category, "
                "embedded_at = now()\n"
                "RETURNING id"
            ).format(
                sid=layout.s_id,
                hash=layout.s_hash,
                cat=layout.s_category,
                src=ident(layout.source),
                idt=self._id_type,
                tgt=ident(layout.target),
            ),
            {"ids": [r.id for r in rows]},
        )
        return [r[0] for r in await cur.fetchall()]

    async def _record_batch(
        self,
        batch: Batch,
        started: datetime,
        *,
        rows: int = 0,
        skipped: int = 0,
        spent: Usage,
        by_category: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        """The batch's status row: 'done' (rows stored, rows not, what it cost, per category), or
        'failed' with ``error``. The one INSERT every outcome of a batch goes through."""
        await self.writer.execute(
            sql.SQL(
                "INSERT INTO {} (migration, target_table, target, shard, phase, status, "
                "first_id, last_id, rows, skipped, tokens, cost_usd, by_category, error, worker, "
                "started_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, "
                "%s, %s, %s)"
            ).format(ident(self.layout.status)),
            [
                self.migration,
                str(self.layout.target),
                self.layout.migration_target,
                str(self.options.shard),
                batch.phase,
                "done" if error is None else "failed",
                str(batch.rows[0].id) if batch.rows else None,
                str(batch.rows[-1].id) if batch.rows else None,
                rows,
                skipped,
                spent.tokens,
                spent.cost_usd,
                _json(by_category or {}),
                error,
                self.worker_id,
                started,
            ],
        )

    async def _record_failure(self, batch: Batch, started: datetime, exc: EmbedshiftError) -> None:
        """Record the failed batch, with what its successful requests were billed."""
        spent = exc if isinstance(exc, ProviderError) else None
        try:
            await self._record_batch(
                batch,
                started,
                spent=Usage(
                    tokens=spent.spent_tokens if spent else 0,
                    cost_usd=spent.spent_usd if spent else 0.0,
                ),
                error=str(exc)[:2000],
            )
        except psycopg.Error:
            log.exception("could not record the failed batch")

    # ---- the run -------------------------------------------------------------------------

    async def prepare(self) -> None:
        await register_vector_async(self.writer)
        # Safe here: a commit lost to a server crash loses its vectors *and* its status row
        # together, and the next run finds those rows pending again. Saves an fsync per batch.
        await self.writer.execute("SET synchronous_commit = off")
        cur = await self.reader.execute(
            "SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s",
            [self.layout.source.regclass_text, self.layout.id_column],
        )
        row = await cur.fetchone()
        self._id_typname = str(row[0]) if row else "text"
        async with self.writer.transaction():
            await self.writer.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS embedshift_staging "
                    "(id {}, embedding {}, content_hash bytea) ON COMMIT DELETE ROWS"
                ).format(self._id_type, self.layout.vector_type)
            )
        spent = await _scalar(
            self.reader,
            sql.SQL("SELECT COALESCE(sum(cost_usd), 0) FROM {} WHERE target_table = %s").format(
                ident(self.layout.status)
            ),
            [str(self.layout.target)],
        )
        self._spent_before = float(spent or 0)

    async def catch_up(self, stop: asyncio.Event | None = None) -> None:
        """Drain the queue: passes until one settles nothing, ``--limit`` is reached or ``stop``
        is set (then the batches already embedding are written and nothing more is started).

        Adds to ``self.report``; ``run`` calls it after the backfill, ``migrate follow`` on every
        notification and sweep.
        """
        for _ in range(self.options.max_catchup_passes):
            if stop is not None and stop.is_set():
                break
            if self.options.limit is not None and self._launched >= self.options.limit:
                self.report.stopped_by = "limit"
                break
            before = (self.report.batches, self.report.settled_from_queue)
            await self._pipeline(self._catchup_batches(), stop)
            if (self.report.batches, self.report.settled_from_queue) == before:
                break

    async def run(self, stop: asyncio.Event | None = None) -> RunReport:
        """Backfill, then drain the queue. Once ``stop`` is set no batch is started; those
        under way are written, the checkpoint stays where they left it, and the report says
        ``stopped_by="signal"`` (without the closing pending count: a full comparison)."""
        started = time.monotonic()
        last_id, completed = await self._checkpoint.read(self.reader)
        if self.options.rescan:
            last_id, completed = None, False
        if not completed:
            total = int(await _scalar(self.reader, pending_query(self.layout, self.options)) or 0)
            self.progress.started(
                total=min(total, self.options.limit or total),
                target=self.layout.migration_target,
                phase="backfill",
            )
            await self._pipeline(self._backfill_batches(last_id), stop)
            if stop is not None and stop.is_set():
                return self._stopped(started)
            if self.options.limit is None or self._launched < self.options.limit:
                async with self.writer.transaction():
                    query, params = self._checkpoint.write(last_id=None, completed=True)
                    await self.writer.execute(query, params)
                log.info("backfill of shard %s complete", self.options.shard)
        else:
            queued = int(
                await _scalar(
                    self.reader,
                    sql.SQL("SELECT count(*) FROM {} q WHERE {}").format(
                        ident(self.layout.queue), shard_filter(sql.SQL("q.id"), self.options.shard)
                    ),
                )
                or 0
            )
            self.progress.started(
                total=min(queued, self.options.limit or queued),
                target=self.layout.migration_target,
                phase="catchup",
            )
        await self.catch_up(stop)
        if stop is not None and stop.is_set():
            return self._stopped(started)
        self.report.pending = int(
            await _scalar(self.reader, pending_query(self.layout, self.options)) or 0
        )
        return self._finished(started)

    def _stopped(self, started: float) -> RunReport:
        self.report.stopped_by = "signal"
        return self._finished(started)

    def _finished(self, started: float) -> RunReport:
        self.report.seconds = time.monotonic() - started
        self.progress.finished(self.report)
        return self.report


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


LockRole = Literal["shard", "follow"]


def lock_key(layout: Layout, role: LockRole, shard: Shard) -> str:
    """The advisory lock a worker holds for its whole session. Pure.

    Shard workers lock their shard; followers lock one key per target of their own, because the
    follower runs beside the shard Jobs from Migrating on and must not wait for (or block) them.
    Both drain the queue safely side by side (hash guard, ``(id, seq)`` deletion): the locks only
    keep two processes of one kind from doing the same work twice.
    """
    return f"embedshift:{layout.target}:{shard if role == 'shard' else 'follow'}"


async def check_options(
    conn: psycopg.AsyncConnection[Any], layout: Layout, options: RunOptions, prices: PriceTable
) -> None:
    """Refuse what would run but do the wrong thing, before anything is embedded or spent: a
    budget on a model whose price is unknown (it would count $0 and never stop), and a category
    no row has (a misspelling would embed nothing and succeed)."""
    if options.budget_usd is not None:
        spec = layout.target_spec
        prices.require_price(spec.provider.value, spec.model, field=options.budget_from)
    await check_categories(conn, layout, options.categories, field=options.categories_from)


@asynccontextmanager
async def worker_session(
    url: str,
    spec: DataPlaneSpec,
    *,
    provider: EmbeddingProvider,
    options: RunOptions,
    migration: str,
    prices: PriceTable | None = None,
    progress: ProgressSink | None = None,
    role: LockRole = "shard",
) -> AsyncIterator[Worker]:
    """A prepared :class:`Worker` holding its advisory lock until the block exits.

    Raises WorkerBusy if another process holds the lock, DatabaseError if setup has not run, and
    turns database errors inside the block into DatabaseError (DatabaseUnavailable when the
    server went away, which a long-running caller may retry).
    """
    if provider.dimensions != spec.target.dimensions:
        raise ConfigError(
            f"--target: provider gives {provider.dimensions} dimensions, spec says "
            f"{spec.target.dimensions}"
        )
    reader = await connect(url, autocommit=True)
    try:
        layout = await inspect_source(reader, spec)
        for table in (layout.target, layout.queue, layout.status, layout.checkpoint):
            if not await table_exists(reader, table):
                raise DatabaseError(
                    f"{table} does not exist: run `embedshift migrate setup` with the same "
                    "table and target first"
                )
        # Before the first read: the backfill skips rows whose hash matches, whichever
        # model's vector holds it, so a table of another identity would look complete.
        await check_side_table_identity(reader, layout)
        await check_target_compatible(reader, layout)
        options = replace(options, categories=tuple(dict.fromkeys(options.categories)))
        await check_options(reader, layout, options, prices or PriceTable())
        locked = await _scalar(
            reader,
            sql.SQL("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"),
            [lock_key(layout, role, options.shard)],
        )
        if not locked:
            raise WorkerBusy(
                f"shard {options.shard} of {layout.target} is being migrated by another worker "
                "(advisory lock held); wait for it, or run another --shard"
                if role == "shard"
                else f"another `embedshift migrate follow` holds the follower lock of "
                f"{layout.target}; one follower per target drains the queue"
            )
        # Autocommit, so each ``transaction()`` block is a real BEGIN/COMMIT, never a savepoint
        # inside an implicit transaction that a stray statement opened.
        writer = await connect(url, autocommit=True)
        try:
            worker = Worker(
                layout=layout,
                provider=provider,
                prices=prices or PriceTable(),
                options=options,
                migration=migration,
                progress=progress or NullProgress(),
                reader=reader,
                writer=writer,
            )
            await worker.prepare()
            yield worker
        except psycopg.Error as exc:
            error = (
                DatabaseUnavailable if isinstance(exc, psycopg.OperationalError) else DatabaseError
            )
            raise error(f"database error during the run: {first_line(exc)}") from None
        finally:
            await writer.close()
    finally:
        await reader.close()


async def run_migration(
    url: str,
    spec: DataPlaneSpec,
    *,
    provider: EmbeddingProvider,
    options: RunOptions,
    migration: str,
    prices: PriceTable | None = None,
    progress: ProgressSink | None = None,
    stop: asyncio.Event | None = None,
) -> RunReport:
    """Run one shard to completion (or ``--limit``/budget, or until ``stop`` is set: see
    :meth:`Worker.run`). Raises EmbedshiftError subclasses."""
    async with worker_session(
        url,
        spec,
        provider=provider,
        options=options,
        migration=migration,
        prices=prices,
        progress=progress,
    ) as worker:
        return await worker.run(stop)


@dataclass
class DryRun:
    """What ``run`` would do now, from SQL alone: nothing is embedded, nothing written."""

    target: str
    rows: int
    estimated_tokens: int
    estimated_cost_usd: float | None  # None: the target model's price is unknown
    by_category: dict[str, int]
    sample: list[dict[str, Any]]
    setup_done: bool


async def plan_run(
    url: str,
    spec: DataPlaneSpec,
    *,
    options: RunOptions,
    prices: PriceTable | None = None,
    sample_size: int = 10,
) -> DryRun:
    """Count the rows a run would embed (all rows if setup has not run) and estimate the cost.

    Tokens are estimated as characters / 3, the same conservative rule budgets use.
    """
    prices = prices or PriceTable()
    conn = await connect(url, autocommit=True)
    async with conn:
        layout = await inspect_source(conn, spec)
        await check_options(conn, layout, options, prices)
        setup_done = await table_exists(conn, layout.target)
        if setup_done:  # a table of another identity would count its rows as done
            await check_side_table_identity(conn, layout)
        stale = (
            sql.SQL(
                "NOT EXISTS (SELECT 1 FROM {tgt} t WHERE t.id = {sid} AND t.content_hash = {h})"
            ).format(tgt=ident(layout.target), sid=layout.s_id, h=layout.s_hash)
            if setup_done
            else sql.SQL("true")
        )
        where = sql.SQL("{} AND {} AND {} AND {}").format(
            layout.s_embeddable,
            shard_filter(layout.s_id, options.shard),
            category_filter(layout, options.categories),
            stale,
        )
        limit = (
            sql.SQL("LIMIT {}").format(sql.Literal(options.limit)) if options.limit else sql.SQL("")
        )
        cur = await conn.execute(
            sql.SQL(
                "SELECT COALESCE(cat, ''), count(*), COALESCE(sum(length(txt) / 3 + 1), 0) FROM "
                "(SELECT {cat} AS cat, {text} AS txt FROM {src} s WHERE {where} ORDER BY {sid} "
                "{limit}) AS p GROUP BY 1 ORDER BY 1"
            ).format(
                cat=layout.s_category,
                text=layout.s_text,
                src=ident(layout.source),
                where=where,
                sid=layout.s_id,
                limit=limit,
            )
        )
        counts = await cur.fetchall()
        cur = await conn.execute(
            sql.SQL(
                "SELECT {sid}, {cat}, left({text}, 80) FROM {src} s WHERE {where} "
                "ORDER BY {sid} LIMIT %s"
            ).format(
                sid=layout.s_id,
                cat=layout.s_category,
                text=layout.s_text,
                src=ident(layout.source),
                where=where,
            ),
            [min(sample_size, options.limit or sample_size)],
        )
        sample = [{"id": str(r[0]), "category": r[1], "text": r[2]} for r in await cur.fetchall()]
    tokens = sum(int(t) for _, _, t in counts)
    return DryRun(
        target=spec.target.descriptor,
        rows=sum(int(n) for _, n, _ in counts),
        estimated_tokens=tokens,
        estimated_cost_usd=(
            prices.cost(spec.target.provider.value, spec.target.model, tokens)
            if prices.knows(spec.target)
            else None
        ),
        by_category={c: int(n) for c, n, _ in counts},
        sample=sample,
        setup_done=setup_done,
    )
