"""``embedshift compare`` and ``embedshift baseline``: v1 against v2 on the same queries.

``compare`` (the guide's ``compare:implementations``) runs a query set against both versions
*directly*: each query is embedded with the version's provider and searched with the very
statement the service runs (:func:`rag_service.search.search_statement`), on one connection
configured like the service's. No HTTP, no query cache: what it measures is the models and the
indexes. Per version it reports

- latency p50/p95 per query (embedding + search, as a user waits for it),
- the average top-1 similarity, errors, tokens and cost per 1,000 queries,
- the recall of what the search returned against an exact search of the same statement (the
  index's recall; 1.0 when the planner scans exactly, and ``annIndex`` says which it did),
- with labelled queries (``"relevant": [ids]``): recall@k, MRR@k and nDCG@10,

and between the versions overlap@k and rank-biased overlap of their top k
(:mod:`rag_service.shadow`). Queries come from a JSON-lines file or are sampled from the corpus
(the first sentence of random documents, reproducible with ``--seed``). The two versions take
turns going first, so neither pays more for cold caches.

``baseline`` (the guide's ``monitor:baseline --compare``) records v1's figures to a file — from
Prometheus (:func:`rag_service.dashboard.prometheus_summary`) or from a compare run — and
``baseline --compare`` measures v2 now from the same kind of source and judges it against the
guide's success criteria (:data:`rag_service.criteria.DEFAULT_SUCCESS_CRITERIA`, bounds
inclusive). Exit code 1 unless every criterion the source can measure passes; a criterion
without data never passes, and one the source cannot measure is listed, not judged.

The metric functions (recall@k, reciprocal rank, nDCG, percentiles), the summaries, the judge
and the renderers are pure; only ``run_compare``, ``sample_cases``, ``measure`` and the baseline
file's ``load_baseline``/``save_baseline`` do I/O. The ``embedshift compare`` and ``embedshift
baseline`` commands are :mod:`embedshift_operator.cli.monitoring`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from rich.console import Group
from rich.table import Table

from rag_service.criteria import (
    DASHBOARD_METRICS,
    DEFAULT_SUCCESS_CRITERIA,
    METRICS,
    CriterionDefault,
    Verdict,
    judge,
)
from rag_service.dashboard import prometheus_summary
from rag_service.errors import (
    AuthenticationFailed,
    ConfigError,
    DatabaseError,
    DimensionMismatch,
    ProviderError,
    QuotaExceeded,
)
from rag_service.prometheus import PrometheusClient
from rag_service.providers import EmbeddingProvider, api_key_from_env, make_provider
from rag_service.providers.base import Purpose
from rag_service.providers.pricing import PriceTable
from rag_service.routing import Version
from rag_service.schema import Layout, connect, ident, inspect_source, table_exists
from rag_service.search import (
    configure_connection,
    ef_search_for,
    over_fetch,
    search,
    search_statement,
)
from rag_service.shadow import overlap_at_k, rank_biased_overlap
from rag_service.spec import DataPlaneSpec

__all__ = [
    "BASELINE_FILE",
    "Agreement",
    "Baseline",
    "BaselineJudgement",
    "CompareReport",
    "Measured",
    "QueryCase",
    "QueryOutcome",
    "VerdictRow",
    "VersionFigures",
    "agreement",
    "baseline_comparison_view",
    "baseline_table",
    "compare_table",
    "first_sentence",
    "judge_baseline",
    "load_baseline",
    "load_queries",
    "measure",
    "ndcg_at_k",
    "parse_queries",
    "percentile",
    "recall_at_k",
    "reciprocal_rank",
    "run_compare",
    "sample_cases",
    "save_baseline",
    "summarise",
]

BASELINE_FILE = "embedshift-baseline.json"
BASELINE_KIND = "embedshift-baseline"
BASELINE_FORMAT = 1
NDCG_DEPTH = 10
DEFAULT_SAMPLE = 50
MAX_QUERY_CHARS = 300


# ---- queries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryCase:
    """One query; ``relevant`` (ids, as text) makes it labelled; ``category`` filters the search
    exactly as the service's ``category`` field does."""

    query: str
    relevant: tuple[str, ...] = ()
    category: str | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.relevant)


def parse_queries(lines: Iterable[str], *, source: str) -> list[QueryCase]:
    """Queries from JSON lines ``{"query": ..., "relevant": [...]?, "category": ...?}``. Pure.

    Blank lines and lines starting with ``#`` are skipped; a bad line is a ConfigError naming
    ``source`` and the line number.
    """
    cases: list[QueryCase] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"--queries: {source} line {number}"
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not JSON: {exc.msg}") from None
        if not isinstance(item, dict):
            raise ConfigError(f'{where}: expected an object like {{"query": "..."}}')
        unknown = set(item) - {"query", "relevant", "category"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                "the fields are query, relevant and category"
            )
        query = item.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ConfigError(f'{where}: "query" must be a non-empty string')
        relevant = item.get("relevant", [])
        if not isinstance(relevant, list) or not all(
            isinstance(r, str | int) and not isinstance(r, bool) for r in relevant
        ):
            raise ConfigError(f'{where}: "relevant" must be a list of document ids')
        category = item.get("category")
        if category is not None and not isinstance(category, str):
            raise ConfigError(f'{where}: "category" must be a string')
        cases.append(
            QueryCase(
                query=query,
                relevant=tuple(dict.fromkeys(str(r) for r in relevant)),
                category=category,
            )
        )
    if not cases:
        raise ConfigError(f"--queries: {source} holds no queries")
    return cases


def load_queries(path: Path) -> list[QueryCase]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--queries: cannot read {path}: {exc.strerror}") from None
    return parse_queries(text.splitlines(), source=str(path))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str, *, max_chars: int = MAX_QUERY_CHARS) -> str:
    """The first sentence of ``text``, whitespace collapsed, cut at a word within ``max_chars``.
    Pure."""
    collapsed = " ".join(text.split())
    sentence = _SENTENCE_END.split(collapsed, maxsplit=1)[0]
    if len(sentence) <= max_chars:
        return sentence
    cut = sentence[:max_chars].rsplit(" ", 1)[0]
    return cut or sentence[:max_chars]


async def sample_cases(
    conn: psycopg.AsyncConnection[Any],
    layout: Layout,
    *,
    count: int,
    seed: int,
    categories: Sequence[str] = (),
) -> list[QueryCase]:
    """``count`` unlabelled queries: the first sentence of documents picked by ``seed``.

    The pick is ``ORDER BY md5(seed || id)``: the same seed gives the same documents on the
    same data, on any server. Only documents with text (and in ``categories``, if given).
    """
    where = layout.s_embeddable
    if categories:
        where = sql.SQL("{} AND {} = ANY(%(categories)s)").format(where, layout.s_category)
    cur = await conn.execute(
        sql.SQL(
            "SELECT {text} FROM {src} s WHERE {where} "
            "ORDER BY md5(%(seed)s || {sid}::text) LIMIT %(count)s"
        ).format(text=layout.s_text, src=ident(layout.source), where=where, sid=layout.s_id),
        {"seed": f"{seed}:", "count": count, "categories": list(categories)},
    )
    cases = [QueryCase(first_sentence(str(row[0]))) for row in await cur.fetchall()]
    if not cases:
        raise DatabaseError(f"--sample: {layout.source} has no documents with text to sample")
    return cases


# ---- pure metrics -----------------------------------------------------------------------------


def recall_at_k(retrieved: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """The share of the relevant ids found in the top ``k`` retrieved. Pure.

    ``relevant`` must not be empty: recall of nothing is undefined (ValueError).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    wanted = set(relevant)
    if not wanted:
        raise ValueError("recall needs at least one relevant id")
    return len(wanted.intersection(retrieved[:k])) / len(wanted)


def reciprocal_rank(retrieved: Sequence[str], relevant: Iterable[str]) -> float:
    """``1 / rank`` of the first relevant id in ``retrieved`` (rank 1 is the top), 0 if none.
    Pure; the mean over queries is MRR (cut ``retrieved`` to k for MRR@k)."""
    wanted = set(relevant)
    for rank, item in enumerate(retrieved, start=1):
        if item in wanted:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(retrieved: Sequence[str], relevant: Iterable[str], k: int = NDCG_DEPTH) -> float:
    """Normalised discounted cumulative gain at ``k`` with binary relevance. Pure.

    ``DCG = Σ_{i ≤ k, retrieved[i] relevant} 1 / log2(i + 1)``, divided by the DCG of the ideal
    ranking (every relevant id first), so 1.0 means "as good as possible" even when fewer than
    ``k`` ids are relevant. A repeated id counts once. ``relevant`` must not be empty.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    wanted = set(relevant)
    if not wanted:
        raise ValueError("nDCG needs at least one relevant id")
    seen: set[str] = set()
    dcg = 0.0
    for rank, item in enumerate(retrieved[:k], start=1):
        if item in wanted and item not in seen:
            dcg += 1.0 / math.log2(rank + 1)
        seen.add(item)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(wanted), k) + 1))
    return dcg / ideal


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0 ≤ q ≤ 1) with linear interpolation between order statistics, as
    numpy's default; None for no values. Pure."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1]; got {q}")
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---- one run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryOutcome:
    """One query on one version: ids best first (depth ≥ k), the exact search's ids, timings."""

    ids: tuple[str, ...] = ()
    exact_ids: tuple[str, ...] = ()
    top_similarity: float | None = None
    embed_seconds: float = 0.0
    search_seconds: float = 0.0
    tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    ann_index: str | None = None  # the HNSW/IVFFlat index the search's plan used, if any

    @property
    def seconds(self) -> float:
        return self.embed_seconds + self.search_seconds


@dataclass(frozen=True)
class VersionFigures:
    """What one version did over the whole query set."""

    version: str
    model: str
    k: int
    queries: int
    errors: int
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None
    avg_latency_seconds: float | None
    avg_embed_seconds: float | None
    avg_search_seconds: float | None
    avg_top_similarity: float | None
    index_recall: float | None
    ann_index: str | None
    indexed_queries: int
    tokens: int
    cost_usd: float
    cost_per_1k_queries_usd: float | None
    labelled_queries: int
    recall_at_k: float | None
    mrr: float | None
    ndcg_at_10: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.queries if self.queries else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "queries": self.queries,
            "errors": self.errors,
            "errorRate": self.error_rate,
            "latencyP50Seconds": self.latency_p50_seconds,
            "latencyP95Seconds": self.latency_p95_seconds,
            "avgLatencySeconds": self.avg_latency_seconds,
            "avgEmbedSeconds": self.avg_embed_seconds,
            "avgSearchSeconds": self.avg_search_seconds,
            "avgTopSimilarity": self.avg_top_similarity,
            "indexRecall": self.index_recall,
            "annIndex": self.ann_index,
            "indexedQueries": self.indexed_queries,
            "tokens": self.tokens,
            "costUSD": round(self.cost_usd, 9),
            "costPer1kQueriesUSD": self.cost_per_1k_queries_usd,
            "labelledQueries": self.labelled_queries,
            "recallAtK": self.recall_at_k,
            "mrr": self.mrr,
            "ndcgAt10": self.ndcg_at_10,
        }

    def dashboard_metrics(self) -> dict[str, float | None]:
        """The figures under the dashboard's metric names (``DASHBOARD_METRICS``); a compare run
        bypasses the query cache, so ``cache_hit_rate`` is None (not measured)."""
        return {
            "requests": float(self.queries),
            "avg_latency_seconds": self.avg_latency_seconds,
            "p95_latency_seconds": self.latency_p95_seconds,
            "error_rate": self.error_rate,
            "cache_hit_rate": None,
            "avg_top_similarity": self.avg_top_similarity,
            "cost_per_1k_queries_usd": self.cost_per_1k_queries_usd,
        }


def summarise(
    version: str,
    model: str,
    cases: Sequence[QueryCase],
    outcomes: Sequence[QueryOutcome],
    *,
    k: int,
) -> VersionFigures:
    """Aggregate per-query outcomes (in ``cases`` order) into one version's figures. Pure.

    Averages are over the queries that did not fail; index recall is micro-averaged (all
    top-k hits over all exact top-k ids), as ``migrate verify`` does.
    """
    if len(cases) != len(outcomes):
        raise ValueError("one outcome per case")
    ok = [(c, o) for c, o in zip(cases, outcomes, strict=True) if o.error is None]
    seconds = [o.seconds for _, o in ok]
    tops = [o.top_similarity for _, o in ok if o.top_similarity is not None]
    found = sum(len(set(o.ids[:k]) & set(o.exact_ids[:k])) for _, o in ok)
    exact = sum(len(o.exact_ids[:k]) for _, o in ok)
    labelled = [(c, o) for c, o in ok if c.labelled]
    cost = sum(o.cost_usd for o in outcomes)
    indexes = Counter(o.ann_index for _, o in ok if o.ann_index)
    return VersionFigures(
        version=version,
        model=model,
        k=k,
        queries=len(outcomes),
        errors=len(outcomes) - len(ok),
        latency_p50_seconds=percentile(seconds, 0.5),
        latency_p95_seconds=percentile(seconds, 0.95),
        avg_latency_seconds=_mean(seconds),
        avg_embed_seconds=_mean([o.embed_seconds for _, o in ok]),
        avg_search_seconds=_mean([o.search_seconds for _, o in ok]),
        avg_top_similarity=_mean(tops),
        index_recall=found / exact if exact else None,
        ann_index=indexes.most_common(1)[0][0] if indexes else None,
        indexed_queries=sum(indexes.values()),
        tokens=sum(o.tokens for o in outcomes),
        cost_usd=cost,
        cost_per_1k_queries_usd=1000 * cost / len(ok) if ok else None,
        labelled_queries=len(labelled),
        recall_at_k=_mean([recall_at_k(o.ids, c.relevant, k) for c, o in labelled]),
        mrr=_mean([reciprocal_rank(o.ids[:k], c.relevant) for c, o in labelled]),
        ndcg_at_10=_mean([ndcg_at_k(o.ids, c.relevant, NDCG_DEPTH) for c, o in labelled]),
    )


@dataclass(frozen=True)
class Agreement:
    """How far v1's and v2's top k agree, averaged over queries both answered."""

    queries: int
    overlap_at_k: float | None
    rbo: float | None
    top1_agreement: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "overlapAtK": self.overlap_at_k,
            "rbo": self.rbo,
            "top1Agreement": self.top1_agreement,
        }


def agreement(
    first: Sequence[QueryOutcome], second: Sequence[QueryOutcome], *, k: int, p: float = 0.9
) -> Agreement:
    """overlap@k, rank-biased overlap (persistence ``p``) and same-top-1 share. Pure."""
    pairs = [
        (a.ids[:k], b.ids[:k])
        for a, b in zip(first, second, strict=True)
        if a.error is None and b.error is None
    ]
    return Agreement(
        queries=len(pairs),
        overlap_at_k=_mean([overlap_at_k(a, b, k) for a, b in pairs]),
        rbo=_mean([rank_biased_overlap(a, b, p=p) for a, b in pairs]),
        top1_agreement=_mean([float(bool(a) and bool(b) and a[0] == b[0]) for a, b in pairs]),
    )


@dataclass(frozen=True)
class CompareReport:
    k: int
    query_source: str
    cases: tuple[QueryCase, ...]
    versions: dict[str, VersionFigures]
    agreement: Agreement | None
    v2_coverage: tuple[int, int] | None = None  # (v2 vectors, documents with text)

    @property
    def v2_share(self) -> float | None:
        if self.v2_coverage is None:
            return None
        vectors, documents = self.v2_coverage
        return min(1.0, vectors / documents) if documents else 1.0

    def as_dict(self) -> dict[str, Any]:
        coverage = None
        if self.v2_coverage is not None:
            vectors, documents = self.v2_coverage
            coverage = {"vectors": vectors, "documents": documents, "share": self.v2_share}
        return {
            "k": self.k,
            "querySource": self.query_source,
            "queries": len(self.cases),
            "labelledQueries": sum(c.labelled for c in self.cases),
            "versions": {name: figures.as_dict() for name, figures in self.versions.items()},
            "agreement": self.agreement.as_dict() if self.agreement else None,
            "v2Coverage": coverage,
        }


_FATAL_PROVIDER_ERRORS = (AuthenticationFailed, QuotaExceeded, DimensionMismatch)


async def _one(
    conn: psycopg.AsyncConnection[Any],
    layout: Layout,
    version: Version,
    provider: EmbeddingProvider,
    case: QueryCase,
    *,
    depth: int,
    ann_indexes: frozenset[str],
) -> QueryOutcome:
    started = time.perf_counter()
    try:
        embedded = await provider.embed([case.query], Purpose.QUERY)
    except _FATAL_PROVIDER_ERRORS:
        raise  # every other query would fail the same way
    except ProviderError as exc:
        return QueryOutcome(
            embed_seconds=time.perf_counter() - started,
            tokens=exc.spent_tokens,
            cost_usd=exc.spent_usd,
            error=str(exc),
        )
    embedded_at = time.perf_counter()
    vector = embedded.vectors[0]
    hits = await search(conn, layout, version, vector, k=depth, category=case.category)
    searched_at = time.perf_counter()
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_indexscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        exact = await search(conn, layout, version, vector, k=depth, category=case.category)
    used = None
    if ann_indexes:
        used = await _plan_ann_index(
            conn, layout, version, vector, depth=depth, category=case.category, known=ann_indexes
        )
    return QueryOutcome(
        ids=tuple(h.id for h in hits),
        exact_ids=tuple(h.id for h in exact),
        top_similarity=hits[0].similarity if hits else None,
        embed_seconds=embedded_at - started,
        search_seconds=searched_at - embedded_at,
        tokens=embedded.usage.tokens,
        cost_usd=embedded.usage.cost_usd,
        ann_index=used,
    )


def _plan_indexes(plan: Any) -> list[str]:
    """Every ``Index Name`` in an EXPLAIN (FORMAT JSON) plan. Pure."""
    found: list[str] = []
    if isinstance(plan, dict):
        if isinstance(plan.get("Index Name"), str):
            found.append(plan["Index Name"])
        for value in plan.values():
            found.extend(_plan_indexes(value))
    elif isinstance(plan, list):
        for value in plan:
            found.extend(_plan_indexes(value))
    return found


async def _ann_indexes(conn: psycopg.AsyncConnection[Any], layout: Layout) -> frozenset[str]:
    """The HNSW and IVFFlat indexes on the source and side tables."""
    cur = await conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam "
        "WHERE i.indrelid IN (to_regclass(%s), to_regclass(%s)) "
        "AND am.amname IN ('hnsw', 'ivfflat')",
        [layout.source.regclass_text, layout.target.regclass_text],
    )
    return frozenset(str(r[0]) for r in await cur.fetchall())


async def _plan_ann_index(
    conn: psycopg.AsyncConnection[Any],
    layout: Layout,
    version: Version,
    vector: Any,
    *,
    depth: int,
    category: str | None,
    known: frozenset[str],
) -> str | None:
    """The ANN index in the plan of ``version``'s search for these values; None: exact scan.

    The compare connection does not prepare statements, so the plan executed is this custom
    plan for the same values.
    """
    statement = search_statement(layout, version, category=category is not None)
    cur = await conn.execute(
        sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement),
        {"q": vector, "k": depth, "fetch": over_fetch(depth), "category": category},
    )
    row = await cur.fetchone()
    return next((n for n in _plan_indexes(row[0] if row else []) if n in known), None)


async def _coverage(conn: psycopg.AsyncConnection[Any], layout: Layout) -> tuple[int, int]:
    """(vectors in the side table, source documents with text): how much of the corpus v2 sees."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT (SELECT count(*) FROM {tgt}), (SELECT count(*) FROM {src} s WHERE {text})"
        ).format(tgt=ident(layout.target), src=ident(layout.source), text=layout.s_embeddable)
    )
    row = await cur.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def run_compare(
    url: str,
    spec: DataPlaneSpec,
    *,
    cases: Sequence[QueryCase] | None = None,
    sample: int | None = None,
    seed: int = 0,
    k: int = 10,
    versions: Sequence[Version] = (Version.V1, Version.V2),
    prices: PriceTable | None = None,
    ef_search: int | None = None,
    query_source: str | None = None,
    providers: Mapping[Version, EmbeddingProvider] | None = None,
) -> CompareReport:
    """Run ``cases`` (or ``sample`` sampled queries) on ``versions`` and measure them.

    ``providers`` overrides the ones built from the spec and the environment (they are then
    not closed here). Raises ConfigError/DatabaseError/ProviderError subclasses.
    """
    if k < 1:
        raise ConfigError(f"-k: must be at least 1, not {k}")
    if Version.V1 in versions and spec.source is None:
        raise ConfigError(
            "spec.source: v1 queries are embedded with the source model; pass "
            "--source provider:model@dims (e.g. google:gemini-embedding-001@1536) or set "
            "spec.source in --config"
        )
    models = {
        Version.V1: spec.source.descriptor if spec.source else "",
        Version.V2: spec.target.descriptor,
    }
    depth = max(k, NDCG_DEPTH)
    conn = await connect(url, autocommit=True)
    owned: dict[Version, EmbeddingProvider] = {}
    try:
        async with conn:
            layout = await inspect_source(conn, spec)
            for version in versions:
                search_statement(layout, version, category=False)  # v1 needs its column
            if Version.V2 in versions and not await table_exists(conn, layout.target):
                raise DatabaseError(
                    f"{layout.target} does not exist: v2 has no vectors yet; run "
                    "`embedshift migrate setup` and `embedshift migrate run` first"
                )
            coverage = await _coverage(conn, layout) if Version.V2 in versions else None
            await configure_connection(conn, ef_search=ef_search_for(spec.target, ef_search))
            conn.prepare_threshold = None  # custom plans only: what EXPLAIN shows is what runs
            ann_indexes = await _ann_indexes(conn, layout)
            if cases is None:
                count = sample or DEFAULT_SAMPLE
                cases = await sample_cases(
                    conn, layout, count=count, seed=seed, categories=spec.migration.categories
                )
                query_source = query_source or f"sample of {len(cases)} documents (seed {seed})"
            if not cases:
                raise ConfigError("--queries: no queries to run")
            active: dict[Version, EmbeddingProvider] = {}
            for version in versions:
                if providers is not None and version in providers:
                    active[version] = providers[version]
                    continue
                model_spec = spec.source if version is Version.V1 else spec.target
                assert model_spec is not None
                role: Literal["source", "target"] = "source" if version is Version.V1 else "target"
                owned[version] = active[version] = make_provider(
                    model_spec,
                    api_key=api_key_from_env(model_spec, role),
                    prices=prices,
                    role=role,
                    concurrency=1,
                )
            for version in versions:  # warm up: untimed, uncounted
                try:
                    warm = await active[version].embed([cases[0].query], Purpose.QUERY)
                except _FATAL_PROVIDER_ERRORS:
                    raise
                except ProviderError:
                    continue  # the measured run will count what keeps failing
                await search(conn, layout, version, warm.vectors[0], k=depth)
            outcomes: dict[Version, list[QueryOutcome]] = {v: [] for v in versions}
            for i, case in enumerate(cases):
                order = list(versions) if i % 2 == 0 else list(reversed(versions))
                for version in order:
                    outcomes[version].append(
                        await _one(
                            conn,
                            layout,
                            version,
                            active[version],
                            case,
                            depth=depth,
                            ann_indexes=ann_indexes,
                        )
                    )
    finally:
        for provider in owned.values():
            await provider.aclose()
    figures = {v.value: summarise(v.value, models[v], cases, outcomes[v], k=k) for v in versions}
    both = Version.V1 in versions and Version.V2 in versions
    return CompareReport(
        k=k,
        query_source=query_source or "queries",
        cases=tuple(cases),
        versions=figures,
        agreement=agreement(outcomes[Version.V1], outcomes[Version.V2], k=k) if both else None,
        v2_coverage=coverage,
    )


# ---- rendering --------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.1f} ms"


def _fraction(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.2f} %"


def _usd(value: float | None) -> str:
    return "–" if value is None else f"${value:.6f}"


def compare_table(report: CompareReport) -> Group:
    """The compare report as rich renderables (a table and the agreement line). Pure."""
    names = list(report.versions)
    table = Table(
        "metric",
        *(f"{name} {report.versions[name].model}" for name in names),
        title=f"compare on {len(report.cases)} queries ({report.query_source}), k={report.k}",
    )

    def row(label: str, cell: Callable[[VersionFigures], str]) -> None:
        table.add_row(label, *(cell(report.versions[name]) for name in names))

    row("latency p50 (embed + search)", lambda f: _ms(f.latency_p50_seconds))
    row("latency p95 (embed + search)", lambda f: _ms(f.latency_p95_seconds))
    row(
        "  embedding / search (mean)",
        lambda f: f"{_ms(f.avg_embed_seconds)} / {_ms(f.avg_search_seconds)}",
    )
    row("avg top-1 similarity", lambda f: _fraction(f.avg_top_similarity))
    row(
        f"index recall@{report.k} vs exact",
        lambda f: (
            f"{_fraction(f.index_recall)} "
            + (
                f"({f.ann_index} in {f.indexed_queries} of {f.queries - f.errors})"
                if f.ann_index
                else "(exact scans: no ANN index used)"
            )
        ),
    )
    labelled = sum(c.labelled for c in report.cases)
    if labelled:
        row(f"recall@{report.k} ({labelled} labelled)", lambda f: _fraction(f.recall_at_k))
        row(f"MRR@{report.k}", lambda f: _fraction(f.mrr))
        row(f"nDCG@{NDCG_DEPTH}", lambda f: _fraction(f.ndcg_at_10))
    row("errors", lambda f: f"{f.errors} of {f.queries}")
    row("cost per 1k queries", lambda f: _usd(f.cost_per_1k_queries_usd))
    row("tokens", lambda f: f"{f.tokens:,}")
    parts: list[Any] = [table]
    share = report.v2_share
    if share is not None and share < 1.0:
        vectors, documents = report.v2_coverage or (0, 0)
        parts.append(
            f"v2 has vectors for {vectors:,} of {documents:,} documents ({share * 100:.1f} %): "
            "until the migration completes, v2 cannot find the rest and the agreement below "
            "understates it"
        )
    if report.agreement is not None:
        a = report.agreement
        parts.append(
            f"v1 ↔ v2 agreement over {a.queries} queries: overlap@{report.k} "
            f"{_fraction(a.overlap_at_k)}, rank-biased overlap {_fraction(a.rbo)}, "
            f"same top-1 {_percent(a.top1_agreement)}"
        )
    return Group(*parts)


# ---- baseline ---------------------------------------------------------------------------------

BaselineSource = Literal["prometheus", "compare"]


@dataclass(frozen=True)
class Baseline:
    """v1's figures at one moment, under the dashboard's metric names (``DASHBOARD_METRICS``)."""

    recorded_at: str
    source: BaselineSource
    version: str
    model: str
    migration: str
    metrics: dict[str, float | None]
    prometheus: dict[str, str] | None = None  # {"url", "range"}
    compare: dict[str, Any] | None = None  # {"queries", "sample", "seed", "k", "count"}

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": BASELINE_KIND,
            "format": BASELINE_FORMAT,
            "recordedAt": self.recorded_at,
            "source": self.source,
            "version": self.version,
            "model": self.model,
            "migration": self.migration,
            "prometheus": self.prometheus,
            "compare": self.compare,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, raw: Any, *, where: str) -> Baseline:
        """Validate a baseline file's content; every problem is one ConfigError line."""
        if not isinstance(raw, dict) or raw.get("kind") != BASELINE_KIND:
            raise ConfigError(
                f'{where} is not an embedshift baseline (no "kind": "{BASELINE_KIND}"); '
                "record one with `embedshift baseline`"
            )
        if raw.get("format") != BASELINE_FORMAT:
            raise ConfigError(
                f"{where}: baseline format {raw.get('format')!r} is not {BASELINE_FORMAT}; "
                "record it again with this version of embedshift"
            )
        source = raw.get("source")
        if source not in ("prometheus", "compare"):
            raise ConfigError(f'{where}: "source" must be "prometheus" or "compare"')
        metrics = raw.get("metrics")
        if not isinstance(metrics, dict):
            raise ConfigError(f'{where}: "metrics" must be an object')
        values: dict[str, float | None] = {}
        for name in DASHBOARD_METRICS:
            value = metrics.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise ConfigError(f"{where}: metrics.{name} must be a number or null")
            values[name] = None if value is None else float(value)
        prometheus = raw.get("prometheus")
        compare = raw.get("compare")
        return cls(
            recorded_at=str(raw.get("recordedAt", "")),
            source=source,
            version=str(raw.get("version", "v1")),
            model=str(raw.get("model", "")),
            migration=str(raw.get("migration", "")),
            metrics=values,
            prometheus=prometheus if isinstance(prometheus, dict) else None,
            compare=compare if isinstance(compare, dict) else None,
        )


def load_baseline(path: Path) -> Baseline:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"--output: no baseline at {path}: record v1's figures first with "
            "`embedshift baseline` (same --output)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"--output: cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--output: {path} is not JSON: {exc.msg}") from None
    return Baseline.from_dict(raw, where=str(path))


@dataclass(frozen=True)
class VerdictRow:
    """One success criterion judged for v2: ``value`` is v2's, ``limit`` the number it was held
    against (for a bound relative to v1: the ratio times the baseline's figure)."""

    criterion: CriterionDefault
    value: float | None
    limit: float | None
    verdict: Verdict
    detail: str

    @property
    def name(self) -> str:
        return self.criterion.name

    @property
    def metric(self) -> str:
        return self.criterion.metric

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "value": self.value,
            "bound": self.criterion.bound.describe(),
            "limit": self.limit,
            "verdict": self.verdict.value,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class BaselineJudgement:
    """The success criteria for v2 against the baseline: those judged, and those the source
    cannot measure (listed, never judged, never a failure)."""

    rows: tuple[VerdictRow, ...]
    not_measured: tuple[CriterionDefault, ...]

    @property
    def ok(self) -> bool:
        """Every judged criterion passes; ``nodata`` does not pass."""
        return all(row.verdict is Verdict.PASS for row in self.rows)

    def not_measured_as_dicts(self) -> list[dict[str, str]]:
        return [
            {"name": c.name, "metric": c.metric, "bound": c.bound.describe()}
            for c in self.not_measured
        ]


def judge_baseline(
    baseline: Mapping[str, float | None],
    current: Mapping[str, float | None],
    *,
    unmeasured: Iterable[str] = (),
    criteria: Sequence[CriterionDefault] = DEFAULT_SUCCESS_CRITERIA,
) -> BaselineJudgement:
    """``criteria`` for v2 (``current``) against v1 (``baseline``), by :func:`criteria.judge`.
    Pure.

    A criterion on a metric the source cannot measure (``unmeasured``: a compare run bypasses
    the query cache; a baseline file holds only the dashboard's figures, so no critical-errors
    count) is listed in ``not_measured``. A criterion whose numbers are missing is ``nodata``,
    which never passes.
    """
    skip = set(unmeasured)
    rows: list[VerdictRow] = []
    not_measured: list[CriterionDefault] = []
    for criterion in criteria:
        if criterion.metric in skip or criterion.metric not in DASHBOARD_METRICS:
            not_measured.append(criterion)
            continue
        value = current.get(criterion.metric)
        v1_value = baseline.get(criterion.metric) if criterion.bound.compares_versions else None
        verdict = judge(value, criterion.bound, v1_value=v1_value)
        detail = criterion.description
        if verdict is Verdict.NODATA:
            detail = "no data for v2" if value is None else "no data for the baseline (v1)"
        rows.append(VerdictRow(criterion, value, criterion.bound.limit(v1_value), verdict, detail))
    return BaselineJudgement(tuple(rows), tuple(not_measured))


_METRIC_LABELS = {
    "requests": "requests",
    "avg_latency_seconds": "avg latency",
    "p95_latency_seconds": "p95 latency",
    "error_rate": "error rate",
    "cache_hit_rate": "cache hit rate",
    "avg_top_similarity": "avg top-1 similarity",
    "cost_per_1k_queries_usd": "cost per 1k queries",
}


def _metric_text(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    unit = METRICS[metric].unit
    if unit == "seconds":
        return _ms(value)
    if unit == "ratio":
        return _percent(value)
    if unit == "usd":
        return _usd(value)
    if unit == "count":
        return f"{value:,.0f}"
    return f"{value:.3f}"


def criteria_text(criteria: Iterable[CriterionDefault] = DEFAULT_SUCCESS_CRITERIA) -> str:
    """``p95_latency_seconds ≤ 0.8; …``: the criteria as ``--help`` states them. Pure."""
    return "; ".join(f"{c.metric} {c.bound.describe()}" for c in criteria)


def deltas(
    baseline: Mapping[str, float | None], current: Mapping[str, float | None]
) -> dict[str, dict[str, float | None]]:
    """Per metric: v1 (baseline), v2 (now), the difference and the relative change. Pure."""
    out: dict[str, dict[str, float | None]] = {}
    for metric in DASHBOARD_METRICS:
        before, now = baseline.get(metric), current.get(metric)
        delta = None if before is None or now is None else now - before
        relative = None if delta is None or not before else delta / abs(before)
        out[metric] = {"v1": before, "v2": now, "delta": delta, "relative": relative}
    return out


def baseline_comparison_view(
    baseline: Baseline,
    current: Mapping[str, float | None],
    judgement: BaselineJudgement,
    *,
    current_model: str,
    source: str,
) -> Group:
    """``baseline --compare`` for people: metrics with deltas, then the verdicts. Pure."""
    metrics = Table(
        "metric",
        f"v1 baseline {baseline.model}",
        f"v2 now {current_model}",
        "Δ",
        "Δ %",
        title=f"v2 now ({source}) against the v1 baseline of {baseline.recorded_at} "
        f"({baseline.source})",
    )
    for metric, d in deltas(baseline.metrics, current).items():
        delta = d["delta"]
        sign = "" if delta is None or delta < 0 else "+"
        delta_text = "–" if delta is None else sign + _metric_text(metric, delta)
        metrics.add_row(
            _METRIC_LABELS.get(metric, metric),
            _metric_text(metric, d["v1"]),
            _metric_text(metric, d["v2"]),
            delta_text,
            "–" if d["relative"] is None else f"{d['relative'] * 100:+.1f} %",
        )
    verdicts = Table("criterion", "v2", "bound", "verdict", "why", title="success criteria")
    marks = {
        Verdict.PASS: "✓ pass",
        Verdict.FAIL: "✗ FAIL",
        Verdict.NODATA: "? no data",
        Verdict.ERROR: "! error",
    }
    for row in judgement.rows:
        # The bound as configured, then the number it came to in the metric's own unit.
        bound_text = row.criterion.bound.describe()
        if row.limit is not None:
            bound_text += f" ({_metric_text(row.metric, row.limit)})"
        verdicts.add_row(
            row.name,
            _metric_text(row.metric, row.value),
            bound_text,
            marks[row.verdict],
            row.detail,
        )
    parts: list[Any] = [metrics, verdicts]
    if judgement.not_measured:
        parts.append(
            "not measured by this source: "
            + ", ".join(f"{c.name} ({c.description})" for c in judgement.not_measured)
        )
    parts.append(
        "all success criteria pass: v2 may take more traffic"
        if judgement.ok
        else "success criteria NOT met: hold the rollout ("
        + ", ".join(r.name for r in judgement.rows if r.verdict is not Verdict.PASS)
        + ")"
    )
    return Group(*parts)


def baseline_table(baseline: Baseline, path: Path) -> Table:
    """A recorded baseline for people: v1's figure per dashboard metric. Pure."""
    table = Table("metric", f"v1 {baseline.model}", title=f"v1 baseline → {path}")
    for metric in DASHBOARD_METRICS:
        table.add_row(_METRIC_LABELS[metric], _metric_text(metric, baseline.metrics[metric]))
    return table


def save_baseline(path: Path, baseline: Baseline) -> None:
    """Write ``baseline`` to ``path`` as JSON; a failure is one ConfigError line."""
    try:
        path.write_text(json.dumps(baseline.as_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {path}: {exc.strerror}") from None


# ---- measuring a version now ------------------------------------------------------------------


@dataclass
class Measured:
    """One version's figures now, under the dashboard's metric names, and where they came from.

    ``unmeasured``: metrics the source cannot measure. ``prometheus`` ({"url", "range"}) or
    ``compare`` ({"queries", "sample", "seed", "k", "count"}) is how to measure it the same way
    again, as a baseline file records it.
    """

    metrics: dict[str, float | None]
    source: BaselineSource
    unmeasured: tuple[str, ...] = ()
    prometheus: dict[str, str] | None = None
    compare: dict[str, Any] | None = None
    report: CompareReport | None = field(default=None)

    def describe(self) -> str:
        """``Prometheus over 24h`` or ``compare run of 50 queries``."""
        if self.prometheus:
            return f"Prometheus over {self.prometheus['range']}"
        return f"compare run of {(self.compare or {}).get('count')} queries"


async def measure(
    url: str,
    spec: DataPlaneSpec,
    prices: PriceTable,
    *,
    migration: str,
    version: Version,
    like: Baseline | None,
    prometheus_url: str | None = None,
    range_: str | None = None,
    queries: Path | None = None,
    sample: int | None = None,
    seed: int | None = None,
    k: int | None = None,
    ef_search: int | None = None,
) -> Measured:
    """``version``'s figures now, from Prometheus (``prometheus_url``) or a compare run.

    With ``like`` (the baseline to compare with), the source is the baseline's and every
    option not given is the baseline's: its Prometheus URL and range, or its query set, seed
    and k. Mixing sources is a ConfigError.
    """
    if like is not None:
        if like.source == "compare" and prometheus_url:
            raise ConfigError(
                "--prometheus-url: the baseline was recorded from a compare run; comparing it "
                "with Prometheus figures would mix sources. Drop --prometheus-url, or record a "
                "new baseline with it"
            )
        if like.source == "prometheus" and not prometheus_url:
            prometheus_url = (like.prometheus or {}).get("url")
            if not prometheus_url:
                raise ConfigError(
                    "--prometheus-url: the baseline came from Prometheus; pass its URL"
                )
    if prometheus_url:
        stored_range = (like.prometheus or {}).get("range") if like else None
        window = range_ or stored_range or "24h"
        model_spec = spec.source if version is Version.V1 else spec.target
        if model_spec is None:
            raise ConfigError(
                "--source: v1's cost per query is counted by its provider and model; pass "
                "--source provider:model@dims (or set spec.source in --config)"
            )
        summary = await prometheus_summary(
            prometheus_url,
            migration=migration,
            range_=window,
            models={version.value: (model_spec.provider.value, model_spec.model)},
        )
        async with PrometheusClient(url=prometheus_url) as client:
            shown_url = client.url  # without credentials
        metrics = dict(summary[version.value])
        if like is None and not metrics.get("requests"):
            raise DatabaseError(
                f"Prometheus at {shown_url} has no {version.value} searches over the last "
                f"{window}: nothing to record; widen --range, or record from a compare run "
                "(without --prometheus-url)"
            )
        return Measured(
            metrics=metrics,
            source="prometheus",
            prometheus={"url": shown_url, "range": window},
        )
    stored = (like.compare or {}) if like else {}
    if queries is None and sample is None and stored:
        queries = Path(stored["queries"]) if stored.get("queries") else None
        sample = stored.get("sample")
    seed = seed if seed is not None else int(stored.get("seed", 0))
    k = k or int(stored.get("k", 10))
    cases = load_queries(queries) if queries else None
    report = await run_compare(
        url,
        spec,
        cases=cases,
        sample=sample,
        seed=seed,
        k=k,
        versions=(version,),
        prices=prices,
        ef_search=ef_search,
        query_source=str(queries) if queries else None,
    )
    figures = report.versions[version.value]
    return Measured(
        metrics=figures.dashboard_metrics(),
        source="compare",
        unmeasured=("cache_hit_rate",),
        compare={
            "queries": str(queries) if queries else None,
            "sample": None if queries else len(report.cases),
            "seed": seed,
            "k": k,
            "count": len(report.cases),
        },
        report=report,
    )
