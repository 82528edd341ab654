"""``embedshift migrate run`` as a real process: killed with SIGKILL, and raced by live writes.

Everything is counted in SQL from the tables, not from what the worker reports.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from rag_service.spec import DataPlaneSpec
from rag_service.testing import EmbeddingServer
from rag_service.testing.corpus import create_corpus
from tests.embedding_fixtures import EMBEDDING_API_KEY
from tests.helpers import PYTHON, cli_subprocess, counts, flags, spec_for, table_name
from tests.rag_service.test_migrate import vectors_match_text

OPENAI = "openai:text-embedding-3-small@64"


def start_run(argv: list[str], *, stdout: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-m", "embedshift_operator.cli", "migrate", "run", *argv],
        stdout=stdout,
        stderr=subprocess.PIPE,
    )


def test_kill_9_at_20_random_moments_loses_nothing_and_doubles_nothing(
    database_url: str, request: pytest.FixtureRequest
) -> None:
    table = table_name(request)
    create_corpus(database_url, table=table, count=12_000)
    base = flags(database_url, table)
    assert cli_subprocess(["migrate", "setup", *base]).code == 0
    rng = random.Random(20261123)
    killed_while_running = 0
    for _ in range(20):
        # One row per batch: many commits, so the kills land between and inside transactions,
        # and the 20 runs end well before the backfill does (with 3 rows per batch a quiet
        # machine finished all 12,000 rows within them). The clock starts when the worker says
        # it has started (JSON line), not when the process does, so a slow interpreter start on
        # a loaded machine cannot make the kills miss.
        proc = start_run(
            [*base, "--batch-size", "1", "--concurrency", "2", "--json"], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # {"event": "started", ...}, or EOF if it finished at once
        # Drain the rest, or a full pipe would stall the worker instead of letting it work.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_while_running += 1
        proc.wait(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read() if proc.stderr else ""
    assert killed_while_running >= 15, "the kills must land while the worker is working"
    spec = spec_for(table)
    partial = counts(database_url, spec)
    assert 0 < partial.target_rows < 12_000  # the kills really interrupted the backfill
    assert partial.embedded_by_batches == partial.target_rows  # ... and nothing committed twice

    final = cli_subprocess(["migrate", "run", *base])
    assert final.code == 0, final.err
    c = counts(database_url, spec)
    # Every source row has exactly one current vector (the primary key forbids two), none stale,
    # and every embedding the workers stored was stored once: killed batches left nothing behind.
    assert c.complete and c.embeddable == 12_000
    assert c.embedded_by_batches == 12_000
    assert cli_subprocess(["migrate", "verify", *base]).code == 0


def test_sigterm_writes_the_batches_under_way_and_exits_143(
    database_url: str, request: pytest.FixtureRequest
) -> None:
    """What Kubernetes does to a Job's pod it deletes or preempts: SIGTERM, then SIGKILL later.
    The worker starts no new batch, writes those it has embedded, and says it stopped."""
    table = table_name(request)
    create_corpus(database_url, table=table, count=12_000)
    base = flags(database_url, table)
    assert cli_subprocess(["migrate", "setup", *base]).code == 0
    proc = start_run([*base, "--batch-size", "5", "--json"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["event"] == "started"
    while json.loads(proc.stdout.readline())["event"] != "batch":
        pass
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM: what the API answered was written; rerun to resume" in err.decode()
    assert b"Traceback" not in err
    finished = json.loads(out.decode().splitlines()[-1])
    assert finished["event"] == "finished" and finished["stopped_by"] == "signal"
    spec = spec_for(table)
    partial = counts(database_url, spec)
    assert 0 < partial.target_rows < 12_000  # it stopped, and what it embedded was kept
    assert partial.embedded_by_batches == partial.target_rows == finished["embedded"]
    final = cli_subprocess(["migrate", "run", *base])
    assert final.code == 0, final.err
    assert counts(database_url, spec).complete


def booked_tokens(url: str, spec: DataPlaneSpec) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT COALESCE(sum(tokens), 0) FROM embedding_migration_status "
            "WHERE target_table = %s",
            [spec.target_table.name],
        ).fetchone()
    return int(row[0]) if row else 0


def test_sigterm_at_a_tight_rate_limit_drops_the_batches_still_waiting_for_room(
    database_url: str, request: pytest.FixtureRequest
) -> None:
    """At a tight limit the pacer holds batches for many seconds before they send anything; a
    pod's grace period is 30 s. On SIGTERM those are dropped (they cost nothing, their rows stay
    pending), the ones that reached the API are written, and the process ends at once."""
    table = table_name(request)
    create_corpus(database_url, table=table, count=400)
    # A 1,500-token bucket refilling 25 tokens a second: the first batches of 20 rows go at
    # once, then one about every 20 s, so the batches behind them in the pipeline wait.
    with EmbeddingServer(api_key=EMBEDDING_API_KEY, tpm=1_500) as server:
        base = [*flags(database_url, table, OPENAI), "--target-base-url", server.openai_base_url]
        env = {**os.environ, "EMBEDSHIFT_TARGET_API_KEY": EMBEDDING_API_KEY}
        assert cli_subprocess(["migrate", "setup", *base]).code == 0
        run = [PYTHON, "-m", "embedshift_operator.cli", "migrate", "run", *base]
        proc = subprocess.Popen(
            [*run, "--batch-size", "20", "--concurrency", "4", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "started"
        for _ in range(2):  # the bucket's first room spent: what follows waits for more
            while json.loads(proc.stdout.readline())["event"] != "batch":
                pass
        proc.send_signal(signal.SIGTERM)
        # Waiting for the held batches would take ~20 s each; dropping them takes none of it.
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 143, err
        assert "given up while waiting for room; they stay pending" in err.decode(), err
        finished = json.loads(out.decode().splitlines()[-1])
        spec = spec_for(table, OPENAI)
        partial = counts(database_url, spec)
        assert partial.embedded_by_batches == partial.target_rows == finished["embedded"]
        assert 0 < partial.target_rows < 400
        # Every answered request is on the books, the given-up batches' ones included.
        assert booked_tokens(database_url, spec) == sum(
            r.tokens for r in server.requests if r.status == 200
        )
        # Nothing was skipped past: with the limit lifted, the next run embeds every row left.
        server.tpm = None
        final = subprocess.run(
            run,
            capture_output=True,
            env=env,
            timeout=120,
        )
        assert final.returncode == 0, final.stderr
    done = counts(database_url, spec)
    assert done.complete and done.embedded_by_batches == 400


def test_live_inserts_updates_and_deletes_during_the_run_are_all_caught_up(
    database_url: str, request: pytest.FixtureRequest
) -> None:
    table = table_name(request)
    create_corpus(database_url, table=table, count=4_000)
    base = flags(database_url, table)
    assert cli_subprocess(["migrate", "setup", *base]).code == 0

    deleted: set[int] = set()
    stop = threading.Event()
    writes = {"insert": 0, "update": 0, "delete": 0, "empty": 0}

    def writer() -> None:
        rng = random.Random(7)
        next_id = 100_000
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not stop.is_set():
                op = rng.choice(["insert", "update", "update", "delete", "empty"])
                doc = rng.randint(1, 4_000)
                if op == "insert":
                    next_id += 1
                    conn.execute(
                        f'INSERT INTO "{table}" VALUES (%s, %s, %s)',
                        [next_id, f"The new studio {next_id} opens at nine.", "facilities"],
                    )
                elif op == "update":
                    conn.execute(
                        f'UPDATE "{table}" SET content = %s WHERE id = %s',
                        [f"The pool timetable changed {rng.random()}.", doc],
                    )
                elif op == "delete":
                    conn.execute(f'DELETE FROM "{table}" WHERE id = %s', [doc])
                    deleted.add(doc)
                else:
                    conn.execute(f'UPDATE "{table}" SET content = NULL WHERE id = %s', [doc])
                writes[op] += 1
                time.sleep(0.002)

    thread = threading.Thread(target=writer)
    proc = start_run([*base, "--batch-size", "8", "--concurrency", "3"])
    thread.start()
    try:
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        stop.set()
        thread.join()
    assert min(writes.values()) > 10, writes  # the writes really raced the worker

    final = cli_subprocess(["migrate", "run", *base])  # the catch-up after the writes stop
    assert final.code == 0, final.err
    spec = spec_for(table)
    c = counts(database_url, spec)
    assert c.complete and c.queued == 0
    checked, matching = vectors_match_text(database_url, table)
    assert checked == matching == c.embeddable  # every vector is the embedding of today's text
    with psycopg.connect(database_url) as conn:
        survivors = conn.execute(
            f'SELECT count(*) FROM "{spec.target_table.name}" WHERE id = ANY(%s)', [list(deleted)]
        ).fetchone()
    assert survivors == (0,)  # deleted documents have no vector
    assert cli_subprocess(["migrate", "verify", *base]).code == 0
