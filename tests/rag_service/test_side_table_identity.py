"""A side table belongs to exactly one embedding identity (provider, model, dimensions, endpoint).

The side table is named after the source table, model name and dimensions only, so targets
that differ in provider or baseURL, or whose model names slug alike, map to one table. Before
the identity was recorded, the second target's backfill skipped every row whose content hash
matched, whichever model's vector held it, and reported the migration complete. Against a real
PostgreSQL + pgvector: setup, the worker, the follower, verify and serve refuse a table of
another identity and change nothing; the same identity is accepted again; a table an older
embedshift made is adopted when its model column says it is this target's; and the record never
holds the baseURL, which may carry a password.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from rag_service.errors import EXIT_SCHEMA_REFUSED, SchemaRefused
from rag_service.follow import follow_changes
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers.local import LocalProvider
from rag_service.schema import layout_for, setup
from rag_service.spec import DataPlaneSpec
from rag_service.testing import EmbeddingServer
from rag_service.testing.corpus import corpus_spec, create_corpus
from rag_service.testing.service_process import start_serve, wait_healthy
from rag_service.verify import verify
from tests.embedding_fixtures import EMBEDDING_API_KEY, OpenAIFactory
from tests.helpers import cli, cli_async, eventually

ROWS = 40
DIMS = 32
MODEL = "text-embedding-3-small"
OPENAI = f"openai:{MODEL}@{DIMS}"
LOCAL = f"local:{MODEL}@{DIMS}"
MIGRATION = "default/identity"
# In a baseURL's userinfo; a leak anywhere is unambiguous.
PASSWORD = "pw-SENTINEL-7c1e9"


@pytest.fixture
def corpus(database_url: str, request: pytest.FixtureRequest) -> str:
    # Unique per test and parameter: a side table outlives its source table's re-creation.
    table = f"ident_{hashlib.sha256(request.node.name.encode()).hexdigest()[:10]}"
    create_corpus(database_url, table=table, count=ROWS, source_dimensions=DIMS)
    return table


def spec(table: str, target: str, base_url: str | None = None, **more: Any) -> DataPlaneSpec:
    provider, rest = target.split(":")
    model, dims = rest.split("@")
    wanted: dict[str, Any] = {"provider": provider, "model": model, "dimensions": int(dims)}
    if base_url is not None:
        wanted["baseURL"] = base_url
    return corpus_spec(table, source_dimensions=DIMS, target={**wanted, **more})


def side_table(table: str, target: str = OPENAI) -> str:
    """The side table's name, as `migrate setup` prints it."""
    return str(spec(table, target).target_table)


def digest(base_url: str) -> str:
    """The record's digest of a baseURL already in normal form (no userinfo, no trailing /)."""
    return hashlib.sha256(base_url.encode()).hexdigest()[:16]


def cli_flags(url: str, table: str, target: str, base_url: str | None = None) -> list[str]:
    endpoint = ["--target-base-url", base_url] if base_url else []
    return [
        "--database-url", url, "--table", table, "--category-column", "category",
        "--source-column", "embedding", "--source", f"local:hash@{DIMS}",
        "--target", target, *endpoint, "--migration", MIGRATION,
    ]  # fmt: skip


def snapshot(url: str, table: str, target: str = OPENAI) -> dict[str, Any]:
    """Everything a refused command must leave as it was: the side table's rows (vectors,
    hashes, model, time embedded), its comment, the change queue, the batches recorded and the
    routing row. Read in SQL, independent of the code under test."""
    layout = layout_for(spec(table, target), id_type="bigint")
    name = layout.target.name
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT id, embedding::text, content_hash, model, embedded_at FROM {} ORDER BY id"
            ).format(sql.Identifier(name))
        ).fetchall()
        comment = conn.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class')", [name]
        ).fetchone()
        queue = conn.execute(
            sql.SQL("SELECT id, seq FROM {} ORDER BY id").format(sql.Identifier(layout.queue.name))
        ).fetchall()
        batches = conn.execute("SELECT count(*) FROM embedding_migration_status").fetchone()
        routing = conn.execute(
            "SELECT target FROM embedshift_rollout WHERE migration = %s", [MIGRATION]
        ).fetchone()
    return {
        "rows": rows,
        "comment": comment,
        "queue": queue,
        "batches": batches,
        "routing": routing,
    }


def recorded(url: str, table: str, target: str = OPENAI) -> dict[str, Any] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class')", [side_table(table, target)]
        ).fetchone()
    assert row is not None
    return None if row[0] is None else dict(json.loads(row[0]))


def forget_identity(url: str, table: str, target: str = OPENAI) -> None:
    """Make the side table look as an embedshift from before the identity record left it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("COMMENT ON TABLE {} IS NULL").format(sql.Identifier(side_table(table, target)))
        )


def refusal(held: str, wanted: str, table: str) -> str:
    """The refusal's first words: which table, what it holds, what was asked for."""
    return (
        f"side table {side_table(table)} holds vectors of {held}, "
        f"not of this spec's target {wanted}"
    )


# ---- (a) the case the content-hash skip used to hide ------------------------------------------


@pytest.mark.parametrize("other", ["provider", "baseURL", "a model name that slugs alike"])
def test_a_second_target_sharing_the_side_table_is_refused_and_its_vectors_stay(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    other: str,
) -> None:
    monkeypatch.setenv("EMBEDSHIFT_TARGET_API_KEY", EMBEDDING_API_KEY)
    a_url = embedding_server.openai_base_url
    a = cli_flags(database_url, corpus, OPENAI, a_url)
    assert cli(capsys, "migrate", "setup", *a).code == 0
    ran = cli(capsys, "migrate", "run", *a)
    assert ran.code == 0 and f"embedded {ROWS} rows" in ran.out, ran
    before = snapshot(database_url, corpus)
    assert {row[3] for row in before["rows"]} == {OPENAI} and len(before["rows"]) == ROWS
    requests = len(embedding_server.requests)

    with EmbeddingServer(api_key=EMBEDDING_API_KEY) as elsewhere:
        target, base_url, wanted = {
            "provider": (LOCAL, None, f"{LOCAL} (the provider's default baseURL)"),
            "baseURL": (
                OPENAI,
                elsewhere.openai_base_url,
                f"{OPENAI} (baseURL digest {digest(elsewhere.openai_base_url)})",
            ),
            "a model name that slugs alike": (
                "local:Text_Embedding_3_Small@32",
                None,
                "local:Text_Embedding_3_Small@32 (the provider's default baseURL)",
            ),
        }[other]
        assert side_table(corpus, target) == side_table(corpus)  # the one table both map to
        b = cli_flags(database_url, corpus, target, base_url)
        expected = refusal(f"{OPENAI} (baseURL digest {digest(a_url)})", wanted, corpus)
        for command in (["setup"], ["run"], ["run", "--dry-run"]):
            refused = cli(capsys, "migrate", *command, *b)
            assert refused.code == EXIT_SCHEMA_REFUSED, (command, refused)
            assert expected in refused.err, refused.err
            assert "DROP TABLE" in refused.err and "(nothing was changed)" in refused.err
            assert "embedded 0 rows" not in refused.out  # the old silent "complete"
        assert elsewhere.requests == []

    assert snapshot(database_url, corpus) == before  # A's vectors, model column and record
    assert len(embedding_server.requests) == requests
    assert recorded(database_url, corpus) == {
        "embedshiftSideTable": 1,
        "provider": "openai",
        "model": MODEL,
        "dimensions": DIMS,
        "baseURLDigest": digest(a_url),
    }


# ---- (b) every other entry point checks it too -------------------------------------------------


async def test_the_worker_the_follower_and_verify_refuse_another_identity(
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    openai_provider: OpenAIFactory,
) -> None:
    a = spec(corpus, LOCAL)
    await setup(database_url, a, migration=MIGRATION)
    report = await run_migration(
        database_url,
        a,
        provider=LocalProvider(model=MODEL, dimensions=DIMS),
        options=RunOptions(),
        migration=MIGRATION,
    )
    assert report.embedded == ROWS
    # Changed texts the follower of another identity would otherwise embed at once.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET content = content || ' (revised)' WHERE id <= 3").format(
                sql.Identifier(corpus)
            )
        )
    before = snapshot(database_url, corpus, LOCAL)
    assert len(before["queue"]) == 3

    b = spec(corpus, OPENAI, embedding_server.openai_base_url)
    expected = refusal(
        f"{LOCAL} (the provider's default baseURL)",
        f"{OPENAI} (baseURL digest {digest(embedding_server.openai_base_url)})",
        corpus,
    )
    provider = openai_provider(model=MODEL, dimensions=DIMS)
    with pytest.raises(SchemaRefused) as worker:
        await run_migration(
            database_url, b, provider=provider, options=RunOptions(), migration=MIGRATION
        )
    with pytest.raises(SchemaRefused) as follower:
        await asyncio.wait_for(
            follow_changes(
                database_url,
                b,
                provider=provider,
                migration=MIGRATION,
                stop=asyncio.Event(),
                sweep_seconds=600,
            ),
            30,
        )
    with pytest.raises(SchemaRefused) as verified:
        await verify(database_url, b)
    for refused in (worker, follower, verified):
        assert expected in str(refused.value) and "(nothing was changed)" in str(refused.value)
    assert snapshot(database_url, corpus, LOCAL) == before  # queue kept, nothing embedded
    assert embedding_server.requests == []
    # Its own identity still runs: the queued changes are embedded and verify passes.
    report = await run_migration(
        database_url,
        a,
        provider=LocalProvider(model=MODEL, dimensions=DIMS),
        options=RunOptions(),
        migration=MIGRATION,
    )
    assert report.embedded == 3
    assert (await verify(database_url, a)).ok


def test_serve_does_not_answer_from_a_side_table_of_another_identity(
    capsys: pytest.CaptureFixture[str], database_url: str, corpus: str, tmp_path: Path
) -> None:
    """The record to serve names one model; the side table holds another's vectors (here: a
    record an older setup wrote, which checked nothing). The service does not serve it:
    /readyz says why, and searches are refused instead of ranking the wrong vectors."""
    held, served = LOCAL, "local:Text_Embedding_3_Small@32"  # one side table, two models
    migration = "default/identity-serve"
    a = cli_flags(database_url, corpus, held)
    assert cli(capsys, "migrate", "setup", *a).code == 0
    assert cli(capsys, "migrate", "run", *a).code == 0
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EMBEDSHIFT_", "DATABASE"))},
        "DATABASE_URL": database_url,
    }
    log = tmp_path / "serve.log"
    process, base = start_serve(
        ["--migration", migration, "--reread-seconds", "0.5"], env=env, log=log
    )
    try:
        wait_healthy(process, base, log, path="/healthz")
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO embedshift_rollout (migration, percentage, source, target) "
                "SELECT %s, 100, source, jsonb_set(jsonb_set(target, '{model}', "
                "to_jsonb(%s::text)), '{spec,model}', to_jsonb(%s::text)) "
                "FROM embedshift_rollout WHERE migration = %s",
                [migration, served, served.split(":")[1].split("@")[0], MIGRATION],
            )
            conn.execute("SELECT pg_notify('embedshift_rollout', %s)", [migration])
        refused = f"cannot serve what `embedshift migrate setup` recorded for {migration}"
        eventually(lambda: refused in log.read_text(), "the refusal", 15)
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
        problem = ready.json()["error"]
        assert problem.startswith("cannot serve the record: spec.target: side table"), problem
        assert f"holds vectors of {held} (the provider's default baseURL)" in problem
        search = httpx.post(f"{base}/api/rag/search", json={"query": "pool"}, timeout=5)
        assert search.status_code == 503, search.text
        assert process.poll() is None  # not crashed: it waits for a record it can serve
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in log.read_text()


# ---- (c) the same identity is welcome again ----------------------------------------------------


async def test_the_same_identity_sets_up_again_and_keeps_running(
    database_url: str, corpus: str, embedding_server: EmbeddingServer
) -> None:
    """Endpoint spellings that name the same server, a new price and new rate limits are the
    same identity: setup is idempotent and the side table is used as it is."""
    url = embedding_server.openai_base_url
    same = [
        spec(corpus, OPENAI, url),
        spec(corpus, OPENAI, url + "/"),
        spec(corpus, OPENAI, url.replace("http://", f"http://embedshift:{PASSWORD}@")),
        spec(corpus, OPENAI, url, usdPerMillionTokens=0.5, requestsPerMinute=60),
    ]
    for each in same:
        await setup(database_url, each, migration=MIGRATION)
        assert recorded(database_url, corpus) == {
            "embedshiftSideTable": 1,
            "provider": "openai",
            "model": MODEL,
            "dimensions": DIMS,
            "baseURLDigest": digest(url),
        }
    verified = await verify(database_url, same[-1])  # accepted: only the counts are short
    assert {c.name for c in verified.checks if not c.ok} == {"counts", "pending"}


# ---- (d) a side table an older embedshift made ------------------------------------------------


async def test_an_unrecorded_side_table_of_this_model_is_adopted(
    database_url: str, corpus: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = spec(corpus, LOCAL)
    await setup(database_url, a, migration=MIGRATION)
    await run_migration(
        database_url,
        a,
        provider=LocalProvider(model=MODEL, dimensions=DIMS),
        options=RunOptions(),
        migration=MIGRATION,
    )
    forget_identity(database_url, corpus, LOCAL)
    rows = snapshot(database_url, corpus, LOCAL)["rows"]
    assert (await verify(database_url, a)).ok  # readers use it as it is, writing nothing
    assert recorded(database_url, corpus, LOCAL) is None

    with caplog.at_level(logging.WARNING, logger="rag_service.schema"):
        await setup(database_url, a, migration=MIGRATION)
    (line,) = [r.getMessage() for r in caplog.records if "adopted" in r.getMessage()]
    assert f"adopted {side_table(corpus, LOCAL)}, made by an older embedshift" in line
    assert f"now records {LOCAL} (the provider's default baseURL)" in line
    assert recorded(database_url, corpus, LOCAL) == {
        "embedshiftSideTable": 1,
        "provider": "local",
        "model": MODEL,
        "dimensions": DIMS,
        "baseURLDigest": None,
    }
    assert snapshot(database_url, corpus, LOCAL)["rows"] == rows
    # Adopted, it is recorded: another identity is refused from now on.
    with pytest.raises(SchemaRefused, match="holds vectors of local:text-embedding-3-small@32"):
        await setup(database_url, spec(corpus, "local:Text_Embedding_3_Small@32"), migration="x/y")


async def test_an_unrecorded_side_table_of_another_model_is_refused(
    database_url: str, corpus: str
) -> None:
    a = spec(corpus, LOCAL)
    await setup(database_url, a, migration=MIGRATION)
    await run_migration(
        database_url,
        a,
        provider=LocalProvider(model=MODEL, dimensions=DIMS),
        options=RunOptions(),
        migration=MIGRATION,
    )
    forget_identity(database_url, corpus, LOCAL)
    before = snapshot(database_url, corpus, LOCAL)
    b = spec(corpus, "local:Text_Embedding_3_Small@32")
    older = f"{LOCAL} (made by an older embedshift, which recorded no baseURL)"
    with pytest.raises(SchemaRefused, match="holds vectors of") as refused:
        await setup(database_url, b, migration=MIGRATION)
    assert f"holds vectors of {older}, not of this spec's target" in str(refused.value)
    with pytest.raises(SchemaRefused, match="made by an older embedshift"):
        await verify(database_url, b)
    assert snapshot(database_url, corpus, LOCAL) == before  # still unrecorded, rows as they were


async def test_an_unrecorded_empty_side_table_is_adopted_only_for_its_model(
    database_url: str, corpus: str
) -> None:
    """Empty, its model column's default still names the model it was made for: rows written
    for another would be labelled with it."""
    a = spec(corpus, LOCAL)
    await setup(database_url, a, migration=MIGRATION)
    forget_identity(database_url, corpus, LOCAL)
    b = spec(corpus, "local:Text_Embedding_3_Small@32")
    with pytest.raises(SchemaRefused, match=f"holds vectors of {LOCAL} \\(made by an older"):
        await setup(database_url, b, migration=MIGRATION)
    assert recorded(database_url, corpus, LOCAL) is None
    await setup(database_url, a, migration=MIGRATION)
    assert recorded(database_url, corpus, LOCAL) is not None


# ---- (e) the baseURL is never written down ----------------------------------------------------


async def test_the_record_and_the_refusals_never_hold_the_base_url(
    capsys: pytest.CaptureFixture[str],
    database_url: str,
    corpus: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    held = f"https://embedshift:{PASSWORD}@proxy.internal:8443/v1"
    other = f"https://embedshift:{PASSWORD}-2@other.internal:8443/v1"
    await setup(database_url, spec(corpus, OPENAI, held), migration=MIGRATION)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class')", [side_table(corpus)]
        ).fetchone()
    assert row is not None
    comment = str(row[0])
    assert json.loads(comment)["baseURLDigest"] == digest("https://proxy.internal:8443/v1")

    messages = []
    with pytest.raises(SchemaRefused) as refused:
        await setup(database_url, spec(corpus, OPENAI, other), migration=MIGRATION)
    messages.append(str(refused.value))
    with pytest.raises(SchemaRefused) as refused:
        await verify(database_url, spec(corpus, OPENAI, other))
    messages.append(str(refused.value))
    result = await cli_async(
        capsys, "migrate", "setup", *cli_flags(database_url, corpus, OPENAI, other)
    )
    assert result.code == EXIT_SCHEMA_REFUSED
    messages += [result.out, result.err]
    assert "baseURL digest" in messages[0]
    logged = [r.getMessage() for r in caplog.records]
    for text in [comment, *messages, *logged]:
        for secret in (PASSWORD, "proxy.internal", "other.internal"):
            assert secret not in text, text
