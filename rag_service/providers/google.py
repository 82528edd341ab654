"""Gemini embeddings through ``google-genai``, with our own retries and pacing.

The SDK's retries are off: with no ``retry_options`` it sends once, but its aiohttp transport
still retries a failed connection by itself after a random 1–10 s sleep unless ``retry_options``
is set, so we set ``attempts=1``. The Gemini API sends no rate-limit headers and no token
counts, so the pacer runs on the limits given here (if any) and on our token estimate, and 429s
are answered with the ``RetryInfo`` delay Google puts in the error body.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from rag_service.providers.base import (
    Embeddings,
    Purpose,
    Vectors,
    checked_vectors,
    estimate_tokens,
    l2_normalise,
)
from rag_service.providers.pricing import PriceTable
from rag_service.providers.retry import (
    Failure,
    Outcome,
    RateLimitPacer,
    RetryPolicy,
    classify_status,
    embed_in_requests,
    parse_duration,
    parse_retry_after,
    redact,
)

__all__ = ["FULL_DIMENSIONS", "MAX_TEXTS_PER_REQUEST", "GoogleProvider", "task_type"]

MAX_TEXTS_PER_REQUEST = 100
# gemini-embedding-001 normalises only its full-size output; Matryoshka-truncated vectors are not
# unit length, and cosine distance in pgvector assumes nothing, but our similarity thresholds do.
FULL_DIMENSIONS = 3072
# batchEmbedContents has no documented per-request token cap beyond 100 × 2048 input tokens;
# this keeps one request from exceeding what a small TPM quota could ever admit.
_MAX_TOKENS_PER_REQUEST = 100 * 2048

_TASK_TYPES: Mapping[Purpose, str] = {
    Purpose.DOCUMENT: "RETRIEVAL_DOCUMENT",
    Purpose.QUERY: "RETRIEVAL_QUERY",
}


def task_type(purpose: Purpose) -> str:
    """Gemini's task type for a purpose: asymmetric retrieval wants documents and queries
    embedded differently. Pure."""
    return _TASK_TYPES[purpose]


class GoogleProvider:
    """``google:<model>@<dimensions>`` on the Gemini Developer API (API key auth)."""

    def __init__(
        self,
        *,
        model: str,
        dimensions: int,
        api_key: str,
        base_url: str | None = None,
        prices: PriceTable | None = None,
        concurrency: int = 4,
        api_version: str | None = None,
        timeout: float = 60.0,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        retry_policy: RetryPolicy | None = None,
        pacer: RateLimitPacer | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._model = model
        self._dimensions = dimensions
        self._api_key = api_key
        self._prices = prices or PriceTable()
        self._policy = retry_policy or RetryPolicy()
        self._pacer = pacer or RateLimitPacer(
            max_concurrency=max(1, concurrency),
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        self._workers = max(1, concurrency)
        self._rng = rng or random.Random()
        self._client = genai.Client(
            api_key=api_key,
            vertexai=False,  # never let GOOGLE_GENAI_USE_VERTEXAI switch the backend under us
            http_options=genai_types.HttpOptions(
                base_url=base_url,
                api_version=api_version,
                timeout=int(timeout * 1000),
                retry_options=genai_types.HttpRetryOptions(attempts=1),
            ),
        )

    @property
    def descriptor(self) -> str:
        return f"google:{self._model}@{self._dimensions}"

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def pacer(self) -> RateLimitPacer:
        return self._pacer

    def estimate_tokens(self, texts: Sequence[str]) -> int:
        return estimate_tokens(texts)

    async def embed(self, texts: Sequence[str], purpose: Purpose) -> Embeddings:
        config = genai_types.EmbedContentConfig(
            task_type=task_type(purpose), output_dimensionality=self._dimensions
        )
        # The Gemini API returns no token count: the estimate is what we bill against.
        return await embed_in_requests(
            list(texts),
            dimensions=self._dimensions,
            request=lambda chunk: self._request(chunk, config),
            classify=self._classify,
            price=lambda tokens: self._prices.cost("google", self._model, tokens),
            pacer=self._pacer,
            policy=self._policy,
            rng=self._rng,
            workers=self._workers,
            max_inputs=MAX_TEXTS_PER_REQUEST,
            max_tokens=_MAX_TOKENS_PER_REQUEST,
            what=self.descriptor,
        )

    async def _request(
        self, chunk: list[str], config: genai_types.EmbedContentConfig
    ) -> Outcome[tuple[Vectors, int | None]]:
        response = await self._client.aio.models.embed_content(
            model=self._model, contents=list(chunk), config=config
        )
        embeddings = response.embeddings or []
        if len(embeddings) != len(chunk):
            raise _MalformedAnswer(f"asked for {len(chunk)} embeddings, got {len(embeddings)}")
        rows = [embedding.values or [] for embedding in embeddings]
        vectors = checked_vectors(rows, dimensions=self._dimensions, source=self.descriptor)
        if self._dimensions < FULL_DIMENSIONS:
            vectors = l2_normalise(vectors)
        headers = response.sdk_http_response.headers if response.sdk_http_response else None
        return Outcome(value=(vectors, None), headers=dict(headers or {}), actual_tokens=None)

    def _classify(self, exc: Exception) -> Failure | None:
        """SDK and transport exceptions → Failure; anything else → None."""
        if isinstance(exc, genai_errors.APIError):
            raw_headers = getattr(exc.response, "headers", None)
            headers: dict[str, str] = dict(raw_headers) if raw_headers is not None else {}
            error = _error_body(exc.details)
            code, retry_delay = _google_signals(error)
            message = str(exc.message or exc.status or "")
            retry_after = retry_delay
            if retry_after is None:
                retry_after = parse_retry_after(headers, now=time.time())
            return Failure(
                kind=classify_status(exc.code, code=code, message=message),
                detail=f"HTTP {exc.code} {exc.status or ''}: {redact(message, [self._api_key])}",
                status=exc.code,
                retry_after=retry_after,
                headers=headers,
            )
        if isinstance(exc, _MalformedAnswer):
            return Failure(kind=classify_status(502), detail=str(exc))
        if isinstance(exc, httpx2.TransportError):  # includes timeouts
            timed_out = isinstance(exc, httpx2.TimeoutException)
            return Failure(
                kind=classify_status(None),
                detail="timed out" if timed_out else "connection failed",
            )
        return None

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        self._client.close()


class _MalformedAnswer(Exception):
    """The API answered 200 with the wrong number of embeddings: worth one more try."""


def _error_body(details: Any) -> Mapping[str, Any]:
    if isinstance(details, list) and len(details) == 1:
        details = details[0]
    if isinstance(details, Mapping):
        inner = details.get("error", details)
        if isinstance(inner, Mapping):
            return inner
    return {}


def _google_signals(error: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """(OpenAI-style code, retry delay) from a Google error body's ``details``. Google says
    "key invalid" with a 400 and "daily quota spent" with the same 429 as "slow down"; the code
    tells them apart for :func:`classify_status`. Pure."""
    code: str | None = None
    retry_delay: float | None = None
    details = error.get("details")
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, Mapping):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.ErrorInfo") and detail.get("reason") == "API_KEY_INVALID":
            code = "invalid_api_key"
        elif kind.endswith("google.rpc.QuotaFailure"):
            violations = detail.get("violations")
            for violation in violations if isinstance(violations, list) else []:
                if isinstance(violation, Mapping) and "PerDay" in str(violation.get("quotaId")):
                    code = "insufficient_quota"
        elif kind.endswith("google.rpc.RetryInfo"):
            retry_delay = parse_duration(str(detail.get("retryDelay", "")))
    return code, retry_delay
