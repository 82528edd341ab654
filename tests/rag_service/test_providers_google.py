"""GoogleProvider through the real ``google-genai`` SDK against the local embedding API."""

from __future__ import annotations

import time

import numpy as np
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from rag_service.errors import AuthenticationFailed, DimensionMismatch, QuotaExceeded
from rag_service.providers import make_provider
from rag_service.providers.base import Purpose, Vectors
from rag_service.providers.google import GoogleProvider, task_type
from rag_service.providers.local import HashEmbedder
from rag_service.providers.pricing import PriceTable
from rag_service.spec import EmbeddingSpec
from rag_service.testing import EmbeddingServer
from tests.embedding_fixtures import EMBEDDING_API_KEY, GoogleFactory

MODEL = "gemini-embedding-001"


def corpus(n: int) -> list[str]:
    return [f"passage {i} on subject {i % 11}: gamma delta {i % 5}" for i in range(n)]


def assert_unit_and_same_direction(vectors: Vectors, texts: list[str], dimensions: int) -> None:
    assert vectors.shape == (len(texts), dimensions)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = HashEmbedder(dimensions, seed=MODEL).embed(texts)
    assert np.allclose(np.sum(expected * vectors, axis=1), 1.0, atol=1e-5)


async def test_5000_texts_go_100_at_a_time_normalised_and_in_order(
    google_provider: GoogleFactory, embedding_server: EmbeddingServer
) -> None:
    texts = corpus(5000)
    result = await google_provider(concurrency=4).embed(texts, Purpose.DOCUMENT)

    assert_unit_and_same_direction(result.vectors, texts, 64)
    records = embedding_server.requests
    assert all(r.status == 200 for r in records)
    assert max(r.inputs for r in records) <= 100
    assert sum(r.inputs for r in records) == 5000
    assert {r.dimensions for r in records} == {64}
    # No token count from the Gemini API: usage is our estimate, and so is the cost.
    estimate = google_provider().estimate_tokens(texts)
    assert result.usage.tokens == estimate
    assert result.usage.requests == len(records)
    assert result.usage.cost_usd == pytest.approx(PriceTable().cost("google", MODEL, estimate))


@pytest.mark.parametrize(
    ("purpose", "sent"),
    [(Purpose.DOCUMENT, "RETRIEVAL_DOCUMENT"), (Purpose.QUERY, "RETRIEVAL_QUERY")],
)
async def test_task_type_follows_the_purpose(
    google_provider: GoogleFactory,
    embedding_server: EmbeddingServer,
    purpose: Purpose,
    sent: str,
) -> None:
    assert task_type(purpose) == sent
    await google_provider().embed(corpus(150), purpose)
    assert {r.task_types for r in embedding_server.requests} == {(sent,)}


@pytest.mark.parametrize("dimensions", [128, 768, 1536])
async def test_truncated_dimensions_come_back_unit_length(
    google_provider: GoogleFactory, embedding_server: EmbeddingServer, dimensions: int
) -> None:
    texts = corpus(20)
    result = await google_provider(dimensions=dimensions).embed(texts, Purpose.QUERY)
    assert_unit_and_same_direction(result.vectors, texts, dimensions)
    assert [r.dimensions for r in embedding_server.requests] == [dimensions]


async def test_errors_and_rate_limits_are_ridden_out(
    google_provider: GoogleFactory, embedding_server: EmbeddingServer
) -> None:
    """20 % of requests fail with 500/503 and the token budget starts spent: Google's 429
    RESOURCE_EXHAUSTED carries a RetryInfo delay, which is honoured."""
    embedding_server.configure({"tpm": 300_000, "error_rate": 0.2, "seed": 5})
    embedding_server.drain()
    texts = corpus(2000)
    started = time.monotonic()
    result = await google_provider(concurrency=4).embed(texts, Purpose.DOCUMENT)
    assert time.monotonic() - started < 30

    assert_unit_and_same_direction(result.vectors, texts, 64)
    statuses = [r.status for r in embedding_server.requests]
    assert statuses.count(429) >= 1
    assert statuses.count(500) + statuses.count(503) >= 1
    assert sum(r.inputs for r in embedding_server.requests if r.status == 200) == 2000


async def test_configured_limits_pace_without_headers(
    google_provider: GoogleFactory, embedding_server: EmbeddingServer
) -> None:
    """Google sends no rate-limit headers: the limits we are given keep us under its RPM."""
    embedding_server.rpm = 60  # a burst of 60, then one a second
    provider = google_provider(requests_per_minute=60, concurrency=8)
    started = time.monotonic()
    await provider.embed(corpus(6200), Purpose.DOCUMENT)  # 62 requests
    assert time.monotonic() - started >= 1.5  # the last two waited for the bucket
    assert [r.status for r in embedding_server.requests].count(429) == 0
    assert provider.pacer.requests_per_minute == 60


async def test_the_specs_limits_reach_the_pacer(embedding_server: EmbeddingServer) -> None:
    """``requestsPerMinute`` / ``tokensPerMinute`` in a spec pace a provider built by
    ``make_provider`` (the path the CLI and the operator's Jobs take), not only a hand-made one."""
    embedding_server.rpm = 60
    spec = EmbeddingSpec.model_validate(
        {
            "provider": "google",
            "model": MODEL,
            "dimensions": 128,
            "baseURL": embedding_server.google_base_url,
            "requestsPerMinute": 60,
            "tokensPerMinute": 1_000_000,
        }
    )
    provider = make_provider(spec, api_key=EMBEDDING_API_KEY, concurrency=8)
    try:
        await provider.embed(corpus(6200), Purpose.DOCUMENT)  # 62 requests
        assert [r.status for r in embedding_server.requests].count(429) == 0
        assert isinstance(provider, GoogleProvider)
        assert provider.pacer.requests_per_minute == 60
        assert provider.pacer.tokens_per_minute == 1_000_000
    finally:
        await provider.aclose()


async def test_spent_daily_quota_fails_at_once(
    google_provider: GoogleFactory, embedding_server: EmbeddingServer
) -> None:
    embedding_server.insufficient_quota = True
    started = time.monotonic()
    with pytest.raises(QuotaExceeded) as caught:
        await google_provider().embed(corpus(1000), Purpose.DOCUMENT)
    assert time.monotonic() - started < 2
    assert len(embedding_server.requests) == 1
    assert EMBEDDING_API_KEY not in str(caught.value)


async def test_wrong_dimensions_fail_and_return_nothing(
    google_provider: GoogleFactory, embedding_server: EmbeddingServer
) -> None:
    embedding_server.wrong_dimensions = True
    with pytest.raises(DimensionMismatch, match="65-dimensional vectors, expected 64"):
        await google_provider().embed(corpus(10), Purpose.DOCUMENT)


@pytest.mark.parametrize("key", ["AIzaSyWRONG-5ecr3t-0123456789abcdef", ""])
async def test_a_refused_or_missing_key_fails_at_once_and_is_never_echoed(
    google_provider: GoogleFactory, embedding_server: EmbeddingServer, key: str
) -> None:
    # An empty key reaches the server as no key at all: Google answers 403, not 400.
    with pytest.raises(AuthenticationFailed) as caught:
        await google_provider(api_key=key or " ").embed(corpus(3), Purpose.DOCUMENT)
    message = str(caught.value)
    assert EMBEDDING_API_KEY not in message
    if key:
        assert key not in message and key[-8:] not in message
    assert len(embedding_server.requests) == 1


# --------------------------------------------------------------------------- the stand-in itself


async def test_server_refuses_more_than_100_texts_like_google(
    embedding_server: EmbeddingServer,
) -> None:
    client = genai.Client(
        api_key=EMBEDDING_API_KEY,
        vertexai=False,
        http_options=genai_types.HttpOptions(
            base_url=embedding_server.google_base_url,
            retry_options=genai_types.HttpRetryOptions(attempts=1),
        ),
    )
    try:
        with pytest.raises(genai_errors.ClientError, match="at most 100 requests") as caught:
            await client.aio.models.embed_content(model=MODEL, contents=["x"] * 101)
        assert caught.value.code == 400 and caught.value.status == "INVALID_ARGUMENT"
        # Full size: already unit length, as the real model's 3072-d output is.
        answer = await client.aio.models.embed_content(model=MODEL, contents=["hello"])
        assert answer.embeddings is not None
        values = np.asarray(answer.embeddings[0].values)
        assert values.shape == (3072,)
        assert np.linalg.norm(values) == pytest.approx(1.0, abs=1e-5)
    finally:
        await client.aio.aclose()
        client.close()
