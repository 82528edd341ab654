"""The query-embedding cache on a real PostgreSQL: memory, the shared table, write-behind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from rag_service.providers.local import LocalProvider
from rag_service.query_cache import QueryCache
from rag_service.schema import QUERY_CACHE_TABLE, query_cache_table
from rag_service.search import configure_connection


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    await configure_connection(conn, ef_search=None)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(query_cache_table(None))
        conn.execute(f"TRUNCATE {QUERY_CACHE_TABLE}")
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url, min_size=1, max_size=4, configure=_configure, kwargs={"autocommit": True}
    )
    async with pool:
        yield pool


def shared_rows(url: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        return [
            (str(r[0]), int(r[1]))
            for r in conn.execute(
                f"SELECT descriptor, vector_dims(embedding) FROM {QUERY_CACHE_TABLE} ORDER BY 1"
            )
        ]


async def test_a_miss_is_shared_once_written_and_a_second_replica_hits(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    provider = LocalProvider(model="hash", dimensions=768)
    first, second = QueryCache(pool=pool), QueryCache(pool=pool)
    miss = await first.embed(provider, "Pool opening hours")
    assert miss.hit is False and miss.usage.tokens > 0
    assert (await first.embed(provider, "pool  OPENING hours")).hit is True  # from memory
    await first.flush()
    assert shared_rows(database_url) == [("local:hash@768", 768)]
    shared = await second.embed(provider, "pool opening hours")
    assert shared.hit is True and shared.usage.tokens == 0
    np.testing.assert_array_equal(shared.vector, miss.vector)
    await first.aclose()
    await second.aclose()


async def test_closing_writes_what_is_still_queued(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    cache = QueryCache(pool=pool, write_batch=3)
    provider = LocalProvider(model="other", dimensions=16)
    for i in range(10):
        await cache.embed(provider, f"question number {i}")
    await cache.aclose()
    assert shared_rows(database_url) == [("local:other@16", 16)] * 10


async def test_a_full_write_queue_drops_the_shared_write_not_the_answer(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    cache = QueryCache(pool=pool, max_pending_writes=2)
    provider = LocalProvider(model="hash", dimensions=8)
    async with pool.connection() as conn:  # holds the table: the writer cannot finish a batch
        await conn.execute("BEGIN")
        await conn.execute(f"LOCK TABLE {QUERY_CACHE_TABLE} IN EXCLUSIVE MODE")
        for i in range(6):
            lookup = await cache.embed(provider, f"queued {i}")
            assert lookup.hit is False and lookup.vector.shape == (8,)
        await conn.execute("ROLLBACK")
    await cache.aclose()
    # The first write was in flight (blocked on the lock), two waited, the rest were dropped.
    assert cache.dropped_writes == 3
    assert len(shared_rows(database_url)) == 3


async def test_an_unreachable_database_costs_the_cache_not_the_answer() -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1",
        min_size=0,
        max_size=1,
        timeout=1,
        open=False,
    )
    await pool.open(wait=False)
    cache = QueryCache(pool=pool)
    provider = LocalProvider(model="hash", dimensions=32)
    lookup = await cache.embed(provider, "anything")
    assert lookup.hit is False and lookup.vector.shape == (32,)
    assert (await cache.embed(provider, "anything")).hit is True  # memory still works
    await cache.aclose()
    assert cache.shared_errors >= 2  # the failed read and the failed write, both logged
    await pool.close()
