"""OpenAI embeddings through the ``openai`` SDK, with our own retries and rate-limit pacing.

The SDK's retries are off (``max_retries=0``): it would retry ``insufficient_quota`` and knows
nothing of the shared rate limit. Requests are sized to the API's limits (2048 inputs, 300k
tokens) and to the pacer's view of the tokens-per-minute bucket, run ``concurrency`` at a time,
and come back in input order.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import time
from collections.abc import Mapping, Sequence
from typing import Literal, cast

import httpx2
import numpy as np
import openai
from openai import AsyncOpenAI

from rag_service.providers.base import (
    Embeddings,
    Purpose,
    Vectors,
    checked_vectors,
    estimate_tokens,
)
from rag_service.providers.pricing import PriceTable
from rag_service.providers.retry import (
    Failure,
    Outcome,
    RateLimitPacer,
    RetryPolicy,
    classify_status,
    embed_in_requests,
    parse_retry_after,
    redact,
)

__all__ = ["MAX_INPUTS_PER_REQUEST", "MAX_TOKENS_PER_REQUEST", "OpenAIProvider"]

MAX_INPUTS_PER_REQUEST = 2048
MAX_TOKENS_PER_REQUEST = 300_000
# Models that predate the ``dimensions`` parameter and answer 400 when it is sent.
_FIXED_DIMENSION_MODELS = frozenset({"text-embedding-ada-002"})

EncodingFormat = Literal["base64", "float"]


class OpenAIProvider:
    """``openai:<model>@<dimensions>`` (any OpenAI-compatible endpoint via ``base_url``)."""

    def __init__(
        self,
        *,
        model: str,
        dimensions: int,
        api_key: str,
        base_url: str | None = None,
        prices: PriceTable | None = None,
        concurrency: int = 4,
        encoding_format: EncodingFormat = "base64",
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
        self._encoding_format: EncodingFormat = encoding_format
        self._policy = retry_policy or RetryPolicy()
        self._pacer = pacer or RateLimitPacer(
            max_concurrency=max(1, concurrency),
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        self._workers = max(1, concurrency)
        self._rng = rng or random.Random()
        self._client = AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout
        )

    @property
    def descriptor(self) -> str:
        return f"openai:{self._model}@{self._dimensions}"

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def pacer(self) -> RateLimitPacer:
        """The rate-limit mirror (read-only use: metrics, benchmarks)."""
        return self._pacer

    def estimate_tokens(self, texts: Sequence[str]) -> int:
        return estimate_tokens(texts)

    async def embed(self, texts: Sequence[str], purpose: Purpose) -> Embeddings:
        del purpose  # OpenAI embeds documents and queries alike
        # OpenAI refuses "" outright; one empty row must not sink a whole batch, and a blank
        # carries no more meaning than an empty string.
        inputs = [text if text else " " for text in texts]
        return await embed_in_requests(
            inputs,
            dimensions=self._dimensions,
            request=self._request,
            classify=self._classify,
            price=lambda tokens: self._prices.cost("openai", self._model, tokens),
            pacer=self._pacer,
            policy=self._policy,
            rng=self._rng,
            workers=self._workers,
            max_inputs=MAX_INPUTS_PER_REQUEST,
            max_tokens=MAX_TOKENS_PER_REQUEST,
            what=self.descriptor,
        )

    async def _request(self, chunk: list[str]) -> Outcome[tuple[Vectors, int | None]]:
        body: dict[str, object] = {
            "input": chunk,
            "model": self._model,
            "encoding_format": self._encoding_format,
        }
        if self._model not in _FIXED_DIMENSION_MODELS:
            body["dimensions"] = self._dimensions
        # The SDK's typed ``embeddings.create`` walks every input through its request transform
        # and builds a pydantic model per vector: half the worker's CPU per row at batch size
        # 100 (docs/benchmarks.md). ``post`` is its documented way to send a body as it is and
        # get the HTTP answer (auth, timeouts and status errors are still the SDK's).
        response = await self._client.post("/embeddings", body=body, cast_to=httpx2.Response)
        vectors, tokens = self._decode(response, expected=len(chunk))
        return Outcome(
            value=(vectors, tokens), headers=dict(response.headers), actual_tokens=tokens
        )

    def _decode(self, response: httpx2.Response, *, expected: int) -> tuple[Vectors, int | None]:
        """The vectors in input order and the tokens the API counted, from the JSON answer;
        an answer of another shape is the SDK's APIResponseValidationError (a 502)."""
        try:
            answer = json.loads(response.content)
            data = sorted(answer["data"], key=lambda item: int(item["index"]))
            rows: list[Sequence[float]] = []
            for item in data:
                value = item["embedding"]
                if isinstance(value, str):
                    decoded = np.frombuffer(base64.b64decode(value, validate=True), dtype="<f4")
                    # ndarray is not a typing Sequence, but has everything checked_vectors uses.
                    rows.append(cast(Sequence[float], decoded))
                else:
                    rows.append(value)
            usage = answer.get("usage") or {}
            counted = usage.get("prompt_tokens")
            tokens = int(counted) if counted is not None else None
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise openai.APIResponseValidationError(
                response, None, message=f"not an embeddings answer ({type(exc).__name__})"
            ) from None
        if len(rows) != expected:
            raise openai.APIResponseValidationError(
                response, None, message=f"asked for {expected} embeddings, got {len(rows)}"
            )
        vectors = checked_vectors(rows, dimensions=self._dimensions, source=self.descriptor)
        return vectors, tokens

    def _classify(self, exc: Exception) -> Failure | None:
        """SDK exceptions → Failure; anything else (our own errors, bugs) → None."""
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, Mapping) else {}
            code = body.get("code") or body.get("type")
            message = str(body.get("message") or exc.message)
            headers: Mapping[str, str] = dict(exc.response.headers)
            return Failure(
                kind=classify_status(
                    exc.status_code, code=str(code) if code else None, message=message
                ),
                detail=f"HTTP {exc.status_code}: {redact(message, [self._api_key])}",
                status=exc.status_code,
                retry_after=parse_retry_after(headers, now=time.time()),
                headers=headers,
            )
        if isinstance(exc, openai.APIResponseValidationError):
            return Failure(
                kind=classify_status(502),
                detail=f"malformed answer: {redact(exc.message, [self._api_key])}",
            )
        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            reason = "timed out" if isinstance(exc, openai.APITimeoutError) else "connection failed"
            return Failure(kind=classify_status(None), detail=reason)
        return None

    async def aclose(self) -> None:
        await self._client.close()
