"""Shadow comparison: run a sample of searches on the other version too, off the request path.

``FF_USE_PARALLEL_RAG``: how far v2's results agree with v1's on real queries says more about a
migration than any offline benchmark. The request that is sampled answers from its own version
at once; the comparison runs later on a background task, one at a time, from a bounded queue,
so a slow shadow path sheds samples instead of adding latency or memory.

The two measures are pure functions:

- ``overlap_at_k``: the share of the top k both lists have (order ignored);
- ``rank_biased_overlap``: agreement weighted toward the top ranks (Webber, Moffat and Zobel,
  "A similarity measure for indefinite rankings", ACM TOIS 28(4), 2010), which tells "the
  first result changed" from "the tenth did".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass

from rag_service.routing import Version

logger = logging.getLogger(__name__)


def overlap_at_k(a: Sequence[Hashable], b: Sequence[Hashable], k: int) -> float:
    """``|top-k(a) ∩ top-k(b)| / k``, in [0, 1]. Pure.

    Missing ranks count as misses: a list shorter than ``k`` cannot reach 1.0, because a search
    that returns fewer results than asked for has lost something.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    return len(set(a[:k]) & set(b[:k])) / k


def rank_biased_overlap(a: Sequence[Hashable], b: Sequence[Hashable], *, p: float = 0.9) -> float:
    """Extrapolated rank-biased overlap RBO_ext of two rankings, in [0, 1]. Pure and symmetric.

    With ``S`` the shorter list (length ``s``), ``L`` the longer (length ``l``), and ``X_d`` the
    number of items the two have in common at depth ``d`` (for ``d > s``: all of ``S`` against
    the top ``d`` of ``L``), Webber et al.'s equation (32) is::

        RBO_ext = (1-p)/p · ( Σ_{d=1..l} X_d/d · p^d  +  Σ_{d=s+1..l} X_s·(d-s)/(s·d) · p^d )
                  + ( (X_l - X_s)/l + X_s/s ) · p^l

    It assumes the agreement seen at the deepest ranks continues below them, so identical
    lists (and a list against its own prefix) score 1.0 and disjoint lists 0.0. ``p`` is the
    persistence: the top ``d`` ranks carry ``1 - p^d`` of the weight (at 0.9, the top 10
    carry 65 %). Two empty lists agree (1.0); one empty list shares nothing (0.0). Repeated
    items carry no rank information and count at their first position only.
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1); got {p}")
    first, second = _dedupe(a), _dedupe(b)
    short, long = (first, second) if len(first) <= len(second) else (second, first)
    s, l = len(short), len(long)  # noqa: E741 (the paper's names)
    if s == 0:
        return 1.0 if l == 0 else 0.0

    seen_short: set[Hashable] = set()
    seen_long: set[Hashable] = set()
    overlap = 0  # X_d
    x_s = 0
    weighted = 0.0  # the bracketed sums
    for d in range(1, l + 1):
        item = long[d - 1]
        if d <= s:
            other = short[d - 1]
            if item == other:
                overlap += 1
            else:
                overlap += (item in seen_short) + (other in seen_long)
            seen_short.add(other)
        else:
            overlap += item in seen_short  # seen_short is all of S now
        seen_long.add(item)
        weighted += overlap / d * p**d
        if d == s:
            x_s = overlap
        elif d > s:
            weighted += x_s * (d - s) / (s * d) * p**d
    score = (1 - p) / p * weighted + ((overlap - x_s) / l + x_s / s) * p**l
    # Floating-point sums can stray a hair past the ends of the true range.
    return min(1.0, max(0.0, score))


def _dedupe(items: Sequence[Hashable]) -> list[Hashable]:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class ShadowJob:
    """A search that was answered by ``primary_version``, to repeat on the other version."""

    query: str
    k: int
    category: str | None
    primary_version: Version
    primary_ids: tuple[Hashable, ...]  # in rank order

    def __post_init__(self) -> None:
        # Accept "v1" and a list as well: a job is built from request data in the hot path.
        object.__setattr__(self, "primary_version", Version(self.primary_version))
        object.__setattr__(self, "primary_ids", tuple(self.primary_ids))

    @property
    def other_version(self) -> Version:
        return self.primary_version.other


@dataclass(frozen=True)
class ShadowResult:
    overlap: float  # overlap@k of the two versions' ids
    rbo: float  # rank-biased overlap (p = 0.9)
    other_version: Version
    latency_seconds: float  # of the other version's search

    @classmethod
    def compare(
        cls, job: ShadowJob, *, other_ids: Sequence[Hashable], latency_seconds: float
    ) -> ShadowResult:
        """The result of ``job`` given the other version's ids, for the app's ``run``."""
        return cls(
            overlap=overlap_at_k(job.primary_ids, other_ids, job.k),
            rbo=rank_biased_overlap(job.primary_ids, other_ids),
            other_version=job.other_version,
            latency_seconds=latency_seconds,
        )


class ShadowComparer:
    """Samples searches onto a bounded queue and runs them with ``run`` on one background task.

    ``run`` does the other version's search and returns the comparison (``ShadowResult.compare``
    helps); ``on_result`` receives each result on the worker task (record metrics, log a large
    disagreement); ``on_drop`` hears of each sampled job the full queue refused. A ``run`` or
    ``on_result`` that raises is logged and counted in ``failed``; the worker carries on.
    Counters: ``submitted`` (queued) = ``completed`` + ``failed`` + still queued or running,
    and ``dropped`` (refused when full); jobs still queued at ``aclose()`` are discarded.
    """

    def __init__(
        self,
        *,
        sample_rate: float,
        capacity: int,
        run: Callable[[ShadowJob], Awaitable[ShadowResult]],
        on_result: Callable[[ShadowResult], None],
        rng: random.Random,
        on_drop: Callable[[ShadowJob], None] | None = None,
    ) -> None:
        if not 0 <= sample_rate <= 1:
            raise ValueError(f"sample_rate must be in [0, 1]; got {sample_rate}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1; got {capacity}")
        self._sample_rate = sample_rate
        self._run = run
        self._on_result = on_result
        self._on_drop = on_drop
        self._rng = rng
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=capacity)
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._dropped = 0

    @property
    def submitted(self) -> int:
        return self._submitted

    @property
    def completed(self) -> int:
        return self._completed

    @property
    def failed(self) -> int:
        return self._failed

    @property
    def dropped(self) -> int:
        return self._dropped

    def maybe_submit(self, job: ShadowJob) -> bool:
        """Sample ``job`` and queue it; never blocks. True iff it was queued.

        Not sampled, or closed: False, nothing counted. Sampled but the queue is full: False,
        counted in ``dropped``.
        """
        if self._closed or self._rng.random() >= self._sample_rate:
            return False
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._dropped += 1
            if self._on_drop is not None:
                self._on_drop(job)
            return False
        self._submitted += 1
        return True

    async def start(self) -> None:
        """Start the worker task (in the app's lifespan); ``aclose()`` stops it."""
        if self._closed:
            raise RuntimeError("ShadowComparer is closed")
        if self._worker is not None:
            raise RuntimeError("ShadowComparer is already started")
        self._worker = asyncio.get_running_loop().create_task(
            self._work(), name="embedshift-shadow-comparer"
        )

    async def aclose(self) -> None:
        """Stop taking jobs, cancel the worker (and the comparison it runs) and wait for it."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                result = await self._run(job)
                self._on_result(result)
            except Exception:
                self._failed += 1
                # Never the query text: queries are user data, and logs outlive them.
                logger.exception(
                    "shadow comparison on %s failed (k=%d, category=%s)",
                    job.other_version.value,
                    job.k,
                    job.category,
                )
            else:
                self._completed += 1
            finally:
                self._queue.task_done()
