"""`embedshift serve` as deployed, a process of its own, with the flags that bound it: a search
past --search-timeout is a 504, a statement past --statement-timeout is that search's error (v2
falls back to v1), the shared query cache is cut to --query-cache-max-rows, and what shows the
rollout needs ALERT_WEBHOOK_SECRET. The real PostgreSQL, the real OpenAI SDK in the service
talking to the local embedding API (made slow on purpose), plain HTTP from outside."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from rag_service.routing import bucket
from rag_service.schema import QUERY_CACHE_TABLE, ident, layout_for
from rag_service.spec import DataPlaneSpec, EmbeddingSpec
from rag_service.testing import EmbeddingServer
from rag_service.testing.corpus import corpus_spec, create_corpus
from rag_service.testing.service_process import start_serve, wait_healthy
from tests.embedding_fixtures import EMBEDDING_API_KEY, migrate_through_openai

TABLE = "limits_docs"
MIGRATION = "rag/limits"
SECRET = "limits-webhook-s3cret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


@dataclass(frozen=True)
class Served:
    url: str  # the database
    api: EmbeddingServer
    spec: DataPlaneSpec
    base: str  # the service
    log: Path


def v2_user() -> str:
    """A user the routing row's 50 % sends to v2."""
    return next(
        u for u in (f"user-{i}" for i in range(100)) if bucket(migration=MIGRATION, key=u) < 50
    )


@pytest.fixture(scope="module")
def served(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """300 documents migrated to openai:text-embedding-3-small@256 through the local API and
    indexed, 20
    rows already in the shared query cache, and `embedshift serve` started with tight bounds."""
    with EmbeddingServer(api_key=EMBEDDING_API_KEY) as api:
        create_corpus(database_url, table=TABLE, count=300, source_dimensions=64)
        target = EmbeddingSpec.parse("openai:text-embedding-3-small@256").model_dump(
            include={"provider", "model", "dimensions"}
        )
        spec = corpus_spec(
            TABLE, source_dimensions=64, target={**target, "baseURL": api.openai_base_url}
        )

        migrate_through_openai(database_url, spec, migration=MIGRATION, batch_size=300)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {QUERY_CACHE_TABLE} (descriptor, query_hash, embedding, created_at) "
                "SELECT 'local:hash@3', sha256(i::text::bytea), '[1,2,3]', "
                "now() - make_interval(secs => i) FROM generate_series(1, 20) AS i"
            )
            conn.execute(
                "UPDATE embedshift_rollout SET percentage = 50 WHERE migration = %s", [MIGRATION]
            )
        log = tmp_path_factory.mktemp("serve") / "serve.log"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "ALERT_WEBHOOK_SECRET": SECRET,
            "EMBEDSHIFT_TARGET_API_KEY": EMBEDDING_API_KEY,
        }
        flags = [
            "--migration", MIGRATION, "--reread-seconds", "0.5",
            "--search-timeout", "1.5", "--statement-timeout", "0.5",
            "--query-cache-max-rows", "5", "--query-cache-ttl", "1h",
        ]  # fmt: skip
        process, base = start_serve(flags, env=env, log=log)
        try:
            wait_healthy(process, base, log, version="v2", timeout=60)
            yield Served(database_url, api, spec, base, log)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(autouse=True)
def fast_api(served: Served) -> None:
    served.api.configure({"latency": 0.0})


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def search(served: Served, query: str, **headers: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(
        f"{served.base}/api/rag/search",
        json={"query": query},
        headers={"X-User-Id": v2_user(), **headers},
        timeout=30,
    )
    return response, time.monotonic() - started


def test_the_shared_query_cache_is_cut_to_its_cap_at_start(served: Served) -> None:
    """Started over a table of 20 old rows with --query-cache-max-rows 5: the oldest go (and
    the service's own rows since, its health check's, count towards the cap at the next
    round)."""
    age = {hashlib.sha256(str(i).encode()).digest(): i for i in range(1, 21)}  # seconds old
    for _ in range(100):
        with psycopg.connect(served.url) as conn:
            ours = conn.execute(
                f"SELECT query_hash FROM {QUERY_CACHE_TABLE} WHERE descriptor = 'local:hash@3'"
            ).fetchall()
        if len(ours) <= 5:
            break
        time.sleep(0.1)
    kept = sorted(age[bytes(row[0])] for row in ours)
    assert kept == list(range(1, len(kept) + 1)) and len(kept) <= 5, kept  # the newest


def test_a_search_past_search_timeout_is_a_504_and_an_error(served: Served) -> None:
    before = metric(served.base, "embedshift_search_requests_total", version="v2", outcome="error")
    served.api.configure({"latency": 3.0})  # under the query embedding's own 5 s give-up
    response, took = search(served, "a slow embedding")
    assert response.status_code == 504, response.text
    assert "deadline of 1.5 s" in response.json()["detail"]
    assert 1.4 <= took < 3.0, took
    after = metric(served.base, "embedshift_search_requests_total", version="v2", outcome="error")
    assert after == before + 1
    served.api.configure({"latency": 0.0})
    again, _ = search(served, "a fast embedding")
    assert again.status_code == 200 and again.json()["version"] == "v2", again.text


def test_a_statement_past_statement_timeout_falls_back_to_v1(served: Served) -> None:
    target = layout_for(served.spec, id_type="bigint").target
    with psycopg.connect(served.url) as locker:
        locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(ident(target)))
        response, took = search(served, "v2's table is locked")
        locker.rollback()
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["version"] == "v1" and answer["fallback"] is True and answer["results"]
    assert took < 1.4, took  # the statement timeout (0.5 s), not the search's deadline
    log = served.log.read_text()
    assert "canceling statement due to statement timeout" in log


def test_the_rollout_is_served_to_the_token_only(served: Served) -> None:
    for path in ("/api/monitoring/rollout", "/api/monitoring/dashboard", "/api/alerts/webhook"):
        assert httpx.get(f"{served.base}{path}", timeout=10).status_code == 401, path
        wrong = httpx.get(f"{served.base}{path}", headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 403, path
        assert httpx.get(f"{served.base}{path}", headers=AUTH, timeout=10).status_code == 200
    assert "ALERT_WEBHOOK_SECRET is not set" not in served.log.read_text()
