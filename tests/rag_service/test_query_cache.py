"""The query-embedding cache on a real PostgreSQL: memory, the shared table, write-behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from rag_service.providers.local import LocalProvider
from rag_service.query_cache import QueryCache, cache_key
from rag_service.schema import QUERY_CACHE_TABLE, query_cache_table
from rag_service.search import configure_connection


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    await configure_connection(conn, ef_search=None)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in query_cache_table(None):
            conn.execute(statement)
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
    assert (await cache.prune()).failed  # pruning too degrades: logged, never raised
    await cache.aclose()
    assert cache.shared_errors >= 3  # the failed read, write and prune, all logged
    await pool.close()


# ---- the shared table's bounds: a TTL and a row cap --------------------------------------------


def test_the_table_has_an_index_on_created_at_and_its_statements_rerun(database_url: str) -> None:
    """The prune filters and orders by ``created_at``: an index on it, made by statements that
    run again (as every ``migrate setup`` does) without an error or a second index."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        for _ in range(2):
            for statement in query_cache_table(None):
                conn.execute(statement)
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexdef LIKE %s",
            [QUERY_CACHE_TABLE, "%(created_at)%"],
        ).fetchall()
    assert len(indexes) == 1 and "btree (created_at)" in indexes[0][0], indexes


def age_rows(url: str, *, older_than_now: dict[str, float]) -> None:
    """Make the rows of the named queries as old as given (seconds): what time would do."""
    with psycopg.connect(url, autocommit=True) as conn:
        for query, seconds in older_than_now.items():
            conn.execute(
                f"UPDATE {QUERY_CACHE_TABLE} SET created_at = now() - make_interval(secs => %s) "
                "WHERE query_hash = %s",
                [seconds, cache_key("local:hash@768", query)],
            )


def cached_queries(url: str, queries: list[str]) -> set[str]:
    """Which of ``queries`` have a row in the shared table."""
    keys = {cache_key("local:hash@768", q): q for q in queries}
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT query_hash FROM {QUERY_CACHE_TABLE}").fetchall()
    return {keys[bytes(r[0])] for r in rows if bytes(r[0]) in keys}


async def fill(pool: AsyncConnectionPool[Any], queries: list[str]) -> None:
    writer = QueryCache(pool=pool)
    provider = LocalProvider(model="hash", dimensions=768)
    for query in queries:
        await writer.embed(provider, query)
    await writer.aclose()


async def test_a_row_past_the_ttl_is_not_served_and_is_pruned(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    queries = [f"opening hours of pool {i}" for i in range(8)]
    await fill(pool, queries)
    expired, fresh = queries[:5], queries[5:]
    age_rows(database_url, older_than_now={q: 7200.0 for q in expired})
    provider = LocalProvider(model="hash", dimensions=768)

    # A replica with nothing in memory: the fresh rows are hits, an expired one is embedded anew.
    reader = QueryCache(pool=pool, shared_ttl_seconds=3600.0)
    assert (await reader.embed(provider, fresh[0])).hit is True
    stale = await reader.embed(provider, expired[0])
    assert stale.hit is False and stale.usage.tokens > 0
    await reader.aclose()  # which writes it again, as new

    pruned = await QueryCache(pool=pool, shared_ttl_seconds=3600.0).prune()
    assert (pruned.expired, pruned.beyond_cap, pruned.failed) == (4, 0, False)
    assert cached_queries(database_url, queries) == {*fresh, expired[0]}


async def test_the_oldest_rows_beyond_the_cap_go_in_limited_batches(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    queries = [f"question {i:02d}" for i in range(25)]
    await fill(pool, queries)
    age_rows(database_url, older_than_now={q: 600.0 - i for i, q in enumerate(queries)})
    newest = set(queries[-10:])
    # At most 2 batches of 4 rows per round: a round never holds the table for long.
    cache = QueryCache(pool=pool, shared_max_rows=10, prune_batch=4, prune_max_batches=2)
    first = await cache.prune()
    assert (first.expired, first.beyond_cap) == (0, 8)
    assert cached_queries(database_url, queries) == set(queries[8:])  # the oldest went first
    second = await cache.prune()
    assert second.beyond_cap == 7
    assert cached_queries(database_url, queries) == newest
    assert (await cache.prune()).beyond_cap == 0  # at the cap: nothing more to do
    await cache.aclose()


async def test_the_pruner_runs_in_the_background_until_closed(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    queries = [f"background {i}" for i in range(6)]
    await fill(pool, queries)
    cache = QueryCache(pool=pool, shared_max_rows=2)
    cache.start(prune_every=0.1)
    for _ in range(100):
        if len(cached_queries(database_url, queries)) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(cached_queries(database_url, queries)) == 2
    await cache.aclose()
