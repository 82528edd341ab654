"""A sample RAG corpus in the guide's categories, for the demo, tests and benchmarks.

Deterministic for a seed. Documents are short templated sentences, so texts in a category share
words and the ``local`` hashing embedder gives them meaningful neighbours. Source (v1) vectors are
1536-d ``local:hash`` vectors, like the guide's v1 column.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from rag_service.identifiers import TableName
from rag_service.providers.local import HashEmbedder
from rag_service.schema import ident
from rag_service.spec import DataPlaneSpec, EmbeddingSpec

CATEGORIES = ("facilities", "pricing", "events")

# Per category: subjects, verbs and the objects only that category uses. Most objects come from
# the shared pool below, and some sentences come from another category (a price list names the
# pool, an event is held at the pool), as in a real centre's pages: the categories overlap in
# vocabulary instead of forming three islands that share only "the" (on which an HNSW graph
# falls apart into three components that a search cannot cross; see docs/benchmarks.md).
_VOCAB = {
    "facilities": (
        ["pool", "gym", "sauna", "parking", "locker room", "tennis court", "studio", "cafe",
         "spa", "squash court", "climbing wall"],
        ["opens at", "closes at", "is renovated in", "is accessible from", "is reserved on",
         "is busy on", "is closed on"],
        ["level two", "the north entrance", "wheelchair users"],
    ),
    "pricing": (
        ["membership", "day pass", "family plan", "student rate", "parking fee", "towel hire",
         "guest pass", "senior rate"],
        ["costs", "is discounted to", "rises to", "includes", "is refunded at", "is free on",
         "is paid for at"],
        ["twenty euros", "half price", "ten percent off", "the annual fee", "one free guest"],
    ),
    "events": (
        ["yoga class", "swim meet", "open day", "concert", "tennis cup", "kids camp", "workshop",
         "aqua aerobics", "spinning class"],
        ["starts on", "is moved to", "sells tickets from", "is cancelled for", "returns in",
         "is held at", "meets on"],
        ["beginners", "the main hall", "kids"],
    ),
}  # fmt: skip
_SHARED_OBJECTS = [
    "seven", "nine", "noon", "the weekend", "Mondays", "Friday evening", "Saturday", "the spring",
    "June", "August", "public holidays", "the evening", "the outdoor pool", "the front desk",
    "the holidays", "next week",
]  # fmt: skip
_OWN_OBJECT_SHARE = 0.4
_CROSS_SENTENCE_SHARE = 0.15


def _sentence(rng: random.Random, category: str) -> str:
    subjects, verbs, own = _VOCAB[category]
    pool = own if rng.random() < _OWN_OBJECT_SHARE else _SHARED_OBJECTS
    return f"The {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(pool)}."


SHORT = (2, 4)
"""Sentences per document by default: 11–38 words (mean 23), the tests' and the demo's size."""
CHUNK_SIZED = (9, 15)
"""Sentences per document for benchmarks at users' sizes: 56–127 words (98 % within 60–120,
mean 87), a typical RAG chunk."""


def documents(
    count: int, *, seed: int = 7, sentence_count: tuple[int, int] = SHORT
) -> Iterator[tuple[int, str, str]]:
    """(id, text, category) for ``count`` documents, ids 1..count, each of ``sentence_count``
    (least, most) sentences. Pure for a seed."""
    rng = random.Random(seed)
    for doc_id in range(1, count + 1):
        category = CATEGORIES[doc_id % len(CATEGORIES)]
        sentences = [
            _sentence(
                rng,
                rng.choice(CATEGORIES) if rng.random() < _CROSS_SENTENCE_SHARE else category,
            )
            for _ in range(rng.randint(*sentence_count))
        ]
        yield doc_id, f"{' '.join(sentences)} Note {doc_id}.", category


def create_corpus(
    url: str,
    *,
    table: str = "documents",
    count: int = 10_000,
    source_dimensions: int = 1536,
    seed: int = 7,
    chunk: int = 5_000,
    sentence_count: tuple[int, int] = SHORT,
) -> TableName:
    """(Re)create ``table`` (id bigint PK, content, category, embedding vector(d)) and fill it.

    ``source_dimensions=0`` leaves out the v1 embedding column (faster, for benchmarks).
    """
    name = TableName.parse(table, field="table")
    embedder = HashEmbedder(source_dimensions, seed="hash") if source_dimensions else None
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(ident(name)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, content text, category text NOT NULL{})"
            ).format(
                ident(name),
                sql.SQL(", embedding vector({})").format(sql.Literal(source_dimensions))
                if source_dimensions
                else sql.SQL(""),
            )
        )
        docs = list(documents(count, seed=seed, sentence_count=sentence_count))
        with conn.cursor() as cur:
            for start in range(0, len(docs), chunk):
                part = docs[start : start + chunk]
                columns = "id, content, category" + (", embedding" if embedder else "")
                with cur.copy(
                    sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                        ident(name), sql.SQL(columns)
                    )
                ) as copy:
                    if embedder is None:
                        copy.set_types(["int8", "text", "text"])
                        for row in part:
                            copy.write_row(row)
                        continue
                    copy.set_types(["int8", "text", "text", "vector"])
                    vectors = embedder.embed([text for _, text, _ in part])
                    for (doc_id, text, category), vector in zip(part, vectors, strict=True):
                        copy.write_row((doc_id, text, category, np.asarray(vector)))
        conn.execute(sql.SQL("ANALYZE {}").format(ident(name)))
    return name


def corpus_spec(
    table: str = "documents",
    *,
    source_dimensions: int = 1536,
    target: str | Mapping[str, Any] = "local:hash@768",
) -> DataPlaneSpec:
    """The spec for a table ``create_corpus`` made: its category and v1 columns, v1 being
    ``local:hash@<source_dimensions>``, and ``target`` (a descriptor, or a whole target mapping,
    e.g. with ``baseURL``). Pure."""
    if isinstance(target, str):
        target = EmbeddingSpec.parse(target).model_dump(include={"provider", "model", "dimensions"})
    return DataPlaneSpec.model_validate(
        {
            "database": {
                "table": table,
                "categoryColumn": "category",
                "sourceEmbeddingColumn": "embedding",
            },
            "source": {"provider": "local", "model": "hash", "dimensions": source_dimensions},
            "target": dict(target),
        }
    )
