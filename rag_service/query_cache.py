"""Query embeddings, cached: an in-process LRU with a TTL in front of a shared Postgres table.

Keyed by (provider, model, dimensions, sha256 of the normalised query), so every replica shares
hits and a model change can never serve another model's vector. A database failure degrades to
the in-process cache (and embedding), never to an error for the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from rag_service.identifiers import TableName
from rag_service.providers.base import EmbeddingProvider, Purpose, Usage, Vectors
from rag_service.schema import QUERY_CACHE_TABLE, ident

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")


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
    waits for everything queued so far; ``aclose`` flushes and stops the writer.

    ``pool``'s connections must know pgvector's types (``search.configure_connection`` does
    that): vectors travel as binary ``vector`` both ways.
    """

    def __init__(
        self,
        *,
        pool: AsyncConnectionPool[Any] | None,
        capacity: int = 10_000,
        ttl_seconds: float = 3600.0,
        schema: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        write_batch: int = 100,
        max_pending_writes: int = 1_000,
    ) -> None:
        self._pool = pool
        self._capacity = capacity
        self._ttl = ttl_seconds
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
                    [descriptor, key, self._ttl],
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

    async def aclose(self) -> None:
        """Flush, then stop the writer. Call before closing the pool."""
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    def _shared_failed(self, exc: BaseException) -> None:
        self.shared_errors += 1
        log.warning(
            "shared query cache unavailable: %s", str(exc).splitlines()[0] if str(exc) else exc
        )
