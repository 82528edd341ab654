"""``migrate follow`` against a real PostgreSQL + pgvector: NOTIFY, sweep, stop, SIGTERM, lag.

Each test backfills a small corpus with the real worker, runs the real follower on the test's
event loop (or as a process), writes to the source table as an application would, and checks
the outcome in SQL: every row has a vector of its current text, and every batch was stored once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from rag_service.follow import FollowReport, follow_changes
from rag_service.migrate import RunOptions, run_migration
from rag_service.progress import fold_batch_rows, migration_progress, oldest_pending_seconds
from rag_service.providers.base import EmbeddingProvider
from rag_service.providers.local import LocalProvider
from rag_service.schema import FOLLOW_CHANNEL, Layout, layout_for, setup
from rag_service.spec import DataPlaneSpec
from rag_service.testing import EmbeddingServer
from rag_service.testing.corpus import create_corpus
from tests.embedding_fixtures import EMBEDDING_API_KEY, OpenAIFactory
from tests.helpers import cli_async, counts, flags, spec_for, table_name
from tests.rag_service.test_migrate import vectors_match_text

ROOT = Path(__file__).resolve().parents[2]
ROWS = 200
MIGRATION = "default/follow"
OPENAI = "openai:text-embedding-3-small@64"
# Longer than any test waits: a quick catch-up can only come from a notification.
NO_SWEEP = 600.0


@pytest.fixture
def corpus(database_url: str, request: pytest.FixtureRequest) -> str:
    table = table_name(request)
    create_corpus(database_url, table=table, count=ROWS, source_dimensions=0)
    return table


def local() -> LocalProvider:
    return LocalProvider(model="hash", dimensions=768)


async def backfill(url: str, spec: DataPlaneSpec, provider: EmbeddingProvider) -> None:
    await setup(url, spec, migration=MIGRATION)
    report = await run_migration(
        url, spec, provider=provider, options=RunOptions(batch_size=100), migration=MIGRATION
    )
    assert report.embedded == ROWS


def sql(url: str, *statements: str) -> None:
    """Run ``statements`` in one committed transaction, as the application would."""
    with psycopg.connect(url) as conn:
        for statement in statements:
            conn.execute(statement)


def scalar(url: str, query: str) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


async def until(check: Callable[[], bool], *, within: float, what: str) -> float:
    """Seconds until ``check()`` holds (polled), failing with ``what`` after ``within``."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > within:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - began


def idle(url: str) -> bool:
    """The follower LISTENs and has drained the queue at least once: it is waiting for a wake-up.

    Read from the sessions' last statements, so nothing has to be written to find out.
    """
    return bool(
        scalar(
            url,
            "SELECT count(*) FILTER (WHERE query LIKE 'LISTEN %') > 0 "
            "AND count(*) FILTER (WHERE query LIKE 'SELECT q.id, q.seq,%') > 0 "
            "FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle'",
        )
    )


def caught_up(url: str, spec: DataPlaneSpec) -> Callable[[], bool]:
    def check() -> bool:
        c = counts(url, spec)
        return c.complete and c.queued == 0

    return check


class Follower:
    """``follow_changes`` as a task on the test's loop; ``await stop()`` gives its report."""

    def __init__(self, url: str, spec: DataPlaneSpec, **options: Any) -> None:
        self.stop_event = asyncio.Event()
        options.setdefault("provider", local())
        options.setdefault("sweep_seconds", NO_SWEEP)
        self.task = asyncio.create_task(
            follow_changes(url, spec, migration=MIGRATION, stop=self.stop_event, **options)
        )

    async def stop(self) -> FollowReport:
        self.stop_event.set()
        return await asyncio.wait_for(self.task, 10)

    async def __aenter__(self) -> Follower:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.task.done():
            await self.stop()
        elif kind is None:
            self.task.result()


async def test_changes_reach_the_side_table_within_a_second_by_notification(
    database_url: str, corpus: str
) -> None:
    spec = spec_for(corpus)
    await backfill(database_url, spec, local())
    async with Follower(database_url, spec) as follower:
        await until(lambda: idle(database_url), within=10, what="the follower waits")
        rounds = [
            # inserts, one committed transaction each, as an application writes
            [f"INSERT INTO \"{corpus}\" VALUES ({ROWS + i}, 'New sauna hours {i}.', 'events')"
             for i in range(1, 4)],
            # re-worded texts and a category change (a copy, no re-embedding)
            [f"UPDATE \"{corpus}\" SET content = content || ' Updated.' WHERE id <= 10",
             f"UPDATE \"{corpus}\" SET category = 'archive' WHERE id = 11"],
            # deletes cascade; an emptied text loses its vector through the queue
            [f'DELETE FROM "{corpus}" WHERE id IN (12, 13)',
             f'UPDATE "{corpus}" SET content = NULL WHERE id = 14'],
        ]  # fmt: skip
        for statements in rounds:
            for statement in statements:
                sql(database_url, statement)
            seconds = await until(
                caught_up(database_url, spec), within=10, what=f"caught up after {statements}"
            )
            # The sweep is minutes away: only the NOTIFY can have woken the follower this fast.
            assert seconds < 2.0, f"{seconds:.2f}s to catch up after {statements}"
        report = await follower.stop()
    c = counts(database_url, spec)
    assert c.complete and c.queued == 0 and c.embeddable == ROWS + 3 - 2 - 1
    assert vectors_match_text(database_url, corpus) == (c.embeddable, c.embeddable)
    target = spec.target_table.name
    archived = f"SELECT count(*) FROM \"{target}\" WHERE id = 11 AND category = 'archive'"
    assert scalar(database_url, archived) == 1
    # Three inserts and ten re-worded rows were embedded, each once; nothing else was.
    assert report.embedded == 13 and c.embedded_by_batches == ROWS + 13
    assert report.passes >= 3 and report.reconnects == 0


async def test_the_sweep_catches_changes_no_notification_announced(
    database_url: str, corpus: str
) -> None:
    spec = spec_for(corpus)
    await backfill(database_url, spec, local())
    layout = layout_for(spec, id_type="bigint")
    async with (
        Follower(database_url, spec, sweep_seconds=1.0) as follower,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as witness,
    ):
        await witness.execute(f'LISTEN "{FOLLOW_CHANNEL}"')
        await until(lambda: idle(database_url), within=10, what="the follower waits")
        # Queue entries written without the trigger: no notification, as if one had been lost.
        sql(
            database_url,
            f'DELETE FROM "{layout.target.name}" WHERE id <= 20',
            f'INSERT INTO "{layout.queue.name}" (id, seq) '
            f"SELECT id, nextval('{layout.queue_seq.name}') FROM \"{corpus}\" WHERE id <= 20",
        )
        seconds = await until(
            caught_up(database_url, spec), within=5, what="the sweep drained the queue"
        )
        assert seconds < 1.0 + 1.5  # one sweep interval, plus the drain
        assert [n async for n in witness.notifies(timeout=0.2)] == []  # really none was sent
        report = await follower.stop()
    assert report.embedded == 20
    assert vectors_match_text(database_url, corpus) == (ROWS, ROWS)


async def test_stop_finishes_the_batch_in_flight_and_a_later_run_finds_only_the_rest(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    openai_provider: OpenAIFactory,
) -> None:
    spec = spec_for(corpus, OPENAI)
    # The endpoint the vectors come from, as the command line's run below names it.
    target = spec.target.model_copy(update={"base_url": embedding_server.openai_base_url})
    spec = spec.model_copy(update={"target": target})
    await backfill(database_url, spec, openai_provider(dimensions=64))
    embedding_server.latency = 0.3  # a slow API: batches are still embedding when stop comes
    changed = 100
    follower = Follower(
        database_url,
        spec,
        provider=openai_provider(dimensions=64),
        batch_size=10,
        concurrency=2,
    )
    sql(database_url, f"UPDATE \"{corpus}\" SET content = content || ' (v2)' WHERE id <= {changed}")

    def some_batches_committed() -> bool:
        return counts(database_url, spec).embedded_by_batches >= ROWS + 20

    await until(some_batches_committed, within=30, what="the follower committed two batches")
    began = time.monotonic()
    report = await follower.stop()
    assert time.monotonic() - began < 3.0  # the batches in flight (2 × 0.3 s), not the queue
    c = counts(database_url, spec)
    assert 20 <= report.embedded < changed
    # Everything the follower reports is committed with its status row, and nothing else is.
    assert c.embedded_by_batches == ROWS + report.embedded
    assert c.current == ROWS - (changed - report.embedded)
    assert c.queued == changed - report.embedded

    embedding_server.latency = 0.0
    monkeypatch.setenv("EMBEDSHIFT_TARGET_API_KEY", EMBEDDING_API_KEY)
    base = [*flags(database_url, corpus, OPENAI), "--target-base-url"]
    run = await cli_async(
        capsys, "migrate", "run", *base, embedding_server.openai_base_url, "--json"
    )
    assert run.code == 0, run.err
    finished = json.loads(run.out.splitlines()[-1])
    assert finished["embedded"] == changed - report.embedded  # only what the follower left
    c = counts(database_url, spec)
    assert c.complete and c.queued == 0 and c.embedded_by_batches == ROWS + changed
    assert vectors_match_text(database_url, corpus, OPENAI) == (ROWS, ROWS)


FOLLOW_SCRIPT = """
import asyncio, sys
from rag_service.follow import follow_command
from tests.helpers import spec_for
sys.exit(asyncio.run(follow_command(
    sys.argv[1], spec_for(sys.argv[2]), migration="default/follow", json_lines=True,
)))
"""


def test_sigterm_ends_the_process_cleanly(database_url: str, corpus: str) -> None:
    spec = spec_for(corpus)
    asyncio.run(backfill(database_url, spec, local()))
    process = subprocess.Popen(
        [sys.executable, "-c", FOLLOW_SCRIPT, database_url, corpus],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        started = json.loads(process.stdout.readline())
        assert started["event"] == "started" and started["phase"] == "catchup"
        sql(database_url, f"INSERT INTO \"{corpus}\" VALUES (9001, 'A late text.', 'events')")
        batch = json.loads(process.stdout.readline())
        assert batch["event"] == "batch" and batch["rows"] == 1
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
        out, err = process.stdout.read(), process.stderr.read()
        assert code == 0, err
        assert "Traceback" not in err
        finished = json.loads(out.splitlines()[-1])
        assert finished["event"] == "finished" and finished["embedded"] == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert caught_up(database_url, spec)()


async def test_one_notification_per_committed_transaction_that_queues_rows(
    database_url: str, corpus: str
) -> None:
    """Two targets on one table: one LISTEN hears both, told apart by the payload."""
    first, second = spec_for(corpus), spec_for(corpus, "local:other@64")
    for spec in (first, second):
        await setup(database_url, spec, migration=MIGRATION)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await listener.execute(f'LISTEN "{FOLLOW_CHANNEL}"')
        sql(database_url, f"UPDATE \"{corpus}\" SET content = content || '!' WHERE id <= 50")
        sql(
            database_url,
            f"INSERT INTO \"{corpus}\" VALUES (9001, 'One.', 'events'), (9002, 'Two.', 'events')",
            f"UPDATE \"{corpus}\" SET category = 'archive' WHERE id = 60",
        )
        with psycopg.connect(database_url) as conn:  # rolled back: never delivered
            conn.execute(f"UPDATE \"{corpus}\" SET content = 'gone' WHERE id <= 5")
            conn.rollback()
        sql(database_url, f'UPDATE "{corpus}" SET content = content WHERE id <= 50')  # unchanged
        sql(database_url, f'DELETE FROM "{corpus}" WHERE id = 70')  # cascades, queues nothing
        for row in (80, 81, 82):
            sql(database_url, f"UPDATE \"{corpus}\" SET content = 'Edited.' WHERE id = {row}")
        notes = [n async for n in listener.notifies(timeout=1.0)]
    assert {n.channel for n in notes} == {FOLLOW_CHANNEL}
    payloads = [n.payload for n in notes]
    assert payloads.count(str(first.target_table)) == 5, payloads
    assert payloads.count(str(second.target_table)) == 5, payloads
    assert len(payloads) == 10


async def test_a_lost_connection_is_logged_and_retried(
    caplog: pytest.LogCaptureFixture, database_url: str, corpus: str
) -> None:
    caplog.set_level(logging.INFO, logger="rag_service.follow")
    spec = spec_for(corpus)
    await backfill(database_url, spec, local())
    async with Follower(database_url, spec) as follower:
        await until(lambda: idle(database_url), within=10, what="the follower waits")
        # As a server restart or a failover would: every session of the follower ends at once.
        sql(
            database_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        sql(database_url, f"INSERT INTO \"{corpus}\" VALUES (9001, 'After the outage.', 'events')")
        await until(caught_up(database_url, spec), within=15, what="caught up after reconnecting")
        report = await follower.stop()
    assert report.reconnects >= 1 and report.embedded == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "reconnecting in" in warnings[0].getMessage()
    assert all("\n" not in r.getMessage() for r in warnings)
    password = str(conninfo_to_dict(database_url).get("password") or "")
    assert not password or password not in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_second_follower_stands_by_and_takes_over(
    caplog: pytest.LogCaptureFixture, database_url: str, corpus: str
) -> None:
    caplog.set_level(logging.INFO, logger="rag_service.follow")
    spec = spec_for(corpus)
    await backfill(database_url, spec, local())
    first = Follower(database_url, spec, sweep_seconds=1.0)
    await until(lambda: idle(database_url), within=10, what="the first follower waits")
    async with Follower(database_url, spec, sweep_seconds=1.0) as second:
        await until(
            lambda: "standing by" in caplog.text, within=10, what="the second one stands by"
        )
        sql(database_url, f"INSERT INTO \"{corpus}\" VALUES (9001, 'For the first.', 'events')")
        await until(caught_up(database_url, spec), within=10, what="the first one embeds it")
        first_report = await first.stop()
        sql(database_url, f"INSERT INTO \"{corpus}\" VALUES (9002, 'For the second.', 'events')")
        await until(caught_up(database_url, spec), within=10, what="the second one took over")
        second_report = await second.stop()
    assert "taking over" in caplog.text
    assert (first_report.embedded, second_report.embedded) == (1, 1)
    assert counts(database_url, spec).embedded_by_batches == ROWS + 2  # neither did it twice


async def test_oldest_pending_seconds_is_the_queues_age(database_url: str, corpus: str) -> None:
    spec = spec_for(corpus)
    await setup(database_url, spec, migration=MIGRATION)
    layout = layout_for(spec, id_type="bigint")
    assert await oldest_pending_seconds(database_url, spec) is None
    sql(
        database_url,
        f'INSERT INTO "{layout.queue.name}" (id, seq, enqueued_at) '
        f"SELECT id, id, now() - interval '90 seconds' FROM \"{corpus}\" "
        "WHERE id = 1 AND category <> 'events'",
        f"UPDATE \"{corpus}\" SET content = 'Fresh.' WHERE id = 2",
    )
    lag = await oldest_pending_seconds(database_url, spec)
    assert lag is not None and 90 <= lag < 120
    progress = await migration_progress(database_url, spec)
    assert progress.as_dict()["oldestPendingSeconds"] == pytest.approx(lag, abs=30)
    # A change outside spec.migration.categories is served by no worker: it is not lag.
    category = scalar(database_url, f'SELECT category FROM "{corpus}" WHERE id = 1')
    others = spec.model_copy(
        update={"migration": spec.migration.model_copy(update={"categories": ["nothing-else"]})}
    )
    assert category != "nothing-else"
    assert await oldest_pending_seconds(database_url, others) is None
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await oldest_pending_seconds(conn, spec) == pytest.approx(lag, abs=30)


# ---- the status table grows with hours, not batches ------------------------------------------


def status_rows(url: str, layout: Layout) -> list[tuple[Any, ...]]:
    """(phase, status, worker is null, batches, rows, tokens, by_category) of every row of this
    target (the status table is shared by every target in the schema)."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT phase, status, worker IS NULL, batches, rows, tokens, by_category "
            f'FROM "{layout.status.name}" WHERE target_table = %s ORDER BY id',
            [str(layout.target)],
        ).fetchall()


def sums(url: str, layout: Layout) -> tuple[Any, ...]:
    """What every reader of the table takes: batches, rows, tokens and cost of the successful
    batches, the failed ones, and the rows per category."""
    status = layout.status.name
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT sum(batches) FILTER (WHERE status = 'done'), sum(rows), sum(tokens), "
            "sum(cost_usd), count(*) FILTER (WHERE status = 'failed'), "
            "(SELECT jsonb_object_agg(key, n) FROM (SELECT c.key, sum(c.value::bigint) AS n "
            f'FROM "{status}", jsonb_each_text(by_category) c WHERE target_table = %(t)s '
            f'GROUP BY c.key) per) FROM "{status}" WHERE target_table = %(t)s',
            {"t": str(layout.target)},
        ).fetchone()
    assert row is not None
    return tuple(row)


async def test_the_follower_folds_batch_rows_older_than_an_hour_keeping_every_sum(
    database_url: str, corpus: str
) -> None:
    """A follower writes a status row per batch for the two weeks a rollout lasts (≈1.5M rows a
    day at 100 changes/s). Rows of more than an hour ago are folded, one per shard, phase and
    hour, and every figure status reads stays the same; failed batches and the last hour's
    batches stay one by one."""
    url = database_url
    spec = spec_for(corpus)
    await setup(url, spec, migration=MIGRATION)
    await run_migration(
        url, spec, provider=local(), options=RunOptions(batch_size=10), migration=MIGRATION
    )
    layout = layout_for(spec, id_type="bigint")
    status = layout.status.name
    assert len(status_rows(url, layout)) == ROWS // 10
    # The backfill ran two and three hours ago (half each), one batch failed then, one just now.
    sql(
        url,
        f"UPDATE \"{status}\" SET started_at = started_at - interval '2 hours' * (1 + id % 2), "
        f"finished_at = date_trunc('hour', now()) - interval '2 hours' * (1 + id % 2) "
        "+ interval '1 minute'",
        f'INSERT INTO "{status}" (migration, target_table, target, shard, phase, status, '
        f"error, worker, started_at, finished_at, tokens) SELECT migration, target_table, target, "
        f"shard, phase, 'failed', 'HTTP 500', worker, started_at, finished_at, 7 "
        f"FROM \"{status}\" WHERE target_table = '{layout.target}' LIMIT 1",
        f'INSERT INTO "{status}" (migration, target_table, target, shard, phase, status, rows, '
        f"tokens, worker, started_at) SELECT migration, target_table, target, shard, 'catchup', "
        f"'done', 3, 11, worker, now() FROM \"{status}\" "
        f"WHERE target_table = '{layout.target}' LIMIT 1",
    )
    before = sums(url, layout)
    progress = await migration_progress(url, spec)
    assert (progress.batches, progress.failed_batches) == (ROWS // 10 + 1, 1)

    async with Follower(url, spec) as follower:
        # Its first fold comes right after its first drain.
        await until(lambda: any(r[2] for r in status_rows(url, layout)), within=10, what="a fold")
        await follower.stop()

    rows = status_rows(url, layout)
    folded = [r for r in rows if r[2]]
    # Two hours of backfill batches: one folded row each, holding ten batches.
    assert sorted((r[0], r[3]) for r in folded) == [("backfill", 10), ("backfill", 10)], rows
    assert [r[1] for r in rows if not r[2]] == ["failed", "done"]  # kept as they were
    assert sums(url, layout) == before
    after = await migration_progress(url, spec)
    assert (after.batches, after.tokens, after.cost_usd, after.failed_batches) == (
        progress.batches,
        progress.tokens,
        progress.cost_usd,
        1,
    )
    assert after.recent_errors == progress.recent_errors
    # A fold with nothing new to fold changes nothing.
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await fold_batch_rows(conn, layout)
    assert status_rows(url, layout) == rows


async def test_a_status_table_from_an_older_setup_is_read_and_left_unfolded(
    database_url: str, corpus: str
) -> None:
    """Made before the ``batches`` column: status counts its rows, the follower leaves them, and
    setup run again adds the column (each old row one batch)."""
    url = database_url
    spec = spec_for(corpus)
    await backfill(url, spec, local())
    layout = layout_for(spec, id_type="bigint")
    status = layout.status.name
    sql(
        url,
        f'ALTER TABLE "{status}" DROP COLUMN batches',
        f"UPDATE \"{status}\" SET finished_at = now() - interval '3 hours' "
        f"WHERE target_table = '{layout.target}'",
    )
    try:
        assert (await migration_progress(url, spec)).batches == ROWS // 100
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await fold_batch_rows(conn, layout)
        assert (
            scalar(url, f"SELECT count(*) FROM \"{status}\" WHERE target_table = '{layout.target}'")
            == ROWS // 100
        )
        await setup(url, spec, migration=MIGRATION)
    finally:  # the status table is the whole module's
        sql(url, f'ALTER TABLE "{status}" ADD COLUMN IF NOT EXISTS batches int NOT NULL DEFAULT 1')
    assert (
        scalar(url, f"SELECT sum(batches) FROM \"{status}\" WHERE target_table = '{layout.target}'")
        == ROWS // 100
    )
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await fold_batch_rows(conn, layout)
    assert (
        scalar(url, f"SELECT count(*) FROM \"{status}\" WHERE target_table = '{layout.target}'")
        == 1
    )
    assert (await migration_progress(url, spec)).batches == ROWS // 100
