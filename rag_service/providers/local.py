"""The offline provider: deterministic feature hashing of words and word pairs.

No key, no network, any dimension. Texts that share words get close, unit-length vectors, which is
what the demo, the tests and the benchmarks need from a model. ``crc32`` (not Python's ``hash()``)
keeps vectors identical across processes and machines.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import numpy.typing as npt

from rag_service.providers.base import Embeddings, Purpose, Usage, Vectors, l2_normalise
from rag_service.providers.pricing import PriceTable

_WORD = re.compile(r"\w+")
_BIGRAM_WEIGHT = 0.5
_CACHE_LIMIT = 500_000
# Below this many texts, hashing is faster than a hop to a worker thread.
_INLINE_TEXTS = 64


class HashEmbedder:
    """Deterministic (a pure function of the texts); memoises word → crc32.

    Word pairs are hashed arithmetically from their words' hashes in numpy, so the only per-word
    Python work is the regex and one C-level dictionary lookup: fast, and short GIL holds.
    """

    def __init__(self, dimensions: int, *, seed: str = "hash") -> None:
        if dimensions < 1:
            raise ValueError("dimensions must be positive")
        self.dimensions = dimensions
        self._seed = zlib.crc32(seed.encode())
        self._memo: dict[str, int] = {}

    def _word_hashes(self, words: list[str]) -> npt.NDArray[np.uint64]:
        memo = self._memo
        missing = set(words).difference(memo)
        if missing:
            if len(memo) + len(missing) > _CACHE_LIMIT:
                memo.clear()
                missing = set(words)
            seed = self._seed
            memo.update((w, zlib.crc32(w.encode(), seed)) for w in missing)
        return np.fromiter(map(memo.__getitem__, words), dtype=np.uint64, count=len(words))

    def embed(self, texts: Sequence[str]) -> Vectors:
        return self.embed_counting(texts)[0]

    def embed_counting(self, texts: Sequence[str]) -> tuple[Vectors, int]:
        """Vectors and the number of words (the local provider's tokens), in one pass."""
        dims = self.dimensions
        per_text = [_WORD.findall(t.lower()) or ["<empty>"] for t in texts]
        lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        words = [w for ws in per_text for w in ws]
        hashes = self._word_hashes(words)
        rows = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        # A pair is two neighbouring words of the same text.
        same_text = rows[1:] == rows[:-1]
        pairs = _mix(hashes[:-1][same_text], hashes[1:][same_text])
        all_hashes = np.concatenate([hashes, pairs])
        all_rows = np.concatenate([rows, rows[:-1][same_text]])
        weights = np.concatenate(
            [np.ones(len(hashes)), np.full(len(pairs), _BIGRAM_WEIGHT)]
        ) * np.where(all_hashes & 0x80000000, 1.0, -1.0)
        flat = all_rows * dims + (all_hashes % np.uint64(dims)).astype(np.int64)
        out = np.bincount(flat, weights=weights, minlength=len(texts) * dims)
        vectors = l2_normalise(out.reshape(len(texts), dims).astype(np.float32))
        return vectors, int(lengths.sum())


def _mix(left: npt.NDArray[np.uint64], right: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """A 32-bit hash of an ordered pair of 32-bit hashes (multiply–xorshift). Pure."""
    x = (left * np.uint64(0x9E3779B1) + right * np.uint64(0x85EBCA77)) & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x2C1B3C6D)) & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(12)
    return x


def count_words(texts: Sequence[str]) -> int:
    """The local provider's token count: words. Pure."""
    return sum(len(_WORD.findall(t)) or 1 for t in texts)


class LocalProvider:
    """``local:<name>@<dims>``; ``<name>`` seeds the hash, so two local models differ.

    With ``processes`` > 0, large batches are hashed in worker processes: the hashing is Python
    and would otherwise hold the GIL against the event loop that drives the database writes.
    """

    def __init__(
        self,
        *,
        model: str,
        dimensions: int,
        prices: PriceTable | None = None,
        processes: int = 0,
    ) -> None:
        self._model = model
        self._embedder = HashEmbedder(dimensions, seed=model)
        self._prices = prices or PriceTable()
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None

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
        elif self._processes > 0:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self._processes, mp_context=multiprocessing.get_context("forkserver")
                )
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(
                self._pool, _embed_in_worker, self._model, self.dimensions, list(texts)
            )
        else:
            vectors, tokens = await asyncio.to_thread(self._embedder.embed_counting, texts)
        cost = self._prices.cost("local", self._model, tokens)
        return Embeddings(vectors=vectors, usage=Usage(tokens=tokens, requests=1, cost_usd=cost))

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# Per worker process: one embedder (and its word memo) per model, reused across batches.
_worker_embedders: dict[tuple[str, int], HashEmbedder] = {}


def _embed_in_worker(model: str, dimensions: int, texts: list[str]) -> tuple[Vectors, int]:
    embedder = _worker_embedders.get((model, dimensions))
    if embedder is None:
        embedder = _worker_embedders[(model, dimensions)] = HashEmbedder(dimensions, seed=model)
    return embedder.embed_counting(texts)
