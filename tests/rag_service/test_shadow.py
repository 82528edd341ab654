"""shadow.py: the agreement measures against hand-computed values and their properties; the
comparer samples as asked, never blocks the caller, sheds load when full, and stops cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Hashable, Sequence
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rag_service.routing import Version
from rag_service.shadow import (
    ShadowComparer,
    ShadowJob,
    ShadowResult,
    overlap_at_k,
    rank_biased_overlap,
)

# ---------------------------------------------------------------------------------------------
# overlap@k


@pytest.mark.parametrize(
    ("a", "b", "k", "expected"),
    [
        ([1, 2, 3], [1, 2, 3], 3, 1.0),
        ([1, 2, 3], [3, 2, 1], 3, 1.0),  # order does not matter
        ([1, 2, 3], [4, 5, 6], 3, 0.0),
        ([1, 2, 3, 4], [4, 3, 9, 8], 4, 0.5),
        ([1, 2, 3, 4], [4, 3, 9, 8], 2, 0.0),  # only the top k of each
        ([1, 2, 3], [1, 2, 3], 5, 0.6),  # fewer results than asked for are misses
        ([], [], 3, 0.0),
        (["doc-1", "doc-2"], ["doc-2", "doc-7"], 2, 0.5),
    ],
)
def test_overlap_at_k(a: list[Hashable], b: list[Hashable], k: int, expected: float) -> None:
    assert overlap_at_k(a, b, k) == pytest.approx(expected)


def test_overlap_at_k_needs_a_positive_k() -> None:
    with pytest.raises(ValueError, match="k"):
        overlap_at_k([1], [1], 0)


# ---------------------------------------------------------------------------------------------
# Rank-biased overlap


def rbo_ext_reference(a: Sequence[Hashable], b: Sequence[Hashable], p: Fraction) -> Fraction:
    """Webber et al. (2010), equation (32), term by term in exact arithmetic."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    s, l = len(short), len(long)  # noqa: E741

    def x(d: int) -> int:
        return len(set(short[:d]) & set(long[:d]))

    sum1 = sum((Fraction(x(d), d) * p**d for d in range(1, l + 1)), Fraction(0))
    sum2 = sum((Fraction(x(s) * (d - s), s * d) * p**d for d in range(s + 1, l + 1)), Fraction(0))
    tail = (Fraction(x(l) - x(s), l) + Fraction(x(s), s)) * p**l
    return (1 - p) / p * (sum1 + sum2) + tail


@pytest.mark.parametrize(
    ("a", "b", "p", "expected"),
    [
        # X = 0, 2, 2; (1-p)/p = 1: 0·½ + 2/2·¼ + 2/3·⅛ = 1/3, plus the tail 2/3·⅛ = 1/12.
        ([1, 2, 3], [2, 1, 4], 0.5, 5 / 12),
        # s = 2, l = 3. X = 0, 1, 2 (X_3: all of the short list against the top 3 of the long):
        # Σ X_d/d·p^d = ¼·½ + ⅔·⅛ = 5/24; Σ X_s(d-s)/(sd)·p^d = 1·1/6·⅛ = 1/48;
        # tail ((2-1)/3 + 1/2)·⅛ = 5/48: 10/48 + 1/48 + 5/48 = 1/3.
        ([1, 2], [2, 3, 1], 0.5, 1 / 3),
        # X = 1, 2, 3, 3, 3 at p = 0.9: (0.1/0.9)·(0.9 + 0.81 + 0.729 + ¾·0.6561 + ⅗·0.59049)
        # + ⅗·0.59049 = 0.365041 + 0.354294.
        (list("abcde"), list("abcfg"), 0.9, 0.719335),
        # The first result agrees, then nothing: the top rank carries 1 - p of the weight,
        # and RBO_ext extrapolates the 1/5 agreement at depth 5 below it.
        (
            list("abcde"),
            list("avwxy"),
            0.9,
            0.1 * (1 + 0.9 / 2 + 0.81 / 3 + 0.729 / 4 + 0.6561 / 5) + 0.59049 / 5,
        ),
    ],
)
def test_rbo_against_hand_computed_values(
    a: list[Hashable], b: list[Hashable], p: float, expected: float
) -> None:
    assert rank_biased_overlap(a, b, p=p) == pytest.approx(expected, abs=1e-12)
    assert rank_biased_overlap(b, a, p=p) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 2, 3], [1, 2, 3], 1.0),
        (list(range(100)), list(range(100)), 1.0),
        ([1], [1, 2, 3, 4], 1.0),  # a prefix: the agreement seen is extrapolated
        ([1, 2, 3], [4, 5, 6], 0.0),
        # X_1..X_3 = 0 and X_4 = 1 (X_s = X_1 = 0): the sum's X_4/4·p^4, scaled by (1-p)/p,
        # plus the tail (X_4 - X_s)/4·p^4.
        ([1], [2, 3, 4, 1], 0.9**4 / 4 * (0.1 / 0.9) + 0.9**4 / 4),
        ([], [], 1.0),  # both found nothing: they agree
        ([], [1, 2], 0.0),
        ([1, 1, 2, 2], [1, 2], 1.0),  # repeats count at their first position only
    ],
)
def test_rbo_edge_cases(a: list[int], b: list[int], expected: float) -> None:
    assert rank_biased_overlap(a, b) == pytest.approx(expected, abs=1e-12)


ids = st.lists(st.integers(min_value=0, max_value=30), max_size=25, unique=True)
persistence = st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.98])


@given(a=ids.filter(bool), b=ids.filter(bool), p=persistence)
def test_rbo_matches_the_formula_term_by_term(a: list[int], b: list[int], p: float) -> None:
    # Non-empty: the formula divides by s; empty lists are tabled above.
    expected = float(rbo_ext_reference(a, b, Fraction(p)))
    assert rank_biased_overlap(a, b, p=p) == pytest.approx(expected, abs=1e-9)


@given(a=ids, b=ids, p=persistence)
def test_rbo_is_symmetric_and_between_0_and_1(a: list[int], b: list[int], p: float) -> None:
    score = rank_biased_overlap(a, b, p=p)
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(rank_biased_overlap(b, a, p=p), abs=1e-12)


@given(a=ids, p=persistence)
def test_rbo_of_a_list_with_itself_is_1(a: list[int], p: float) -> None:
    assert rank_biased_overlap(a, list(a), p=p) == pytest.approx(1.0, abs=1e-12)


@given(a=ids, b=ids, p=persistence)
def test_rbo_of_disjoint_lists_is_0(a: list[int], b: list[int], p: float) -> None:
    b = [x + 100 for x in b]
    if a or b:
        assert rank_biased_overlap(a, b, p=p) == 0.0


def test_rbo_weighs_the_top_more_than_the_bottom() -> None:
    base = list(range(10))
    top_swapped = [1, 0, *base[2:]]
    bottom_swapped = [*base[:8], 9, 8]
    assert rank_biased_overlap(base, bottom_swapped) > rank_biased_overlap(base, top_swapped)
    # overlap@k cannot tell them apart at all
    assert overlap_at_k(base, bottom_swapped, 10) == overlap_at_k(base, top_swapped, 10) == 1.0


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_rbo_needs_p_strictly_between_0_and_1(p: float) -> None:
    with pytest.raises(ValueError, match="p must be"):
        rank_biased_overlap([1], [1], p=p)


# ---------------------------------------------------------------------------------------------
# Jobs and results


def job(n: int = 0, *, version: Version = Version.V1) -> ShadowJob:
    return ShadowJob(
        query=f"opening hours of pool {n}",
        k=3,
        category="facilities",
        primary_version=version,
        primary_ids=(1, 2, 3),
    )


def test_a_job_knows_the_version_to_shadow_and_accepts_plain_values() -> None:
    plain = ShadowJob(
        query="q",
        k=2,
        category=None,
        primary_version="v2",  # type: ignore[arg-type]
        primary_ids=[5, 6],  # type: ignore[arg-type]
    )
    assert plain.primary_version is Version.V2
    assert plain.other_version is Version.V1
    assert plain.primary_ids == (5, 6)
    assert job(version=Version.V1).other_version is Version.V2


def test_compare_measures_the_other_versions_ids_against_the_primarys() -> None:
    result = ShadowResult.compare(job(), other_ids=[2, 1, 9], latency_seconds=0.042)
    assert result.overlap == pytest.approx(2 / 3)
    assert result.rbo == pytest.approx(rank_biased_overlap([1, 2, 3], [2, 1, 9]))
    assert result.other_version is Version.V2
    assert result.latency_seconds == 0.042


# ---------------------------------------------------------------------------------------------
# The comparer


FAILING_QUERY = "is my rash contagious"  # run() fails on this one


class Recorder:
    """The app's side: ``run`` answers from a fixed other version; results are collected."""

    def __init__(self, other_ids: Sequence[Hashable] = (1, 2, 4)) -> None:
        self.other_ids = other_ids
        self.started: list[ShadowJob] = []
        self.results: list[ShadowResult] = []
        self.dropped: list[ShadowJob] = []
        self.gate = asyncio.Event()
        self.gate.set()  # clear() to hold every run until set() again
        self.cancelled = 0

    async def run(self, job: ShadowJob) -> ShadowResult:
        self.started.append(job)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if job.query == FAILING_QUERY:
            raise RuntimeError("the other version's database is down")
        return ShadowResult.compare(job, other_ids=self.other_ids, latency_seconds=0.01)

    def comparer(self, *, sample_rate: float = 1.0, capacity: int = 10) -> ShadowComparer:
        return ShadowComparer(
            sample_rate=sample_rate,
            capacity=capacity,
            run=self.run,
            on_result=self.results.append,
            rng=random.Random(42),
            on_drop=self.dropped.append,
        )


async def eventually(condition: Callable[[], bool]) -> None:
    """Let the worker run until ``condition`` holds (at most 5 s)."""
    async with asyncio.timeout(5):
        # Polling, not an Event: the counters under test are plain properties by design.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)


async def settle(comparer: ShadowComparer, *, jobs: int) -> None:
    """Wait until ``jobs`` jobs have finished (either way)."""
    await eventually(lambda: comparer.completed + comparer.failed >= jobs)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_the_sample_rate_is_respected(rate: float) -> None:
    recorder = Recorder()
    comparer = recorder.comparer(sample_rate=rate, capacity=10_000)
    accepted = sum(comparer.maybe_submit(job(n)) for n in range(10_000))
    # The same seed draws the same numbers: the count is exact, not merely close.
    draws = random.Random(42)
    assert accepted == sum(draws.random() < rate for _ in range(10_000))
    assert abs(accepted - rate * 10_000) <= 150  # and it is the rate (3 sd at 50 %: 150)
    assert comparer.submitted == accepted
    assert comparer.dropped == 0


async def test_results_arrive_off_the_request_path() -> None:
    recorder = Recorder()
    comparer = recorder.comparer()
    await comparer.start()
    try:
        assert comparer.maybe_submit(job(1))
        assert comparer.maybe_submit(job(2))
        assert recorder.started == []  # the caller returned before any comparison ran
        await settle(comparer, jobs=2)
    finally:
        await comparer.aclose()
    assert [r.overlap for r in recorder.results] == [pytest.approx(2 / 3)] * 2
    assert [j.query for j in recorder.started] == [job(1).query, job(2).query]
    assert (comparer.submitted, comparer.completed, comparer.dropped) == (2, 2, 0)


async def test_a_full_queue_drops_and_counts_without_blocking() -> None:
    recorder = Recorder()
    recorder.gate.clear()  # the other version hangs
    comparer = recorder.comparer(capacity=2)
    await comparer.start()
    try:
        assert comparer.maybe_submit(job(0))
        await eventually(lambda: bool(recorder.started))  # the worker holds job 0; queue empty
        loop = asyncio.get_running_loop()
        began = loop.time()
        accepted = [comparer.maybe_submit(job(n)) for n in range(1, 6)]
        assert loop.time() - began < 0.5  # no waiting for room
        assert accepted == [True, True, False, False, False]
        assert (comparer.submitted, comparer.dropped) == (3, 3)
        assert [j.query for j in recorder.dropped] == [job(n).query for n in (3, 4, 5)]

        recorder.gate.set()
        await settle(comparer, jobs=3)
        assert comparer.completed == 3
        assert comparer.maybe_submit(job(6))  # room again
    finally:
        await comparer.aclose()


async def test_a_failing_comparison_is_logged_and_the_worker_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    comparer = recorder.comparer()
    await comparer.start()
    try:
        with caplog.at_level(logging.ERROR, logger="rag_service.shadow"):
            comparer.maybe_submit(
                ShadowJob(
                    query=FAILING_QUERY,
                    k=3,
                    category=None,
                    primary_version=Version.V2,
                    primary_ids=(),
                )
            )
            comparer.maybe_submit(job(1))
            await settle(comparer, jobs=2)
    finally:
        await comparer.aclose()
    assert (comparer.failed, comparer.completed) == (1, 1)
    assert len(recorder.results) == 1
    assert "shadow comparison on v1 failed" in caplog.text
    assert "database is down" in caplog.text
    assert FAILING_QUERY not in caplog.text  # queries are user data: never logged


async def test_aclose_stops_the_worker_and_cancels_the_comparison_in_flight() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    comparer = recorder.comparer()
    await comparer.start()
    comparer.maybe_submit(job(1))
    comparer.maybe_submit(job(2))
    await eventually(lambda: bool(recorder.started))
    workers = [t for t in asyncio.all_tasks() if t.get_name() == "embedshift-shadow-comparer"]
    assert len(workers) == 1

    await comparer.aclose()

    assert workers[0].done()
    assert recorder.cancelled == 1
    assert recorder.results == []
    assert not comparer.maybe_submit(job(3))  # closed: nothing taken, nothing counted
    assert (comparer.submitted, comparer.dropped) == (2, 0)
    await comparer.aclose()  # a second close is harmless


async def test_start_once_and_never_after_close() -> None:
    comparer = Recorder().comparer()
    await comparer.start()
    with pytest.raises(RuntimeError, match="already started"):
        await comparer.start()
    await comparer.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await comparer.start()


@pytest.mark.parametrize(
    ("sample_rate", "capacity", "field"),
    [(-0.1, 10, "sample_rate"), (1.5, 10, "sample_rate"), (0.5, 0, "capacity")],
)
def test_nonsense_settings_are_refused(sample_rate: float, capacity: int, field: str) -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match=field):
        ShadowComparer(
            sample_rate=sample_rate,
            capacity=capacity,
            run=recorder.run,
            on_result=recorder.results.append,
            rng=random.Random(0),
        )
