"""The maintained progress counts against the full comparison, on a real PostgreSQL + pgvector.

The control loop reads progress from counters kept by triggers and from the change queue
(:mod:`rag_service.progress`). After every kind of write an application or a worker makes, the
figures it reads must be the exact ones: each test writes, then compares
:func:`maintained_counts` with :func:`category_counts` (the full source ⟕ target comparison) at
one REPEATABLE READ snapshot, so the comparison itself cannot race a writer. A last test shows
that a tick reads nothing of the corpus: no statement it runs plans a sequential scan of the
source or the side table, and the server's own counters of those scans do not move.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from embedshift_operator.adapters.postgres import ControlStore
from embedshift_operator.resource import CountsKind, parse_migration
from rag_service.follow import follow_changes
from rag_service.migrate import RunOptions, run_migration
from rag_service.progress import (
    COMPACT_AFTER,
    CategoryCounts,
    CountersCheck,
    category_counts,
    compact_counters,
    count_rows,
    counts_drift,
    maintained_counts,
    migration_progress,
    open_layout,
)
from rag_service.providers.local import LocalProvider
from rag_service.schema import COUNTS_TABLE, Layout, layout_for, seed_counters, setup
from rag_service.spec import DataPlaneSpec
from rag_service.testing.corpus import create_corpus
from rag_service.testing.rollout import manifest
from tests.helpers import cli_async, flags, spec_for, table_name

ROWS = 600
TARGET = "local:hash@64"
MIGRATION = "default/maintained"


@pytest.fixture
def corpus(database_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A 600-row corpus whose category may be NULL, set up (counters seeded) but not migrated."""
    table = table_name(request)
    create_corpus(database_url, table=table, count=ROWS, source_dimensions=0)
    sql(database_url, f'ALTER TABLE "{table}" ALTER COLUMN category DROP NOT NULL')
    yield table


def spec(table: str) -> DataPlaneSpec:
    return spec_for(table, TARGET)


def provider() -> LocalProvider:
    return LocalProvider(model="hash", dimensions=64)


def sql(url: str, *statements: str) -> None:
    """``statements`` in one committed transaction, as the application would write."""
    with psycopg.connect(url) as conn:
        for statement in statements:
            conn.execute(statement)


def layout(table: str) -> Layout:
    return layout_for(spec(table), id_type="bigint")


async def run(url: str, table: str, **options: Any) -> None:
    await run_migration(
        url,
        spec(table),
        provider=provider(),
        options=RunOptions(batch_size=50, **options),
        migration=MIGRATION,
    )


async def snapshot(url: str, table: str) -> tuple[list[CategoryCounts], list[CategoryCounts]]:
    """(maintained, exact) per-category figures of one snapshot; the maintained side-table row
    count is checked against the table's own count there too."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        found = await open_layout(conn, spec(table))
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            exact = await category_counts(conn, found)
            maintained = await maintained_counts(conn, found)
            vectors = await count_rows(conn, found.target)
    assert maintained is not None, "the counters were not seeded"
    assert maintained.vectors == vectors
    return maintained.categories, exact


async def agree(url: str, table: str) -> list[CategoryCounts]:
    """The maintained figures equal the exact ones; returns them."""
    maintained, exact = await snapshot(url, table)
    assert maintained == exact
    return exact


def by_category(counts: list[CategoryCounts]) -> dict[str, CategoryCounts]:
    return {c.category: c for c in counts}


async def test_every_kind_of_write_keeps_the_counts_exact(database_url: str, corpus: str) -> None:
    url, table = database_url, corpus
    # NULL and blank text and a NULL category before setup: the seed counts them.
    sql(
        url,
        f'UPDATE "{table}" SET content = NULL WHERE id IN (1, 2)',
        f"UPDATE \"{table}\" SET content = E'  \\t ' WHERE id = 3",
        f'UPDATE "{table}" SET category = NULL WHERE id IN (4, 5, 6)',
    )
    await setup(url, spec(table), migration=MIGRATION)
    seeded = by_category(await agree(url, table))
    assert seeded[""].source == 3 and sum(c.no_text for c in seeded.values()) == 3
    assert sum(c.current for c in seeded.values()) == 0

    await run(url, table, limit=120)  # part of the backfill
    partial = await agree(url, table)
    assert 0 < sum(c.current for c in partial) < ROWS - 3
    await run(url, table)  # the rest
    done = await agree(url, table)
    assert sum(c.pending for c in done) == 0 and sum(c.current for c in done) == ROWS - 3

    # Inserts: one row, many rows in one statement, one without text, one in a new category.
    sql(
        url,
        f"INSERT INTO \"{table}\" VALUES (10001, 'A new page.', 'events')",
        f"INSERT INTO \"{table}\" SELECT g, 'Bulk page ' || g, 'pricing' "
        "FROM generate_series(10002, 10040) g",
        f"INSERT INTO \"{table}\" VALUES (10041, NULL, 'events'), (10042, 'x', 'brand new')",
    )
    await agree(url, table)
    # Deletes: migrated rows (their vectors go by cascade), a queued one, one without text.
    sql(url, f'DELETE FROM "{table}" WHERE id IN (7, 8, 9, 10001, 1)')
    await agree(url, table)
    # Text updates: re-worded, re-worded back to what was embedded, made blank, made NULL.
    sql(
        url,
        f"UPDATE \"{table}\" SET content = 'Re-worded ' || id WHERE id BETWEEN 20 AND 29",
        f"UPDATE \"{table}\" SET content = content || ' (draft)' WHERE id = 30",
        f"UPDATE \"{table}\" SET content = replace(content, ' (draft)', '') WHERE id = 30",
        f"UPDATE \"{table}\" SET content = '   ' WHERE id = 31",
        f'UPDATE "{table}" SET content = NULL WHERE id = 32',
    )
    await agree(url, table)
    # Category updates: moved, moved to NULL, moved and re-worded at once.
    sql(
        url,
        f"UPDATE \"{table}\" SET category = 'pricing' WHERE id IN (40, 41)",
        f'UPDATE "{table}" SET category = NULL WHERE id = 42',
        f"UPDATE \"{table}\" SET category = 'events', content = 'Moved.' WHERE id = 43",
    )
    await agree(url, table)
    # Text back from NULL; an UPDATE that changes neither text nor category.
    sql(
        url,
        f"UPDATE \"{table}\" SET content = 'Back again.' WHERE id IN (2, 32)",
        f'UPDATE "{table}" SET id = id + 50000 WHERE id = 50',  # cascades to the vector
    )
    await agree(url, table)
    # A bulk UPDATE of a whole category's text.
    sql(url, f"UPDATE \"{table}\" SET content = content || ' Updated.' WHERE category = 'events'")
    bulk = by_category(await agree(url, table))
    assert bulk["events"].current == 0 and bulk["events"].stale > 150

    await run(url, table)  # the catch-up drains the queue
    caught_up = await agree(url, table)
    assert sum(c.pending for c in caught_up) == 0 and sum(c.stale for c in caught_up) == 0
    # The same figures through the public reading, maintained and exact.
    maintained = await migration_progress(url, spec(table))
    exact = await migration_progress(url, spec(table), exact=True)
    assert maintained.counts == "maintained" and exact.counts == "exact"
    assert exact.counters is not None and exact.counters.agreed
    assert maintained.categories == exact.categories
    assert maintained.target_rows == exact.target_rows


async def test_a_rollback_counts_nothing(database_url: str, corpus: str) -> None:
    url, table = database_url, corpus
    await setup(url, spec(table), migration=MIGRATION)
    await run(url, table)
    before = await agree(url, table)
    rows_before = counter_rows(url, table)
    with psycopg.connect(url) as conn:
        conn.execute(f"INSERT INTO \"{table}\" VALUES (20001, 'Never kept.', 'events')")
        conn.execute(f'DELETE FROM "{table}" WHERE id BETWEEN 100 AND 150')
        conn.execute(f"UPDATE \"{table}\" SET content = NULL, category = 'x' WHERE id < 50")
        conn.rollback()
    assert await agree(url, table) == before
    assert counter_rows(url, table) == rows_before


def counter_rows(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {COUNTS_TABLE} WHERE target_table = %s",
            [str(layout(table).target)],
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_truncates_are_counted(database_url: str, corpus: str) -> None:
    url, table = database_url, corpus
    await setup(url, spec(table), migration=MIGRATION)
    await run(url, table)
    # The source, and by cascade its vectors and queue: both tables' TRUNCATE triggers count.
    sql(url, f'TRUNCATE "{table}" CASCADE')
    assert await agree(url, table) == []
    sql(
        url,
        f"INSERT INTO \"{table}\" SELECT g, 'Again ' || g, 'events' FROM generate_series(1, 9) g",
    )
    await run(url, table)
    assert [(c.source, c.current) for c in await agree(url, table)] == [(9, 9)]
    sql(url, f'TRUNCATE "{layout(table).target.name}"')  # the vectors alone
    assert [(c.source, c.current) for c in await agree(url, table)] == [(9, 0)]


async def test_concurrent_writers_a_worker_folds_and_seeds_agree_at_every_snapshot(
    database_url: str, corpus: str
) -> None:
    """Four application writers (some transactions rolled back), the catch-up worker, folds
    and seeds of the counters, all at once; every snapshot taken meanwhile agrees."""
    url, table = database_url, corpus
    await setup(url, spec(table), migration=MIGRATION)
    await run(url, table)
    found = layout(table)
    stop = asyncio.Event()

    async def writer(number: int) -> int:
        rng = random.Random(number)
        written = 0
        async with await psycopg.AsyncConnection.connect(url) as conn:
            for step in range(40):
                doc = rng.randint(1, ROWS)
                statement = rng.choice(
                    [
                        f'INSERT INTO "{table}" VALUES ({100_000 * number + step}, '
                        "'Concurrent page.', 'events')",
                        f"UPDATE \"{table}\" SET content = 'Writer {number} step {step}' "
                        f"WHERE id = {doc}",
                        f"UPDATE \"{table}\" SET category = 'pricing' WHERE id = {doc}",
                        f'UPDATE "{table}" SET content = NULL WHERE id = {doc}',
                        f'DELETE FROM "{table}" WHERE id = {doc}',
                        f"UPDATE \"{table}\" SET content = content || '!' "
                        f"WHERE id BETWEEN {doc} AND {doc + 5}",
                    ]
                )
                try:
                    await conn.execute(statement)
                    if rng.random() < 0.2:
                        await conn.rollback()
                    else:
                        await conn.commit()
                        written += 1
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    await conn.rollback()
                await asyncio.sleep(rng.random() * 0.01)
        return written

    async def worker() -> None:
        while not stop.is_set():
            await run(url, table)

    async def folder() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                await compact_counters(conn, found)
                await asyncio.sleep(0.01)

    async def seeder() -> int:
        # Counted whole again while everything else runs: nothing missed or counted twice.
        seeds = 0
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                await seed_counters(conn, found)
                seeds += 1
                await asyncio.sleep(0.05)
        return seeds

    async def checker() -> int:
        compared = 0
        while not stop.is_set():
            maintained, exact = await snapshot(url, table)
            assert maintained == exact
            compared += 1
        return compared

    background = [
        asyncio.create_task(worker()),
        asyncio.create_task(folder()),
        asyncio.create_task(checker()),
        asyncio.create_task(seeder()),
    ]
    try:
        written = await asyncio.gather(*(writer(n) for n in range(1, 5)))
    finally:
        stop.set()
        results = await asyncio.gather(*background)
    assert sum(written) > 100 and results[2] > 3 and results[3] > 1
    await run(url, table)
    final = await agree(url, table)
    assert sum(c.pending for c in final) == 0


async def test_follower_catch_up(database_url: str, corpus: str) -> None:
    url, table = database_url, corpus
    await setup(url, spec(table), migration=MIGRATION)
    await run(url, table)
    stop = asyncio.Event()
    follower = asyncio.create_task(
        follow_changes(
            url,
            spec(table),
            provider=provider(),
            migration=MIGRATION,
            stop=stop,
            sweep_seconds=0.5,
        )
    )
    try:
        sql(
            url,
            f"INSERT INTO \"{table}\" SELECT g, 'Followed ' || g, 'events' "
            "FROM generate_series(30001, 30030) g",
            f"UPDATE \"{table}\" SET content = 'Followed change' WHERE id BETWEEN 60 AND 69",
            f"UPDATE \"{table}\" SET category = 'facilities' WHERE id BETWEEN 70 AND 74",
            f'DELETE FROM "{table}" WHERE id BETWEEN 80 AND 84',
        )
        deadline = time.monotonic() + 20
        while True:
            counted = await agree(url, table)
            if sum(c.pending for c in counted) == 0 and not queued(url, table):
                break
            assert time.monotonic() < deadline, "the follower did not catch up"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        report = await asyncio.wait_for(follower, 10)
    assert report.embedded >= 40
    progress = await migration_progress(url, spec(table))
    assert progress.counts == "maintained" and progress.total("pending") == 0
    assert progress.total("source") == ROWS + 30 - 5


def queued(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{layout(table).queue.name}"').fetchone()
    assert row is not None
    return int(row[0])


async def test_folding_keeps_the_figures(database_url: str, corpus: str) -> None:
    url, table = database_url, corpus
    await setup(url, spec(table), migration=MIGRATION)
    await run(url, table)
    for doc in range(1, COMPACT_AFTER + 30):  # one statement each: one counter row each
        sql(url, f"UPDATE \"{table}\" SET category = 'c{doc % 7}' WHERE id = {doc}")
    before = await agree(url, table)
    assert counter_rows(url, table) > COMPACT_AFTER
    # A reading folds them (at most one row per category remains), and says the same.
    assert (await migration_progress(url, spec(table))).categories == before
    assert counter_rows(url, table) <= len(before) + 1
    assert await agree(url, table) == before


async def test_drift_is_found_reported_and_repaired(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    """Counter rows written by hand, and vectors made stale while the queue's trigger was off:
    ``status --exact`` and ``verify`` find them, count again, and queue what needs it."""
    url, table = database_url, corpus
    await setup(url, spec(table), migration=MIGRATION)
    await run(url, table)
    target = str(layout(table).target)
    sql(url, f"INSERT INTO {COUNTS_TABLE} VALUES ('{target}', 'events', 5, 0, 0, NULL)")
    maintained, exact = await snapshot(url, table)
    assert maintained != exact
    base = flags(url, table, TARGET)
    checked = json.loads(
        (await cli_async(capsys, "migrate", "status", *base, "--exact", "--json")).out
    )
    assert checked["counts"] == "exact"
    assert checked["countersCheck"]["reseeded"] is True
    assert checked["countersCheck"]["drift"]["events"]["source"] == [
        exact_source(exact, "events") + 5,
        exact_source(exact, "events"),
    ]
    await agree(url, table)

    trigger = layout(table).trigger_name
    sql(
        url,
        f'ALTER TABLE "{table}" DISABLE TRIGGER "{trigger}"',
        f"UPDATE \"{table}\" SET content = 'Changed behind the queue' WHERE id IN (11, 12, 13)",
        f'ALTER TABLE "{table}" ENABLE TRIGGER "{trigger}"',
    )
    verified = json.loads((await cli_async(capsys, "migrate", "verify", *base, "--json")).out)
    check = {c["name"]: c for c in verified["checks"]}
    assert check["stale_hashes"]["value"] == 3 and not check["stale_hashes"]["ok"]
    assert check["maintained_counts"]["value"]["requeued"] == 3
    assert (
        "3 vectors that were not current but not queued were queued"
        in (check["maintained_counts"]["detail"])
    )
    assert queued(url, table) == 3
    await agree(url, table)
    await run(url, table)
    assert sum(c.stale + c.pending for c in await agree(url, table)) == 0
    verified = json.loads((await cli_async(capsys, "migrate", "verify", *base, "--json")).out)
    check = {c["name"]: c for c in verified["checks"]}
    assert check["maintained_counts"]["value"]["agreed"] is True


def exact_source(counts: list[CategoryCounts], category: str) -> int:
    return by_category(counts)[category].source


async def test_status_says_which_figures_are_maintained(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    url, table = database_url, corpus
    base = flags(url, table, TARGET)
    assert (await cli_async(capsys, "migrate", "setup", *base)).code == 0
    document = json.loads((await cli_async(capsys, "migrate", "status", *base, "--json")).out)
    assert document["counts"] == "maintained" and document["countersSeededAt"]
    assert "migrated" in document["figures"]["maintained"]
    assert "queued" in document["figures"]["exact"]
    assert document["total"] == ROWS and document["pending"] == ROWS
    shown = await cli_async(capsys, "migrate", "status", *base)
    assert "counts: maintained" in shown.out
    exact = await cli_async(capsys, "migrate", "status", *base, "--exact")
    assert "counts: exact (full comparison); the maintained counters agree" in exact.out


async def test_a_target_without_counters_is_counted_exactly_until_setup_runs_again(
    database_url: str, corpus: str
) -> None:
    """As a target set up by an older embedshift: no counter rows. The reading falls back to the
    full comparison and says why; setup installs and seeds the counters."""
    url, table = database_url, corpus
    await setup(url, spec(table), migration=MIGRATION)
    await run(url, table, limit=100)
    sql(url, f"DELETE FROM {COUNTS_TABLE} WHERE target_table = '{layout(table).target}'")
    fallback = await migration_progress(url, spec(table))
    assert fallback.counts == "exact" and fallback.note and "migrate setup" in fallback.note
    assert fallback.total("current") == 100
    await setup(url, spec(table), migration=MIGRATION)
    again = await migration_progress(url, spec(table))
    assert again.counts == "maintained" and again.categories == fallback.categories


# ---- a tick reads nothing of the corpus ----------------------------------------------------------

TICK_ROWS = 6000
TICK_QUEUED = 25


def scans(url: str, *tables: str) -> dict[str, tuple[int, int]]:
    """(seq_scan, idx_tup_fetch) per table, from the server's cumulative statistics."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT relname, seq_scan, COALESCE(idx_tup_fetch, 0) FROM pg_stat_user_tables "
            "WHERE relname = ANY(%s)",
            [list(tables)],
        ).fetchall()
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def settled_scans(url: str, *tables: str) -> dict[str, tuple[int, int]]:
    """``scans`` once the statistics of sessions that have ended are all in: a backend reports
    its counts when it exits (the tick's connections are closed, their backends exiting)."""
    previous = scans(url, *tables)
    for _ in range(50):
        time.sleep(0.1)
        current = scans(url, *tables)
        if current == previous and not other_backends(url):
            return current
        previous = current
    return previous


def other_backends(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


async def test_a_tick_reads_nothing_of_the_corpus(
    database_url: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database_url
    table = table_name(request)
    create_corpus(url, table=table, count=TICK_ROWS, source_dimensions=32)
    resource = parse_migration(
        manifest(name="tick", prometheus_url="http://x", table=table), where="t"
    )
    migration_spec = resource.spec.model_copy(
        update={
            "migration": resource.spec.migration.model_copy(
                update={"categories": ["events", "pricing"]}  # the lag's category lookup too
            )
        }
    )
    data_plane = migration_spec.data_plane
    await setup(url, data_plane, migration="default/tick")
    found = layout_for(data_plane, id_type="bigint")
    source, side = found.source.name, found.target.name
    # The side table filled in SQL (the vectors' values do not matter here), then changes.
    sql(
        url,
        f'INSERT INTO "{side}" (id, embedding, content_hash, category) '
        f"SELECT id, array_fill(0.25, ARRAY[16])::vector, sha256(convert_to(content, 'UTF8')), "
        f'category FROM "{source}"',
        f"UPDATE \"{source}\" SET content = content || ' Changed.' WHERE id <= {TICK_QUEUED}",
        f'ANALYZE "{source}"',
        f'ANALYZE "{side}"',
    )
    store = ControlStore(url=url, spec=migration_spec, migration="default/tick")

    recorded: list[tuple[Any, Any]] = []
    original = psycopg.AsyncCursor.execute

    async def recording(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        recorded.append((query, params))
        return await original(self, query, params, **kwargs)

    before = settled_scans(url, source, side)
    monkeypatch.setattr(psycopg.AsyncCursor, "execute", recording)
    observed = await store.progress()
    monkeypatch.undo()
    after = settled_scans(url, source, side)

    assert observed.total == TICK_ROWS and observed.migrated == TICK_ROWS - TICK_QUEUED
    assert observed.pending == TICK_QUEUED and observed.oldest_pending_seconds is not None
    assert observed.counts is CountsKind.MAINTAINED and observed.counted_since is not None
    for name in (source, side):
        assert after[name][0] == before[name][0], f"a sequential scan of {name}"
        # Index lookups of the queued rows (and their side rows) only, never the table.
        assert after[name][1] - before[name][1] <= 3 * TICK_QUEUED, name
    assert recorded
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for query, params in recorded:
            text = query if isinstance(query, str) else query.as_string(conn)
            if not text.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            cur = await conn.execute(f"EXPLAIN {text}", params)
            plan = "\n".join(r[0] for r in await cur.fetchall())
            for name in (source, side):
                scan = re.compile(rf'Seq Scan on "?{re.escape(name)}"?(\s|$)', re.MULTILINE)
                assert not scan.search(plan), f"{text}\n{plan}"
    # The exact comparison agrees with what the tick observed.
    exact = await migration_progress(url, data_plane, exact=True)
    assert exact.counters is not None and exact.counters.agreed
    assert observed.by_category == {c.category: (c.source, c.current) for c in exact.categories}
    # Counters lost (as after a setup by an older embedshift): the tick says it counted exactly.
    sql(url, f"DELETE FROM {COUNTS_TABLE} WHERE target_table = '{found.target}'")
    fallback = await store.progress()
    assert fallback.counts is CountsKind.EXACT and fallback.counted_since is None
    assert fallback.by_category == observed.by_category


def test_drift_names_each_figure_that_differs() -> None:
    maintained = [CategoryCounts("events", 10, 9, 0, 1), CategoryCounts("gone", 2, 2, 0, 0)]
    exact = [CategoryCounts("events", 10, 7, 2, 1), CategoryCounts("new", 1, 0, 0, 0)]
    drift = counts_drift(maintained, exact)
    assert drift == {
        "events": {"current": [9, 7], "stale": [0, 2]},
        "gone": {"source": [2, 0], "current": [2, 0]},
        "new": {"source": [0, 1]},
    }
    assert counts_drift(exact, exact) == {}
    check = CountersCheck(drift=drift, requeued=2)
    assert not check.agreed and check.as_dict()["reseeded"] is True
    assert "events current 9 vs 7" in check.describe()
    assert "2 vectors that were not current but not queued were queued" in check.describe()
    assert CountersCheck(drift={}).describe().startswith("the maintained counters agree")
