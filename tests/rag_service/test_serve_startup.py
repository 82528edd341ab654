"""`serve` says at start-up when v2 is not ready: no side table (v2 searches fail and fall back
to v1), no usable index (v2 searches scan the whole table); and nothing once both exist."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import httpx
import psycopg
import pytest

from rag_service.indexes import build_index
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers import make_provider
from rag_service.providers.pricing import PriceTable
from rag_service.schema import layout_for, setup
from rag_service.service import ServiceSettings
from rag_service.testing.corpus import corpus_spec, create_corpus
from rag_service.testing.service_process import start_serve, wait_healthy
from tests.service_harness import serving

TABLE = "svc_startup"
MIGRATION = "rag/startup"


def v2_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "embedshift.service"
    ]


async def test_serve_warns_while_v2_is_not_ready(
    caplog: pytest.LogCaptureFixture, database_url: str
) -> None:
    caplog.set_level(logging.INFO, logger="embedshift.service")
    create_corpus(database_url, table=TABLE, count=200, source_dimensions=32)
    spec = corpus_spec(TABLE, source_dimensions=32, target="local:hash@64")
    layout = layout_for(spec, id_type="bigint")
    settings = ServiceSettings(database_url=database_url, spec=spec, migration=MIGRATION)

    async with serving(settings) as running:  # before `migrate setup`
        assert (await running.client.get("/api/rag/v1/health")).status_code == 200  # v1 serves
    (warning,) = v2_warnings(caplog)
    assert f"v2 side table {layout.target} does not exist" in warning
    assert "`embedshift migrate setup` and `embedshift migrate run`" in warning

    caplog.clear()
    await setup(database_url, spec, migration=MIGRATION)
    async with serving(settings):  # set up, not indexed
        pass
    (warning,) = v2_warnings(caplog)
    assert f"v2 index {layout.index_name} does not exist" in warning
    assert "`embedshift migrate index`" in warning

    caplog.clear()
    provider = make_provider(spec.target, api_key=None)
    try:
        await run_migration(
            database_url, spec, provider=provider, options=RunOptions(), migration=MIGRATION
        )
    finally:
        await provider.aclose()
    await build_index(database_url, spec)
    async with serving(settings):  # ready
        pass
    assert v2_warnings(caplog) == []
    assert any("serving rag/startup" in r.getMessage() for r in caplog.records)


async def test_serve_warns_about_an_invalid_index(
    caplog: pytest.LogCaptureFixture, database_url: str
) -> None:
    """An interrupted CREATE INDEX CONCURRENTLY leaves an invalid index PostgreSQL never uses."""
    caplog.set_level(logging.INFO, logger="embedshift.service")
    table = f"{TABLE}_invalid"
    create_corpus(database_url, table=table, count=50, source_dimensions=32)
    spec = corpus_spec(table, source_dimensions=32, target="local:hash@64")
    layout = layout_for(spec, id_type="bigint")
    await setup(database_url, spec, migration=f"{MIGRATION}-invalid")
    await build_index(database_url, spec)
    with psycopg.connect(database_url, autocommit=True) as conn:  # what an interruption leaves
        conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s::regclass",
            [layout.target.sibling(layout.index_name).regclass_text],
        )
    settings = ServiceSettings(
        database_url=database_url, spec=spec, migration=f"{MIGRATION}-invalid"
    )
    async with serving(settings):
        pass
    (warning,) = v2_warnings(caplog)
    assert f"v2 index {layout.index_name} is invalid" in warning


def test_embedshift_serve_binds_serves_and_logs_the_warning(
    database_url: str, tmp_path: Path
) -> None:
    """The real command in a process: the socket it binds before starting serves requests,
    the warning is in its log, and SIGTERM shuts it down gracefully."""
    table = f"{TABLE}_process"
    create_corpus(database_url, table=table, count=50, source_dimensions=32)
    log = tmp_path / "serve.log"
    flags = [
        "--database-url", database_url, "--table", table, "--category-column", "category",
        "--source-column", "embedding", "--source", "local:hash@32", "--target", "local:hash@64",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "ALERT_WEBHOOK_SECRET"}
    process, base = start_serve(flags, env=env, log=log)
    try:
        wait_healthy(process, base, log, version="v1", timeout=60)
        found = httpx.post(f"{base}/api/rag/search", json={"query": "pool hours"}, timeout=10)
        assert found.status_code == 200, found.text
        assert found.json()["version"] == "v1"
        # Without the secret, what shows the rollout is not served to anyone: fail closed.
        closed = httpx.get(f"{base}/api/monitoring/rollout", timeout=10)
        assert closed.status_code == 503, closed.text
        assert "ALERT_WEBHOOK_SECRET is not set" in closed.json()["detail"]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0  # a graceful stop, not death by the signal (uvicorn raises it again)
    text = log.read_text()
    assert "Application shutdown complete" in text
    assert f"listening on {base}" in text
    assert "WARNING embedshift.service: v2 side table" in text and "does not exist" in text
    # Said once, at start-up: what is off without ALERT_WEBHOOK_SECRET.
    (unset,) = [line for line in text.splitlines() if "ALERT_WEBHOOK_SECRET is not set" in line]
    assert "WARNING embedshift.serve" in unset and "/api/monitoring/rollout" in unset
    assert "Traceback" not in text


async def test_serve_warns_when_a_models_price_is_unknown(
    caplog: pytest.LogCaptureFixture, database_url: str
) -> None:
    """An unpriced v2 counts $0: the cost-vs-v1 criterion would pass it whatever it costs."""
    caplog.set_level(logging.INFO, logger="embedshift.service")
    table = f"{TABLE}_price"
    create_corpus(database_url, table=table, count=20, source_dimensions=32)
    unpriced = corpus_spec(table, source_dimensions=32, target="openai:my-finetune@64")
    async with serving(
        ServiceSettings(
            database_url=database_url, spec=unpriced, migration=MIGRATION, target_api_key="unused"
        )
    ):
        pass
    (warning,) = [w for w in v2_warnings(caplog) if "no known price" in w]
    assert warning.startswith("v2 openai:my-finetune@64 has no known price")
    assert "usdPerMillionTokens" in warning and "--price openai:my-finetune=" in warning

    caplog.clear()
    priced = unpriced.model_copy(
        update={"target": unpriced.target.model_copy(update={"usd_per_million_tokens": 0.5})}
    )
    settings = ServiceSettings(
        database_url=database_url,
        spec=priced,
        migration=MIGRATION,
        target_api_key="unused",
        prices=PriceTable().with_spec_prices(priced.source, priced.target),
    )
    async with serving(settings):
        pass
    assert [w for w in v2_warnings(caplog) if "no known price" in w] == []


async def test_a_missing_api_key_fails_start_up_at_once(
    caplog: pytest.LogCaptureFixture, database_url: str
) -> None:
    """Checked before the pool opens, so nothing is left connecting (it once hung the loop)."""
    spec = corpus_spec(f"{TABLE}_nokey", source_dimensions=32, target="openai:my-finetune@64")
    with pytest.raises(RuntimeError, match="did not start"):
        async with serving(ServiceSettings(database_url=database_url, spec=spec, migration="a/b")):
            pass
    assert any(
        "no API key for target openai:my-finetune@64" in r.getMessage() for r in caplog.records
    )
