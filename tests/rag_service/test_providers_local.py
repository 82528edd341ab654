"""The offline provider: deterministic, unit length, meaningful, any dimension."""

from __future__ import annotations

import numpy as np
import pytest

from rag_service.providers.base import Purpose
from rag_service.providers.local import HashEmbedder, LocalProvider, count_words

TEXTS = [
    "PostgreSQL stores the vectors next to the rows",
    "pgvector adds an HNSW index to PostgreSQL",
    "",
    "ünïcödé wörds and 数字 too",
    "the the the the",
]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_two_embedders_with_the_same_seed_agree_exactly() -> None:
    first = HashEmbedder(128, seed="hash").embed(TEXTS)
    second = HashEmbedder(128, seed="hash").embed(list(reversed(TEXTS)))[::-1]
    assert np.array_equal(first, second)


def test_the_seed_makes_a_different_model() -> None:
    a = HashEmbedder(128, seed="model-a").embed(TEXTS[:2])
    b = HashEmbedder(128, seed="model-b").embed(TEXTS[:2])
    assert not np.allclose(a, b)


@pytest.mark.parametrize("dimensions", [1, 2, 7, 64, 768, 1536, 3072])
def test_any_dimension_gives_unit_float32_rows(dimensions: int) -> None:
    vectors = HashEmbedder(dimensions).embed(TEXTS)
    assert vectors.shape == (len(TEXTS), dimensions)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_zero_dimensions_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        HashEmbedder(0)


@pytest.mark.parametrize(
    ("anchor", "related", "unrelated"),
    [
        (
            "how do I build an hnsw index in postgres",
            "building an hnsw index in postgres takes time",
            "the recipe needs two eggs and some flour",
        ),
        (
            "refund policy for annual plans",
            "annual plans: refund policy and exceptions",
            "kubernetes operator reconcile loop",
        ),
    ],
)
def test_shared_words_are_closer_than_disjoint_texts(
    anchor: str, related: str, unrelated: str
) -> None:
    a, r, u = HashEmbedder(768).embed([anchor, related, unrelated])
    assert cosine(a, r) > cosine(a, u) + 0.2


def test_word_order_matters_a_little_through_word_pairs() -> None:
    a, b, c = HashEmbedder(768).embed(["dog bites man", "man bites dog", "dog bites man"])
    assert cosine(a, c) == pytest.approx(1.0)
    assert 0.5 < cosine(a, b) < 1.0


async def test_local_provider_is_a_provider() -> None:
    provider = LocalProvider(model="hash", dimensions=96)
    assert provider.descriptor == "local:hash@96"
    assert provider.dimensions == 96
    result = await provider.embed(TEXTS, Purpose.DOCUMENT)
    assert np.array_equal(result.vectors, HashEmbedder(96, seed="hash").embed(TEXTS))
    assert result.usage.tokens == count_words(TEXTS) == provider.estimate_tokens(TEXTS)
    assert result.usage.cost_usd == 0.0
    await provider.aclose()


async def test_documents_and_queries_embed_alike_and_big_batches_match_small_ones() -> None:
    provider = LocalProvider(model="hash", dimensions=32)
    texts = [f"text number {i} with shared words" for i in range(500)]  # off the event loop
    big = await provider.embed(texts, Purpose.DOCUMENT)
    small = [await provider.embed(texts[i : i + 10], Purpose.QUERY) for i in range(0, 500, 10)]
    assert np.array_equal(big.vectors, np.concatenate([s.vectors for s in small]))
