"""Hostile input, counted: HTTP requests, EmbeddingMigration specs and CLI flags built to break
the parser, the SQL, the PromQL or the YAML, each refused with a clear answer that changes
nothing.

Every case runs against the real parts (the search service under uvicorn, ``embedshift rollout
run`` and the other commands as a user runs them, one real PostgreSQL) and is followed by the same
check: every table of the database holds exactly what it held before (the shared query-embedding
cache excepted: a valid but odd query may fill it), and the service still answers a plain search.
The cases are tables; ``test_the_suite_is_at_least_sixty_strong`` counts them.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from embedshift_operator.cli import main
from rag_service.schema import QUERY_CACHE_TABLE, setup
from rag_service.service import ServiceSettings
from rag_service.testing.corpus import corpus_spec, create_corpus
from tests.service_harness import serving

TABLE = "hostile_docs"
MIGRATION = "rag/hostile"
SECRET = "hostile-webhook-token-0123456789"
EMBEDSHIFT = Path(sys.executable).with_name("embedshift")
# What the YAML exploit below would create.
PWNED = Path("/tmp/embedshift-hostile-pwned")


@pytest.fixture(scope="module")
def world(database_url: str) -> Iterator[str]:
    """40 documents with 64-d v1 vectors, set up for a 32-d target, routed 0 % to v2."""
    create_corpus(database_url, table=TABLE, count=40, source_dimensions=64)
    spec = corpus_spec(TABLE, source_dimensions=64, target="local:hash@32")
    asyncio.run(setup(database_url, spec, migration=MIGRATION))
    yield database_url


def snapshot(url: str) -> dict[str, str]:
    """Every table of the database, each as a digest of all its rows."""
    with psycopg.connect(url) as conn:
        tables = [
            (str(schema), str(name))
            for schema, name in conn.execute(
                "SELECT schemaname, tablename FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') AND tablename <> %s",
                [QUERY_CACHE_TABLE],
            ).fetchall()
        ]
        digests = {}
        for schema, name in tables:
            row = conn.execute(
                psycopg.sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
                    " FROM {} t"
                ).format(psycopg.sql.Identifier(schema, name))
            ).fetchone()
            digests[f"{schema}.{name}"] = repr(row)
    return digests


# ---------------------------------------------------------------------------------------------
# HTTP: the search service


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: tuple[int, ...]  # what a clear refusal is here
    body: bytes | None = None
    json_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    said: str = ""  # what the answer must say (its field or reason)


def deep(levels: int) -> bytes:
    return b'{"query": ' + b"[" * levels + b"]" * levels + b"}"


AUTH = {"Authorization": f"Bearer {SECRET}"}
JSON = {"content-type": "application/json"}
HTTP: dict[str, Request] = {
    "search-not-json": Request("POST", "/api/rag/search", (422,), body=b"{", headers=JSON),
    "search-array": Request("POST", "/api/rag/search", (422,), json_body=[1, 2]),
    "search-string": Request("POST", "/api/rag/search", (422,), json_body="pool"),
    "search-null-query": Request("POST", "/api/rag/search", (422,), json_body={"query": None},
                                 said="query"),
    "search-number-query": Request("POST", "/api/rag/search", (422,), json_body={"query": 7},
                                   said="query"),
    "search-object-query": Request("POST", "/api/rag/search", (422,),
                                   json_body={"query": {"$ne": ""}}, said="query"),
    "search-nested-100k": Request("POST", "/api/rag/search", (400, 422), body=deep(100_000),
                                  headers=JSON),
    "search-empty-query": Request("POST", "/api/rag/search", (422,), json_body={"query": ""},
                                  said="query"),
    "search-blank-unicode": Request("POST", "/api/rag/search", (422,),
                                    json_body={"query": "\u2003\u3000\n\t"}, said="query"),
    "search-over-max-chars": Request("POST", "/api/rag/search", (422,),
                                     json_body={"query": "x" * 5000}, said="query"),
    "search-nfkc-expanding": Request("POST", "/api/rag/search", (200, 422),
                                     json_body={"query": "\ufdfa" * 150}),
    "search-nul-byte": Request("POST", "/api/rag/search", (200, 422),
                               json_body={"query": "pool\x00; DROP TABLE hostile_docs"}),
    "search-lone-surrogate": Request("POST", "/api/rag/search", (422,),
                                     body=b'{"query": "pool \\ud800 hours"}', headers=JSON),
    "search-bidi-override": Request("POST", "/api/rag/search", (200,),
                                    json_body={"query": "pool \u202e sruoh"}),
    "search-k-negative": Request("POST", "/api/rag/search", (422,),
                                 json_body={"query": "pool", "k": -1}, said="k"),
    "search-k-huge": Request("POST", "/api/rag/search", (422,),
                             json_body={"query": "pool", "k": 10**12}, said="k"),
    "search-k-float": Request("POST", "/api/rag/search", (422,),
                              json_body={"query": "pool", "k": 5.5}, said="k"),
    "search-k-bigint-text": Request("POST", "/api/rag/search", (400, 422), headers=JSON,
                                    body=b'{"query": "pool", "k": ' + b"9" * 5000 + b"}"),
    "search-min-similarity-nan": Request("POST", "/api/rag/search", (422,), headers=JSON,
                                         body=b'{"query": "pool", "min_similarity": NaN}',
                                         said="min_similarity"),
    "search-category-sql": Request("POST", "/api/rag/search", (200,),
                                   json_body={"query": "pool", "category": "x' OR '1'='1"}),
    "search-category-object": Request("POST", "/api/rag/search", (422,),
                                      json_body={"query": "pool", "category": ["a"]},
                                      said="category"),
    "search-text-plain": Request("POST", "/api/rag/search", (422,),
                                 body=b'{"query": "pool"}', headers={"content-type": "text/plain"}),
    "search-huge-user-id": Request(
        "POST", "/api/rag/search", (200, 400, 431), json_body={"query": "pool"},
        headers={"X-User-Id": "u" * 60_000},
    ),
    "search-version-override-without-token": Request(
        "POST", "/api/rag/search", (401, 403), json_body={"query": "pool"},
        headers={"X-Embedding-Version": "v2"},
    ),
    "search-version-override-wrong-token": Request(
        "POST", "/api/rag/search", (403,), json_body={"query": "pool"},
        headers={"X-Embedding-Version": "v2", "Authorization": "Bearer guess"},
    ),
    "search-version-unknown": Request(
        "POST", "/api/rag/search", (422,), json_body={"query": "pool"},
        headers={"X-Embedding-Version": "v2; DROP", **AUTH}, said="X-Embedding-Version",
    ),
    "webhook-no-token": Request(
        "POST", "/api/alerts/webhook", (401,),
        json_body={"type": "error_rate", "severity": "critical", "value": 1, "threshold": 0.1},
    ),
    "webhook-wrong-token": Request(
        "POST", "/api/alerts/webhook", (403,), headers={"Authorization": "Bearer nope"},
        json_body={"type": "error_rate", "severity": "critical", "value": 1, "threshold": 0.1},
    ),
    "webhook-basic-scheme": Request(
        "POST", "/api/alerts/webhook", (401,), headers={"Authorization": f"Basic {SECRET}"},
        json_body={"type": "error_rate", "severity": "critical", "value": 1, "threshold": 0.1},
    ),
    "webhook-token-prefix": Request(
        "POST", "/api/alerts/webhook", (403,), headers={"Authorization": f"Bearer {SECRET[:-1]}"},
        json_body={"type": "error_rate", "severity": "critical", "value": 1, "threshold": 0.1},
    ),
    "webhook-huge-token": Request(
        "POST", "/api/alerts/webhook", (400, 403, 431),
        headers={"Authorization": "Bearer " + "t" * 60_000},
        json_body={"type": "error_rate", "severity": "critical", "value": 1, "threshold": 0.1},
    ),
    "webhook-not-json": Request("POST", "/api/alerts/webhook", (422,), body=b"[", headers=AUTH),
    "webhook-alerts-not-a-list": Request(
        "POST", "/api/alerts/webhook", (422,), headers=AUTH,
        json_body={"version": "4", "status": "firing", "alerts": {"labels": {}}},
    ),
    "webhook-alert-without-name": Request(
        "POST", "/api/alerts/webhook", (422,), headers=AUTH, said="alertname",
        json_body={"version": "4", "status": "firing",
                   "alerts": [{"status": "firing", "labels": {"severity": "critical"}}]},
    ),
    "webhook-labels-not-strings": Request(
        "POST", "/api/alerts/webhook", (422,), headers=AUTH,
        json_body={"version": "4", "status": "firing",
                   "alerts": [{"status": "firing", "labels": {"alertname": ["x"],
                                                             "severity": "critical"}}]},
    ),
    "webhook-unknown-status": Request(
        "POST", "/api/alerts/webhook", (422,), headers=AUTH, said="status",
        json_body={"type": "error_rate", "severity": "critical", "status": "exploded"},
    ),
    "webhook-value-infinite": Request(
        "POST", "/api/alerts/webhook", (422,), headers={**AUTH, **JSON},
        body=b'{"type": "error_rate", "severity": "critical", "value": Infinity, '
             b'"threshold": 0.1}',
    ),
    "webhook-empty-object": Request("POST", "/api/alerts/webhook", (422,), headers=AUTH,
                                    json_body={}),
    "alerts-history-no-token": Request("GET", "/api/alerts/webhook", (401, 503)),
    "alerts-history-bad-severity": Request("GET", "/api/alerts/webhook?severity=%3Cscript%3E",
                                           (422,), headers=AUTH, said="severity"),
    "rollout-view-no-token": Request("GET", "/api/monitoring/rollout", (401, 503)),
    "dashboard-range-promql": Request(
        "GET", "/api/monitoring/dashboard?range=1h%5D)%20or%20vector(1)%20%23", (401, 422),
    ),
    "dashboard-range-promql-with-token": Request(
        "GET", "/api/monitoring/dashboard?range=1h%5D)%20or%20vector(1)%20%23", (422,),
        headers=AUTH, said="range",
    ),
    "path-traversal": Request("GET", "/dashboard/..%2F..%2Fetc%2Fpasswd", (404,)),
    "search-wrong-method": Request("DELETE", "/api/rag/search", (405,)),
    "metrics-post": Request("POST", "/metrics", (405,)),
}  # fmt: skip


@pytest.mark.parametrize("case", HTTP)
async def test_a_hostile_request_is_refused_and_changes_nothing(world: str, case: str) -> None:
    request = HTTP[case]
    spec = corpus_spec(TABLE, source_dimensions=64, target="local:hash@32")
    settings = ServiceSettings(
        database_url=world, spec=spec, migration=MIGRATION, webhook_secret=SECRET,
        max_query_chars=2000, allow_version_override=True,
    )  # fmt: skip
    before = snapshot(world)
    async with serving(settings) as svc:
        content = (
            request.body if request.json_body is None else json.dumps(request.json_body).encode()
        )
        headers = dict(request.headers)
        if request.json_body is not None:
            headers.setdefault("content-type", "application/json")
        answer = await svc.client.request(
            request.method, request.path, content=content, headers=headers
        )
        assert answer.status_code in request.status, (case, answer.status_code, answer.text[:500])
        assert request.said in answer.text, (case, answer.text[:500])
        assert "Traceback" not in answer.text and SECRET not in answer.text
        plain = await svc.client.post("/api/rag/search", json={"query": "pool opening hours"})
        assert plain.status_code == 200, plain.text
        assert plain.json()["version"] == "v1"  # no emergency, no override: 0 % to v2 still
    assert snapshot(world) == before, case


# ---------------------------------------------------------------------------------------------
# Specs: `embedshift rollout run FILE`


BASE: dict[str, Any] = {
    "apiVersion": "embedshift.io/v1alpha1",
    "kind": "EmbeddingMigration",
    "metadata": {"name": "hostile", "namespace": "rag"},
    "spec": {
        "database": {
            "table": TABLE,
            "textColumn": "content",
            "categoryColumn": "category",
            "sourceEmbeddingColumn": "embedding",
        },
        "source": {"provider": "local", "model": "hash", "dimensions": 64},
        "target": {"provider": "local", "model": "hash", "dimensions": 32},
        "migration": {"batchSize": 20},
        "rollout": {"steps": [{"percentage": 10, "minDuration": "1m"}, {"percentage": 100}]},
        "analysis": {"prometheus": {"url": "http://127.0.0.1:9"}, "interval": "30s"},
    },
}


def edited(path: str, value: Any) -> dict[str, Any]:
    """BASE with the dotted ``path`` set to ``value``."""
    manifest = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = manifest
    for part in parents:
        node = node[part]
    node[last] = value
    return manifest


def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        previous, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\nspec: *i\n"


@dataclass(frozen=True)
class Spec:
    text: str
    said: str  # the field (or the problem) the refusal names


def spec(path: str, value: Any, said: str | None = None) -> Spec:
    return Spec(yaml.safe_dump(edited(path, value)), said or path.removeprefix("spec."))


SPECS: dict[str, Spec] = {
    "name-promql": spec("metadata.name", 'docs"} or vector(1) #', "metadata.name"),
    "name-too-long": spec("metadata.name", "a" * 300, "metadata.name"),
    "namespace-spaces": spec("metadata.namespace", "Kube System", "metadata.namespace"),
    "table-sql": spec("spec.database.table", "docs; DROP TABLE hostile_docs", "database.table"),
    "text-column-sql": spec("spec.database.textColumn", 'content" OR 1=1 --'),
    "category-column-nul": spec("spec.database.categoryColumn", "category\x00x"),
    "id-column-empty": spec("spec.database.idColumn", ""),
    "model-promql": spec("spec.target.model", 'hash"} or vector(1) #', "target.model"),
    "model-newline": spec("spec.target.model", "hash\nX: 1", "target.model"),
    "dimensions-zero": spec("spec.target.dimensions", 0, "target.dimensions"),
    "dimensions-over-pgvector": spec("spec.target.dimensions", 16001, "target.dimensions"),
    "dimensions-text": spec("spec.target.dimensions", "32; DROP", "target.dimensions"),
    "dimensions-infinite": spec("spec.target.dimensions", float("inf"), "target.dimensions"),
    "provider-unknown": spec("spec.target.provider", "evil", "target.provider"),
    "base-url-file": spec("spec.target.baseURL", "file:///etc/passwd", "target.baseURL"),
    "base-url-newline": spec("spec.target.baseURL", "http://127.0.0.1:1/v1\nHost: x",
                             "target.baseURL"),
    "steps-descending": spec("spec.rollout.steps", [{"percentage": 50}, {"percentage": 25}],
                             "rollout.steps"),
    "step-over-100": spec("spec.rollout.steps", [{"percentage": 101}], "percentage"),
    "step-negative": spec("spec.rollout.steps", [{"percentage": -1}], "percentage"),
    "steps-empty": spec("spec.rollout.steps", [], "rollout.steps"),
    "min-duration-negative": spec("spec.rollout.steps", [{"percentage": 10, "minDuration": "-1s"}],
                                  "minDuration"),
    "min-duration-enormous": spec("spec.rollout.steps",
                                  [{"percentage": 10, "minDuration": "99999999999999999h"}],
                                  "minDuration"),
    "interval-zero": spec("spec.analysis.interval", "0s", "analysis.interval"),
    "interval-words": spec("spec.analysis.interval", "5 minutes", "analysis.interval"),
    "criterion-nan": spec("spec.analysis.successCriteria",
                          [{"name": "x", "metric": "error_rate", "max": float("nan")}], "max"),
    "criterion-unknown-metric": spec("spec.analysis.successCriteria",
                                     [{"name": "x", "metric": "$(rm -rf /)", "max": 1}], "metric"),
    "max-percentage-150": spec("spec.rollout.maxPercentage", 150, "maxPercentage"),
    "batch-size-zero": spec("spec.migration.batchSize", 0, "batchSize"),
    "budget-negative": spec("spec.migration.budgetUSD", -5, "budgetUSD"),
    "kind-wrong": spec("kind", "Deployment", "kind"),
    "yaml-billion-laughs": Spec(billion_laughs(), "spec"),
    "yaml-python-object": Spec(
        f'!!python/object/apply:os.system ["touch {PWNED}"]\n', "constructor for the tag"
    ),
    "yaml-two-documents": Spec(yaml.safe_dump(BASE) + "---\n" + yaml.safe_dump(BASE), "document"),
    "yaml-a-list": Spec("- a\n- b\n", "mapping"),
    "yaml-broken": Spec("spec: {database: [\n", "YAML"),
    "yaml-not-utf8": Spec("\udcff\udcfe spec: x\n", "UTF-8"),
}  # fmt: skip


@pytest.mark.parametrize("case", SPECS)
def test_a_hostile_spec_is_refused_and_changes_nothing(
    world: str, case: str, tmp_path: Path
) -> None:
    path = tmp_path / "migration.yaml"
    path.write_bytes(SPECS[case].text.encode("utf-8", "surrogateescape"))
    before = snapshot(world)
    done = subprocess.run(
        [str(EMBEDSHIFT), "rollout", "run", str(path), "--json", "--until", "Failed,Succeeded",
         "--log-dir", str(tmp_path / "logs")],
        env={**os.environ, "DATABASE_URL": world}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode == 2, (case, said[-2000:])
    assert SPECS[case].said.lower() in said.lower(), (case, said[-2000:])
    assert "Traceback" not in said, said[-3000:]
    assert not PWNED.exists()
    assert snapshot(world) == before, case


# ---------------------------------------------------------------------------------------------
# CLI flags


def base_flags(url: str) -> list[str]:
    return ["--database-url", url, "--table", TABLE, "--category-column", "category"]


FLAGS: dict[str, tuple[list[str], str]] = {
    "batch-size-zero": (["migrate", "run", "--target", "local:hash@32", "--batch-size", "0"],
                        "--batch-size"),
    "batch-size-negative": (["migrate", "run", "--target", "local:hash@32", "--batch-size", "-5"],
                            "--batch-size"),
    "batch-size-words": (["migrate", "run", "--target", "local:hash@32", "--batch-size", "many"],
                         "--batch-size"),
    "concurrency-zero": (["migrate", "run", "--target", "local:hash@32", "--concurrency", "0"],
                         "--concurrency"),
    "budget-negative": (["migrate", "run", "--target", "local:hash@32", "--budget-usd", "-1"],
                        "--budget-usd"),
    "shard-out-of-range": (["migrate", "run", "--target", "local:hash@32", "--shard", "3/2"],
                           "--shard"),
    "limit-negative": (["migrate", "run", "--target", "local:hash@32", "--limit", "-1"],
                       "--limit"),
    "target-dims-words": (["migrate", "setup", "--target", "local:hash@abc"], "--target"),
    "target-provider-unknown": (["migrate", "setup", "--target", "evil:x@8"], "--target"),
    "target-dims-zero": (["migrate", "setup", "--target", "local:hash@0"], "--target"),
    "table-sql": (["migrate", "setup", "--target", "local:hash@32", "--table",
                   'docs"; DROP TABLE hostile_docs; --'], "table"),
    "table-three-parts": (["migrate", "setup", "--target", "local:hash@32", "--table", "a.b.c"],
                          "table"),
    "migration-key-quote": (["migrate", "setup", "--target", "local:hash@32", "--migration",
                             "rag/a'b"], "--migration"),
    "price-garbage": (["migrate", "run", "--target", "local:hash@32", "--price", "nonsense"],
                      "--price"),
    "serve-port-range": (["serve", "--port", "70000"], "--port"),
    "serve-body-limit-negative": (["serve", "--max-body-bytes", "-1"], "--max-body-bytes"),
    "monitor-range-promql": (["monitor", "--target", "local:hash@32", "--range",
                              "1h]) or vector(1) #"], "--range"),
    "monitor-interval-zero": (["monitor", "--target", "local:hash@32", "--continuous",
                               "--interval", "0"], "--interval"),
}  # fmt: skip


@pytest.mark.parametrize("case", FLAGS)
def test_a_hostile_flag_is_refused_and_changes_nothing(
    world: str, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, flag = FLAGS[case]
    before = snapshot(world)
    capsys.readouterr()
    try:
        words = next(i for i, arg in enumerate(argv) if arg.startswith("--"))
        # The hostile flag last: given twice, argparse keeps the last.
        code = main([*argv[:words], *base_flags(world), *argv[words:]])
    except SystemExit as exc:  # argparse's refusals
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert code == 2, (case, code, said[-2000:])
    assert flag.lower() in said.lower(), (case, said[-2000:])
    assert "Traceback" not in said
    assert snapshot(world) == before, case


def test_the_suite_is_at_least_sixty_strong() -> None:
    assert len(HTTP) + len(SPECS) + len(FLAGS) >= 60
