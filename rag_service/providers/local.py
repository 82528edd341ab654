"""The offline provider: deterministic feature hashing of words and word pairs.

No key, no network, any dimension. Texts that share words get close, unit-length vectors, which is
what the demo, the tests and the benchmarks need from a model. ``crc32`` (not Python's ``hash()``)
keeps vectors identical across processes and machines.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from rag_service.providers.base import Embeddings, Purpose, Usage, Vectors, l2_normalise
from rag_service.providers.pricing import PriceTable

_WORD = re.compile(r"\w+")
_BIGRAM_WEIGHT = 0.5
_CACHE_LIMIT = 500_000
# Below this many texts, hashing is faster than a hop to a worker thread.
_INLINE_TEXTS = 64


class HashEmbedder:
    """Deterministic (a pure function of the texts); memoises feature → (column, sign)."""

    def __init__(self, dimensions: int, *, seed: str = "hash") -> None:
        if dimensions < 1:
            raise ValueError("dimensions must be positive")
        self.dimensions = dimensions
        self._seed = zlib.crc32(seed.encode())
        self._memo: dict[str, tuple[int, float]] = {}

    def _feature(self, feature: str) -> tuple[int, float]:
        hit = self._memo.get(feature)
        if hit is None:
            h = zlib.crc32(feature.encode(), self._seed)
            hit = (h % self.dimensions, 1.0 if h & 0x80000000 else -1.0)
            if len(self._memo) >= _CACHE_LIMIT:
                self._memo.clear()
            self._memo[feature] = hit
        return hit

    def embed(self, texts: Sequence[str]) -> Vectors:
        return self.embed_counting(texts)[0]

    def embed_counting(self, texts: Sequence[str]) -> tuple[Vectors, int]:
        """Vectors and the number of words (the local provider's tokens), in one pass."""
        dims = self.dimensions
        words_seen = 0
        flat: list[int] = []  # row * dims + column, so one bincount builds the matrix
        vals: list[float] = []
        memo = self._memo
        feature = self._feature
        for i, text in enumerate(texts):
            words = _WORD.findall(text.lower()) or ["<empty>"]
            words_seen += len(words)
            base = i * dims
            for w in words:
                col, sign = memo.get(w) or feature(w)
                flat.append(base + col)
                vals.append(sign)
            for a, b in pairwise(words):
                col, sign = feature(a + " " + b)
                flat.append(base + col)
                vals.append(sign * _BIGRAM_WEIGHT)
        out = np.bincount(
            np.asarray(flat, dtype=np.int64),
            weights=np.asarray(vals, dtype=np.float64),
            minlength=len(texts) * dims,
        )
        return l2_normalise(out.reshape(len(texts), dims).astype(np.float32)), words_seen


def count_words(texts: Sequence[str]) -> int:
    """The local provider's token count: words. Pure."""
    return sum(len(_WORD.findall(t)) or 1 for t in texts)


class LocalProvider:
    """``local:<name>@<dims>``; ``<name>`` seeds the hash, so two local models differ."""

    def __init__(self, *, model: str, dimensions: int, prices: PriceTable | None = None) -> None:
        self._model = model
        self._embedder = HashEmbedder(dimensions, seed=model)
        self._prices = prices or PriceTable()

    @property
    def descriptor(self) -> str:
        return f"local:{self._model}@{self._embedder.dimensions}"

    @property
    def dimensions(self) -> int:
        return self._embedder.dimensions

    def estimate_tokens(self, texts: Sequence[str]) -> int:
        return count_words(texts)

    async def embed(self, texts: Sequence[str], purpose: Purpose) -> Embeddings:
        del purpose  # documents and queries embed alike
        if len(texts) <= _INLINE_TEXTS:
            vectors, tokens = self._embedder.embed_counting(texts)
        else:
            vectors, tokens = await asyncio.to_thread(self._embedder.embed_counting, texts)
        cost = self._prices.cost("local", self._model, tokens)
        return Embeddings(vectors=vectors, usage=Usage(tokens=tokens, requests=1, cost_usd=cost))

    async def aclose(self) -> None:
        return None
