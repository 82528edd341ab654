"""`embedshift serve --migration NS/NAME` serves what `migrate setup` recorded for that migration
(table, columns, v1 column, both models with their base URLs), with DATABASE_URL and the API keys
as its only environment; flags override the record; an unknown key is one line naming the fix.
Readiness (`/readyz`) follows the database alone: an embedding API outage leaves it 200."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from embedshift_operator.cli import build_parser
from embedshift_operator.cli.serve import resolve_recorded
from rag_service.identifiers import TableName
from rag_service.rollout_row import write_percentage
from rag_service.schema import ROLLOUT_TABLE, connect, setup
from rag_service.service import ServiceSettings
from rag_service.spec import DataPlaneSpec, ProviderName
from rag_service.testing import EmbeddingServer
from rag_service.testing.corpus import corpus_spec, create_corpus
from rag_service.testing.service_process import free_port, start_serve, wait_healthy
from tests.helpers import cli, routed_percentage
from tests.service_harness import serving

TABLE = "svc_recorded"
SOURCE = "local:hash@32"
TARGET = "openai:text-embedding-3-small@64"


def setup_flags(url: str, table: str, migration: str, base_url: str) -> list[str]:
    return [
        "--database-url", url, "--table", table, "--category-column", "category",
        "--source-column", "embedding", "--source", SOURCE,
        "--target", TARGET, "--target-base-url", base_url, "--migration", migration,
    ]  # fmt: skip


def only_database_and_keys(url: str, key: str) -> dict[str, str]:
    """The process environment without any data-plane setting: DATABASE_URL and an API key."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EMBEDSHIFT_", "FF_", "DATABASE_URL", "OPENAI_", "GEMINI_"))
    }
    return {**env, "DATABASE_URL": url, "OPENAI_API_KEY": key}


def search(base: str, user: str) -> dict[str, Any]:
    found = httpx.post(
        f"{base}/api/rag/search",
        json={"query": "pool opening hours", "k": 5},
        headers={"X-User-Id": user},
        timeout=30,
    )
    assert found.status_code == 200, found.text
    answer: dict[str, Any] = found.json()
    return answer


async def set_percentage(url: str, migration: str, percentage: int) -> None:
    conn = await connect(url, autocommit=True)
    async with conn:
        await write_percentage(
            conn,
            table=TableName(ROLLOUT_TABLE),
            migration=migration,
            percentage=percentage,
            reason="test",
        )


@pytest.fixture(scope="module")
def corpus(database_url: str) -> str:
    create_corpus(database_url, table=TABLE, count=60, source_dimensions=32)
    return TABLE


def test_setup_then_serve_with_only_the_migration_answers_v1_and_v2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    embedding_api_key: str,
    tmp_path: Path,
) -> None:
    migration = "rag/recorded"
    flags = setup_flags(database_url, corpus, migration, embedding_server.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", embedding_api_key)
    assert cli(capsys, "migrate", "setup", *flags).code == 0
    assert cli(capsys, "migrate", "run", *flags).code == 0
    before = len(embedding_server.requests)

    log = tmp_path / "serve.log"
    process, base = start_serve(
        ["--migration", migration],
        env=only_database_and_keys(database_url, embedding_api_key),
        log=log,
    )
    try:
        wait_healthy(process, base, log, path="/readyz")
        v1 = search(base, "ada")  # a new routing row routes 0 %
        assert (v1["version"], v1["fallback"]) == ("v1", False)
        assert v1["results"], v1

        asyncio.run(set_percentage(database_url, migration, 100))
        deadline = time.monotonic() + 15  # NOTIFY wakes the follower; it re-reads every 5 s
        while (v2 := search(base, "ada"))["percentage"] != 100 and time.monotonic() < deadline:
            time.sleep(0.2)
        # v2 answered (no fallback): the recorded base URL reached the embedding API, and the
        # recorded table and columns found the side table's vectors.
        assert (v2["version"], v2["fallback"]) == ("v2", False), v2
        assert v2["results"], v2
        queries = embedding_server.requests[before:]
        assert any(r.endpoint == "openai" and r.status == 200 for r in queries), queries
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    text = log.read_text()
    assert f"recorded for {migration}" in text
    assert "Traceback" not in text

    # Setup again records the same facts and leaves the rollout where it is.
    assert cli(capsys, "migrate", "setup", *flags).code == 0
    assert routed_percentage(database_url, migration) == 100


async def resolved(*argv: str) -> tuple[DataPlaneSpec, str]:
    args = build_parser().parse_args(["serve", *argv])
    spec, migration, _, _ = await resolve_recorded(args)
    return spec, migration


async def test_a_flag_overrides_the_record(
    monkeypatch: pytest.MonkeyPatch, database_url: str, corpus: str
) -> None:
    """`--table` names another table; everything else still comes from the record."""
    for name in ("EMBEDSHIFT_TABLE", "EMBEDSHIFT_SOURCE", "EMBEDSHIFT_TARGET", "EMBEDSHIFT_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    migration = "rag/overridden"
    other = f"{TABLE}_other"
    create_corpus(database_url, table=other, count=3, source_dimensions=32, seed=11)
    spec = corpus_spec(corpus, source_dimensions=32, target="local:hash@64")
    await setup(database_url, spec, migration=migration)

    recorded, key = await resolved("--database-url", database_url, "--migration", migration)
    assert key == migration
    assert recorded.database == spec.database and recorded.target == spec.target
    assert recorded.source == spec.source

    overridden, _ = await resolved(
        "--database-url", database_url, "--migration", migration, "--table", other
    )
    assert overridden.database.table == other
    assert overridden.database.source_embedding_column == "embedding"  # from the record
    assert overridden.target == spec.target and overridden.source == spec.source

    settings = ServiceSettings.from_env(
        database_url=database_url, spec=overridden, migration=migration, env={}
    )
    async with serving(settings) as running:
        found = await running.client.post("/api/rag/search", json={"query": "pool", "k": 10})
    assert found.status_code == 200, found.text
    assert found.json()["version"] == "v1"
    with psycopg.connect(database_url) as conn:
        texts = {
            str(r[0])
            for r in conn.execute(sql.SQL("SELECT content FROM {}").format(sql.Identifier(other)))
        }
    assert {hit["text"] for hit in found.json()["results"]} == texts  # the flag's table, all 3


async def test_a_row_recorded_before_the_full_models_still_serves(
    database_url: str, corpus: str
) -> None:
    """A routing row written by an older setup holds only the models' readable form."""
    migration = "rag/older"
    spec = corpus_spec(corpus, source_dimensions=32, target="local:hash@64")
    await setup(database_url, spec, migration=migration)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE embedshift_rollout SET source = source - 'spec', target = target - 'spec' "
            "WHERE migration = %s",
            [migration],
        )
    recorded, _ = await resolved("--database-url", database_url, "--migration", migration)
    assert recorded.database == spec.database
    assert recorded.source is not None and recorded.source.descriptor == SOURCE
    assert recorded.target.descriptor == "local:hash@64"


def test_an_unknown_migration_is_one_line_naming_the_fix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    for name in ("EMBEDSHIFT_TABLE", "EMBEDSHIFT_TARGET", "EMBEDSHIFT_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    result = cli(capsys, "serve", "--migration", "rag/nobody", "--port", str(free_port()))
    assert result.code == 2, result
    (line,) = result.err.splitlines()
    assert line.startswith("embedshift: error: --migration rag/nobody: nothing is recorded")
    assert line.endswith(
        "run `embedshift migrate setup` for rag/nobody first, or give --table/--source/--target"
    )
    assert "password" not in line


@pytest.fixture
def database_switch(pg_admin_url: str, database_url: str) -> Iterator[tuple[str, Any]]:
    """Turn the test database's connections off (and its sessions out) and on again."""
    name = str(conninfo_to_dict(database_url)["dbname"])

    def allow(on: bool) -> None:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(name), sql.SQL("true" if on else "false")
                )
            )
            if not on:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    [name],
                )

    try:
        yield name, allow
    finally:
        allow(True)


async def test_readiness_follows_the_database_not_the_embedding_api(
    database_url: str, corpus: str, database_switch: tuple[str, Any]
) -> None:
    _, allow = database_switch
    # v1's embedding API is down: nothing listens at its base URL.
    spec = corpus_spec(corpus, source_dimensions=32, target="local:hash@64")
    assert spec.source is not None
    down = spec.source.model_copy(
        update={
            "provider": ProviderName.OPENAI,
            "model": "text-embedding-3-small",
            "base_url": f"http://127.0.0.1:{free_port()}/v1",
        }
    )
    settings = ServiceSettings(
        database_url=database_url,
        spec=spec.model_copy(update={"source": down}),
        migration="rag/ready",
        source_api_key="unused",
    )
    async with serving(settings) as running:
        ready = await running.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"ready": True, "database": {"ok": True}}
        v1_health = await running.client.get("/api/rag/v1/health")
        assert v1_health.status_code == 503  # the API is down, and health says so
        assert v1_health.json()["checks"]["provider"]["ok"] is False

        allow(False)
        not_ready = await running.client.get("/readyz")
        assert not_ready.status_code == 503, not_ready.text
        assert not_ready.json()["ready"] is False
        assert not_ready.json()["database"]["error"]

        allow(True)
        deadline = time.monotonic() + 60  # the pool reconnects with a backoff
        while (again := await running.client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, again.text
            await asyncio.sleep(0.5)
