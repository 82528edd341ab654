"""retry.py: pure parsing and classification as tables; the pacer and the loop on a fake clock.

The fake clock is time itself, not a double of our code: the pacer takes ``clock`` and ``sleep``
as parameters precisely so these tests run instantly and deterministically.
"""

from __future__ import annotations

import asyncio
import email.utils
import heapq
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from rag_service.errors import AuthenticationFailed, ProviderError, QuotaExceeded
from rag_service.providers.retry import (
    MAX_SERVER_PAUSE_SECONDS,
    Failure,
    FailureKind,
    LimiterStyle,
    Outcome,
    RateLimitHeaders,
    RateLimitPacer,
    RequestTooLarge,
    RetryPolicy,
    classify_status,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
    redact,
    send_in_requests,
    send_with_retries,
)
from rag_service.testing.embedding_server import (
    Limiter,
    format_duration,
    make_limiter,
)


class FakeTime:
    """A clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


def pacer_on(time: FakeTime, **options: float | int | None) -> RateLimitPacer:
    # Exact arithmetic for the tables: no estimate margin, no safety floor unless asked.
    defaults: dict[str, float | int | None] = {"margin": 1.0, "safety_seconds": 0.0}
    return RateLimitPacer(clock=time.clock, sleep=time.sleep, **{**defaults, **options})  # type: ignore[arg-type]


def limit_headers(
    limit: int, remaining: int, *, requests: tuple[int, int] | None = None
) -> dict[str, str]:
    headers = {
        "x-ratelimit-limit-tokens": str(limit),
        "x-ratelimit-remaining-tokens": str(remaining),
        "x-ratelimit-reset-tokens": format_duration((limit - remaining) * 60 / limit),
    }
    if requests:
        headers["x-ratelimit-limit-requests"] = str(requests[0])
        headers["x-ratelimit-remaining-requests"] = str(requests[1])
    return headers


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("2.5s", 2.5),
        ("7.66s", 7.66),
        ("10us", 1e-5),
        ("1.5", 1.5),
        ("17", 17.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("5x", None),
        ("1s garbage", None),
        ("-1", None),
        ("inf", None),
    ],
)
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.12, "120ms"),
        (1, "1s"),
        (59.9996, "1m0s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_server_duration_format_round_trips_through_the_parser(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-3)


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "3", "retry-after-ms": "2500"}, 2.5),  # the precise one wins
        ({"Retry-After": email.utils.formatdate(NOW + 10, usegmt=True)}, 10.0),
        ({"Retry-After": email.utils.formatdate(NOW - 10, usegmt=True)}, 0.0),
        ({"retry-after-ms": "nonsense", "retry-after": "4"}, 4.0),
        ({"Retry-After": "next tuesday"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == (
        pytest.approx(seconds) if seconds is not None else None
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {
                "X-RateLimit-Limit-Requests": "3000",
                "x-ratelimit-limit-tokens": "1000000",
                "x-ratelimit-remaining-requests": "2999",
                "x-ratelimit-remaining-tokens": "999000",
                "x-ratelimit-reset-requests": "20ms",
                "x-ratelimit-reset-tokens": "60ms",
            },
            RateLimitHeaders(3000, 1_000_000, 2999, 999_000, 0.02, 0.06),
        ),
        ({"x-ratelimit-limit-tokens": "5000"}, RateLimitHeaders(limit_tokens=5000)),
        ({"x-ratelimit-limit-tokens": "lots"}, RateLimitHeaders()),
        ({}, RateLimitHeaders()),
    ],
)
def test_parse_rate_limit_headers(headers: dict[str, str], expected: RateLimitHeaders) -> None:
    parsed = parse_rate_limit_headers(headers)
    assert parsed == expected
    assert parsed.present == (
        expected.limit_tokens is not None or expected.limit_requests is not None
    )


@pytest.mark.parametrize(
    ("status", "code", "message", "kind"),
    [
        (None, None, "", FailureKind.TRANSIENT),
        (429, "rate_limit_exceeded", "Rate limit reached for ...", FailureKind.RATE_LIMITED),
        (429, "insufficient_quota", "You exceeded your current quota", FailureKind.QUOTA),
        (429, "rate_limit_exceeded", "Request too large for embeddings", FailureKind.TOO_LARGE),
        (400, "max_tokens_per_request", "Requested 453357 tokens", FailureKind.TOO_LARGE),
        (413, None, "", FailureKind.TOO_LARGE),
        (401, "invalid_api_key", "Incorrect API key provided", FailureKind.AUTH),
        (403, None, "PERMISSION_DENIED", FailureKind.AUTH),
        (400, "invalid_api_key", "API key not valid", FailureKind.AUTH),  # Google says 400
        (400, None, "'$.input' is invalid", FailureKind.REJECTED),
        (404, None, "model not found", FailureKind.REJECTED),
        (408, None, "", FailureKind.TRANSIENT),
        (500, None, "", FailureKind.TRANSIENT),
        (502, None, "", FailureKind.TRANSIENT),
        (503, None, "", FailureKind.TRANSIENT),
        (504, None, "", FailureKind.TRANSIENT),
        (529, None, "", FailureKind.TRANSIENT),
    ],
)
def test_classify_status(
    status: int | None, code: str | None, message: str, kind: FailureKind
) -> None:
    assert classify_status(status, code=code, message=message) is kind
    assert kind.retried == (kind in (FailureKind.RATE_LIMITED, FailureKind.TRANSIENT))


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("key my-secret-key refused", ["my-secret-key"], "key [redacted] refused"),
        (
            "Incorrect API key provided: sk-proj-****abcd.",
            [],
            "Incorrect API key provided: [redacted].",
        ),
        ("bad key AIzaSyA1234567890abcdef", [], "bad key [redacted]"),
        ("two\nlines\t here", [], "two lines here"),
        ("short key abc", ["abc"], "short key abc"),  # too short to be a key: left alone
        ("x" * 400, [], "x" * 299 + "…"),
    ],
)
def test_redact(text: str, secrets: list[str], expected: str) -> None:
    assert redact(text, secrets) == expected


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("attempt", "retry_after", "expected"),
    [
        (1, None, 0.5),
        (2, None, 1.0),
        (3, None, 2.0),
        (10, None, 60.0),  # capped
        (1, 7.5, 7.5),  # the server's word beats the backoff...
        (9, 120.0, 60.0),  # ...up to the cap: a Retry-After of hours must not hold a worker
        (1, 3600.0, 60.0),
        (1, -1.0, 0.0),
    ],
)
def test_delay_without_jitter(attempt: int, retry_after: float | None, expected: float) -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=60.0, jitter=False)
    assert policy.delay(attempt, retry_after, random.Random(0)) == expected


def test_full_jitter_stays_under_the_ceiling_and_is_reproducible() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    first = [policy.delay(n, None, random.Random(42)) for n in range(1, 8)]
    again = [policy.delay(n, None, random.Random(42)) for n in range(1, 8)]
    assert first == again
    for attempt, delay in enumerate(first, start=1):
        assert 0.0 <= delay <= min(8.0, 2 ** (attempt - 1))


# --------------------------------------------------------------------------- pacer


async def test_configured_limit_waits_for_refill() -> None:
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=600)  # 10 tokens a second
    await pacer.acquire(600)
    assert time.now == 0.0
    await pacer.acquire(100)
    assert time.now == pytest.approx(10.0)


async def test_a_safety_floor_stays_banked_and_costs_no_throughput() -> None:
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=600, safety_seconds=0.5)  # floor: 5 tokens
    await pacer.acquire(600)  # a full bucket may still be spent whole
    await pacer.acquire(100)
    assert time.now == pytest.approx(10.5)
    await pacer.acquire(100)
    assert time.now == pytest.approx(20.5)  # steady state: one refill period per 100 tokens


async def test_request_limit_spaces_requests() -> None:
    time = FakeTime()
    pacer = pacer_on(time, requests_per_minute=60)
    for _ in range(60):
        pacer.settle(await pacer.acquire(1), headers={}, actual_tokens=None)
    assert time.now == 0.0  # a full bucket's burst
    pacer.settle(await pacer.acquire(1), headers={}, actual_tokens=None)
    assert time.now == pytest.approx(1.0)


async def test_headers_set_the_limit_and_the_level() -> None:
    time = FakeTime()
    pacer = pacer_on(time)
    probe = await pacer.acquire(100)
    assert probe.probe
    pacer.settle(probe, headers=limit_headers(6000, 1000), actual_tokens=100)
    assert pacer.tokens_per_minute == 6000
    await pacer.acquire(2000)  # 1000 banked, 100 a second
    assert time.now == pytest.approx(10.0)


async def test_reset_header_stands_in_for_a_missing_remaining() -> None:
    time = FakeTime()
    pacer = pacer_on(time)
    headers = {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-reset-tokens": "50s"}
    pacer.settle(await pacer.acquire(10), headers=headers, actual_tokens=10)
    await pacer.acquire(2000)  # 50 s from full means 1000 left
    assert time.now == pytest.approx(10.0)


async def test_the_servers_word_raises_the_level_too() -> None:
    """A cautious error must not stay banked forever: the header is the truth both ways."""
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=6000)
    first = await pacer.acquire(5000)  # our estimate; the API counts 1000 and says so
    pacer.settle(first, headers=limit_headers(6000, 5000), actual_tokens=None)
    await pacer.acquire(4000)
    assert time.now == 0.0


async def test_older_requests_still_in_flight_count_as_unseen() -> None:
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=6000)
    await pacer.acquire(1000)  # sent first, answer still outstanding
    second = await pacer.acquire(1000)
    # The server admitted `second` first and has not seen the other one yet.
    pacer.settle(second, headers=limit_headers(6000, 5000), actual_tokens=1000)
    await pacer.acquire(4500)  # 5000 - 1000 unseen = 4000 banked: wait 5 s for 500 more
    assert time.now == pytest.approx(5.0)


async def test_another_client_on_the_key_gets_its_share() -> None:
    """A simulated server bucket (100 tokens/s) that another client drains at 50/s: once our
    pacer has seen that in the headers it runs at the remaining 50/s without a 429."""
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=6000, safety_seconds=0.5)
    server_level, server_at = 6000.0, 0.0
    admitted: list[tuple[float, int]] = []
    refused: list[float] = []
    while time.now < 600:
        permit = await pacer.acquire(100)
        # The server's bucket: refilled at 100/s, drawn on by the other client at 50/s.
        server_level = (
            min(6000.0, server_level + (time.now - server_at) * 100) - (time.now - server_at) * 50
        )
        server_at = time.now
        if server_level >= 100:
            server_level -= 100
            headers = limit_headers(6000, max(0, int(server_level)))
            pacer.settle(permit, headers=headers, actual_tokens=100)
            admitted.append((time.now, 100))
        else:
            failure = Failure(
                kind=FailureKind.RATE_LIMITED,
                detail="HTTP 429",
                retry_after=(100 - server_level) / 50,
                headers=limit_headers(6000, max(0, int(server_level))),
            )
            pacer.release(permit, failure)
            refused.append(time.now)
    late = [tokens for at, tokens in admitted if at >= 300]
    assert sum(late) / 300 == pytest.approx(50, rel=0.05)
    assert [at for at in refused if at >= 300] == []


async def test_requests_sent_after_are_subtracted_from_a_header() -> None:
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=6000)
    first = await pacer.acquire(1000)
    await pacer.acquire(1000)  # in flight when the first answer arrives
    # The server admitted `first` with 3000 left (someone else used 2000).
    pacer.settle(first, headers=limit_headers(6000, 3000), actual_tokens=1000)
    await pacer.acquire(2500)  # 3000 - 1000 (second) = 2000 banked, 100 a second
    assert time.now == pytest.approx(5.0)


async def test_actual_usage_is_refunded_and_calibrates_the_estimate() -> None:
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=6000)
    permit = await pacer.acquire(4000)
    pacer.settle(permit, headers={}, actual_tokens=2000)  # the estimate was twice reality
    assert pacer.ratio == pytest.approx(0.5)
    assert pacer.calibrated(1000) == 500
    second = await pacer.acquire(8000)  # reserves 4000 of the 4000 left
    assert second.reserved == 4000
    assert time.now == 0.0


async def test_a_rate_limit_pauses_everyone_and_halves_concurrency() -> None:
    time = FakeTime()
    pacer = pacer_on(time, max_concurrency=8)
    pacer.settle(await pacer.acquire(1), headers={}, actual_tokens=1)  # no headers: no probing
    permit = await pacer.acquire(10)
    pacer.release(
        permit, Failure(kind=FailureKind.RATE_LIMITED, detail="HTTP 429", retry_after=5.0)
    )
    assert pacer.concurrency == 4
    await pacer.acquire(10)
    assert time.now == pytest.approx(5.0)


async def test_a_retry_after_of_an_hour_pauses_the_pacer_a_minute_at_most() -> None:
    time = FakeTime()
    pacer = pacer_on(time, max_concurrency=8)
    pacer.settle(await pacer.acquire(1), headers={}, actual_tokens=1)
    permit = await pacer.acquire(10)
    pacer.release(
        permit, Failure(kind=FailureKind.RATE_LIMITED, detail="HTTP 429", retry_after=3600.0)
    )
    await pacer.acquire(10)
    assert time.now == pytest.approx(MAX_SERVER_PAUSE_SECONDS)


async def test_concurrency_window_blocks_until_a_request_finishes() -> None:
    time = FakeTime()
    pacer = pacer_on(time, max_concurrency=2, tokens_per_minute=10**6)
    first = await pacer.acquire(1)
    await pacer.acquire(1)
    third = asyncio.create_task(pacer.acquire(1))
    await asyncio.sleep(0.01)
    assert not third.done()
    pacer.settle(first, headers={}, actual_tokens=1)
    await asyncio.wait_for(third, timeout=1)


async def test_only_the_probe_goes_until_the_first_answer() -> None:
    time = FakeTime()
    pacer = pacer_on(time)
    probe = await pacer.acquire(1)
    waiting = asyncio.create_task(pacer.acquire(1))
    ready = asyncio.create_task(pacer.ready())
    await asyncio.sleep(0.01)
    assert not waiting.done() and not ready.done()
    pacer.settle(probe, headers={}, actual_tokens=1)
    second = await asyncio.wait_for(waiting, timeout=1)
    await asyncio.wait_for(ready, timeout=1)
    assert not second.probe  # the answer carried no headers: nothing more to learn


async def test_a_failed_probe_hands_probing_to_the_next_request() -> None:
    pacer = pacer_on(FakeTime())
    probe = await pacer.acquire(1)
    pacer.release(probe, Failure(kind=FailureKind.TRANSIENT, detail="HTTP 503"))
    assert (await pacer.acquire(1)).probe


async def test_max_request_tokens_is_a_share_of_the_bucket() -> None:
    pacer = pacer_on(FakeTime(), tokens_per_minute=40_000, request_share=0.25)
    assert pacer.max_request_tokens() == 10_000


async def test_the_probe_is_small_and_a_server_without_headers_takes_whole_batches() -> None:
    """Before the first answer the limit is unknown: the probe is small, not a whole batch that
    could take most of a short window. An answer without rate-limit headers lifts the cap."""
    pacer = pacer_on(FakeTime())
    assert pacer.max_request_tokens() == 500
    probe = await pacer.acquire(300)
    pacer.settle(probe, headers={}, actual_tokens=300)
    assert pacer.max_request_tokens() is None


async def test_a_request_bigger_than_the_bucket_waits_for_a_full_bucket_not_forever() -> None:
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=600)
    await pacer.acquire(300)
    await pacer.acquire(10_000)
    assert time.now == pytest.approx(30.0)


async def test_paced_throughput_matches_the_limit() -> None:
    """A long run on a small bucket: tokens granted per minute equal the limit."""
    time = FakeTime()
    pacer = pacer_on(time, tokens_per_minute=60_000, max_concurrency=4)
    granted = 0
    while time.now < 600:
        permit = await pacer.acquire(700)
        pacer.settle(permit, headers={}, actual_tokens=700)
        granted += 700
    steady = (granted - 60_000) / time.now * 60  # minus the initial full bucket
    assert steady == pytest.approx(60_000, rel=0.01)


# --------------------------------------------------------------------------- the loop


def scripted(
    answers: list[Exception | str],
) -> tuple[Callable[[], Awaitable[Outcome[str]]], list[int]]:
    """A transport stand-in: raises or returns the next scripted answer."""
    calls: list[int] = []

    async def send() -> Outcome[str]:
        calls.append(1)
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return Outcome(value=answer, headers={}, actual_tokens=1)

    return send, calls


class StatusError(Exception):
    def __init__(self, status: int | None, code: str | None = None) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.code = code


def classify(exc: Exception) -> Failure | None:
    if not isinstance(exc, StatusError):
        return None
    kind = classify_status(exc.status, code=exc.code)
    return Failure(kind=kind, detail=f"HTTP {exc.status}", status=exc.status)


async def run(
    answers: list[Exception | str], *, attempts: int = 4
) -> tuple[str, list[int], FakeTime]:
    time = FakeTime()
    send, calls = scripted(answers)
    value = await send_with_retries(
        send,
        estimated_tokens=1,
        classify=classify,
        pacer=pacer_on(time),
        policy=RetryPolicy(max_attempts=attempts, base_delay=1.0, jitter=False),
        rng=random.Random(0),
        what="openai:m@8",
        sleep=time.sleep,
    )
    return value, calls, time


async def test_transient_failures_are_retried_with_backoff() -> None:
    value, calls, time = await run([StatusError(503), StatusError(None), "vectors"])
    assert value == "vectors"
    assert len(calls) == 3
    assert time.slept == [1.0, 2.0]


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (StatusError(429, "insufficient_quota"), QuotaExceeded),
        (StatusError(401), AuthenticationFailed),
        (StatusError(400), ProviderError),
        (StatusError(400, "max_tokens_per_request"), RequestTooLarge),
    ],
)
async def test_what_retrying_cannot_fix_fails_at_once(
    error: StatusError, raised: type[ProviderError]
) -> None:
    with pytest.raises(raised) as caught:
        await run([error, "never reached"])
    assert type(caught.value) is raised
    assert "openai:m@8" in str(caught.value)


async def test_running_out_of_attempts_says_what_kept_failing() -> None:
    answers: list[Exception | str] = [StatusError(500), StatusError(429), StatusError(503)]
    with pytest.raises(
        ProviderError,
        match=r"gave up after 3 attempts \(2× server error or timeout, 1× rate limited \(429\)\); "
        r"last: HTTP 503",
    ):
        await run([*answers, StatusError(500), "never reached"], attempts=2)


async def test_rate_limits_have_their_own_larger_budget() -> None:
    answers: list[Exception | str] = [*[StatusError(429)] * 6, StatusError(500), "vectors"]
    value, calls, _ = await run(answers, attempts=2)  # 6 rate limits do not exhaust 2 attempts
    assert value == "vectors"
    assert len(calls) == 8


async def test_exceptions_that_are_not_api_failures_propagate() -> None:
    with pytest.raises(ZeroDivisionError):
        await run([ZeroDivisionError(), "never reached"])


async def test_send_in_requests_keeps_order_and_halves_what_is_too_large() -> None:
    sent: list[tuple[int, int]] = []

    async def send_range(start: int, end: int) -> None:
        if end - start > 3:
            raise RequestTooLarge("too large", detail="HTTP 400: Requested too many tokens")
        sent.append((start, end))
        await asyncio.sleep(0)

    await send_in_requests(
        [1] * 20,
        max_inputs=8,
        max_tokens=1000,
        pacer=RateLimitPacer(max_concurrency=3),
        workers=3,
        send_range=send_range,
        what="openai:m@8",
    )
    covered = sorted(sent)  # workers finish in any order; together they tile [0, 20)
    assert covered[0][0] == 0 and covered[-1][1] == 20
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert max(end - start for start, end in sent) <= 3


@pytest.mark.parametrize(
    ("estimates", "max_inputs", "max_tokens", "sizes"),
    [
        ([1] * 10, 4, 1000, [4, 4, 2]),
        ([10] * 10, 100, 25, [2, 2, 2, 2, 2]),
        ([50, 1, 1], 100, 10, [1, 2]),  # one text over the cap still goes, alone
    ],
)
async def test_send_in_requests_respects_input_and_token_caps(
    estimates: list[int], max_inputs: int, max_tokens: int, sizes: list[int]
) -> None:
    sent: list[tuple[int, int]] = []

    async def send_range(start: int, end: int) -> None:
        sent.append((start, end))

    await send_in_requests(
        estimates,
        max_inputs=max_inputs,
        max_tokens=max_tokens,
        pacer=RateLimitPacer(max_concurrency=1),
        workers=1,
        send_range=send_range,
        what="x",
    )
    assert [end - start for start, end in sent] == sizes


async def test_one_text_too_large_on_its_own_is_named() -> None:
    async def send_range(start: int, end: int) -> None:
        if start <= 2 < end:
            raise RequestTooLarge("too large", detail="HTTP 400: context length")

    with pytest.raises(ProviderError, match="text 2 of the batch is too large"):
        await send_in_requests(
            [1] * 4,
            max_inputs=4,
            max_tokens=100,
            pacer=RateLimitPacer(max_concurrency=1),
            workers=1,
            send_range=send_range,
            what="x",
        )


# --------------------------------------------------------------------------- any limiter


class VirtualTime:
    """Time shared by many tasks, as a discrete-event simulation: a sleeper wakes at its
    deadline, and time moves only once every task is waiting (on a sleep or on the pacer)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._order), future))
        await future

    async def run_until(self, end: float) -> None:
        while True:
            for _ in range(200):  # every runnable task runs until it waits
                await asyncio.sleep(0)
            if not self._sleepers or self._sleepers[0][0] > end:
                return
            wake, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            if not future.done():
                future.set_result(None)


class RateLimited(Exception):
    def __init__(self, headers: dict[str, str], retry_after: float) -> None:
        super().__init__("429")
        self.headers = headers
        self.retry_after = retry_after


def classify_429(exc: Exception) -> Failure | None:
    if not isinstance(exc, RateLimited):
        return None
    return Failure(
        kind=FailureKind.RATE_LIMITED,
        detail="HTTP 429",
        status=429,
        retry_after=exc.retry_after,
        headers=exc.headers,
    )


@dataclass
class Simulated:
    admitted: list[tuple[float, int]]
    refused: int
    limiter: Limiter

    @property
    def budget_share(self) -> float:
        """Tokens admitted ÷ the most the limiter could admit over the run (Limiter.budget)."""
        return self.limiter.share_of_budget(self.admitted, self.admitted[-1][0])

    @property
    def refused_share(self) -> float:
        return self.refused / (self.refused + len(self.admitted))


async def simulate(
    limiter: Limiter,
    *,
    clients: int = 1,
    seconds: float = 600.0,
    latency: float = 0.2,
    workers: int = 4,
    largest: int = 2_000,
) -> Simulated:
    """Independent pacers (one per client, ``workers`` requests each at once) on one key,
    against a server limiter on virtual time. The server decides when a request arrives and
    answers ``latency`` later, with the headers as they stood after its decision."""
    time = VirtualTime()
    admitted: list[tuple[float, int]] = []
    refused = 0

    def pacer() -> RateLimitPacer:
        return RateLimitPacer(max_concurrency=workers, clock=time.clock, sleep=time.sleep)

    pacers = [pacer() for _ in range(clients)]

    async def worker(pacer: RateLimitPacer) -> None:
        nonlocal refused
        while True:
            await pacer.ready()
            size = min(largest, pacer.max_request_tokens() or largest)

            async def send(size: int = size) -> Outcome[None]:
                nonlocal refused
                arrived = time.now
                wait = limiter.wait_for(size, arrived)
                if wait <= 0:
                    limiter.take(size, arrived)
                    admitted.append((arrived, size))
                headers = limiter.headers("tokens", arrived)
                await time.sleep(latency)
                if wait > 0:
                    refused += 1
                    raise RateLimited(headers, wait)
                return Outcome(value=None, headers=headers, actual_tokens=size)

            await send_with_retries(
                send,
                estimated_tokens=size,
                classify=classify_429,
                pacer=pacer,
                policy=RetryPolicy(max_rate_limited=1000),
                rng=random.Random(0),
                what="sim",
                sleep=time.sleep,
            )

    tasks = [asyncio.create_task(worker(p)) for p in pacers for _ in range(workers)]
    try:
        await time.run_until(seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Simulated(admitted=admitted, refused=refused, limiter=limiter)


# 60,000 tokens a minute however enforced; sliding windows reporting either reset.
LIMITERS = {
    "bucket": lambda: make_limiter(60_000, 0.0),
    "sliding-first-4s": lambda: make_limiter(60_000, 0.0, style="sliding", window=4),
    "sliding-empty-10s": lambda: make_limiter(
        60_000, 0.0, style="sliding", window=10, reset_report="empty"
    ),
    "sliding-first-60s": lambda: make_limiter(60_000, 0.0, style="sliding", window=60),
    "fixed-4s": lambda: make_limiter(60_000, 0.0, style="fixed", window=4),
    "fixed-10s": lambda: make_limiter(60_000, 0.0, style="fixed", window=10),
    "fixed-60s": lambda: make_limiter(60_000, 0.0, style="fixed", window=60),
}


@pytest.mark.parametrize(
    ("style", "clients"),
    [
        ("bucket", 1),
        ("bucket", 2),
        ("sliding-first-4s", 1),
        ("sliding-first-4s", 2),
        ("sliding-first-4s", 4),
        ("sliding-empty-10s", 1),
        ("sliding-empty-10s", 2),
        ("sliding-empty-10s", 4),
        ("sliding-first-60s", 1),
        ("sliding-first-60s", 2),
        ("sliding-first-60s", 4),
        ("fixed-4s", 1),
        ("fixed-4s", 2),
        ("fixed-4s", 4),
        ("fixed-10s", 1),
        ("fixed-10s", 2),
        ("fixed-10s", 4),
        ("fixed-60s", 1),
        ("fixed-60s", 2),
    ],
)
async def test_ten_minutes_on_any_limiter_use_the_budget_with_few_429s(
    style: str, clients: int
) -> None:
    """Independent pacers (one per client) on one key for 10 simulated minutes: ≥ 0.95 of the
    most the limiter could admit (``Limiter.budget``), < 1 % of requests refused. The cells
    this simulation still misses are listed in docs/benchmarks.md ("Pacing on any limiter")."""
    run = await simulate(LIMITERS[style](), clients=clients)
    assert run.budget_share >= 0.95
    assert run.refused_share < 0.01


async def test_a_window_is_learned_as_a_window_and_a_bucket_as_a_bucket() -> None:
    """The answers alone tell the styles apart: a bucket's (limit − remaining) / reset is the
    same in every answer, a window's is not; a fixed window forgets use at its boundary."""
    styles = {}
    for name in ("bucket", "sliding-first-4s", "fixed-10s"):
        time = FakeTime()
        limiter = LIMITERS[name]()
        pacer = RateLimitPacer(clock=time.clock, sleep=time.sleep)
        for _ in range(40):
            permit = await pacer.acquire(1000)
            limiter.take(1000, time.now)
            pacer.settle(permit, headers=limiter.headers("tokens", time.now), actual_tokens=1000)
            time.now += 0.5
        styles[name] = pacer.style
    assert styles == {
        "bucket": LimiterStyle.BUCKET,
        "sliding-first-4s": LimiterStyle.WINDOW,
        "fixed-10s": LimiterStyle.WINDOW,
    }


async def test_a_limit_passed_in_gives_way_to_what_the_answers_show() -> None:
    """A per-minute limit from the spec is paced as a bucket until the server's headers show
    a 4-s window with a fifteenth of it."""
    time = FakeTime()
    limiter = LIMITERS["sliding-first-4s"]()
    pacer = RateLimitPacer(tokens_per_minute=60_000, clock=time.clock, sleep=time.sleep)
    assert pacer.style is LimiterStyle.BUCKET
    for _ in range(10):
        permit = await pacer.acquire(300)
        limiter.take(300, time.now)
        pacer.settle(permit, headers=limiter.headers("tokens", time.now), actual_tokens=300)
        time.now += 0.1
    assert pacer.style is LimiterStyle.WINDOW
    assert pacer.tokens_per_minute == 4000  # the header's limit, per its window


@pytest.mark.parametrize(
    ("style", "shrinks"),
    [
        # A fixed window's last room is lost at the period's end: a smaller request takes it.
        ("fixed-4s", True),
        ("fixed-10s", True),
        # A sliding window loses nothing by waiting (its room frees as our requests leave):
        # sized by the little room free at the moment, requests shrink, and small requests
        # free small room a window later (issue 17 §3: 352 tokens on average where the usual
        # was 500, and 4 in flight could no longer carry the limit's rate).
        ("sliding-first-4s", False),
        ("sliding-empty-10s", False),
    ],
)
async def test_only_a_fixed_windows_last_room_takes_a_smaller_request(
    style: str, shrinks: bool
) -> None:
    time = FakeTime()
    limiter = LIMITERS[style]()
    pacer = RateLimitPacer(clock=time.clock, sleep=time.sleep)

    async def send(size: int) -> None:
        permit = await pacer.acquire(size)
        limiter.take(size, time.now)
        pacer.settle(permit, headers=limiter.headers("tokens", time.now), actual_tokens=size)

    for _ in range(60):  # long enough to learn the window (and that it is fixed)
        await send(pacer.max_request_tokens() or 1000)
        time.now += 0.05
    usual = pacer.max_request_tokens()
    assert usual is not None
    # Fill the window until less than one usual request of room is left.
    while int(limiter.headers("tokens", time.now)["x-ratelimit-remaining-tokens"]) >= usual:
        await send(30)
    size = pacer.max_request_tokens()
    assert size is not None
    assert (size < usual) is shrinks
