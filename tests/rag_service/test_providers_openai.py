"""OpenAIProvider through the real ``openai`` SDK against the local embedding API.

The server's request record is the witness: what was sent (sizes, dimensions, encoding) and how
it was answered. Vectors are checked against the local HashEmbedder, which the server uses.
"""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
import time
import urllib.error

import numpy as np
import openai
import pytest

from rag_service.errors import AuthenticationFailed, DimensionMismatch, ProviderError, QuotaExceeded
from rag_service.providers.base import Purpose, Vectors
from rag_service.providers.local import HashEmbedder
from rag_service.providers.pricing import PriceTable
from rag_service.providers.retry import LimiterStyle, parse_duration
from rag_service.testing import EmbeddingServer
from tests.embedding_fixtures import EMBEDDING_API_KEY, OpenAIFactory, ServerProcess

MODEL = "text-embedding-3-small"


def corpus(n: int, *, offset: int = 0) -> list[str]:
    return [
        f"document {i} about topic {i % 7}: alpha beta {i % 13}" for i in range(offset, n + offset)
    ]


def assert_same_direction(
    vectors: Vectors, texts: list[str], *, dimensions: int, model: str = MODEL
) -> None:
    expected = HashEmbedder(dimensions, seed=model).embed(texts)
    assert vectors.shape == (len(texts), dimensions)
    assert vectors.dtype == np.float32
    cosines = np.sum(expected * vectors, axis=1) / np.linalg.norm(vectors, axis=1)
    assert np.allclose(cosines, 1.0, atol=1e-5)


async def test_5000_texts_go_in_requests_of_at_most_2048_and_come_back_in_order(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    texts = corpus(5000)
    provider = openai_provider(concurrency=4)
    result = await provider.embed(texts, Purpose.DOCUMENT)

    assert_same_direction(result.vectors, texts, dimensions=64)
    records = embedding_server.requests
    assert all(r.status == 200 for r in records)
    assert max(r.inputs for r in records) <= 2048
    assert sum(r.inputs for r in records) == 5000
    assert {r.dimensions for r in records} == {64}
    assert {r.encoding_format for r in records} == {"base64"}
    tokens = sum(r.tokens for r in records)
    assert result.usage.tokens == tokens  # the API's count, not our estimate
    assert result.usage.requests == len(records)
    assert result.usage.cost_usd == pytest.approx(PriceTable().cost("openai", MODEL, tokens))


@pytest.mark.parametrize("encoding_format", ["base64", "float"])
async def test_both_encodings_decode_to_the_same_vectors(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer, encoding_format: str
) -> None:
    texts = corpus(50)
    result = await openai_provider(encoding_format=encoding_format, dimensions=256).embed(
        texts, Purpose.QUERY
    )
    assert_same_direction(result.vectors, texts, dimensions=256)
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert {r.encoding_format for r in embedding_server.requests} == {encoding_format}


async def test_requests_stay_under_300k_tokens_and_a_refused_one_is_halved(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    # Punctuation is one token per character to the API but ~1/3 to our estimate. The small
    # first request (words) calibrates the estimate the other way, so the punctuation's first
    # full-size request is too large and only the API's 400 can tell it.
    texts = [f"{i} " + "word " * 60 for i in range(100)]
    texts += [f"{i} " + "!" * 200 for i in range(1900)]
    result = await openai_provider().embed(texts, Purpose.DOCUMENT)

    assert_same_direction(result.vectors, texts, dimensions=64)
    records = embedding_server.requests
    refused = [r for r in records if r.status == 400]
    assert refused and {r.error for r in refused} == {"max_tokens_per_request"}
    accepted = [r for r in records if r.status == 200]
    assert max(r.tokens for r in accepted) <= 300_000
    assert sum(r.inputs for r in accepted) == 2000


async def test_ada_002_is_not_sent_dimensions(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    texts = corpus(3)
    result = await openai_provider(model="text-embedding-ada-002", dimensions=1536).embed(
        texts, Purpose.DOCUMENT
    )
    assert_same_direction(result.vectors, texts, dimensions=1536, model="text-embedding-ada-002")
    assert [r.dimensions for r in embedding_server.requests] == [None]


async def test_empty_texts_do_not_sink_the_batch(openai_provider: OpenAIFactory) -> None:
    result = await openai_provider().embed(["", "hello world", ""], Purpose.DOCUMENT)
    assert result.vectors.shape == (3, 64)


async def test_no_texts_no_requests(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    result = await openai_provider().embed([], Purpose.DOCUMENT)
    assert result.vectors.shape == (0, 64)
    assert result.usage.requests == 0
    assert embedding_server.requests == []


async def test_errors_and_rate_limits_are_ridden_out(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    """20 % of requests fail with 500/503, and two workers (each its own provider and pacer, as
    two Jobs would be) share a drained tokens-per-minute budget: everything still arrives."""
    embedding_server.configure({"tpm": 240_000, "error_rate": 0.2, "seed": 3, "latency": 0.005})
    embedding_server.drain()
    texts = corpus(2000)
    workers = [openai_provider(concurrency=4) for _ in range(2)]
    batches = [texts[i : i + 100] for i in range(0, 2000, 100)]

    started = time.monotonic()
    results = await asyncio.gather(
        *(workers[n % 2].embed(batch, Purpose.DOCUMENT) for n, batch in enumerate(batches))
    )
    elapsed = time.monotonic() - started

    vectors = np.concatenate([r.vectors for r in results])
    assert_same_direction(vectors, texts, dimensions=64)
    statuses = [r.status for r in embedding_server.requests]
    assert statuses.count(429) >= 1
    assert statuses.count(500) + statuses.count(503) >= 1
    assert sum(r.inputs for r in embedding_server.requests if r.status == 200) == 2000
    assert elapsed < 30


async def test_insufficient_quota_fails_at_once_without_retrying(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    embedding_server.insufficient_quota = True
    started = time.monotonic()
    with pytest.raises(QuotaExceeded) as caught:
        await openai_provider(concurrency=4).embed(corpus(5000), Purpose.DOCUMENT)
    assert time.monotonic() - started < 2
    assert len(embedding_server.requests) == 1
    assert "quota" in str(caught.value)
    assert EMBEDDING_API_KEY not in str(caught.value)


async def test_wrong_dimensions_fail_and_return_nothing(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    embedding_server.wrong_dimensions = True
    with pytest.raises(DimensionMismatch, match="65-dimensional vectors, expected 64"):
        await openai_provider().embed(corpus(10), Purpose.DOCUMENT)
    assert len(embedding_server.requests) == 1  # not retried: the model will not change its mind


async def test_a_refused_key_fails_at_once_and_is_never_echoed(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    wrong_key = "sk-wrong-5ecr3t-key-0123456789"
    with pytest.raises(AuthenticationFailed) as caught:
        await openai_provider(api_key=wrong_key).embed(corpus(3), Purpose.DOCUMENT)
    message = str(caught.value)
    assert "HTTP 401" in message and "API_KEY" in message
    # The API answers with a masked copy of the key; none of it may reach the user's terminal.
    for secret in (wrong_key, EMBEDDING_API_KEY, wrong_key[-4:], wrong_key[:6]):
        assert secret not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert len(embedding_server.requests) == 1


async def test_other_refusals_carry_the_apis_words(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    with pytest.raises(ProviderError, match="does not support more than 1536 dimensions") as caught:
        await openai_provider(dimensions=4096).embed(corpus(2), Purpose.DOCUMENT)
    assert type(caught.value) is ProviderError
    assert len(embedding_server.requests) == 1


async def test_retries_run_out_with_a_message_saying_what_failed(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    from rag_service.providers.retry import RetryPolicy

    embedding_server.error_rate = 1.0
    with pytest.raises(
        ProviderError, match=r"gave up after 3 attempts \(3× server error"
    ) as caught:
        await openai_provider(retry_policy=RetryPolicy(max_attempts=3, base_delay=0.01)).embed(
            corpus(2), Purpose.DOCUMENT
        )
    assert EMBEDDING_API_KEY not in str(caught.value)
    assert len(embedding_server.requests) == 3


async def test_an_unreachable_api_is_retried_then_reported() -> None:
    from rag_service.providers.openai import OpenAIProvider
    from rag_service.providers.retry import RetryPolicy

    with EmbeddingServer() as server:
        url = server.openai_base_url  # a port that was just free and is closed again
    provider = OpenAIProvider(
        model=MODEL,
        dimensions=8,
        api_key=EMBEDDING_API_KEY,
        base_url=url,
        retry_policy=RetryPolicy(max_attempts=2, base_delay=0.01),
    )
    try:
        with pytest.raises(ProviderError, match="connection failed"):
            await provider.embed(["x"], Purpose.DOCUMENT)
    finally:
        await provider.aclose()


async def test_the_pacer_learns_the_limit_and_splits_requests_to_fit_it(
    openai_provider: OpenAIFactory, embedding_server: EmbeddingServer
) -> None:
    embedding_server.tpm = 600_000  # a quarter of the bucket is 150k tokens per request
    provider = openai_provider()
    await provider.embed(corpus(1), Purpose.DOCUMENT)  # the probe
    texts = [f"{i} " + "word " * 150 for i in range(2000)]  # ~300k tokens in all
    await provider.embed(texts, Purpose.DOCUMENT)
    assert provider.pacer.tokens_per_minute == 600_000
    assert 0.5 < provider.pacer.ratio < 1.0  # our estimate overcounts this server's tokens
    later = embedding_server.requests[1:]
    assert len(later) >= 2
    assert max(r.tokens for r in later) <= 150_000 * 1.1
    assert all(r.status == 200 for r in later)


# --------------------------------------------------------------------------- the stand-in itself


async def test_server_refuses_what_openai_refuses(embedding_server: EmbeddingServer) -> None:
    client = openai.AsyncOpenAI(
        api_key=EMBEDDING_API_KEY, base_url=embedding_server.openai_base_url, max_retries=0
    )
    try:
        with pytest.raises(openai.BadRequestError, match="input"):
            await client.embeddings.create(input=["ok", ""], model=MODEL)
        with pytest.raises(openai.BadRequestError, match="at most 2048 inputs"):
            await client.embeddings.create(input=["x"] * 2049, model=MODEL)
        with pytest.raises(openai.BadRequestError, match="max 300000 tokens per request"):
            await client.embeddings.create(input=["a " * 8000] * 40, model=MODEL)
        # The SDK's own default: base64 on the wire, decoded by the SDK.
        answer = await client.embeddings.create(input="hello world", model=MODEL, dimensions=16)
        expected = HashEmbedder(16, seed=MODEL).embed(["hello world"])[0]
        assert np.allclose(answer.data[0].embedding, expected, atol=1e-6)
    finally:
        await client.close()


async def test_server_rate_limit_answers_like_openai(embedding_server: EmbeddingServer) -> None:
    embedding_server.tpm = 1000
    client = openai.AsyncOpenAI(
        api_key=EMBEDDING_API_KEY, base_url=embedding_server.openai_base_url, max_retries=0
    )
    try:
        ok = await client.embeddings.with_raw_response.create(input=["a " * 900], model=MODEL)
        assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
        assert ok.headers["x-ratelimit-remaining-tokens"] == "100"
        assert ok.headers["x-ratelimit-reset-tokens"] == "54s"
        with pytest.raises(openai.RateLimitError) as caught:
            await client.embeddings.create(input=["a " * 500], model=MODEL)
        assert caught.value.code == "rate_limit_exceeded"
        headers = caught.value.response.headers
        assert 23_000 < int(headers["retry-after-ms"]) <= 24_100
        assert headers["retry-after"] == "24"
        with pytest.raises(openai.RateLimitError, match="Request too large"):
            await client.embeddings.create(input=["a " * 1001], model=MODEL)
    finally:
        await client.close()


async def test_server_subprocess_is_driven_by_control_and_stats(
    embedding_server_process: ServerProcess,
) -> None:
    from rag_service.providers.openai import OpenAIProvider

    knobs = embedding_server_process.control(tpm=1_000_000, latency=0.001)
    assert knobs["tpm"] == 1_000_000
    provider = OpenAIProvider(
        model=MODEL,
        dimensions=32,
        api_key=EMBEDDING_API_KEY,
        base_url=embedding_server_process.openai_base_url,
    )
    try:
        result = await provider.embed(corpus(3000), Purpose.DOCUMENT)
    finally:
        await provider.aclose()
    stats = embedding_server_process.stats()
    assert stats["ok_inputs"] == 3000
    assert stats["max_inputs"] <= 2048
    assert stats["ok_tokens"] == result.usage.tokens
    assert embedding_server_process.control(reset=True)["tpm"] == 1_000_000
    assert embedding_server_process.stats()["requests"] == 0


# --------------------------------------------------------------------------- limiter styles


def server_client(server: EmbeddingServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=EMBEDDING_API_KEY, base_url=server.openai_base_url, max_retries=0
    )


@pytest.mark.parametrize("report", ["first", "empty"])
async def test_a_sliding_window_frees_room_as_each_request_leaves_it(
    embedding_server: EmbeddingServer, report: str
) -> None:
    """30,000 TPM as a 2-s sliding window: 1,000 tokens in any 2 s, and the reset header says
    either when the first room frees or when the window is empty."""
    embedding_server.configure(
        {"limiter": "sliding", "window": 2, "reset_report": report, "tpm": 30_000}
    )
    client = server_client(embedding_server)
    try:
        first = await client.embeddings.with_raw_response.create(input=["a " * 600], model=MODEL)
        assert first.headers["x-ratelimit-limit-tokens"] == "1000"
        assert first.headers["x-ratelimit-remaining-tokens"] == "400"
        await asyncio.sleep(0.5)
        second = await client.embeddings.with_raw_response.create(input=["a " * 300], model=MODEL)
        assert second.headers["x-ratelimit-remaining-tokens"] == "100"
        reset = parse_duration(second.headers["x-ratelimit-reset-tokens"])
        assert reset is not None
        if report == "first":
            assert reset <= 1.501  # the first request leaves 2 s after it came, ≥ 0.5 s ago
        else:
            assert reset == 2.0  # the second just came: the window is empty 2 s from now
        with pytest.raises(openai.RateLimitError) as caught:
            await client.embeddings.create(input=["a " * 300], model=MODEL)
        retry_after = int(caught.value.response.headers["retry-after-ms"]) / 1000
        assert retry_after <= 1.501  # room for 300 comes when the first 600 leave
        await asyncio.sleep(retry_after)
        third = await client.embeddings.with_raw_response.create(input=["a " * 300], model=MODEL)
        # Only the first request left: the second still counts.
        assert third.headers["x-ratelimit-remaining-tokens"] == "400"
    finally:
        await client.close()


async def test_a_fixed_window_gives_the_whole_limit_back_at_its_boundary(
    embedding_server: EmbeddingServer,
) -> None:
    embedding_server.configure({"limiter": "fixed", "window": 2, "tpm": 30_000})
    client = server_client(embedding_server)
    try:
        first = await client.embeddings.with_raw_response.create(input=["a " * 600], model=MODEL)
        assert first.headers["x-ratelimit-remaining-tokens"] == "400"
        reset = parse_duration(first.headers["x-ratelimit-reset-tokens"])
        assert reset is not None and 0 < reset <= 2.0  # the next boundary
        with pytest.raises(openai.RateLimitError) as caught:
            await client.embeddings.create(input=["a " * 600], model=MODEL)
        retry_after = int(caught.value.response.headers["retry-after-ms"]) / 1000
        assert retry_after <= reset
        await asyncio.sleep(retry_after)
        whole = await client.embeddings.with_raw_response.create(input=["a " * 1000], model=MODEL)
        assert whole.headers["x-ratelimit-remaining-tokens"] == "0"
    finally:
        await client.close()


def test_limiter_knobs_refuse_what_they_cannot_enforce(embedding_server: EmbeddingServer) -> None:
    with pytest.raises(ValueError, match="limiter must be one of bucket, sliding, fixed"):
        embedding_server.configure({"limiter": "leaky"})
    with pytest.raises(ValueError, match="window must be a number of seconds above 0"):
        embedding_server.configure({"window": 0})
    with pytest.raises(ValueError, match="reset_report must be one of first, empty"):
        embedding_server.configure({"reset_report": "never"})
    assert embedding_server.knobs()["limiter"] == "bucket"


def test_limiter_flags_on_the_command_line_and_control_knobs() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rag_service.testing.embedding_server",
            "--tpm=60000",
            "--limiter=sliding",
            "--window=3",
            "--reset-report=empty",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        server = ServerProcess(url=process.stdout.readline().strip(), process=process)
        knobs = server.stats()["knobs"]
        assert (knobs["limiter"], knobs["window"], knobs["reset_report"]) == (
            "sliding",
            3.0,
            "empty",
        )
        assert server.control(limiter="fixed", window=4)["limiter"] == "fixed"
        with pytest.raises(urllib.error.HTTPError) as refused:
            server.control(limiter="leaky")
        assert refused.value.code == 400
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize(
    ("limiter", "report", "tpm", "learned"),
    [
        ("bucket", "first", 20_000, LimiterStyle.BUCKET),
        ("sliding", "first", 120_000, LimiterStyle.WINDOW),
        ("sliding", "empty", 120_000, LimiterStyle.WINDOW),
        ("fixed", "first", 120_000, LimiterStyle.WINDOW),
    ],
)
async def test_the_pacer_learns_each_limiter_and_keeps_within_it(
    openai_provider: OpenAIFactory,
    embedding_server: EmbeddingServer,
    limiter: str,
    report: str,
    tpm: int,
    learned: LimiterStyle,
) -> None:
    """600 texts (about 7,000 tokens) against a bucket, or 2,000 tokens per 1-s window: all
    arrive in order, the pacer tells the style from the headers, 429s stay rare."""
    window = 60 if limiter == "bucket" else 1
    embedding_server.configure(
        {"limiter": limiter, "window": window, "reset_report": report, "tpm": tpm}
    )
    provider = openai_provider(concurrency=4)
    await provider.embed(corpus(1, offset=600), Purpose.DOCUMENT)  # the probe
    texts = corpus(600)
    result = await provider.embed(texts, Purpose.DOCUMENT)
    assert_same_direction(result.vectors, texts, dimensions=64)
    assert provider.pacer.style is learned
    records = embedding_server.requests
    refused = sum(1 for r in records if r.status == 429)
    assert refused <= 0.1 * len(records)


class _Answering(http.server.BaseHTTPRequestHandler):
    """Answers every POST 200 with the body the test sets: a proxy's page, a cut-off answer."""

    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.mark.parametrize(
    ("body", "why"),
    [
        pytest.param(b"<html>502 Bad Gateway</html>", "JSONDecodeError", id="a-proxy-page"),
        pytest.param(b'{"data": [{"index": 0, "embedding": "AAAA', "JSONDecodeError", id="cut"),
        pytest.param(b'{"object": "list"}', "KeyError", id="no-data"),
        pytest.param(b'{"data": [{"index": 0, "embedding": "@@@@"}]}', "Error", id="not-base64"),
        pytest.param(b'{"data": [{"embedding": "AAAAAA=="}]}', "KeyError", id="no-index"),
        pytest.param(b'{"data": []}', "asked for 1 embeddings, got 0", id="too-few"),
    ],
)
async def test_an_answer_that_is_not_embeddings_is_a_retried_malformed_answer(
    body: bytes, why: str
) -> None:
    """Parsed by us, not by the SDK's models: whatever a 200 carries, the failure says what was
    wrong, is retried like a server error, and never carries the key."""
    from rag_service.providers.openai import OpenAIProvider
    from rag_service.providers.retry import RetryPolicy

    handler = type("Handler", (_Answering,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    provider = OpenAIProvider(
        model=MODEL,
        dimensions=1,
        api_key=EMBEDDING_API_KEY,
        base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
        retry_policy=RetryPolicy(max_attempts=2, base_delay=0.01),
    )
    try:
        with pytest.raises(ProviderError, match="malformed answer") as caught:
            await provider.embed(["x"], Purpose.DOCUMENT)
    finally:
        await provider.aclose()
        server.shutdown()
        server.server_close()
    message = str(caught.value)
    assert why in message and "gave up after 2 attempts" in message, message
    assert EMBEDDING_API_KEY not in message
