"""Query embeddings, cached: an in-process LRU with a TTL in front of a shared Postgres table.

Keyed by (provider, model, dimensions, sha256 of the normalised query), so every replica shares
hits and a model change can never serve another model's vector. A database failure degrades to
the in-process cache (and embedding), never to an error for the user.

The shared table is bounded: a row older than ``shared_ttl_seconds`` is never served, and
:meth:`QueryCache.prune` (run in the background by the service, see :meth:`QueryCache.start`)
deletes expired rows, then the oldest rows beyond ``shared_max_rows``, in batches of short
statements, so the table does not grow one row per distinct query forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import random
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from rag_service.identifiers import TableName
from rag_service.providers.base import EmbeddingProvider, Purpose, Usage, Vectors
from rag_service.schema import QUERY_CACHE_TABLE, ident

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")

# The shared table's bounds (``embedshift serve --query-cache-ttl`` and
# ``--query-cache-max-rows``). A week: a query asked again within a week is served from the
# table, and a model the provider silently updated stops being served from it within a week.
# A million rows: about 3 GB of 768-d vectors, what a busy service's distinct queries of a week
# come to; past it, the oldest go first.
SHARED_TTL_SECONDS: Final = 7 * 24 * 3600.0
SHARED_MAX_ROWS: Final = 1_000_000
# How often the service prunes the shared table (each replica, with jitter), and how: batches of
# at most PRUNE_BATCH rows (each its own short statement), at most PRUNE_MAX_BATCHES per round.
PRUNE_EVERY_SECONDS: Final = 300.0
PRUNE_BATCH: Final = 1_000
PRUNE_MAX_BATCHES: Final = 50


@dataclass(frozen=True)
class Pruned:
    """What one :meth:`QueryCache.prune` round deleted from the shared table."""

    expired: int = 0
    beyond_cap: int = 0
    failed: bool = False  # a statement failed: the round stopped there (logged)


def normalise_query(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: "Pool  Hours" and "pool hours" share a key. Pure."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def cache_key(descriptor: str, text: str) -> bytes:
    """sha256 over the model descriptor and the normalised query. Pure."""
    return hashlib.sha256(f"{descriptor}\0{normalise_query(text)}".encode()).digest()


@dataclass(frozen=True)
class Lookup:
    vector: Vectors  # 1-d, float32
    hit: bool  # found in memory or in the shared table: no provider call
    usage: Usage  # what embedding it cost (zero on a hit)


class QueryCache:
    """Query embeddings by (model, normalised query): memory first, then the shared table.

    A miss is written to the shared table behind the answer, not before it: a write-behind queue
    (one entry per key, bounded; entries beyond ``max_pending_writes`` are dropped and counted)
    that one background task flushes in multi-row statements. A user never waits for another
    replica's future hit, and under load 32 misses cost one round trip instead of 32. ``flush``
    waits for everything queued so far; ``aclose`` flushes and stops the writer and the pruner.

    ``ttl_seconds`` bounds the in-process entries, ``shared_ttl_seconds`` every entry: a row of
    the shared table older than it is never served (nor a memory entry). ``shared_max_rows``
    bounds the shared table; ``prune`` enforces both bounds, ``start(prune_every=...)`` runs it
    in the background.

    ``pool``'s connections must know pgvector's types (``search.configure_connection`` does
    that): vectors travel as binary ``vector`` both ways. ``error_text``: how a database error
    is logged (the service passes its redaction of the URL's secrets); by default its first line.
    """

    def __init__(
        self,
        *,
        pool: AsyncConnectionPool[Any] | None,
        capacity: int = 10_000,
        ttl_seconds: float = 3600.0,
        shared_ttl_seconds: float = SHARED_TTL_SECONDS,
        shared_max_rows: int = SHARED_MAX_ROWS,
        schema: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        write_batch: int = 100,
        max_pending_writes: int = 1_000,
        prune_batch: int = PRUNE_BATCH,
        prune_max_batches: int = PRUNE_MAX_BATCHES,
        error_text: Callable[[BaseException], str] | None = None,
    ) -> None:
        self._pool = pool
        self._error_text = error_text
        self._capacity = capacity
        self._ttl = min(ttl_seconds, shared_ttl_seconds)
        self._shared_ttl = shared_ttl_seconds
        self._max_rows = shared_max_rows
        self._prune_batch = prune_batch
        self._prune_max_batches = prune_max_batches
        self._pruner: asyncio.Task[None] | None = None
        self._table = TableName(QUERY_CACHE_TABLE, schema)
        self._clock = clock
        self._memory: OrderedDict[bytes, tuple[float, Vectors]] = OrderedDict()
        self._write_batch = write_batch
        self._max_pending = max_pending_writes
        self._pending: dict[tuple[str, bytes], Vectors] = {}
        self._wake = asyncio.Event()
        self._writing = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self.shared_errors = 0
        self.dropped_writes = 0

    def _remember(self, key: bytes, vector: Vectors) -> None:
        self._memory[key] = (self._clock(), vector)
        self._memory.move_to_end(key)
        while len(self._memory) > self._capacity:
            self._memory.popitem(last=False)

    def _recall(self, key: bytes) -> Vectors | None:
        entry = self._memory.get(key)
        if entry is None:
            return None
        stored_at, vector = entry
        if self._clock() - stored_at > self._ttl:
            del self._memory[key]
            return None
        self._memory.move_to_end(key)
        return vector

    async def embed(self, provider: EmbeddingProvider, text: str) -> Lookup:
        key = cache_key(provider.descriptor, text)
        vector = self._recall(key)
        if vector is not None:
            return Lookup(vector, hit=True, usage=Usage())
        vector = await self._shared_get(provider.descriptor, key)
        if vector is not None:
            self._remember(key, vector)
            return Lookup(vector, hit=True, usage=Usage())
        embedded = await provider.embed([text], Purpose.QUERY)
        vector = embedded.vectors[0]
        self._remember(key, vector)
        self._queue_write(provider.descriptor, key, vector)
        return Lookup(vector, hit=False, usage=embedded.usage)

    async def _shared_get(self, descriptor: str, key: bytes) -> Vectors | None:
        if self._pool is None:
            return None
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    sql.SQL(
                        "SELECT embedding FROM {} WHERE descriptor = %s AND query_hash = %s "
                        "AND created_at > now() - make_interval(secs => %s)"
                    ).format(ident(self._table)),
                    [descriptor, key, self._shared_ttl],
                    binary=True,
                )
                row = await cur.fetchone()
        except (psycopg.Error, OSError) as exc:
            self._shared_failed(exc)
            return None
        stored: Vector | None = None if row is None else row[0]
        return None if stored is None else stored.to_numpy()

    def _queue_write(self, descriptor: str, key: bytes, vector: Vectors) -> None:
        if self._pool is None:
            return
        if len(self._pending) >= self._max_pending and (descriptor, key) not in self._pending:
            self.dropped_writes += 1  # the table is a shared bonus; memory still has it
            return
        self._pending[(descriptor, key)] = vector
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_behind(), name="query-cache-writer")
        self._wake.set()

    async def _write_behind(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._write_some()

    async def _write_some(self) -> None:
        """Take up to ``write_batch`` queued entries and upsert them in one statement."""
        async with self._writing:
            if not self._pending or self._pool is None:
                return
            keys = list(itertools.islice(self._pending, self._write_batch))
            rows = [(d, k, self._pending.pop((d, k))) for d, k in keys]
            values = sql.SQL(", ").join(sql.SQL("(%s, %s, %s)") for _ in rows)
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(
                        sql.SQL(
                            "INSERT INTO {} (descriptor, query_hash, embedding) VALUES {} "
                            "ON CONFLICT (descriptor, query_hash) DO UPDATE "
                            "SET embedding = EXCLUDED.embedding, created_at = now()"
                        ).format(ident(self._table), values),
                        [field for row in rows for field in row],
                        binary=True,
                    )
            except (psycopg.Error, OSError) as exc:
                self._shared_failed(exc)  # dropped, not retried: the next miss writes it again

    async def flush(self) -> None:
        """Write everything queued so far to the shared table (or give up on it on an error)."""
        while self._pending:
            await self._write_some()
        async with self._writing:  # and wait for a batch the writer task has in flight
            pass

    def start(self, *, prune_every: float = PRUNE_EVERY_SECONDS) -> None:
        """Prune the shared table in the background: at once, then every ``prune_every``
        seconds (give or take a tenth, so replicas started together do not prune together)."""
        if self._pool is None or self._pruner is not None:
            return
        self._pruner = asyncio.create_task(
            self._prune_every(prune_every), name="query-cache-pruner"
        )

    async def _prune_every(self, seconds: float) -> None:
        jitter = random.Random()
        while True:
            try:
                await self.prune()
            except Exception:  # a bug must not end the pruning for good; logged in full
                log.exception("pruning the shared query cache failed; trying again later")
            await asyncio.sleep(seconds * jitter.uniform(0.9, 1.1))

    async def prune(self) -> Pruned:
        """One round: delete expired rows, then the oldest rows beyond the cap, each batch of at
        most ``prune_batch`` rows its own short statement, at most ``prune_max_batches`` batches
        of each. A failure ends the round (logged, counted in ``shared_errors``), never raises:
        the next round tries again."""
        if self._pool is None:
            return Pruned()
        table = ident(self._table)
        # TID scans: each statement deletes the rows its subquery picked and nothing else, and
        # stops reading at the batch's end.
        expired_statement = sql.SQL(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY("
            "SELECT ctid FROM {t} WHERE created_at < now() - make_interval(secs => %s) LIMIT %s))"
        ).format(t=table)
        oldest_statement = sql.SQL(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY("
            "SELECT ctid FROM {t} ORDER BY created_at LIMIT %s))"
        ).format(t=table)
        expired = beyond = 0
        try:
            for _ in range(self._prune_max_batches):
                done = await self._execute(expired_statement, [self._shared_ttl, self._prune_batch])
                expired += done
                if done < self._prune_batch:
                    break
            excess = await self._excess()
            for _ in range(self._prune_max_batches):
                if excess <= 0:
                    break
                done = await self._execute(oldest_statement, [min(excess, self._prune_batch)])
                beyond += done
                excess -= done
                if not done:
                    break
        except (psycopg.Error, OSError) as exc:
            self._shared_failed(exc, doing="pruning")
            return Pruned(expired, beyond, failed=True)
        if expired or beyond:
            log.debug(
                "shared query cache: deleted %d expired rows and %d beyond the cap of %d",
                expired,
                beyond,
                self._max_rows,
            )
        return Pruned(expired, beyond)

    async def _execute(self, statement: sql.Composed, params: list[Any]) -> int:
        assert self._pool is not None
        async with self._pool.connection() as conn:
            cur = await conn.execute(statement, params)
            return max(int(cur.rowcount), 0)

    async def _excess(self) -> int:
        """How many rows the shared table holds beyond the cap."""
        assert self._pool is not None
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(self._table)))
            row = await cur.fetchone()
        total = int(row[0]) if row else 0
        return max(0, total - self._max_rows)

    async def aclose(self) -> None:
        """Flush, then stop the writer and the pruner. Call before closing the pool."""
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    def _shared_failed(self, exc: BaseException, *, doing: str = "") -> None:
        self.shared_errors += 1
        if self._error_text is not None:
            said = self._error_text(exc)
        else:
            said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("shared query cache unavailable%s: %s", f" ({doing})" if doing else "", said)
