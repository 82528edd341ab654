"""The worker against the real OpenAI and Gemini SDKs, talking to the local embedding API:
faults, quota, wrong dimensions, and what ends up stored."""

from __future__ import annotations

import psycopg
import pytest

from rag_service.errors import EXIT_PROVIDER_REFUSED, QuotaExceeded
from rag_service.migrate import RunOptions, run_migration
from rag_service.schema import setup
from rag_service.testing import EmbeddingServer
from rag_service.testing.corpus import create_corpus
from tests.embedding_fixtures import GoogleFactory, OpenAIFactory
from tests.helpers import cli, counts, flags, spec_for, table_name
from tests.rag_service.test_migrate import vectors_match_text

OPENAI = "openai:text-embedding-3-small@64"
GOOGLE = "google:gemini-embedding-001@128"


@pytest.fixture
def corpus(database_url: str, request: pytest.FixtureRequest) -> str:
    table = table_name(request)
    create_corpus(database_url, table=table, count=600, source_dimensions=0)
    return table


async def test_a_run_survives_20_percent_server_errors_and_rate_limits(
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    openai_provider: OpenAIFactory,
) -> None:
    spec = spec_for(corpus, OPENAI)
    await setup(database_url, spec, migration="default/x")
    embedding_server.error_rate = 0.2
    embedding_server.tpm = 600_000
    embedding_server.drain()  # start with the minute's budget spent by "someone else"
    report = await run_migration(
        database_url,
        spec,
        provider=openai_provider(dimensions=64, concurrency=4),
        options=RunOptions(batch_size=10, concurrency=4),
        migration="default/x",
    )
    statuses = embedding_server.stats()["by_status"]
    faults = statuses.get("500", 0) + statuses.get("503", 0) + statuses.get("429", 0)
    assert faults >= 6, statuses  # the faults really happened (60 batches at 20 %) ...
    assert report.embedded == 600  # ... and the run still completed
    c = counts(database_url, spec)
    assert c.complete and c.embedded_by_batches == 600
    assert vectors_match_text(database_url, corpus, OPENAI) == (600, 600)


async def test_the_gemini_sdk_fills_the_target_with_unit_vectors(
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    google_provider: GoogleFactory,
) -> None:
    spec = spec_for(corpus, GOOGLE)
    await setup(database_url, spec, migration="default/x")
    embedding_server.error_rate = 0.2
    await run_migration(
        database_url,
        spec,
        provider=google_provider(dimensions=128),
        options=RunOptions(batch_size=250, concurrency=2),
        migration="default/x",
    )
    assert max(r.inputs for r in embedding_server.requests) <= 100  # Gemini's batch limit
    assert counts(database_url, spec).complete
    # The API's vectors are not unit length below 3072 dims; stored ones must be.
    assert vectors_match_text(database_url, corpus, GOOGLE) == (600, 600)
    with psycopg.connect(database_url) as conn:
        off = conn.execute(
            f'SELECT count(*) FROM "{spec.target_table.name}" '
            "WHERE abs(vector_norm(embedding) - 1) > 1e-3"
        ).fetchone()
    assert off == (0,)


def test_insufficient_quota_fails_fast_and_writes_nothing(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    embedding_api_key: str,
) -> None:
    monkeypatch.setenv("EMBEDSHIFT_TARGET_API_KEY", embedding_api_key)
    base = [*flags(database_url, corpus, OPENAI), "--target-base-url", embedding_server.url + "/v1"]
    assert cli(capsys, "migrate", "setup", *base).code == 0
    embedding_server.insufficient_quota = True
    result = cli(capsys, "migrate", "run", *base, "--concurrency", "1")
    assert result.code == EXIT_PROVIDER_REFUSED
    assert "embedshift: error:" in result.err and "quota" in result.err.lower()
    assert "Traceback" not in result.err and embedding_api_key not in result.err + result.out
    assert len(embedding_server.requests) == 1  # never retried
    assert counts(database_url, spec_for(corpus, OPENAI)).target_rows == 0
    with psycopg.connect(database_url) as conn:
        failed = conn.execute(
            "SELECT count(*), max(error) FROM embedding_migration_status "
            "WHERE target_table = %s AND status = 'failed'",
            [spec_for(corpus, OPENAI).target_table.name],
        ).fetchone()
    assert failed is not None and failed[0] == 1 and "quota" in failed[1].lower()
    status = cli(capsys, "migrate", "status", *base)
    assert "1 failed" in status.out and "quota" in status.out.lower()


def test_vectors_of_the_wrong_dimension_are_refused(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    embedding_api_key: str,
) -> None:
    monkeypatch.setenv("EMBEDSHIFT_TARGET_API_KEY", embedding_api_key)
    base = [*flags(database_url, corpus, OPENAI), "--target-base-url", embedding_server.url + "/v1"]
    assert cli(capsys, "migrate", "setup", *base).code == 0
    embedding_server.wrong_dimensions = True
    result = cli(capsys, "migrate", "run", *base)
    assert result.code == EXIT_PROVIDER_REFUSED
    assert "expected 64" in result.err and "nothing was stored" in result.err
    assert counts(database_url, spec_for(corpus, OPENAI)).target_rows == 0


def test_a_refused_key_is_reported_without_the_key(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
) -> None:
    monkeypatch.setenv("EMBEDSHIFT_TARGET_API_KEY", "sk-wrong-key-123456")
    base = [*flags(database_url, corpus, OPENAI), "--target-base-url", embedding_server.url + "/v1"]
    assert cli(capsys, "migrate", "setup", *base).code == 0
    result = cli(capsys, "migrate", "run", *base)
    assert result.code == EXIT_PROVIDER_REFUSED and "embedshift: error:" in result.err
    assert "sk-wrong-key-123456" not in result.err + result.out


async def test_a_failed_call_still_counts_what_its_earlier_requests_cost(
    database_url: str,
    request: pytest.FixtureRequest,
    embedding_server: EmbeddingServer,
    openai_provider: OpenAIFactory,
) -> None:
    """Money spent by the requests of a batch that later fails is recorded, so budgets see it."""
    table = table_name(request, "big")
    create_corpus(database_url, table=table, count=2500, source_dimensions=0)
    spec = spec_for(table, OPENAI)
    await setup(database_url, spec, migration="default/x")
    embedding_server.quota_after = 1  # the first request is billed, the second finds no quota
    provider = openai_provider(dimensions=64, concurrency=1)
    with pytest.raises(QuotaExceeded) as failure:
        # 2500 texts in one batch: more than OpenAI's 2048 inputs, so two requests.
        await run_migration(
            database_url,
            spec,
            provider=provider,
            options=RunOptions(batch_size=2500, concurrency=1),
            migration="default/x",
        )
    billed = sum(r.tokens for r in embedding_server.requests if r.status == 200)
    assert billed > 0 and failure.value.spent_tokens == billed
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT tokens, cost_usd FROM embedding_migration_status "
            "WHERE target_table = %s AND status = 'failed'",
            [spec.target_table.name],
        ).fetchone()
    assert row is not None and row[0] == billed and float(row[1]) > 0
    assert counts(database_url, spec).target_rows == 0  # all or nothing: nothing stored
