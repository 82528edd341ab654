"""The migration worker against a real PostgreSQL + pgvector: setup, run, catch-up, guards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from rag_service.errors import EXIT_PROVIDER_REFUSED
from rag_service.migrate import RunOptions, Shard, run_migration
from rag_service.providers.base import Embeddings, Purpose
from rag_service.providers.local import HashEmbedder, LocalProvider
from rag_service.schema import setup
from rag_service.testing.corpus import create_corpus
from tests.helpers import cli, counts, flags, spec_for, table_name


@pytest.fixture
def corpus(database_url: str, request: pytest.FixtureRequest) -> str:
    table = table_name(request)
    create_corpus(database_url, table=table, count=600)
    return table


def vectors_match_text(url: str, table: str, target: str = "local:hash@768") -> tuple[int, int]:
    """(rows checked, rows whose stored vector is the embedding of the text as it is now).

    The local provider and the test embedding API both embed with ``HashEmbedder(dims,
    seed=model)``, so the expected vector is computable here, independently of the worker.
    """
    spec = spec_for(table, target)
    embedder = HashEmbedder(spec.target.dimensions, seed=spec.target.model)
    with psycopg.connect(url) as conn:
        register_vector(conn)
        rows = conn.execute(
            f'SELECT s.content, t.embedding FROM "{spec.target_table.name}" t '
            f'JOIN "{table}" s USING (id) ORDER BY id'
        ).fetchall()
    if not rows:
        return 0, 0
    expected = embedder.embed([r[0] for r in rows])
    stored = np.stack([np.asarray(r[1].to_numpy()) for r in rows])
    cosines = np.sum(expected * stored, axis=1)
    return len(rows), int(np.sum(cosines > 0.9999))


def test_setup_dry_run_prints_sql_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    result = cli(capsys, "migrate", "setup", *flags(database_url, corpus), "--dry-run")
    assert result.code == 0
    assert "CREATE TABLE IF NOT EXISTS" in result.out
    assert "CREATE OR REPLACE TRIGGER" in result.out
    with psycopg.connect(database_url) as conn:
        target = spec_for(corpus).target_table.name
        assert conn.execute("SELECT to_regclass(%s)", [f'"{target}"']).fetchone() == (None,)


def test_setup_is_idempotent_and_creates_routing_row(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    for _ in range(2):
        result = cli(capsys, "migrate", "setup", *flags(database_url, corpus))
        assert result.code == 0, result.err
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT percentage, emergency, target->>'model' FROM embedshift_rollout "
            "WHERE migration = %s",
            [f"default/{corpus}"],
        ).fetchone()
    assert row == (0, False, "local:hash@768")


def test_run_embeds_every_row_with_the_targets_vectors(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    assert cli(capsys, "migrate", "setup", *flags(database_url, corpus)).code == 0
    result = cli(capsys, "migrate", "run", *flags(database_url, corpus), "--batch-size", "64")
    assert result.code == 0, result.err
    assert "embedded 600 rows" in result.out
    c = counts(database_url, spec_for(corpus))
    assert c.complete and c.embeddable == 600 and c.embedded_by_batches == 600
    assert vectors_match_text(database_url, corpus) == (600, 600)
    # A second run finds nothing to do and embeds nothing again.
    again = cli(capsys, "migrate", "run", *flags(database_url, corpus))
    assert again.code == 0 and "embedded 0 rows" in again.out
    assert counts(database_url, spec_for(corpus)).embedded_by_batches == 600


def test_dry_run_limit_and_category(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    base = flags(database_url, corpus)
    dry = cli(capsys, "migrate", "run", *base, "--dry-run", "--limit", "10")
    assert dry.code == 0
    assert "would embed 10 rows" in dry.out and "setup has not run yet" in dry.out
    assert cli(capsys, "migrate", "setup", *base).code == 0
    dry_json = cli(capsys, "migrate", "run", *base, "--dry-run", "--json", "--category", "pricing")
    plan = json.loads(dry_json.out)
    assert plan["rows"] == 200 and plan["by_category"] == {"pricing": 200}
    assert counts(database_url, spec_for(corpus)).target_rows == 0  # dry runs write nothing

    assert cli(capsys, "migrate", "run", *base, "--limit", "10").code == 0
    assert counts(database_url, spec_for(corpus)).target_rows == 10
    assert cli(capsys, "migrate", "run", *base, "--category", "facilities").code == 0
    with psycopg.connect(database_url) as conn:
        by_category = dict(
            conn.execute(
                f'SELECT category, count(*) FROM "{spec_for(corpus).target_table.name}" GROUP BY 1'
            ).fetchall()
        )
    assert by_category["facilities"] == 200
    assert by_category.get("events", 0) + by_category.get("pricing", 0) <= 10


def test_json_progress_lines(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    assert cli(capsys, "migrate", "setup", *flags(database_url, corpus)).code == 0
    result = cli(
        capsys, "migrate", "run", *flags(database_url, corpus), "--json", "--batch-size", "100"
    )
    events = [json.loads(line) for line in result.out.splitlines()]
    assert events[0] == {
        "event": "started",
        "phase": "backfill",
        "target": "local:hash@768",
        "total": 600,
    }
    batches = [e for e in events if e["event"] == "batch"]
    assert len(batches) == 6 and batches[-1]["done"] == 600
    assert {"rowsPerSecond", "etaSeconds", "tokens", "costUSD"} <= set(batches[0])
    assert events[-1]["event"] == "finished" and events[-1]["embedded"] == 600


class GatedProvider:
    """The local model, but the first call waits until the test says go (a slow API)."""

    def __init__(self) -> None:
        self.inner = LocalProvider(model="hash", dimensions=768)
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.descriptor = self.inner.descriptor
        self.dimensions = self.inner.dimensions

    def estimate_tokens(self, texts: Sequence[str]) -> int:
        return self.inner.estimate_tokens(texts)

    async def embed(self, texts: Sequence[str], purpose: Purpose) -> Embeddings:
        if not self.started.is_set():
            self.started.set()
            await self.release.wait()
        return await self.inner.embed(texts, purpose)

    async def aclose(self) -> None:
        return None


async def test_a_row_reworded_while_embedding_is_not_stored_stale(
    database_url: str, corpus: str
) -> None:
    spec = spec_for(corpus)
    await setup(database_url, spec, migration="default/x")
    provider = GatedProvider()
    run = asyncio.create_task(
        run_migration(
            database_url,
            spec,
            provider=provider,
            options=RunOptions(batch_size=50, concurrency=1),
            migration="default/x",
        )
    )
    await asyncio.wait_for(provider.started.wait(), 30)
    # Row 1 is in the batch being embedded right now; change its text under the worker's feet.
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            f"UPDATE \"{corpus}\" SET content = 'The sauna closes at midnight.' WHERE id = 1"
        )
    provider.release.set()
    report = await asyncio.wait_for(run, 60)
    assert report.changed_while_embedding == 1  # the guard refused the stale vector ...
    c = counts(database_url, spec)
    assert c.complete and c.queued == 0  # ... and the catch-up embedded the new text
    assert vectors_match_text(database_url, corpus) == (600, 600)


def test_emptied_text_loses_its_vector(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    base = flags(database_url, corpus)
    assert cli(capsys, "migrate", "setup", *base).code == 0
    assert cli(capsys, "migrate", "run", *base).code == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'UPDATE "{corpus}" SET content = NULL WHERE id = 5')
        conn.execute(f"UPDATE \"{corpus}\" SET content = '  ' WHERE id = 6")
        conn.execute(f"UPDATE \"{corpus}\" SET content = 'A brand new text.' WHERE id = 7")
        conn.execute(f'DELETE FROM "{corpus}" WHERE id = 8')
        conn.execute(f"INSERT INTO \"{corpus}\" VALUES (9001, 'The gym opens late.', 'facilities')")
    result = cli(capsys, "migrate", "run", *base, "--json")
    finished = json.loads(result.out.splitlines()[-1])
    assert finished["embedded"] == 2  # the re-worded row and the inserted row, nothing else
    c = counts(database_url, spec_for(corpus))
    assert c.complete and c.embeddable == 598 and c.queued == 0
    verify = cli(capsys, "migrate", "verify", *base, "--json")
    assert verify.code == 0, verify.out
    checks = {c["name"]: c for c in json.loads(verify.out)["checks"]}
    assert checks["rows_without_text"]["value"] == 2


def test_budget_stops_before_it_is_exceeded_and_resumes(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    # $1000 per million tokens: 600 documents of ~20 words cost about $12.
    base = [*flags(database_url, corpus), "--price", "local:hash=1000"]
    assert cli(capsys, "migrate", "setup", *base).code == 0
    stopped = cli(capsys, "migrate", "run", *base, "--budget-usd", "2", "--batch-size", "50")
    assert stopped.code == EXIT_PROVIDER_REFUSED  # no rerun mends it: raise the budget
    assert "embedshift: error: --budget-usd" in stopped.err and "Traceback" not in stopped.err
    with psycopg.connect(database_url) as conn:
        spent = conn.execute(
            "SELECT sum(cost_usd) FROM embedding_migration_status WHERE target_table = %s",
            [spec_for(corpus).target_table.name],
        ).fetchone()
    assert spent is not None and 0 < float(spent[0]) <= 2.0
    partial = counts(database_url, spec_for(corpus))
    assert 0 < partial.target_rows < 600
    resumed = cli(capsys, "migrate", "run", *base, "--budget-usd", "100")
    assert resumed.code == 0, resumed.err
    c = counts(database_url, spec_for(corpus))
    assert c.complete and c.embedded_by_batches == 600


def test_a_second_worker_on_the_same_shard_is_refused(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    base = flags(database_url, corpus)
    assert cli(capsys, "migrate", "setup", *base).code == 0
    target = spec_for(corpus).target_table
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", [f"embedshift:{target}:0/1"]
        )
        busy = cli(capsys, "migrate", "run", *base)
        assert busy.code == 1 and "another worker" in busy.err
        other_shard = cli(capsys, "migrate", "run", *base, "--shard", "1/2")
        assert other_shard.code == 0
    assert cli(capsys, "migrate", "run", *base, "--shard", "0/2").code == 0
    c = counts(database_url, spec_for(corpus))
    assert c.complete and c.embedded_by_batches == 600  # two shards, no row twice


def test_shards_partition_the_rows() -> None:
    from psycopg import sql

    from rag_service.migrate import shard_filter

    text = shard_filter(sql.SQL("s.id"), Shard(1, 4)).as_string()
    assert text == "mod(mod(hashtextextended(s.id::text, 0), 4) + 4, 4) = 1"
    assert shard_filter(sql.SQL("s.id"), Shard()).as_string() == "true"


async def test_overlapping_workers_fall_back_to_the_upsert_and_store_each_row_once(
    database_url: str, corpus: str
) -> None:
    """A 1/1 worker and a 0/2 worker race over the same rows: the fast COPY path collides, falls
    back to the guarded upsert, and every row ends with one current vector."""
    spec = spec_for(corpus)
    await setup(database_url, spec, migration="default/x")

    async def worker(shard: Shard) -> None:
        await run_migration(
            database_url,
            spec,
            provider=LocalProvider(model="hash", dimensions=768),
            options=RunOptions(batch_size=20, concurrency=2, shard=shard),
            migration="default/x",
        )

    await asyncio.gather(worker(Shard(0, 1)), worker(Shard(0, 2)))
    c = counts(database_url, spec)
    assert c.complete and c.queued == 0
    assert vectors_match_text(database_url, corpus) == (600, 600)


def test_a_category_change_refreshes_the_copy_without_re_embedding(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str
) -> None:
    base = flags(database_url, corpus)
    assert cli(capsys, "migrate", "setup", *base).code == 0
    assert cli(capsys, "migrate", "run", *base).code == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE \"{corpus}\" SET category = 'archive' WHERE id <= 3")
    result = cli(capsys, "migrate", "run", *base, "--json")
    assert json.loads(result.out.splitlines()[-1])["embedded"] == 0  # no tokens spent
    target = spec_for(corpus).target_table.name
    with psycopg.connect(database_url) as conn:
        moved = conn.execute(
            f"SELECT count(*) FROM \"{target}\" WHERE category = 'archive'"
        ).fetchone()
    assert moved == (3,)
    assert counts(database_url, spec_for(corpus)).queued == 0


def test_setup_waits_out_a_lock_with_short_timeouts_and_retries(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    database_url: str,
    corpus: str,
) -> None:
    """A long transaction holds the source table; setup must neither queue behind it with an
    unbounded wait (blocking every query that arrives after it) nor fail at once."""
    import threading
    import time

    locked = threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(database_url) as conn:
            conn.execute(f'LOCK TABLE "{corpus}" IN ACCESS EXCLUSIVE MODE')
            locked.set()
            time.sleep(3)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(10)
    result = cli(capsys, "migrate", "setup", *flags(database_url, corpus))
    holder.join()
    assert result.code == 0, result.err
    assert "lock not available, retrying" in caplog.text
