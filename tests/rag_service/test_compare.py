"""``embedshift compare`` and ``embedshift baseline`` against a real PostgreSQL + pgvector (and a
real Prometheus for the Prometheus-sourced baseline), plus the pure metric functions.

The labelled corpus is built so the answers are certain: each query is two made-up words that
appear in exactly three documents and nowhere else. With the ``local`` hashing model a text's
vector is the signed sum of its words' (and word pairs') buckets, so those three documents share
the query's three features (cosine ≈ 0.5) while every other document shares at most a chance
bucket collision (≤ 0.15 each): the three are the top three, in some order, for v1 and for v2.
v1 and v2 are the same model (``local:hash@768``), so their rankings agree.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pgvector.psycopg import register_vector
from prometheus_client import CollectorRegistry
from psycopg import sql
from psycopg.conninfo import make_conninfo
from rich.console import Console

from rag_service.compare import (
    Baseline,
    CompareReport,
    QueryCase,
    QueryOutcome,
    agreement,
    compare_table,
    first_sentence,
    judge_baseline,
    ndcg_at_k,
    parse_queries,
    percentile,
    recall_at_k,
    reciprocal_rank,
    sample_cases,
    summarise,
)
from rag_service.criteria import Verdict
from rag_service.errors import ConfigError
from rag_service.indexes import build_index
from rag_service.metrics import ServiceMetrics
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers.local import HashEmbedder, LocalProvider
from rag_service.schema import connect, inspect_source, setup
from rag_service.spec import DataPlaneSpec
from rag_service.testing.corpus import corpus_spec, documents
from rag_service.testing.prometheus import serving_metrics
from tests.helpers import cli, cli_async
from tests.helpers import flags as cli_flags
from tests.prometheus_fixtures import PrometheusFactory

TABLE = "cmp_docs"
MODEL = "local:hash@768"
TOPICS = [
    ("zorblax", "quintal"),
    ("vremp", "oxlade"),
    ("glimmick", "saxtorn"),
    ("plandor", "wuzzet"),
    ("crombly", "fenthor"),
    ("yarrowix", "blunt"),
    ("tesselk", "mordain"),
    ("quibbet", "norsel"),
    ("drafnel", "ukkami"),
    ("spindrel", "havoque"),
    ("obrantic", "zeliph"),
    ("marrowkin", "pestle"),
]
RELEVANT_PER_TOPIC = 3
FILLER = 300


@dataclass(frozen=True)
class Corpus:
    url: str
    relevant: dict[str, list[str]]  # query → its relevant ids
    texts: dict[str, str]  # id → text
    flags: list[str]
    labelled: Path
    exact: Path


def _spec() -> DataPlaneSpec:
    return corpus_spec(TABLE, source_dimensions=768)  # the corpus's columns, built below


@pytest.fixture(scope="module")
def corpus(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    rows: list[tuple[int, str, str]] = list(documents(FILLER, seed=3))
    relevant: dict[str, list[str]] = {}
    next_id = 10_000
    for t, (a, b) in enumerate(TOPICS):
        query = f"{a} {b}"
        relevant[query] = []
        for j in range(RELEVANT_PER_TOPIC):
            category = ("facilities", "pricing", "events")[t % 3]
            text = f"The {a} {b} opens at {('seven', 'nine', 'noon')[j]}. Note {next_id}."
            rows.append((next_id, text, category))
            relevant[query].append(str(next_id))
            next_id += 1
    embedder = HashEmbedder(768, seed="hash")  # = local:hash@768, the v1 model
    vectors = embedder.embed([text for _, text, _ in rows])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, content text, category text NOT NULL, "
                "embedding vector(768))"
            ).format(sql.Identifier(TABLE))
        )
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s)").format(sql.Identifier(TABLE)),
                [(i, text, cat, v) for (i, text, cat), v in zip(rows, vectors, strict=True)],
            )
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops)").format(
                sql.Identifier(f"{TABLE}_v1_hnsw"), sql.Identifier(TABLE)
            )
        )
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(TABLE)))

    spec = _spec()

    async def migrate() -> None:
        await setup(database_url, spec, migration=f"default/{TABLE}")
        provider = LocalProvider(model="hash", dimensions=768)
        await run_migration(
            database_url,
            spec,
            provider=provider,
            options=RunOptions(batch_size=500),
            migration=f"default/{TABLE}",
        )
        await build_index(database_url, spec)

    asyncio.run(migrate())
    folder = tmp_path_factory.mktemp("queries")
    labelled = folder / "labelled.jsonl"
    lines = []
    for n, (query, ids) in enumerate(relevant.items()):
        item: dict[str, object] = {"query": query, "relevant": ids}
        if n % 4 == 0:  # some queries filter by the category their documents are in
            item["category"] = ("facilities", "pricing", "events")[n % 3]
        lines.append(json.dumps(item))
    labelled.write_text("# labelled queries\n" + "\n".join(lines) + "\n\n")
    texts = {str(i): text for i, text, _ in rows}
    exact = folder / "exact.jsonl"
    exact.write_text(
        "\n".join(json.dumps({"query": texts[ids[0]]}) for ids in relevant.values()) + "\n"
    )
    flags = cli_flags(database_url, TABLE, target=MODEL, source=MODEL)
    yield Corpus(database_url, relevant, texts, flags, labelled, exact)


V2_INDEX = f"embedshift_{TABLE}_hash_768_hnsw"


# ---- compare against the database ----------------------------------------------------------


def test_compare_labelled_set_gives_the_known_answers(
    capsys: pytest.CaptureFixture[str], corpus: Corpus
) -> None:
    result = cli(
        capsys,
        "compare",
        *corpus.flags,
        "--queries",
        str(corpus.labelled),
        "-k",
        "3",
        "--ef-search",
        "1000",  # the graph search reaches every document: the answers below are certain
        "--price",
        "local:hash=1000",  # USD per 1M tokens: a query of 2 words costs $0.002
        "--json",
    )
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["k"] == 3
    assert report["queries"] == report["labelledQueries"] == len(TOPICS)
    assert report["querySource"] == str(corpus.labelled)
    documents_ = FILLER + len(TOPICS) * RELEVANT_PER_TOPIC
    assert report["v2Coverage"] == {"vectors": documents_, "documents": documents_, "share": 1.0}
    assert set(report["versions"]) == {"v1", "v2"}
    for name, figures in report["versions"].items():
        assert figures["model"] == MODEL, name
        assert figures["queries"] == len(TOPICS) and figures["errors"] == 0
        assert figures["errorRate"] == 0
        assert figures["recallAtK"] == 1.0, name
        assert figures["mrr"] == 1.0, name
        assert figures["ndcgAt10"] == pytest.approx(1.0), name
        assert figures["indexRecall"] >= 0.9, name
        assert 0.3 < figures["avgTopSimilarity"] < 0.7  # three shared features of ~9
        assert figures["tokens"] == 2 * len(TOPICS)  # the warm-up query is not counted
        assert figures["costPer1kQueriesUSD"] == pytest.approx(2.0)
        assert 0 < figures["latencyP50Seconds"] <= figures["latencyP95Seconds"] < 5
        assert figures["avgEmbedSeconds"] > 0 and figures["avgSearchSeconds"] > 0
        assert set(figures) >= {"avgLatencySeconds", "costUSD", "labelledQueries"}
        # v1's column has no index here and is scanned exactly; v2's side table has one, which
        # the planner may or may not prefer at this size: compare credits what actually ran.
        if name == "v1":
            assert figures["annIndex"] is None and figures["indexedQueries"] == 0
        else:
            assert figures["annIndex"] in (None, V2_INDEX)
        assert figures["indexRecall"] == 1.0
    agreement_ = report["agreement"]
    assert agreement_["queries"] == len(TOPICS)
    assert agreement_["overlapAtK"] == 1.0  # identical models agree on the top 3
    assert agreement_["rbo"] == pytest.approx(1.0) and 0 <= agreement_["rbo"] <= 1
    assert 0 <= agreement_["top1Agreement"] <= 1


def test_compare_measures_the_recall_of_an_ann_index(
    capsys: pytest.CaptureFixture[str], corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With sequential scans priced out (for this connection only), v1's single-table statement
    runs on its HNSW index; with ef_search above the table's size the graph search reaches
    every document, so the index's recall against exact search is (all but) perfect."""
    url = make_conninfo(corpus.url, options="-c enable_seqscan=off")
    at = corpus.flags.index("--database-url")
    flags = [*corpus.flags[:at], "--database-url", url, *corpus.flags[at + 2 :]]
    result = cli(
        capsys,
        "compare",
        *flags,
        "--queries",
        str(corpus.labelled),
        "-k",
        "3",
        "--ef-search",
        "1000",
        "--json",
    )
    assert result.code == 0, result.err
    v1 = json.loads(result.out)["versions"]["v1"]
    assert v1["annIndex"] == f"{TABLE}_v1_hnsw"
    assert v1["indexedQueries"] == len(TOPICS)
    assert v1["indexRecall"] >= 0.9
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    table = cli(
        capsys,
        "compare",
        *flags,
        "--queries",
        str(corpus.labelled),
        "-k",
        "3",
        "--ef-search",
        "1000",
    )
    row = next(line for line in table.out.splitlines() if "index recall@3" in line)
    assert f"({TABLE}_v1_hnsw in {len(TOPICS)} of {len(TOPICS)})" in row
    # v2's scan touches the side table alone, so its HNSW index serves it too.
    assert f"({V2_INDEX} in {len(TOPICS)} of {len(TOPICS)})" in row


def test_compare_recall_below_the_number_of_relevant_documents(
    capsys: pytest.CaptureFixture[str], corpus: Corpus
) -> None:
    result = cli(
        capsys,
        "compare",
        *corpus.flags,
        "--queries",
        str(corpus.labelled),
        "-k",
        "2",
        "--ef-search",
        "1000",
        "--json",
    )
    assert result.code == 0, result.err
    report = json.loads(result.out)
    for figures in report["versions"].values():
        assert figures["recallAtK"] == pytest.approx(2 / 3)  # 2 of 3 relevant fit in the top 2
        assert figures["mrr"] == 1.0
        assert figures["ndcgAt10"] == pytest.approx(1.0)  # depth 10 is searched regardless of k
        assert figures["costPer1kQueriesUSD"] == 0.0  # the local model is free by default
    assert report["agreement"]["overlapAtK"] == 1.0


def test_compare_sampled_queries_table(capsys: pytest.CaptureFixture[str], corpus: Corpus) -> None:
    result = cli(capsys, "compare", *corpus.flags, "--sample", "6", "--seed", "4")
    assert result.code == 0, result.err
    for text in (
        "compare on 6 queries",
        "sample of 6 documents (seed 4)",
        "latency p95",
        "avg top-1 similarity",
        "index recall@10",
        "cost per 1k queries",
        "overlap@10",
        "rank-biased overlap",
    ):
        assert text in result.out, text
    assert "nDCG" not in result.out  # sampled queries carry no labels
    as_json = json.loads(
        cli(capsys, "compare", *corpus.flags, "--sample", "6", "--seed", "4", "--json").out
    )
    assert as_json["labelledQueries"] == 0
    assert as_json["versions"]["v2"]["recallAtK"] is None
    assert 0 <= as_json["agreement"]["rbo"] <= 1
    assert 0 <= as_json["agreement"]["overlapAtK"] <= 1


async def test_sampling_is_reproducible_for_a_seed(corpus: Corpus) -> None:
    conn = await connect(corpus.url, autocommit=True)
    async with conn:
        layout = await inspect_source(conn, _spec())
        first = await sample_cases(conn, layout, count=5, seed=11)
        again = await sample_cases(conn, layout, count=5, seed=11)
        other = await sample_cases(conn, layout, count=5, seed=12)
    assert first == again and first != other
    assert all(case.query.endswith(".") and not case.labelled for case in first)
    assert all(any(t.startswith(c.query) for t in corpus.texts.values()) for c in first)


def test_compare_refuses_without_the_v1_model(
    capsys: pytest.CaptureFixture[str], corpus: Corpus
) -> None:
    at = corpus.flags.index("--source")
    flags = corpus.flags[:at] + corpus.flags[at + 2 :]  # without --source MODEL
    result = cli(capsys, "compare", *flags, "--sample", "2")
    assert result.code == 2
    assert result.err.count("\n") == 1 and "--source" in result.err


def test_compare_bad_queries_file(
    capsys: pytest.CaptureFixture[str], corpus: Corpus, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "ok"}\n{"query": 3}\n')
    result = cli(capsys, "compare", *corpus.flags, "--queries", str(bad))
    assert result.code == 2
    assert f"{bad} line 2" in result.err and result.err.count("\n") == 1


# ---- baseline ---------------------------------------------------------------------------------


def _write_baseline(path: Path, **metrics: float | None) -> None:
    values = {
        "requests": 100.0,
        "avg_latency_seconds": 0.1,
        "p95_latency_seconds": 0.2,
        "error_rate": 0.0,
        "cache_hit_rate": None,
        "avg_top_similarity": 0.8,
        "cost_per_1k_queries_usd": 0.0,
        **metrics,
    }
    path.write_text(
        json.dumps(
            {
                "kind": "embedshift-baseline",
                "format": 1,
                "recordedAt": "2026-01-01T00:00:00+00:00",
                "source": "compare",
                "version": "v1",
                "model": MODEL,
                "migration": f"default/{TABLE}",
                "prometheus": None,
                "compare": {"queries": None, "sample": 5, "seed": 0, "k": 5, "count": 5},
                "metrics": values,
            }
        )
    )


def test_baseline_records_v1_from_a_compare_run(
    capsys: pytest.CaptureFixture[str], corpus: Corpus, tmp_path: Path
) -> None:
    output = tmp_path / "baseline.json"
    result = cli(
        capsys,
        "baseline",
        *corpus.flags,
        "--output",
        str(output),
        "--queries",
        str(corpus.labelled),
        "-k",
        "3",
    )
    assert result.code == 0, result.err
    assert "recorded from a compare run of 12 queries" in result.out
    saved = json.loads(output.read_text())
    assert saved["kind"] == "embedshift-baseline" and saved["source"] == "compare"
    assert saved["version"] == "v1" and saved["model"] == MODEL
    assert saved["compare"] == {
        "queries": str(corpus.labelled),
        "sample": None,
        "seed": 0,
        "k": 3,
        "count": len(TOPICS),
    }
    metrics = saved["metrics"]
    assert metrics["requests"] == len(TOPICS) and metrics["error_rate"] == 0
    assert metrics["cache_hit_rate"] is None  # a compare run bypasses the cache
    assert 0 < metrics["p95_latency_seconds"] < 5
    # --compare reuses the recorded query set (same k, same file) for v2.
    again = cli(capsys, "baseline", *corpus.flags, "--output", str(output), "--compare", "--json")
    report = json.loads(again.out)
    assert report["current"]["compare"]["queries"] == str(corpus.labelled)
    assert report["current"]["compare"]["k"] == 3
    verdicts = {row["name"]: row["verdict"] for row in report["criteria"]}
    assert "cache-hit-rate" not in verdicts  # a compare run bypasses the cache: not judged
    assert {c["name"] for c in report["notMeasured"]} == {"cache-hit-rate", "critical-errors"}
    assert verdicts["avg-similarity"] == "fail"  # two words against ~9: cosine ≈ 0.5
    assert verdicts["cost-vs-v1"] == "pass"  # free against free
    assert again.code == 1 and report["ok"] is False


def test_baseline_compare_passes_when_v2_is_better(
    capsys: pytest.CaptureFixture[str], corpus: Corpus, tmp_path: Path
) -> None:
    output = tmp_path / "better.json"
    # v1 was slow, expensive and unreliable; v2 answers whole documents (similarity 1.0), free.
    _write_baseline(
        output,
        p95_latency_seconds=5.0,
        cost_per_1k_queries_usd=1.0,
        avg_top_similarity=0.5,
        error_rate=0.01,
    )
    flags = [*corpus.flags, "--output", str(output), "--compare", "--queries", str(corpus.exact)]
    result = cli(capsys, "baseline", *flags, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["ok"] is True
    verdicts = {row["name"]: row["verdict"] for row in report["criteria"]}
    assert verdicts == {
        "p95-latency": "pass",
        "p95-latency-vs-v1": "pass",
        "avg-similarity": "pass",
        "error-rate": "pass",
        "cost-vs-v1": "pass",
    }
    assert report["current"]["metrics"]["avg_top_similarity"] == pytest.approx(1.0)
    deltas = report["deltas"]
    assert deltas["cost_per_1k_queries_usd"] == {
        "v1": 1.0,
        "v2": 0.0,
        "delta": -1.0,
        "relative": -1.0,
    }
    assert deltas["p95_latency_seconds"]["delta"] < 0
    table = cli(capsys, "baseline", *flags)
    assert table.code == 0
    assert "all success criteria pass" in table.out and "✓ pass" in table.out
    assert "not measured by this source: cache-hit-rate" in table.out


def test_baseline_compare_fails_when_v2_is_worse(
    capsys: pytest.CaptureFixture[str], corpus: Corpus, tmp_path: Path
) -> None:
    output = tmp_path / "worse.json"
    _write_baseline(output, p95_latency_seconds=1e-9, cost_per_1k_queries_usd=0.0)
    flags = [
        *corpus.flags,
        "--output",
        str(output),
        "--compare",
        "--queries",
        str(corpus.labelled),
        "--price",
        "local:hash=1000",  # v2 now costs money where v1 was free
    ]
    result = cli(capsys, "baseline", *flags, "--json")
    assert result.code == 1
    verdicts = {row["name"]: row["verdict"] for row in json.loads(result.out)["criteria"]}
    assert verdicts["p95-latency-vs-v1"] == "fail"
    assert verdicts["p95-latency"] == "pass"
    assert verdicts["avg-similarity"] == "fail"
    assert verdicts["cost-vs-v1"] == "fail"
    assert verdicts["error-rate"] == "pass"
    table = cli(capsys, "baseline", *flags)
    assert table.code == 1
    assert "success criteria NOT met" in table.out and "✗ FAIL" in table.out
    assert "p95-latency-vs-v1" in table.out


def test_baseline_compare_mistakes_are_one_line(
    capsys: pytest.CaptureFixture[str], corpus: Corpus, tmp_path: Path
) -> None:
    missing = cli(
        capsys, "baseline", *corpus.flags, "--compare", "--output", str(tmp_path / "none.json")
    )
    assert missing.code == 2 and "record v1's figures first" in missing.err
    assert missing.err.count("\n") == 1
    recorded = tmp_path / "compare.json"
    _write_baseline(recorded)
    mixed = cli(
        capsys,
        "baseline",
        *corpus.flags,
        "--compare",
        "--output",
        str(recorded),
        "--prometheus-url",
        "http://127.0.0.1:9",
    )
    assert mixed.code == 2 and "mix sources" in mixed.err
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"kind": "something else"}')
    wrong = cli(capsys, "baseline", *corpus.flags, "--compare", "--output", str(garbage))
    assert wrong.code == 2 and "is not an embedshift baseline" in wrong.err


async def test_baseline_from_prometheus(
    capsys: pytest.CaptureFixture[str], prometheus: PrometheusFactory, tmp_path: Path
) -> None:
    """v1 and v2 traffic as the service counts it, scraped by a real Prometheus that also
    scrapes another migration's service, whose failing traffic must not count."""
    registry, other_registry = CollectorRegistry(), CollectorRegistry()
    models = [("local", "v1model"), ("local", "v2model")]
    metrics = ServiceMetrics(migration=f"default/{TABLE}", registry=registry, usage_models=models)
    other = ServiceMetrics(migration="rag/other", registry=other_registry, usage_models=models)
    with serving_metrics(registry) as target, serving_metrics(other_registry) as other_target:
        prom = prometheus(targets=[target, other_target])
        await prom.wait_for_scrape_async()  # every series is in Prometheus at 0
        for _ in range(50):
            other.observe_search(version="v2", seconds=5.0, outcome="error", top_similarity=None)
        other.count_usage(provider="local", model="v2model", tokens=1000, cost_usd=100.0)
        for i in range(100):
            metrics.observe_search(version="v1", seconds=0.45, outcome="ok", top_similarity=0.78)
            metrics.count_cache(version="v1", hit=i < 60)
            metrics.observe_search(version="v2", seconds=0.04, outcome="ok", top_similarity=0.92)
            metrics.count_cache(version="v2", hit=i < 90)
        metrics.count_usage(provider="local", model="v1model", tokens=1000, cost_usd=0.5)
        metrics.count_usage(provider="local", model="v2model", tokens=1000, cost_usd=0.1)
        await prom.wait_for_scrape_async()
        output = tmp_path / "prom.json"
        flags = [
            "--database-url",
            "postgresql://unused@127.0.0.1:9/unused",  # Prometheus only: never connected
            "--table",
            TABLE,
            "--source",
            "local:v1model@768",
            "--target",
            "local:v2model@768",
            "--output",
            str(output),
        ]
        record = await cli_async(
            capsys, "baseline", *flags, "--prometheus-url", prom.url, "--range", "5m"
        )
        assert record.code == 0, record.err
        saved = json.loads(output.read_text())
        assert saved["source"] == "prometheus"
        assert saved["prometheus"] == {"url": prom.url, "range": "5m"}
        v1 = saved["metrics"]
        assert v1["requests"] > 0
        assert v1["cache_hit_rate"] == pytest.approx(0.6)
        assert v1["avg_top_similarity"] == pytest.approx(0.78)
        assert 0.3 <= v1["p95_latency_seconds"] <= 0.5  # within the 0.3–0.5 s bucket
        assert v1["error_rate"] == 0
        # --compare reads the URL and range the baseline recorded.
        judged = await cli_async(capsys, "baseline", *flags, "--compare", "--json")
        assert judged.code == 0, judged.out + judged.err
        report = json.loads(judged.out)
        assert report["current"]["source"] == "prometheus"
        assert report["current"]["metrics"]["cache_hit_rate"] == pytest.approx(0.9)
        assert {row["verdict"] for row in report["criteria"]} == {"pass"}
        assert report["ok"] is True
        # Prometheus measures the cache; the baseline file still records no critical errors.
        assert [c["name"] for c in report["notMeasured"]] == ["critical-errors"]
        cost = report["deltas"]["cost_per_1k_queries_usd"]
        assert cost["v2"] == pytest.approx(cost["v1"] / 5)


# ---- pure functions ---------------------------------------------------------------------------


def test_recall_at_k() -> None:
    assert recall_at_k(["a", "b", "c"], ["a", "c"], 3) == 1.0
    assert recall_at_k(["a", "b", "c"], ["a", "c"], 2) == 0.5
    assert recall_at_k(["x"], ["a"], 10) == 0.0
    assert recall_at_k(["a", "b"], {"a", "b", "c", "d"}, 10) == 0.5
    with pytest.raises(ValueError):
        recall_at_k(["a"], [], 3)
    with pytest.raises(ValueError):
        recall_at_k(["a"], ["a"], 0)


def test_reciprocal_rank() -> None:
    assert reciprocal_rank(["a", "b"], ["a"]) == 1.0
    assert reciprocal_rank(["x", "y", "a"], ["a", "y"]) == 0.5
    assert reciprocal_rank(["x", "y"], ["a"]) == 0.0
    assert reciprocal_rank([], ["a"]) == 0.0


def test_ndcg_at_k() -> None:
    assert ndcg_at_k(["a", "b", "x"], ["a", "b"]) == pytest.approx(1.0)
    # one relevant at rank 2 of two relevant: (1/log2 3) / (1 + 1/log2 3)
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["x", "a"], ["a", "b"]) == pytest.approx(expected)
    assert ndcg_at_k(["x", "y"], ["a"]) == 0.0
    assert ndcg_at_k(["a", "a", "b"], ["a", "b"], 3) < 1.0  # a repeat counts once
    # only the top k count: relevant at rank 3 is outside k = 2
    assert ndcg_at_k(["x", "y", "a"], ["a"], 2) == 0.0
    with pytest.raises(ValueError):
        ndcg_at_k(["a"], [])


def test_percentile() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 0.95) == pytest.approx(95.05)
    assert percentile([5.0, 1.0], 0.0) == 1.0 and percentile([5.0, 1.0], 1.0) == 5.0


def test_first_sentence() -> None:
    assert first_sentence("The pool opens at seven. The gym closes.") == "The pool opens at seven."
    assert first_sentence("  no   end  ") == "no end"
    assert first_sentence("Why? Because.") == "Why?"
    long = "word " * 100
    cut = first_sentence(long, max_chars=22)
    assert cut == "word word word word" and len(cut) <= 22


def test_parse_queries() -> None:
    cases = parse_queries(
        [
            '{"query": "pool hours", "relevant": ["1", 2, "1"], "category": "facilities"}',
            "",
            "# a comment",
            '{"query": "prices"}',
        ],
        source="q.jsonl",
    )
    assert cases == [
        QueryCase("pool hours", ("1", "2"), "facilities"),
        QueryCase("prices"),
    ]
    assert cases[0].labelled and not cases[1].labelled
    for line, message in (
        ("not json", "line 1 is not JSON"),
        ('{"query": ""}', '"query" must be a non-empty string'),
        ('{"query": "q", "relevant": "1"}', '"relevant" must be a list'),
        ('{"query": "q", "labels": []}', "unknown field(s) labels"),
        ("[1]", "expected an object"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_queries([line], source="q.jsonl")
    with pytest.raises(ConfigError, match="holds no queries"):
        parse_queries(["", "# nothing"], source="q.jsonl")


def test_summarise_and_agreement() -> None:
    cases = [QueryCase("a", ("1",)), QueryCase("b"), QueryCase("c", ("9",))]
    v1 = [
        QueryOutcome(("1", "2"), ("1", "2"), 0.9, 0.01, 0.02, 3, 0.003),
        QueryOutcome(("3", "4"), ("3", "5"), 0.7, 0.03, 0.04, 3, 0.003),
        QueryOutcome(error="boom", tokens=0, cost_usd=0.0),
    ]
    figures = summarise("v1", MODEL, cases, v1, k=2)
    assert figures.queries == 3 and figures.errors == 1
    assert figures.error_rate == pytest.approx(1 / 3)
    assert figures.index_recall == pytest.approx(3 / 4)
    assert figures.avg_top_similarity == pytest.approx(0.8)
    assert figures.labelled_queries == 1 and figures.recall_at_k == 1.0 and figures.mrr == 1.0
    assert figures.cost_per_1k_queries_usd == pytest.approx(3.0)  # $0.006 over 2 answered
    assert figures.latency_p50_seconds == pytest.approx(0.05)
    assert figures.dashboard_metrics()["cache_hit_rate"] is None
    v2 = [
        QueryOutcome(("2", "1")),
        QueryOutcome(("3", "6")),
        QueryOutcome(("7", "8")),
    ]
    a = agreement(v1, v2, k=2)
    assert a.queries == 2  # the failed v1 query is left out
    assert a.overlap_at_k == pytest.approx(0.75)
    assert a.top1_agreement == pytest.approx(0.5)
    assert a.rbo is not None and 0 < a.rbo < 1


def test_compare_table_notes_partial_coverage() -> None:
    cases = [QueryCase("a", ("1",))]
    figures = {
        v: summarise(v, MODEL, cases, [QueryOutcome(("1",), ("1",), 0.9, 0.01, 0.01)], k=1)
        for v in ("v1", "v2")
    }
    report = CompareReport(
        k=1,
        query_source="q.jsonl",
        cases=tuple(cases),
        versions=figures,
        agreement=None,
        v2_coverage=(30, 90),
    )
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(compare_table(report))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "v2 has vectors for 30 of 90 documents (33.3 %)" in text
    assert "recall@1 (1 labelled)" in text and "nDCG@10" in text
    assert report.as_dict()["v2Coverage"] == {"vectors": 30, "documents": 90, "share": 1 / 3}


def test_judge_baseline() -> None:
    v1 = {
        "p95_latency_seconds": 0.5,
        "avg_top_similarity": 0.8,
        "error_rate": 0.0,
        "cache_hit_rate": 0.8,
        "cost_per_1k_queries_usd": 0.2,
    }
    good = {**v1, "p95_latency_seconds": 0.4, "cost_per_1k_queries_usd": 0.03}
    judged = judge_baseline(v1, good)
    assert {r.verdict for r in judged.rows} == {Verdict.PASS} and judged.ok
    # A baseline records the dashboard's figures only: no critical-errors count to judge.
    assert [c.name for c in judged.not_measured] == ["critical-errors"]
    at_the_bounds = {
        "p95_latency_seconds": 0.5,  # = v1
        "avg_top_similarity": 0.7,
        "error_rate": 0.001,
        "cache_hit_rate": 0.7,
        "cost_per_1k_queries_usd": 0.2,  # = v1
    }
    assert judge_baseline(v1, at_the_bounds).ok  # bounds are inclusive
    bad = {
        "p95_latency_seconds": 0.9,
        "avg_top_similarity": 0.69,
        "error_rate": 0.0011,
        "cache_hit_rate": None,
        "cost_per_1k_queries_usd": 0.21,
    }
    judged = judge_baseline(v1, bad)
    assert {r.name: r.verdict for r in judged.rows} == {
        "p95-latency": Verdict.FAIL,
        "p95-latency-vs-v1": Verdict.FAIL,
        "avg-similarity": Verdict.FAIL,
        "error-rate": Verdict.FAIL,
        "cache-hit-rate": Verdict.NODATA,
        "cost-vs-v1": Verdict.FAIL,
    }
    assert not judged.ok
    unmeasured = judge_baseline({}, {"cache_hit_rate": None}, unmeasured=["cache_hit_rate"])
    assert "cache-hit-rate" in {c.name for c in unmeasured.not_measured}
    rows = {r.name: r for r in unmeasured.rows}
    assert "cache-hit-rate" not in rows
    assert rows["p95-latency-vs-v1"].verdict is Verdict.NODATA
    assert rows["p95-latency-vs-v1"].detail == "no data for v2"
    no_v1 = judge_baseline({}, {"p95_latency_seconds": 0.1})
    assert {r.name: r.detail for r in no_v1.rows}["p95-latency-vs-v1"] == (
        "no data for the baseline (v1)"
    )
    free = judge_baseline({"cost_per_1k_queries_usd": 0.0}, {"cost_per_1k_queries_usd": 0.0})
    assert {r.name: r.verdict for r in free.rows}["cost-vs-v1"] is Verdict.PASS
    row = {r.name: r for r in judge_baseline(v1, good).rows}["p95-latency-vs-v1"]
    assert row.as_dict() == {
        "name": "p95-latency-vs-v1",
        "metric": "p95_latency_seconds",
        "value": 0.4,
        "bound": "≤ 1 × v1",
        "limit": 0.5,
        "verdict": "pass",
        "detail": "v2 response time ≤ v1",
    }


def test_baseline_file_validation() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.error_rate must be a number"):
        Baseline.from_dict(
            {
                "kind": "embedshift-baseline",
                "format": 1,
                "source": "compare",
                "metrics": {"error_rate": "low"},
            },
            where="b.json",
        )
    with pytest.raises(ConfigError, match="format 2"):
        Baseline.from_dict({"kind": "embedshift-baseline", "format": 2}, where="b.json")
