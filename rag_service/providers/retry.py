"""Our retry loop and rate-limit pacing, shared by the OpenAI and Google providers.

The SDKs' own retries are switched off: they retry blindly (no shared view of the rate limit, no
pacing), and a retried ``insufficient_quota`` only burns time. Instead every request goes through
:func:`send_with_retries`, which asks a :class:`RateLimitPacer` for room first, classifies any
failure once (:func:`classify_status`), and either retries (rate limits, 5xx, timeouts) or raises
the one error the user can act on.

The pacer is a client-side mirror of the server's token bucket. Feeding it the
``x-ratelimit-*`` headers and the tokens each response actually used lets a long backfill run at
the limit instead of bouncing off it with 429s, alone or sharing a key with other Jobs. Its clock
and sleep are parameters, so its tests are deterministic and instant. The parsing,
classification and backoff functions are pure; the pacer and the two loops
(:func:`send_with_retries`, :func:`send_in_requests`) are where the waiting happens.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

import numpy as np

from rag_service.errors import AuthenticationFailed, ProviderError, QuotaExceeded
from rag_service.providers.base import Embeddings, Usage, Vectors, estimate_tokens

__all__ = [
    "Failure",
    "FailureKind",
    "Outcome",
    "Permit",
    "RateLimitHeaders",
    "RateLimitPacer",
    "RequestTooLarge",
    "RetryPolicy",
    "classify_status",
    "embed_in_requests",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "redact",
    "send_in_requests",
    "send_with_retries",
]

T = TypeVar("T")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


# --------------------------------------------------------------------------- pure parsing

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str | None) -> float | None:
    """Seconds in OpenAI's ``x-ratelimit-reset-*`` format (Go durations: ``6m0s``, ``1s``,
    ``120ms``, ``1h2m3.5s``), Google's ``retryDelay`` (``"2.5s"``) or a bare number of seconds.
    None when absent or unreadable, so a malformed header degrades to "unknown". Pure."""
    if text is None:
        return None
    value = text.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            return None
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        position = match.end()
    return total if position == len(value) else None


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    # HTTP header names are case-insensitive; the SDKs hand us different mapping types.
    return {key.lower(): value for key, value in headers.items()}


def parse_retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms`` (OpenAI, precise) first, then
    ``Retry-After`` as seconds or an HTTP date (relative to ``now``, epoch seconds). Pure."""
    lowered = _lower_keys(headers)
    milliseconds = lowered.get("retry-after-ms")
    if milliseconds is not None:
        try:
            value = float(milliseconds)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000
    retry_after = lowered.get("retry-after")
    if retry_after is None:
        return None
    seconds = parse_duration(retry_after)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RateLimitHeaders:
    """OpenAI's ``x-ratelimit-*`` headers; None for any that are absent or unreadable."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None

    @property
    def present(self) -> bool:
        return self.limit_requests is not None or self.limit_tokens is not None


def _int_header(lowered: Mapping[str, str], name: str) -> int | None:
    raw = lowered.get(name)
    if raw is None:
        return None
    try:
        return int(float(raw.strip()))
    except ValueError:
        return None


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    """Read the ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers. Pure."""
    lowered = _lower_keys(headers)
    return RateLimitHeaders(
        limit_requests=_int_header(lowered, "x-ratelimit-limit-requests"),
        limit_tokens=_int_header(lowered, "x-ratelimit-limit-tokens"),
        remaining_requests=_int_header(lowered, "x-ratelimit-remaining-requests"),
        remaining_tokens=_int_header(lowered, "x-ratelimit-remaining-tokens"),
        reset_requests=parse_duration(lowered.get("x-ratelimit-reset-requests")),
        reset_tokens=parse_duration(lowered.get("x-ratelimit-reset-tokens")),
    )


_MASKED_KEYS = re.compile(r"sk-[A-Za-z0-9_\-*]{3,}|AIza[0-9A-Za-z_\-]{10,}")
_MAX_DETAIL = 300


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """One line of API error text that is safe to show: the secrets and anything shaped like an
    OpenAI or Google key (APIs echo masked keys back) removed, whitespace folded, length bounded.
    Pure."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    text = _MASKED_KEYS.sub("[redacted]", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


# --------------------------------------------------------------------------- classification


class FailureKind(Enum):
    """What one failed request means for the next step."""

    RATE_LIMITED = "rate limited (429)"
    TRANSIENT = "server error or timeout"
    TOO_LARGE = "request too large"
    QUOTA = "out of quota"
    AUTH = "key refused"
    REJECTED = "request rejected"

    @property
    def retried(self) -> bool:
        return self in (FailureKind.RATE_LIMITED, FailureKind.TRANSIENT)


_TRANSIENT_STATUSES = frozenset({408, 409, 500, 502, 503, 504})


def classify_status(
    status: int | None, *, code: str | None = None, message: str = ""
) -> FailureKind:
    """Map an API answer to what to do. ``status`` None means no answer (timeout, connection
    refused or reset). ``code`` is the API's error code; the Google adapter maps its own signals
    onto OpenAI's (``insufficient_quota``, ``invalid_api_key``) so one table serves both. Pure."""
    if status is None:
        return FailureKind.TRANSIENT
    if code == "insufficient_quota":
        return FailureKind.QUOTA
    if code == "invalid_api_key" or status in (401, 403):
        return FailureKind.AUTH
    if status == 429:
        # OpenAI answers a single request larger than the whole per-minute budget with a 429
        # that no amount of waiting fixes; only a smaller request does.
        if message.startswith("Request too large"):
            return FailureKind.TOO_LARGE
        return FailureKind.RATE_LIMITED
    if status == 413 or code == "max_tokens_per_request":
        return FailureKind.TOO_LARGE
    if status in _TRANSIENT_STATUSES or status >= 500:
        return FailureKind.TRANSIENT
    return FailureKind.REJECTED


@dataclass(frozen=True)
class Failure:
    """One failed attempt, already classified and with its text redacted."""

    kind: FailureKind
    detail: str
    status: int | None = None
    retry_after: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class RequestTooLarge(ProviderError):
    """The API refused a request for its size: the provider splits it and tries again."""

    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _error_for(failure: Failure, what: str) -> ProviderError:
    """The one-line error a user sees for a failure that is not retried."""
    if failure.kind is FailureKind.QUOTA:
        return QuotaExceeded(
            f"{what}: the API account is out of quota ({failure.detail}); add credit or raise "
            "the quota with the provider, then rerun (retrying cannot fix this)"
        )
    if failure.kind is FailureKind.AUTH:
        # The API's own text is left out on purpose: OpenAI echoes part of the key in it.
        return AuthenticationFailed(
            f"{what}: the API refused the key (HTTP {failure.status}); set a valid "
            "key in EMBEDSHIFT_TARGET_API_KEY / EMBEDSHIFT_SOURCE_API_KEY or the provider's own "
            "variable (in Kubernetes: the spec's apiKeySecretRef)"
        )
    if failure.kind is FailureKind.TOO_LARGE:
        return RequestTooLarge(
            f"{what}: request too large ({failure.detail})", detail=failure.detail
        )
    return ProviderError(
        f"{what}: the API rejected the request ({failure.detail}); fix the input or the spec, "
        "retrying will not help"
    )


# --------------------------------------------------------------------------- retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry rate limits, 5xx answers and timeouts.

    Exponential backoff with full jitter (AWS's "Exponential Backoff And Jitter") when the server
    gives no hint, so concurrent workers that failed together do not retry together.
    """

    max_attempts: int = 10
    # 429s are counted apart: the server is saying when, not failing. A paced backfill that
    # shares its key rides them out; only a key that stays saturated for long gives up.
    max_rate_limited: int = 50
    base_delay: float = 0.5
    max_delay: float = 60.0
    jitter: bool = True

    @classmethod
    def interactive(cls) -> RetryPolicy:
        """For a user waiting on a search: one quick retry, then let the caller fall back."""
        return cls(max_attempts=2, max_rate_limited=1, base_delay=0.05, max_delay=0.25)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based). A server's
        ``retry_after`` wins: it knows when its bucket has room and guessing shorter only earns
        another 429. Pure given ``rng``."""
        if retry_after is not None and math.isfinite(retry_after):
            return max(0.0, retry_after)
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, attempt - 1))
        return rng.uniform(0.0, ceiling) if self.jitter else ceiling


# --------------------------------------------------------------------------- pacing


class _Bucket:
    """A continuous token bucket, as OpenAI describes its limits: ``limit`` per minute,
    refilled at ``limit / 60`` per second, at most ``limit`` banked. The level may go negative:
    that is debt the next request waits out.

    Other clients on the same key (another Job of the same migration) draw on the server's
    bucket too. ``shadow`` models the server's level from our own use alone; the gap to what the
    next header reports is the others' use. Our refill is the limit's rate times our share of
    all recent use: with N clients the shares always sum to one, so together they refill at
    exactly the limit's rate however they split it, instead of each claiming all of it and
    bouncing off 429s. Alone, the share is one.
    """

    def __init__(self, limit: float, now: float) -> None:
        self.limit = limit
        self.level = limit
        self.updated = now
        self.shadow: float | None = None  # the server's level as of our last header, projected
        # (time, our use, others' use) over the last _SHARE_WINDOW seconds.
        self.history: deque[tuple[float, float, float]] = deque()
        self.share = 1.0

    @property
    def rate(self) -> float:
        return self.limit / 60.0

    @property
    def own_rate(self) -> float:
        return self.rate * self.share

    def refill(self, now: float) -> None:
        if now > self.updated:
            elapsed = now - self.updated
            self.level = min(self.limit, self.level + elapsed * self.own_rate)
            if self.shadow is not None:
                self.shadow = min(self.limit, self.shadow + elapsed * self.rate)
        self.updated = max(self.updated, now)

    def take(self, amount: float, now: float) -> None:
        """Book our own use (negative: a refund) in our level, the server model and history."""
        self.level -= amount
        if self.shadow is not None:  # no headers, no server model: nothing to compare with
            self.shadow -= amount
            self.history.append((now, amount, 0.0))
            self._forget_before(now - _SHARE_WINDOW)

    def sync(self, server_now: float, now: float) -> None:
        """Move our level to the server's, and learn the others' use from the difference."""
        self.refill(now)
        if self.shadow is not None:
            self.history.append((now, 0.0, self.shadow - server_now))
        self.shadow = server_now
        self._update_share(now)
        if server_now <= self.level:
            self.level = server_now
        else:
            # Raise too, or every cautious error stays banked for good. But only by our share
            # of the surplus: every client on the key sees the same surplus in its headers,
            # and if each took all of it they would collide.
            self.level += (server_now - self.level) * self.share

    def _forget_before(self, moment: float) -> None:
        while self.history and self.history[0][0] < moment:
            self.history.popleft()

    def _update_share(self, now: float) -> None:
        self._forget_before(now - _SHARE_WINDOW)
        ours = sum(entry[1] for entry in self.history)
        # Summed over the window, not clamped per answer: timing noise has both signs.
        others = sum(entry[2] for entry in self.history)
        if others <= 0 or ours + others <= 0:
            self.share = 1.0
        else:
            self.share = max(_MIN_SHARE, max(ours, 0.0) / (ours + others))

    def wait_for(self, amount: float, *, floor_seconds: float = 0.0) -> float:
        """Seconds until ``amount`` can be taken leaving ``floor_seconds`` of refill banked.

        The floor absorbs timing noise: the server refills from when requests *arrive*, we from
        when we send them, so a mirror that spends to exactly zero gets a 429 whenever one
        request travels faster than the one before. Banked once, it costs no throughput.
        """
        # A request bigger than the bucket waits for a full bucket, never forever: the server
        # then tells us it is too large and the provider splits it.
        needed = min(amount + floor_seconds * self.rate, self.limit)
        # The tolerance stops float rounding from asking for sleeps too short to move a clock.
        if self.level >= needed - 1e-6:
            return 0.0
        return (needed - self.level) / self.own_rate


@dataclass(frozen=True)
class Permit:
    """Room granted for one request; hand it back with ``settle`` or ``release``."""

    seq: int
    estimate: int
    reserved: int
    issued_at: float
    probe: bool = False


_EWMA_WEIGHT = 0.3
# How far back our share of the key's use is measured: long enough to average out timing
# noise and bursts, short enough to take back the whole limit soon after another Job ends.
_SHARE_WINDOW = 30.0
# Our share never drops below this, so a pacer cannot starve itself.
_MIN_SHARE = 0.05
_MIN_SLEEP = 0.001
_RATIO_BOUNDS = (0.05, 20.0)


class RateLimitPacer:
    """A client-side mirror of the server's token and request buckets.

    Before each request ``await acquire(estimate)`` waits until both buckets have room; after it
    ``settle`` (success) or ``release`` (failure) returns the permit with what happened:

    - the ``x-ratelimit-limit-*`` headers set the buckets' size; ``remaining-*`` (or ``reset-*``)
      set our level, corrected for our requests the answer has not seen yet. The gap between
      what we expected and what the server reports is other clients' use of the same key
      (another Job), which slows our own refill (see ``_Bucket``).
    - the tokens the API counted replace the estimate we reserved, and calibrate the ratio
      between estimate and reality, so later reservations are right-sized.
    - a 429 pauses everyone until the server's ``Retry-After`` and halves concurrency; each
      window's worth of successes adds one back (additive increase, multiplicative decrease).
    - ``safety_seconds`` of refill always stay banked, so network jitter between our clock and
      the server's cannot turn an exact mirror into a 429.

    Until the first answer says whether the API sends rate-limit headers, one request probes
    alone, so a new worker never opens with a burst into an already drained bucket. Limits
    passed in (Google sends no headers) replace the probe.

    Not thread-safe: one pacer per event loop, shared by all requests of one provider.
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 4,
        tokens_per_minute: int | None = None,
        requests_per_minute: int | None = None,
        request_share: float = 0.25,
        margin: float = 1.05,
        safety_seconds: float = 0.5,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._clock = clock
        self._sleep = sleep
        self._max_concurrency = max_concurrency
        self._window = float(max_concurrency)
        self._request_share = request_share
        self._margin = margin
        self._safety = safety_seconds
        now = clock()
        self._tokens = _Bucket(tokens_per_minute, now) if tokens_per_minute else None
        self._requests = _Bucket(requests_per_minute, now) if requests_per_minute else None
        # None: not known yet whether the server sends x-ratelimit headers.
        self._headers_seen: bool | None = (
            False if (tokens_per_minute or requests_per_minute) else None
        )
        self._ratio = 1.0
        self._calibrated = False
        self._paused_until = -math.inf
        self._seq = 0
        self._in_flight: dict[int, Permit] = {}
        # What each recent permit consumed (tokens, requests), for permits newer than the oldest
        # one still in flight: a header answer must be corrected for requests sent after it.
        self._ledger: dict[int, tuple[float, int]] = {}
        self._probe_seq: int | None = None
        self._gate = asyncio.Lock()
        self._changed = asyncio.Event()

    # -- what the provider reads

    @property
    def concurrency(self) -> int:
        """Requests allowed in flight now (halved on 429s, regrown on successes)."""
        return int(self._window)

    @property
    def ratio(self) -> float:
        """Measured tokens ÷ estimated tokens (1.0 until the API has counted some)."""
        return self._ratio

    @property
    def tokens_per_minute(self) -> float | None:
        return self._tokens.limit if self._tokens else None

    @property
    def requests_per_minute(self) -> float | None:
        return self._requests.limit if self._requests else None

    def calibrated(self, estimate: int) -> int:
        """``estimate`` corrected by the measured ratio: the tokens the API will probably count."""
        return math.ceil(estimate * self._ratio)

    def max_request_tokens(self) -> int | None:
        """The largest request (in calibrated tokens) worth sending as one: a share of the
        bucket, so requests queue smoothly instead of each waiting for a full bucket. None while
        no token limit is known."""
        if self._tokens is None:
            return None
        return max(1, int(self._tokens.limit * self._request_share))

    async def ready(self) -> None:
        """Wait while the first request is still finding out the limits (size requests after)."""
        while self._probe_seq is not None:
            await self._wait_for_change()

    # -- the request cycle

    async def acquire(self, estimate: int) -> Permit:
        """Wait until a request of ``estimate`` tokens fits the buckets and the concurrency
        window, then take its room. FIFO: callers are served in the order they asked."""
        async with self._gate:
            while True:
                if len(self._in_flight) >= int(self._window) or self._probe_seq is not None:
                    await self._wait_for_change()
                    continue
                now = self._clock()
                reserve = math.ceil(estimate * self._ratio * self._margin)
                wait = self._paused_until - now
                if self._tokens:
                    self._tokens.refill(now)
                    wait = max(wait, self._tokens.wait_for(reserve, floor_seconds=self._safety))
                if self._requests:
                    self._requests.refill(now)
                    wait = max(wait, self._requests.wait_for(1, floor_seconds=self._safety))
                if wait > 0:
                    await self._sleep(max(wait, _MIN_SLEEP))
                    continue
                break
            if self._tokens:
                self._tokens.take(reserve, now)
            if self._requests:
                self._requests.take(1, now)
            self._seq += 1
            probe = self._headers_seen is None
            permit = Permit(
                seq=self._seq, estimate=estimate, reserved=reserve, issued_at=now, probe=probe
            )
            if probe:
                self._probe_seq = permit.seq
            self._in_flight[permit.seq] = permit
            self._ledger[permit.seq] = (float(reserve), 1)
            return permit

    def settle(
        self, permit: Permit, *, headers: Mapping[str, str], actual_tokens: int | None
    ) -> None:
        """The request succeeded: book what it really used and learn from the headers."""
        self._in_flight.pop(permit.seq, None)
        if actual_tokens is not None:
            if self._tokens:
                self._tokens.take(actual_tokens - permit.reserved, self._clock())
            self._ledger[permit.seq] = (float(actual_tokens), 1)
            if permit.estimate > 0:
                self._learn_ratio(actual_tokens / permit.estimate)
        self._observe(permit, headers)
        # +1 per window's worth of successes, as TCP grows its window: +1 per success would
        # refill it at once and walk straight back into the limit.
        self._window = min(float(self._max_concurrency), self._window + 1 / self._window)
        self._finish(permit)

    def release(self, permit: Permit, failure: Failure | None = None) -> None:
        """The request failed: give its room back, and on a 429 slow everyone down."""
        self._in_flight.pop(permit.seq, None)
        now = self._clock()
        if self._tokens:
            self._tokens.take(-permit.reserved, now)
        if self._requests:
            self._requests.take(-1, now)
        self._ledger[permit.seq] = (0.0, 0)
        if failure is not None:
            if failure.headers:
                self._observe(permit, failure.headers)
            if failure.kind is FailureKind.RATE_LIMITED:
                self._window = max(1.0, self._window / 2)
                if failure.retry_after is not None:
                    self._paused_until = max(
                        self._paused_until, self._clock() + failure.retry_after
                    )
        self._finish(permit)

    # -- internals

    def _learn_ratio(self, observed: float) -> None:
        low, high = _RATIO_BOUNDS
        observed = min(high, max(low, observed))
        if self._calibrated:
            self._ratio += _EWMA_WEIGHT * (observed - self._ratio)
        else:
            self._ratio = observed
            self._calibrated = True

    def _observe(self, permit: Permit, headers: Mapping[str, str]) -> None:
        parsed = parse_rate_limit_headers(headers)
        if not parsed.present:
            if self._headers_seen is None and permit.probe:
                self._headers_seen = False
            return
        self._headers_seen = True
        now = self._clock()
        # Use the header has not seen: requests sent after this one, and requests sent before
        # it that are still in flight (the server may have admitted them after this one; if it
        # did not, we are cautious until the next answer).
        unseen = [
            entry
            for seq, entry in self._ledger.items()
            if seq > permit.seq or (seq < permit.seq and seq in self._in_flight)
        ]
        self._tokens = self._synced(
            self._tokens,
            limit=parsed.limit_tokens,
            remaining=parsed.remaining_tokens,
            reset=parsed.reset_tokens,
            unseen_use=sum(tokens for tokens, _ in unseen),
            since=now - permit.issued_at,
            now=now,
        )
        self._requests = self._synced(
            self._requests,
            limit=parsed.limit_requests,
            remaining=parsed.remaining_requests,
            reset=parsed.reset_requests,
            unseen_use=sum(requests for _, requests in unseen),
            since=now - permit.issued_at,
            now=now,
        )

    @staticmethod
    def _synced(
        bucket: _Bucket | None,
        *,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        unseen_use: float,
        since: float,
        now: float,
    ) -> _Bucket | None:
        if limit is None or limit <= 0:
            return bucket
        if bucket is None:
            bucket = _Bucket(limit, now)
        else:
            bucket.refill(now)
            if bucket.limit != limit:
                bucket.limit = limit
                bucket.level = min(bucket.level, limit)
        if remaining is None and reset is not None:
            # reset = time until the bucket is full again, so it also says how empty it is.
            remaining = int(limit - reset * limit / 60.0)
        if remaining is None:
            return bucket
        # The header is the server's level when it admitted this request. Since then it has
        # refilled, and our other requests have drawn on it. Refill is counted from when we
        # sent it: a little early, so a little optimistic, which the safety floor absorbs.
        server_now = min(bucket.limit, remaining + since * bucket.rate) - unseen_use
        bucket.sync(server_now, now)
        return bucket

    def _finish(self, permit: Permit) -> None:
        if self._probe_seq == permit.seq:
            self._probe_seq = None
        oldest = min(self._in_flight, default=None)
        if oldest is None:
            self._ledger.clear()
        else:
            for seq in [seq for seq in self._ledger if seq < oldest]:
                del self._ledger[seq]
        self._changed.set()

    async def _wait_for_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """A successful attempt: the value, the response headers, the tokens the API counted."""

    value: T
    headers: Mapping[str, str]
    actual_tokens: int | None = None


async def send_with_retries(
    send: Callable[[], Awaitable[Outcome[T]]],
    *,
    estimated_tokens: int,
    classify: Callable[[Exception], Failure | None],
    pacer: RateLimitPacer,
    policy: RetryPolicy,
    rng: random.Random,
    what: str,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Send one request through the pacer, retrying what a retry can fix.

    ``classify`` turns an SDK exception into a :class:`Failure`, or None for exceptions that are
    not API failures (bugs, :class:`DimensionMismatch`): those propagate unchanged. Raises
    QuotaExceeded, AuthenticationFailed, RequestTooLarge or ProviderError; the messages carry the
    API's (redacted) words, never the key.
    """
    failures: list[Failure] = []
    counts: dict[FailureKind, int] = {}
    while True:
        permit = await pacer.acquire(estimated_tokens)
        try:
            outcome = await send()
        except Exception as exc:
            failure = classify(exc)
            pacer.release(permit, failure)
            if failure is None:
                raise
            if not failure.kind.retried:
                raise _error_for(failure, what) from None
            failures.append(failure)
            count = counts[failure.kind] = counts.get(failure.kind, 0) + 1
            if failure.kind is FailureKind.RATE_LIMITED:
                exhausted = count >= policy.max_rate_limited
            else:
                exhausted = count >= policy.max_attempts
            if exhausted:
                break
            await sleep(policy.delay(count, failure.retry_after, rng))
            continue
        except BaseException:
            # Cancelled (a sibling request failed): the room was not used.
            pacer.release(permit)
            raise
        pacer.settle(permit, headers=outcome.headers, actual_tokens=outcome.actual_tokens)
        return outcome.value
    summary = ", ".join(f"{n}× {kind.value}" for kind, n in counts.items())
    raise ProviderError(
        f"{what}: gave up after {len(failures)} attempts ({summary}); last: "
        f"{failures[-1].detail}; the API keeps failing: retry later or lower concurrency"
    )


async def send_in_requests(
    estimates: Sequence[int],
    *,
    max_inputs: int,
    max_tokens: int,
    pacer: RateLimitPacer,
    workers: int,
    send_range: Callable[[int, int], Awaitable[None]],
    what: str,
) -> None:
    """Cover texts ``[0, len(estimates))`` with contiguous requests, ``workers`` at a time.

    Each request is sized when a worker is ready to send it, not up front, so requests shrink as
    soon as the pacer learns the bucket is small. ``send_range(start, end)`` sends one request
    and stores its results itself (so input order is kept whatever order requests finish in). A
    request the API refuses as too large is halved until it fits; a single text that is still
    too large is the caller's problem and says so. The first failure cancels the rest: all or
    nothing, as the provider protocol promises.
    """
    count = len(estimates)
    cursor = 0

    def next_end(start: int) -> int:
        budget = pacer.max_request_tokens()
        end, raw = start, 0
        while end < count and end - start < max_inputs:
            raw_next = raw + estimates[end]
            # The calibrated figure guards against scripts our estimate undercounts (CJK).
            tokens = max(raw_next, pacer.calibrated(raw_next))
            over_budget = budget is not None and pacer.calibrated(raw_next) > budget
            if end > start and (tokens > max_tokens or over_budget):
                break
            raw, end = raw_next, end + 1
        return end

    async def send_halving(start: int, end: int) -> None:
        try:
            await send_range(start, end)
        except RequestTooLarge as exc:
            if end - start == 1:
                raise ProviderError(
                    f"{what}: text {start} of the batch is too large for one request "
                    f"({exc.detail}); shorten or split that text"
                ) from None
            middle = (start + end) // 2
            await send_halving(start, middle)
            await send_halving(middle, end)

    async def worker() -> None:
        nonlocal cursor
        try:
            while True:
                await pacer.ready()
                if cursor >= count:
                    return
                start = cursor
                cursor = next_end(start)
                await send_halving(start, cursor)
        except BaseException:
            # Cancel the siblings now, before yielding: the failure just woke workers waiting
            # on the pacer, and left to run they would each send one more doomed request.
            this = asyncio.current_task()
            for task in tasks:
                if task is not this:
                    task.cancel()
            raise

    tasks: list[asyncio.Task[None]] = []
    tasks.extend(asyncio.create_task(worker()) for _ in range(max(1, workers)))
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def embed_in_requests(
    inputs: Sequence[str],
    *,
    dimensions: int,
    request: Callable[[list[str]], Awaitable[Outcome[tuple[Vectors, int | None]]]],
    classify: Callable[[Exception], Failure | None],
    price: Callable[[int], float],
    pacer: RateLimitPacer,
    policy: RetryPolicy,
    rng: random.Random,
    workers: int,
    max_inputs: int,
    max_tokens: int,
    what: str,
) -> Embeddings:
    """Embed ``inputs`` in API-sized requests (see :func:`send_in_requests`), in input order.

    ``request`` answers (vectors, tokens the API counted, or None where it counts none: then
    the estimate is billed). All or nothing; a failure carries what was already spent.
    """
    estimates = [estimate_tokens([text]) for text in inputs]
    vectors = np.zeros((len(inputs), dimensions), dtype=np.float32)
    usage = Usage()

    async def send_range(start: int, end: int) -> None:
        nonlocal usage
        chunk = list(inputs[start:end])
        rows, counted = await send_with_retries(
            lambda: request(chunk),
            estimated_tokens=sum(estimates[start:end]),
            classify=classify,
            pacer=pacer,
            policy=policy,
            rng=rng,
            what=what,
        )
        vectors[start:end] = rows
        tokens = counted if counted is not None else sum(estimates[start:end])
        usage += Usage(tokens=tokens, requests=1, cost_usd=price(tokens))

    try:
        await send_in_requests(
            estimates,
            max_inputs=max_inputs,
            max_tokens=max_tokens,
            pacer=pacer,
            workers=workers,
            send_range=send_range,
            what=what,
        )
    except ProviderError as exc:
        exc.spent_tokens, exc.spent_usd = usage.tokens, usage.cost_usd
        raise
    return Embeddings(vectors=vectors, usage=usage)
