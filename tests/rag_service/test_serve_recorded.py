"""`embedshift serve --migration NS/NAME` serves what `migrate setup` recorded for that migration
(table, columns, v1 column, both models with their base URLs), with DATABASE_URL and the API keys
as its only environment; flags override the record. Started before setup, it waits: live, not
ready, saying so once, and serves the record as soon as setup writes it. When setup records
another data plane for the key, it switches between requests; the running ones finish.
Readiness (`/readyz`) follows the database alone: an embedding API outage leaves it 200."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
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
from tests.embedding_fixtures import EMBEDDING_API_KEY
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
def embedding_server() -> Iterator[EmbeddingServer]:
    """One embedding API (one baseURL) for the module: its tests set up one table, and a side
    table holds the vectors of one endpoint only."""
    with EmbeddingServer(api_key=EMBEDDING_API_KEY) as server:
        yield server


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


def local_flags(url: str, table: str, migration: str, target: str) -> list[str]:
    return [
        "--database-url", url, "--table", table, "--category-column", "category",
        "--source-column", "embedding", "--source", SOURCE, "--target", target,
        "--migration", migration,
    ]  # fmt: skip


def eventually(check: Callable[[], bool], what: str, within: float) -> float:
    """Seconds until ``check()`` holds; fails naming ``what`` after ``within`` seconds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"not within {within:g}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


def test_serve_started_before_setup_waits_then_serves_the_record(
    capsys: pytest.CaptureFixture[str],
    database_url: str,
    corpus: str,
    embedding_api_key: str,
    tmp_path: Path,
) -> None:
    """The chart installed with (or before) the EmbeddingMigration: the search pods start
    before the setup Job has recorded anything. They wait, live and not ready, instead of
    crash-looping, and serve within seconds of the record."""
    migration = "rag/later"
    log = tmp_path / "serve.log"
    process, base = start_serve(
        ["--migration", migration, "--reread-seconds", "0.5"],
        env=only_database_and_keys(database_url, embedding_api_key),
        log=log,
    )
    try:
        wait_healthy(process, base, log, path="/healthz")
        waiting = f"waiting for `embedshift migrate setup` to record {migration} in host="
        not_ready = httpx.get(f"{base}/readyz", timeout=5)
        assert not_ready.status_code == 503, not_ready.text
        assert not_ready.json()["ready"] is False
        assert not_ready.json()["waiting"].startswith(waiting), not_ready.json()
        assert "password" not in not_ready.text
        # Searches say why they are refused; /metrics answers (a scrape, a liveness probe).
        refused = httpx.post(f"{base}/api/rag/search", json={"query": "pool"}, timeout=5)
        assert refused.status_code == 503 and waiting in refused.json()["detail"]
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200

        time.sleep(2)  # four re-reads at 0.5 s: the log says it waits once, not at each
        lines = [line for line in log.read_text().splitlines() if waiting in line]
        assert len(lines) == 1, lines
        assert f"--migration {migration}: " in lines[0] and "dbname=" in lines[0]
        assert process.poll() is None  # still running: no crash loop

        flags = local_flags(database_url, corpus, migration, "local:hash@64")
        assert cli(capsys, "migrate", "setup", *flags).code == 0
        # The NOTIFY of setup wakes it at once; the re-read would within 0.5 s.
        ready_in = eventually(
            lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, "ready", 10
        )
        assert ready_in < 5
        assert cli(capsys, "migrate", "run", *flags).code == 0
        v1 = search(base, "ada")
        assert (v1["version"], v1["fallback"]) == ("v1", False) and v1["results"], v1
        asyncio.run(set_percentage(database_url, migration, 100))
        eventually(lambda: search(base, "ada")["percentage"] == 100, "routing 100 %", 15)
        v2 = search(base, "ada")
        assert (v2["version"], v2["fallback"]) == ("v2", False) and v2["results"], v2
    finally:
        code = stop(process)
    assert code == 0
    text = log.read_text()
    assert f"`embedshift migrate setup` recorded {migration}: serving it" in text
    assert f"serving {migration}: v1 {SOURCE}, v2 local:hash@64" in text
    assert "Traceback" not in text


def test_a_new_record_is_served_in_place_and_running_searches_finish(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    embedding_api_key: str,
    tmp_path: Path,
) -> None:
    """A spec edit of the target re-migrates: setup records the new target for the same key.
    The running service switches to it (no restart, no readiness gap); a search running on the
    previous target at that moment is answered by it, not dropped."""
    migration = "rag/switch"
    before = setup_flags(database_url, corpus, migration, embedding_server.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", embedding_api_key)
    assert cli(capsys, "migrate", "setup", *before).code == 0
    assert cli(capsys, "migrate", "run", *before).code == 0
    log = tmp_path / "serve.log"
    token = "a-test-token"  # the override needs the webhook's bearer token
    process, base = start_serve(
        ["--migration", migration, "--allow-version-override"],
        env={
            **only_database_and_keys(database_url, embedding_api_key),
            "ALERT_WEBHOOK_SECRET": token,
        },
        log=log,
    )
    forced_v2 = {"X-Embedding-Version": "v2", "Authorization": f"Bearer {token}"}
    try:
        wait_healthy(process, base, log, path="/readyz")
        answers: list[httpx.Response] = []

        def slow_search() -> None:
            answers.append(
                httpx.post(
                    f"{base}/api/rag/search",
                    json={"query": f"a query in flight {time.time()}", "k": 5},
                    headers=forced_v2,
                    timeout=30,
                )
            )

        embedding_server.latency = 3.0  # the previous target's API: this search takes 3 s
        running = threading.Thread(target=slow_search)
        running.start()
        time.sleep(0.5)
        after = local_flags(database_url, corpus, migration, "local:hash@48")
        assert cli(capsys, "migrate", "setup", *after).code == 0  # routes 0 %: allowed
        switched = f"the record of {migration} changed"
        eventually(lambda: switched in log.read_text(), "the switch", 10)
        assert running.is_alive()  # the switch happened while the search ran
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        running.join(timeout=30)
        embedding_server.latency = 0.0
        (answer,) = answers
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == "v2" and answer.json()["fallback"] is False
        assert answer.json()["results"], answer.json()  # the previous side table answered

        health = httpx.get(f"{base}/api/rag/v2/health", timeout=30).json()
        assert health["checks"]["provider"]["detail"] == "local:hash@48", health
        assert cli(capsys, "migrate", "run", *after).code == 0
        new = httpx.post(
            f"{base}/api/rag/search", json={"query": "pool", "k": 5}, headers=forced_v2, timeout=30
        )
        # 48-dimensional query vectors against the new side table: the new target serves.
        assert new.status_code == 200, new.text
        assert new.json()["version"] == "v2" and new.json()["results"], new.json()
        assert process.poll() is None  # switched in place, not restarted
    finally:
        embedding_server.latency = 0.0
        code = stop(process)
    assert code == 0
    text = log.read_text()
    (line,) = [x for x in text.splitlines() if switched in x]
    assert (
        f"switched from v1 {SOURCE}, v2 {TARGET} on {corpus} to v1 {SOURCE}, v2 local:hash@48"
        in line
    )
    assert f"serving {migration}: v1 {SOURCE}, v2 local:hash@48" in text
    assert "Traceback" not in text


def test_a_new_record_it_cannot_serve_turns_the_replica_unready_not_wrong(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    corpus: str,
    embedding_server: EmbeddingServer,
    embedding_api_key: str,
    tmp_path: Path,
) -> None:
    """The new target's API key is not in the service's environment: one ERROR line, and the
    replica leaves the Service (not ready) rather than answer from the data plane setup
    replaced; it keeps running, and is ready again once the record is one it can serve."""
    migration = "rag/nokey"
    served = local_flags(database_url, corpus, migration, "local:hash@64")
    assert cli(capsys, "migrate", "setup", *served).code == 0
    log = tmp_path / "serve.log"
    no_keys = {k: v for k, v in only_database_and_keys(database_url, "").items() if v}
    process, base = start_serve(["--migration", migration], env=no_keys, log=log)
    try:
        wait_healthy(process, base, log, path="/readyz")
        monkeypatch.setenv("OPENAI_API_KEY", embedding_api_key)  # setup's, not the service's
        unservable = setup_flags(database_url, corpus, migration, embedding_server.openai_base_url)
        assert cli(capsys, "migrate", "setup", *unservable).code == 0
        refused = f"cannot serve what `embedshift migrate setup` recorded for {migration}"
        eventually(lambda: refused in log.read_text(), "the refusal", 10)
        stale = httpx.get(f"{base}/readyz", timeout=5)
        assert stale.status_code == 503, stale.text
        assert stale.json()["stale"].startswith("cannot serve the record: no API key for target")
        assert "OPENAI_API_KEY" in stale.json()["stale"]
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        # Back to a record it can serve (the one it serves): ready again, nothing switched.
        assert cli(capsys, "migrate", "setup", *served).code == 0
        eventually(
            lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, "ready again", 10
        )
        health = httpx.get(f"{base}/api/rag/v2/health", timeout=30).json()
        assert health["checks"]["provider"]["detail"] == "local:hash@64", health
    finally:
        code = stop(process)
    assert code == 0
    lines = log.read_text().splitlines()
    (line,) = [x for x in lines if refused in x]
    assert " ERROR " in line and "OPENAI_API_KEY" in line, line
    assert line.endswith(
        f"; still serving v1 {SOURCE}, v2 local:hash@64 to what reaches it, but not ready until "
        "the record can be served"
    ), line
    assert not [x for x in lines if "changed" in x or "Traceback" in x], lines


def test_serve_waits_for_an_unreachable_database_without_its_password(tmp_path: Path) -> None:
    """The database may come up after the search pods: they wait for it as for the record."""
    url = f"postgresql://app:s3cret-pw@127.0.0.1:{free_port()}/rag"
    log = tmp_path / "serve.log"
    process, base = start_serve(
        ["--migration", "rag/db-later", "--reread-seconds", "0.5"],
        env=only_database_and_keys(url, "unused"),
        log=log,
    )
    try:
        wait_healthy(process, base, log, path="/healthz")
        eventually(lambda: "cannot connect" in log.read_text(), "the log says why", 20)
        time.sleep(2)  # re-read four times: said once
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 503
        body = ready.json()
        assert body["waiting"] == (
            "waiting for `embedshift migrate setup` to record rag/db-later in "
            "host=127.0.0.1 port=" + url.rsplit(":", 1)[1].split("/")[0] + " dbname=rag"
        )
        assert body["error"].startswith("cannot connect to the database (host=127.0.0.1"), body
        assert process.poll() is None
    finally:
        code = stop(process)
    assert code == 0
    text = log.read_text()
    assert "s3cret-pw" not in text + ready.text
    assert len([x for x in text.splitlines() if "cannot connect" in x]) == 1, text


def test_serve_without_a_key_or_a_database_is_one_line_at_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """Nothing to wait for: what a person must fix is exit 2 at once, not a waiting pod."""
    for name in (
        "EMBEDSHIFT_MIGRATION", "EMBEDSHIFT_TABLE", "EMBEDSHIFT_TARGET", "EMBEDSHIFT_CONFIG",
        "DATABASE_URL",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    port = str(free_port())
    no_key = cli(capsys, "serve", "--database-url", database_url, "--port", port)
    assert no_key.code == 2, no_key
    (line,) = no_key.err.splitlines()
    assert line.startswith("embedshift: error: --migration: which migration to serve?")
    no_url = cli(capsys, "serve", "--migration", "rag/nobody", "--port", port)
    assert no_url.code == 2, no_url
    (line,) = no_url.err.splitlines()
    assert line.startswith("embedshift: error: DATABASE_URL is not set")


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
