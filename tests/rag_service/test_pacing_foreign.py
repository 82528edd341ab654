"""Pacing on a limiter we did not write (issue 17 §3): header formats, ratio learning, and the
pacer against :mod:`rag_service.testing.foreign_limiter` through the real ``openai`` SDK."""

from __future__ import annotations

import asyncio
import random

import pytest

from rag_service.providers.base import Purpose, estimate_tokens
from rag_service.providers.openai import OpenAIProvider
from rag_service.providers.retry import (
    RateLimitPacer,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
)
from rag_service.testing.foreign_limiter import ForeignLimiter, go_duration, serve, server_tokens


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),  # OpenAI's documented examples
        ("1s", 1.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("1h2m3.5s", 3723.5),
        ("2m30.25s", 150.25),
        ("250us", 0.00025),
        ("3", 3.0),  # a bare number of seconds
        ("0.5", 0.5),
        (" 20ms ", 0.02),
        ("", None),
        ("soon", None),
        ("5 s", None),
        ("-1", None),
        ("1s20", None),
    ],
)
def test_reset_formats(text: str, seconds: float | None) -> None:
    got = parse_duration(text)
    assert got == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize("seconds", [0.0, 0.0004, 0.02, 0.999, 1.0, 1.5, 3.9995, 59.9, 360.0])
def test_foreign_formats_read_back(seconds: float) -> None:
    # Go durations round up to the millisecond; whole seconds round up: never read as earlier.
    exact = parse_duration(go_duration(seconds, "go"))
    assert exact is not None and seconds <= exact < seconds + 0.001 + 1e-9
    whole = parse_duration(go_duration(seconds, "seconds"))
    assert whole is not None and seconds <= whole < seconds + 1


def test_azure_headers_are_a_limit_without_limit_headers() -> None:
    parsed = parse_rate_limit_headers(
        {"x-ratelimit-remaining-requests": "39", "x-ratelimit-remaining-tokens": "19500"}
    )
    assert parsed.present
    assert (parsed.limit_tokens, parsed.remaining_tokens, parsed.reset_tokens) == (
        None,
        19500,
        None,
    )
    assert not parse_rate_limit_headers({"content-type": "application/json"}).present


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),  # the precise one wins
        ({"Retry-After-Ms": "20"}, 0.02),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    got = parse_retry_after(headers, now=0.0)
    assert got == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ([(1000, 500)], 0.5),  # the first answer is taken as is
        ([(1000, 500), (1000, 500), (1000, 500)], 0.5),
        ([(1000, 500), (1000, 1500)], 0.5 + 0.3 * (1.5 - 0.5)),  # then an EWMA (weight 0.3)
        ([(1000, 10)], 0.05),  # clamped to the plausible range
    ],
)
def test_ratio_learned_from_usage(answers: list[tuple[int, int]], expected: float) -> None:
    async def run() -> float:
        async def no_sleep(seconds: float) -> None:
            del seconds

        pacer = RateLimitPacer(clock=lambda: 0.0, sleep=no_sleep)
        for estimate, actual in answers:
            permit = await pacer.acquire(estimate)
            pacer.settle(permit, headers={}, actual_tokens=actual)
        return pacer.ratio

    assert asyncio.run(run()) == pytest.approx(expected)


def _texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["vector", "index", "query", "document", "embedding", "a", "migration", "postgres"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 60))) for _ in range(count)]


@pytest.mark.parametrize(
    ("headers", "requests"),
    [("openai", None), ("openai", 12), ("azure", None)],
)
def test_pacer_on_the_foreign_limiter(headers: str, requests: int | None) -> None:
    limiter = ForeignLimiter(
        tokens=3000,
        requests=requests,
        window=1.0,
        headers="azure" if headers == "azure" else "openai",
        reset_format="go",
        latency=0.02,
    )
    server, url = serve(limiter)
    batches = [_texts(60, seed) for seed in range(4)]

    async def run() -> OpenAIProvider:
        provider = OpenAIProvider(
            model="text-embedding-3-small", dimensions=8, api_key="k", base_url=f"{url}/v1"
        )
        try:
            for batch in batches:
                result = await provider.embed(batch, Purpose.DOCUMENT)
                assert result.vectors.shape == (len(batch), 8)
        finally:
            await provider.aclose()
        return provider

    try:
        provider = asyncio.run(run())
    finally:
        server.shutdown()
    records = limiter.stats()["records"]
    refused = sum(1 for record in records if record["status"] == 429)
    # No 429 storm: a handful at most while the pacer learns, on counts, not timings.
    assert refused <= max(2, len(records) // 20), (refused, len(records))
    # Everything was embedded once: the server admitted exactly the corpus's tokens.
    texts = [text for batch in batches for text in batch]
    assert sum(r["tokens"] for r in records if r["status"] == 200) == sum(
        server_tokens(text) for text in texts
    )
    # The learned ratio converges on the server's tokenizer ÷ our estimate.
    true_ratio = sum(server_tokens(t) for t in texts) / sum(estimate_tokens([t]) for t in texts)
    assert provider.pacer.ratio == pytest.approx(true_ratio, rel=0.15)
    # Azure states no limit: the pacer infers it from remaining + what it had just used.
    assert provider.pacer.tokens_per_minute == 3000
    if requests:
        assert provider.pacer.requests_per_minute == requests
