"""Query embeddings, cached: an in-process LRU with a TTL in front of a shared Postgres table.

Keyed by (provider, model, dimensions, sha256 of the normalised query), so every replica shares
hits and a model change can never serve another model's vector. A database failure degrades to
the in-process cache (and embedding), never to an error for the user.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from rag_service.identifiers import TableName
from rag_service.providers.base import EmbeddingProvider, Purpose, Usage, Vectors
from rag_service.schema import QUERY_CACHE_TABLE

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
    def __init__(
        self,
        *,
        pool: AsyncConnectionPool[Any] | None,
        capacity: int = 10_000,
        ttl_seconds: float = 3600.0,
        schema: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._capacity = capacity
        self._ttl = ttl_seconds
        self._table = TableName(QUERY_CACHE_TABLE, schema)
        self._clock = clock
        self._memory: OrderedDict[bytes, tuple[float, Vectors]] = OrderedDict()
        self.shared_errors = 0

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
        await self._shared_put(provider.descriptor, key, vector)
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
                    ).format(self._table.ident),
                    [descriptor, key, self._ttl],
                )
                row = await cur.fetchone()
        except (psycopg.Error, OSError) as exc:
            self._shared_failed(exc)
            return None
        return None if row is None else np.asarray(row[0], dtype=np.float32)

    async def _shared_put(self, descriptor: str, key: bytes, vector: Vectors) -> None:
        if self._pool is None:
            return
        try:
            async with self._pool.connection() as conn:
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (descriptor, query_hash, embedding) VALUES (%s, %s, %s) "
                        "ON CONFLICT (descriptor, query_hash) DO UPDATE "
                        "SET embedding = EXCLUDED.embedding, created_at = now()"
                    ).format(self._table.ident),
                    [descriptor, key, vector.tolist()],
                )
        except (psycopg.Error, OSError) as exc:
            self._shared_failed(exc)

    def _shared_failed(self, exc: BaseException) -> None:
        self.shared_errors += 1
        log.warning(
            "shared query cache unavailable: %s", str(exc).splitlines()[0] if str(exc) else exc
        )
