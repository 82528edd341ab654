"""``migrate index`` and ``migrate verify`` against real pgvector: repairs and detections."""

from __future__ import annotations

import json
import logging

import psycopg
import pytest
from psycopg import sql

from rag_service.errors import EXIT_VERIFICATION
from rag_service.schema import layout_for
from rag_service.testing.corpus import create_corpus
from tests.helpers import cli, flags, spec_for, table_name


@pytest.fixture
def migrated(
    capsys: pytest.CaptureFixture[str], database_url: str, request: pytest.FixtureRequest
) -> str:
    table = table_name(request)
    create_corpus(database_url, table=table, count=900)
    base = flags(database_url, table)
    assert cli(capsys, "migrate", "setup", *base).code == 0
    assert cli(capsys, "migrate", "run", *base).code == 0
    return table


def checks(out: str) -> dict[str, dict[str, object]]:
    return {c["name"]: c for c in json.loads(out)["checks"]}


def index_name(table: str) -> str:
    return layout_for(spec_for(table), id_type="bigint").index_name


def test_index_is_built_once_and_verify_measures_its_recall(
    capsys: pytest.CaptureFixture[str], database_url: str, migrated: str
) -> None:
    base = flags(database_url, migrated)
    before = cli(capsys, "migrate", "verify", *base, "--json")
    assert before.code == 0
    assert "no index yet" in checks(before.out)["index_recall"]["detail"]  # type: ignore[operator]
    built = json.loads(cli(capsys, "migrate", "index", *base, "--json").out)
    assert built["action"] == "created"
    assert (
        "USING hnsw (embedding vector_cosine_ops) WITH (m='16', ef_construction='64')"
        in built["definition"]
    )
    again = json.loads(cli(capsys, "migrate", "index", *base, "--json").out)
    assert again["action"] == "unchanged"
    after = cli(capsys, "migrate", "verify", *base, "--json", "--sample", "30")
    recall = checks(after.out)["index_recall"]
    assert after.code == 0 and recall["ok"] and float(recall["value"]) >= 0.9  # type: ignore[arg-type]


def test_an_invalid_leftover_index_fails_verify_and_is_rebuilt(
    capsys: pytest.CaptureFixture[str], database_url: str, migrated: str
) -> None:
    base = flags(database_url, migrated)
    assert cli(capsys, "migrate", "index", *base).code == 0
    # What an interrupted CREATE INDEX CONCURRENTLY leaves behind: an index marked invalid.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)",
            [f'"{index_name(migrated)}"'],
        )
    broken = cli(capsys, "migrate", "verify", *base, "--json")
    assert broken.code == EXIT_VERIFICATION
    assert "INVALID" in checks(broken.out)["index_recall"]["detail"]  # type: ignore[operator]
    repaired = json.loads(cli(capsys, "migrate", "index", *base, "--json").out)
    assert repaired["action"] == "rebuilt-invalid"
    assert cli(capsys, "migrate", "verify", *base).code == 0


def test_an_index_with_other_parameters_is_rebuilt(
    capsys: pytest.CaptureFixture[str], database_url: str, migrated: str
) -> None:
    base = flags(database_url, migrated)
    target = spec_for(migrated).target_table.name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f'CREATE INDEX "{index_name(migrated)}" ON "{target}" '
            "USING hnsw (embedding vector_cosine_ops) WITH (m = 4)"
        )
    rebuilt = json.loads(cli(capsys, "migrate", "index", *base, "--json").out)
    assert rebuilt["action"] == "rebuilt-changed" and "m='16'" in rebuilt["definition"]


def test_verify_finds_stale_pending_and_broken_vectors(
    capsys: pytest.CaptureFixture[str], database_url: str, migrated: str
) -> None:
    base = flags(database_url, migrated)
    target = spec_for(migrated).target_table.name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE \"{migrated}\" SET content = 'Changed text.' WHERE id IN (1, 2)")
        conn.execute(f"INSERT INTO \"{migrated}\" VALUES (5000, 'A new row.', 'events')")
        conn.execute(f'UPDATE "{target}" SET embedding = embedding + embedding WHERE id = 3')
    result = cli(capsys, "migrate", "verify", *base, "--json")
    assert result.code == EXIT_VERIFICATION
    found = checks(result.out)
    assert found["stale_hashes"]["value"] == 2 and not found["stale_hashes"]["ok"]
    assert found["pending"]["value"] == {"rows": 3, "queued": 3}
    assert found["unit_norms"]["value"] == 1 and not found["unit_norms"]["ok"]
    human = cli(capsys, "migrate", "verify", *base)
    assert human.code == EXIT_VERIFICATION and "verification FAILED" in human.out
    status = json.loads(cli(capsys, "migrate", "status", *base, "--json").out)
    assert status["pending"] == 3 and status["stale"] == 2 and status["queued"] == 3
    assert status["byCategory"]["events"]["pending"] >= 1


def test_the_index_build_asks_for_the_memory_its_graph_needs(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    database_url: str,
    migrated: str,
) -> None:
    """Too little maintenance_work_mem: pgvector spills the graph to disk part way and says so;
    the default sizes the build so it does not, with the server's own parallel workers."""
    base = flags(database_url, migrated)
    with caplog.at_level(logging.WARNING, logger="rag_service.indexes"):
        small = cli(capsys, "migrate", "index", *base, "--maintenance-work-mem", "1MB")
    assert small.code == 0, small.err
    assert "(maintenance_work_mem 1MB, up to" in small.out
    assert "hnsw graph no longer fits into maintenance_work_mem" in caplog.text
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(migrated))))
        server_workers = int(conn.execute("SHOW max_parallel_maintenance_workers").fetchone()[0])  # type: ignore[index]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rag_service.indexes"):
        auto = json.loads(cli(capsys, "migrate", "index", *base, "--json").out)
    assert auto["action"] == "created"
    assert "no longer fits" not in caplog.text
    assert auto["maintenance_work_mem"] >= 900 * 768 * 4  # at least the vectors themselves
    assert auto["parallel_workers"] == server_workers


def test_a_memory_size_postgresql_would_refuse_is_refused_by_the_flag(
    capsys: pytest.CaptureFixture[str], database_url: str, migrated: str
) -> None:
    base = flags(database_url, migrated)
    for flag, value in [("--maintenance-work-mem", v) for v in ("512mb", "lots", "0MB", "3TB")] + [
        ("--parallel-workers", "-1"),
        ("--max-maintenance-work-mem", "auto"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli(capsys, "migrate", "index", *base, flag, value)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: " in err and value in err
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass(%s)", [index_name(migrated)]).fetchone() == (None,)
