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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Generic, TypeVar

import numpy as np

from rag_service.errors import AuthenticationFailed, ProviderError, QuotaExceeded
from rag_service.providers.base import (
    Embeddings,
    Usage,
    Vectors,
    estimate_tokens,
    request_answered,
    request_sent,
)
from rag_service.redaction import redact  # the one rule; re-exported for the providers

__all__ = [
    "MAX_SERVER_PAUSE_SECONDS",
    "Failure",
    "FailureKind",
    "LimiterStyle",
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


# The longest a server's Retry-After (or retry-after-ms, or retryDelay) pauses the pacer and a
# retry: the providers' limits refill per minute, so a longer hint is an outage or an attack.
MAX_SERVER_PAUSE_SECONDS: Final = 60.0


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
        # Azure OpenAI sends remaining-* without limit-*: that is still a limit to pace to.
        return any(
            value is not None
            for value in (
                self.limit_requests,
                self.limit_tokens,
                self.remaining_requests,
                self.remaining_tokens,
            )
        )


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
    max_delay: float = MAX_SERVER_PAUSE_SECONDS
    jitter: bool = True

    @classmethod
    def interactive(cls) -> RetryPolicy:
        """For a user waiting on a search: one quick retry, then let the caller fall back."""
        return cls(max_attempts=2, max_rate_limited=1, base_delay=0.05, max_delay=0.25)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based). A server's
        ``retry_after`` wins up to ``max_delay``: it knows when its bucket has room and guessing
        shorter only earns another 429, but a ``Retry-After: 3600`` must not hold a search (or
        a backfill's worker) for an hour. Pure given ``rng``."""
        if retry_after is not None and math.isfinite(retry_after):
            return min(self.max_delay, max(0.0, retry_after))
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, attempt - 1))
        return rng.uniform(0.0, ceiling) if self.jitter else ceiling


# --------------------------------------------------------------------------- pacing


class _Bucket:
    """A continuous token bucket, as OpenAI describes its limits: ``limit`` per minute,
    refilled at ``limit / 60`` per second (``period`` 60 s, or as learned), at most ``limit``
    banked. The level may go negative:
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
        # Seconds a drained bucket takes to refill: OpenAI's minute unless the server's own
        # answers show another rate (see _Limit).
        self.period = 60.0
        self.level = limit
        self.updated = now
        self.shadow: float | None = None  # the server's level as of our last header, projected
        # (time, our use, others' use) over the last _SHARE_WINDOW seconds.
        self.history: deque[tuple[float, float, float]] = deque()
        self.share = 1.0

    @property
    def rate(self) -> float:
        return self.limit / self.period

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
        if server_now * self.share <= self.level:
            # Every client on the key sees the same level: each may count on its share of it
            # (alone, all of it), or together they would spend it several times over.
            self.level = server_now * self.share if server_now > 0 else server_now
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
            # A little under our measured share: measured from each client's side, the shares
            # can sum to a few percent over one, which a bucket repays with 429s.
            self.share = max(_MIN_SHARE, _SHARE_SLACK * max(ours, 0.0) / (ours + others))

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


class LimiterStyle(str, Enum):
    """How the server's limit behaves, as the pacer has learned it from the server's answers."""

    UNKNOWN = "unknown"  # not enough answers yet: the room they report, refilled as reset implies
    BUCKET = "bucket"  # continuous refill: every answer's (limit - remaining) / reset agrees
    WINDOW = "window"  # room frees in steps (a sliding or fixed window): it does not


# Implied refill rates that agree within this are one bucket; rounding (remaining floored, reset
# in whole milliseconds) stays well inside it on the answers compared.
_RATE_TOLERANCE = 0.1
# Our clock says when we sent, the server's when it admitted: a window is waited out this much
# longer (plus 0.5 % of it) so that a request never arrives a hair before the one it replaced
# left. A 429 that came a moment too early adds to it.
_WINDOW_MARGIN = 0.03
# Requests against a window are a fortieth of the limit (times our share of the key): the room
# too small for one more request is left unused until the window moves, so it must be small
# (a twentieth left about 5 % of every 4-s window unused in a real run).
_WINDOW_REQUEST_SHARE = 0.025
# Requests against a requests limit as well are at least this × tokens limit ÷ requests limit:
# half again the average that spends both at once, for the smaller last requests.
_REQUESTS_SLACK = 1.5


class _Limit:
    """One of the server's limits (tokens or requests), learned from its answers.

    Servers enforce "LIMIT" in different ways behind the same headers: a token bucket refilled
    continuously (OpenAI's description), a sliding window (at most LIMIT in any W seconds) or a
    fixed window (LIMIT per W-second period), with ``reset`` meaning time until full, until the
    first room frees, until the window is empty, or until the next period. A bucket is recognised
    by its answers alone: ``(limit - remaining) / reset`` is its refill rate, the same in every
    answer; a window's is not. Until two pairs of answers agree or one disagrees the style is
    UNKNOWN, and the room an answer reports is all that is spent (refilled at that implied rate).

    - BUCKET: the :class:`_Bucket` mirror, refilled at the learned rate, shares and all.
    - WINDOW: no refill is projected. The room the newest answer reported, less our use it did
      not see, grows only as our own requests leave the window: W is learned as the longest
      reset or retry hint seen (a request sent into an empty window reports W itself; for a fixed
      window, aging by W is never earlier than the period boundary). A request only waits for
      that, for an answer, or (nothing in flight) for the reported reset, when one request goes
      to find out. This is exact for a sliding window and safe for a fixed one and a bucket.
      Other clients on the key show as use in the answers that is not ours: our share of the key
      is ours ÷ all the use in the window, and with others about we keep our use within our
      share of the limit, so pacers that each keep to their share never collide.
    """

    def __init__(self, limit: float, now: float, *, style: LimiterStyle) -> None:
        self.limit = limit
        self.style = style
        # A bucket passed in (a per-minute limit from the spec) is believed until the server's
        # answers, if any, show otherwise; one learned from them is settled.
        self.settled = False
        self.bucket = _Bucket(limit, now)
        # (remaining, implied rate) of recent answers, to tell a bucket from a window.
        self.rates: deque[tuple[float, float]] = deque(maxlen=8)
        self.window = 0.0
        self.window_bound = math.inf  # without reset headers: the least W can be (see learn)
        # Our own use by permit: seq -> [sent at, amount, answered at]; sends are in seq order.
        self.sent: dict[int, list[float]] = {}
        self.base_room: float | None = None  # the newest answer's room less our unseen use
        self.base_at = now  # when that answer's request was sent (≈ admitted)
        self.reset_at: float | None = None
        self.counted_from = 0  # the oldest of our requests (seq) the newest answer counted
        self.fixed = False  # a window whose room comes back all at once, at period boundaries
        self.period_end: float | None = None
        self.late = 0.0  # added to the margin after a 429 that our own requests' timing caused
        self.share = 1.0
        self.samples: deque[tuple[float, float, float]] = deque()  # (at, ours, all use)

    @property
    def margin(self) -> float:
        return _WINDOW_MARGIN + 0.005 * self.window + self.late

    @property
    def implied_rate(self) -> float | None:
        return self.rates[-1][1] if self.rates else None

    def set_limit(self, limit: float, now: float) -> None:
        if limit != self.limit:
            self.limit = limit
            self.bucket.refill(now)
            self.bucket.limit = limit
            self.bucket.level = min(self.bucket.level, limit)

    def take(self, amount: float, now: float, seq: int) -> None:
        """Book our own use of the permit ``seq`` (negative: a refund)."""
        self.bucket.take(amount, now)
        entry = self.sent.get(seq)
        if entry is None:
            self.sent[seq] = [now, amount, math.inf]
        else:
            entry[1] += amount
        if self.base_room is not None:
            self.base_room -= amount
        if amount > 0 and self.reset_at is not None and now >= self.reset_at:
            self.reset_at = None  # the one request after the reset: the next waits for its answer

    def answered(self, seq: int, now: float) -> None:
        entry = self.sent.get(seq)
        if entry is not None:
            entry[2] = now

    def learn(
        self,
        *,
        remaining: float,
        reset: float | None,
        unseen_use: float,
        unseen: set[int],
        seq: int,
        sent_at: float,
        now: float,
    ) -> None:
        """One answer (success or 429) to the request ``seq`` sent at ``sent_at``."""
        if reset is not None:
            self.window = max(self.window, reset)
        elif self.style is not LimiterStyle.BUCKET:
            self._bound_window(remaining, unseen, seq, sent_at)
        self._classify(remaining, reset)
        self.base_room = remaining - unseen_use
        self.base_at = sent_at
        self.reset_at = sent_at + reset + self.margin if reset else None
        # Which of our requests this answer counted: a sliding window counts all of them in the
        # last W, a fixed one only those since its period began, so the newest ones that the
        # reported use can hold. Only those give room back when they leave the window.
        used = self.limit - remaining
        seen = [k for k in self.sent if k <= seq and k not in unseen]
        # Only requests answered before this one was sent were surely admitted before it.
        surely_counted = sum(
            amount
            for at, amount, answered in self.sent.values()
            if answered < sent_at and at > sent_at - self.window + self.margin
        )
        # Only once known to be a window: a bucket's count of use also falls, as it refills.
        if self.style is LimiterStyle.WINDOW and surely_counted > used + 0.01 * self.limit:
            # A sliding window would still count all our use of the last W: this one forgot
            # some at a period boundary. A fixed window frees everything at once, at the reset.
            self.fixed = True
        if self.fixed and reset:
            self.period_end = sent_at + reset
        if self.window <= 0:
            # No reset header and no retry hint yet (Azure sends neither on a success): which of
            # our requests the answer counted is unknowable, so is others' use; until a hint
            # shows the window, the room the answers report is all we go by.
            self.counted_from = seq + 1
            self.share = 1.0
            self._forget(now)
            return
        ours = 0.0
        self.counted_from = seq + 1
        # A fixed window's period began W before its reset; a sliding one counts the last W.
        since = sent_at - self.window
        if self.fixed and self.period_end is not None:
            since = self.period_end - self.window - self.margin
        for key in sorted(seen, reverse=True):
            at, amount, _ = self.sent[key]
            if at <= since or ours + amount > used + 1e-6:
                break
            ours += amount
            self.counted_from = key
        self.samples.append((now, ours, used))
        horizon = now - max(2 * self.window, 10.0)
        while self.samples and self.samples[0][0] < horizon:
            self.samples.popleft()
        mine = sum(sample[1] for sample in self.samples)
        used_all = sum(max(sample[1], sample[2]) for sample in self.samples)
        others = used_all - mine
        self.share = (
            1.0
            if others <= 0.02 * used_all
            else max(_MIN_SHARE, _WINDOW_SHARE_SLACK * mine / used_all)
        )
        self._forget(now)

    def _bound_window(self, remaining: float, unseen: set[int], seq: int, sent_at: float) -> None:
        """No reset header (Azure OpenAI): learn W from which of our requests an answer still
        counts. Walking back from the newest, the first request of ours that the reported use
        cannot hold had left the window when this one arrived, so W ≤ the time between the two
        sends. The smallest such bound converges on W from above (others' use only loosens it),
        and pacing to a window W' ≥ W is safe for a window and for a bucket alike."""
        used = self.limit - remaining
        counted = 0.0
        for key in sorted((k for k in self.sent if k <= seq and k not in unseen), reverse=True):
            at, amount, answered = self.sent[key]
            if key != seq and answered >= sent_at:
                # In flight when this one was sent: the server may have admitted it after this
                # one and not counted it yet. Leaving it out only loosens the bound.
                continue
            if counted + amount > used + 0.01 * self.limit:
                if sent_at - at > 0:
                    self.window_bound = min(self.window_bound, sent_at - at)
                    self.window = self.window_bound
                    self.style = LimiterStyle.WINDOW
                return
            counted += amount

    def failed(self, retry_after: float | None, now: float) -> None:
        """A 429: it says when the request would have fitted."""
        if retry_after is None or self.style is LimiterStyle.BUCKET:
            return
        if self.style is LimiterStyle.WINDOW:
            self.window = max(self.window, retry_after)
            if not self.fixed and retry_after < 0.1 * self.window:
                # Refused a moment before room came back: our clock runs ahead of the server's
                # by more than the margin allows for (or another client took the room). Allow
                # for a little more, within bounds: each 10 ms costs 0.25 % of a 4-s window.
                self.late = min(0.1, self.late + 0.01)
        self.reset_at = now + retry_after

    def _classify(self, remaining: float, reset: float | None) -> None:
        if reset is None or reset < 0.05 or self.limit - remaining < 0.01 * self.limit:
            return  # too close to full (or no reset) for the rounding to leave a usable rate
        rate = (self.limit - remaining) / reset
        if not self.settled:
            agreeing = 0
            for earlier, earlier_rate in self.rates:
                if abs(earlier - remaining) < 0.01 * self.limit:
                    continue  # the same room says nothing about the refill model
                if abs(rate - earlier_rate) > _RATE_TOLERANCE * max(rate, earlier_rate):
                    self.style, self.settled = LimiterStyle.WINDOW, True
                    break
                agreeing += 1
            else:
                if agreeing >= 2:
                    self.style, self.settled = LimiterStyle.BUCKET, True
                    self.bucket.period = self.limit / rate
        self.rates.append((remaining, rate))

    def _forget(self, now: float) -> None:
        # Until W is known, keep a minute: learning W without reset headers needs our requests
        # from before the window's start.
        horizon = self.window if self.window > 0 else 60.0
        oldest = min(self.base_at, now) - horizon - self.margin - 1.0
        while self.sent:
            seq, (at, *_) = next(iter(self.sent.items()))
            if at >= oldest:
                break
            del self.sent[seq]

    def _aged(self, now: float) -> float:
        """Our use that has left the window since the newest answer."""
        if self.style is not LimiterStyle.WINDOW or self.window <= 0 or self.fixed:
            return 0.0
        high = now - self.window - self.margin
        return sum(
            amount
            for key, (at, amount, _) in self.sent.items()
            if key >= self.counted_from and at <= high
        )

    def room(self, now: float) -> float:
        """The server's room now, as far as we can tell (a bucket's level for a bucket)."""
        if self.style is LimiterStyle.BUCKET or self.base_room is None:
            self.bucket.refill(now)
            return self.bucket.level
        room = self.base_room + self._aged(now)
        rate = self.implied_rate if self.style is LimiterStyle.UNKNOWN else None
        if rate:
            room = min(self.limit, room + rate * max(0.0, now - self.base_at))
        return room

    def _recent(self, now: float) -> float:
        """Our use the server counts now: in the last W, or in a fixed window's period."""
        since = now - self.window - self.margin
        if self.fixed and self.period_end is not None:
            since = self.period_end - self.window if now < self.period_end else self.period_end
        return sum(amount for at, amount, _ in self.sent.values() if at > since)

    def wait_for(self, amount: float, *, floor_seconds: float, now: float, busy: bool) -> float:
        """Seconds until ``amount`` fits; 0 now, ``math.inf`` at the next answer (``busy``: a
        request of ours is in flight)."""
        if self.style is LimiterStyle.BUCKET or self.base_room is None:
            self.bucket.refill(now)
            return self.bucket.wait_for(amount, floor_seconds=floor_seconds)
        amount = min(amount, self.limit)
        room = self.room(now)
        rate = self.implied_rate if self.style is LimiterStyle.UNKNOWN else None
        # Our own use is held to our share of the limit only once the style is known: before,
        # the answers are too few to tell others' use from the refill model.
        capped = self.style is LimiterStyle.WINDOW and self.share < 1.0
        recent = self._recent(now) if capped else 0.0
        cap = self.share * self.limit
        if room >= amount - 1e-6 and (not capped or recent + amount <= cap + 1e-6):
            return 0.0
        waits: list[float] = []
        if self.style is LimiterStyle.WINDOW and self.window > 0 and not self.fixed:
            # Our requests leave the window one by one: the first moment both checks pass.
            for key, (at, taken, _) in self.sent.items():
                leaves = at + self.window + self.margin
                if leaves <= now:
                    continue
                if key >= self.counted_from:
                    room += taken
                recent -= taken
                if room >= amount - 1e-6 and (not capped or recent + amount <= cap + 1e-6):
                    waits.append(leaves - now)
                    break
        if rate and room < amount:
            waits.append((amount - room) / rate)
        if self.reset_at is not None and not waits:
            # Only when our own requests will not make room: a sliding window's reset may free
            # less than we need, or free another client's room.
            if self.reset_at > now:
                waits.append(self.reset_at - now)
            elif not busy:
                return 0.0  # the reset has passed and nothing will answer: one request goes
        if waits:
            return max(min(waits), _MIN_SLEEP)
        if busy:
            return math.inf
        # No answer to come and no hint: look again after a window (or a second). Without reset
        # headers (W learned from the answers) no hint ever comes, and a whole window idle is
        # most of a short window's budget: look again after a tenth of it.
        wait = max(self.window, 1.0)
        if self.window_bound < math.inf:
            wait = max(0.1 * self.window, _MIN_SLEEP)
        self.reset_at = now + wait
        return self.reset_at - now


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
_SHARE_SLACK = 0.97
# Against a window each pacer's own use is capped at its share of LIMIT, so the slack is budget
# left unused by all of them (4 pacers on a 4-s window: shares × 0.97 summed to 0.963 of LIMIT,
# 0.939 of the budget used); the measured shares summed to 0.99 there, so half the slack does.
_WINDOW_SHARE_SLACK = 0.985
_MIN_SLEEP = 0.001
# The first request's size (calibrated tokens), before any answer has told us the limit.
_PROBE_TOKENS = 500
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
        # Limits passed in are per minute, as OpenAI and Google state them: buckets.
        self._tokens = (
            _Limit(tokens_per_minute, now, style=LimiterStyle.BUCKET) if tokens_per_minute else None
        )
        self._requests = (
            _Limit(requests_per_minute, now, style=LimiterStyle.BUCKET)
            if requests_per_minute
            else None
        )
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
        self._inferred: dict[str, int] = {}  # limits the headers do not state (see _observe)
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
        """The token limit as passed in or as the headers state it (per their window)."""
        return self._tokens.limit if self._tokens else None

    @property
    def requests_per_minute(self) -> float | None:
        return self._requests.limit if self._requests else None

    @property
    def style(self) -> LimiterStyle:
        """How the server's token limit behaves, as learned (the request limit's if no tokens)."""
        limit = self._tokens or self._requests
        return limit.style if limit else LimiterStyle.UNKNOWN

    def calibrated(self, estimate: int) -> int:
        """``estimate`` corrected by the measured ratio: the tokens the API will probably count."""
        return math.ceil(estimate * self._ratio)

    def max_request_tokens(self) -> int | None:
        """The largest request (in calibrated tokens) worth sending as one: a share of the
        bucket, so requests queue smoothly instead of each waiting for a full bucket. None while
        no token limit is known."""
        if self._tokens is None:
            # Before the first answer, a small probe: a whole batch could take most of a short
            # window (or of every client's share of it) before we know the limit.
            return _PROBE_TOKENS if self._headers_seen is None else None
        if self._tokens.style is LimiterStyle.BUCKET:
            return max(1, int(self._tokens.limit * self._request_share))
        usual = max(1, int(self._tokens.limit * _WINDOW_REQUEST_SHARE * self._tokens.share))
        if self._requests:
            # With a requests limit too, small requests spend it before the tokens: size them
            # so the tokens bind first, with room to spare for the smaller last ones.
            per_request = self._tokens.limit / self._requests.limit
            usual = max(usual, math.ceil(per_request * _REQUESTS_SLACK))
        if self._tokens.style is LimiterStyle.WINDOW and not self._tokens.fixed:
            # A sliding window loses no room by waiting: it frees as our own requests leave.
            # Sized by the room at the moment of sizing (the window is full most of the time)
            # requests would shrink to what happens to be free, small requests free small
            # room a window later, and 4 in flight can then no longer carry the limit's rate.
            return usual
        # The last room in a fixed window takes a smaller request (down to a quarter of the
        # usual), or it stays unused until the period ends.
        fits = int(self._tokens.room(self._clock()) / self._margin)
        return min(usual, max(usual // 4, fits))

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
                busy = bool(self._in_flight)
                for limit, amount in ((self._tokens, reserve), (self._requests, 1)):
                    if limit:
                        wait = max(
                            wait,
                            limit.wait_for(amount, floor_seconds=self._safety, now=now, busy=busy),
                        )
                if wait == math.inf:
                    await self._wait_for_change()
                    continue
                if wait > 0:
                    if busy and self.style is not LimiterStyle.BUCKET:
                        # An answer may show room sooner than our own requests leave the window.
                        await self._sleep_or_change(max(wait, _MIN_SLEEP))
                    else:
                        await self._sleep(max(wait, _MIN_SLEEP))
                    continue
                break
            self._seq += 1
            if self._tokens:
                self._tokens.take(reserve, now, self._seq)
            if self._requests:
                self._requests.take(1, now, self._seq)
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
        self._answered(permit)
        if actual_tokens is not None:
            if self._tokens:
                self._tokens.take(actual_tokens - permit.reserved, self._clock(), permit.seq)
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
        self._answered(permit)
        now = self._clock()
        if self._tokens:
            self._tokens.take(-permit.reserved, now, permit.seq)
        if self._requests:
            self._requests.take(-1, now, permit.seq)
        self._ledger[permit.seq] = (0.0, 0)
        if failure is not None:
            if failure.headers:
                self._observe(permit, failure.headers)
            # A server's pause, at most MAX_SERVER_PAUSE_SECONDS (a 3600 would stall all).
            pause = (
                None
                if failure.retry_after is None
                else min(failure.retry_after, MAX_SERVER_PAUSE_SECONDS)
            )
            if failure.kind is FailureKind.RATE_LIMITED:
                for limit in (self._tokens, self._requests):
                    if limit:
                        limit.failed(pause, now)
                if self.style is not LimiterStyle.WINDOW:
                    # Against a window a 429 is a matter of timing, which the margin learns;
                    # fewer requests in flight would only leave its room unused.
                    self._window = max(1.0, self._window / 2)
                if pause is not None:
                    self._paused_until = max(self._paused_until, self._clock() + pause)
        self._finish(permit)

    # -- internals

    def _answered(self, permit: Permit) -> None:
        now = self._clock()
        for limit in (self._tokens, self._requests):
            if limit:
                limit.answered(permit.seq, now)

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
        unseen = {
            seq: entry
            for seq, entry in self._ledger.items()
            if seq > permit.seq or (seq < permit.seq and seq in self._in_flight)
        }
        own_tokens, own_requests = self._ledger.get(permit.seq, (0.0, 0))
        self._tokens = self._synced(
            self._tokens,
            limit=parsed.limit_tokens or self._inferred_limit("tokens", parsed, own_tokens),
            remaining=parsed.remaining_tokens,
            reset=parsed.reset_tokens,
            unseen_use=sum(tokens for tokens, _ in unseen.values()),
            unseen=set(unseen),
            own_use=own_tokens,
            permit=permit,
            now=now,
        )
        self._requests = self._synced(
            self._requests,
            limit=parsed.limit_requests or self._inferred_limit("requests", parsed, own_requests),
            remaining=parsed.remaining_requests,
            reset=parsed.reset_requests,
            unseen_use=sum(requests for _, requests in unseen.values()),
            unseen=set(unseen),
            own_use=own_requests,
            permit=permit,
            now=now,
        )

    def _inferred_limit(self, name: str, parsed: RateLimitHeaders, own_use: float) -> int | None:
        """A limit the server does not state (Azure OpenAI sends only remaining-*): at least the
        room an answer reported plus the use it had just counted, our request's, so the largest
        such figure seen. Low at first (others' use and earlier requests are not in it), it
        grows to the true limit as soon as one answer comes from a nearly empty window."""
        remaining = parsed.remaining_tokens if name == "tokens" else parsed.remaining_requests
        if remaining is None:
            return None
        seen = math.ceil(remaining + own_use)
        best = max(self._inferred.get(name, 0), seen)
        self._inferred[name] = best
        return best

    @staticmethod
    def _synced(
        limit_state: _Limit | None,
        *,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        unseen_use: float,
        unseen: set[int],
        own_use: float,
        permit: Permit,
        now: float,
    ) -> _Limit | None:
        if limit is None or limit <= 0:
            return limit_state
        if limit_state is None:
            limit_state = _Limit(limit, now, style=LimiterStyle.UNKNOWN)
            # The request that brought the first answer was sent before we knew of the limit.
            limit_state.sent[permit.seq] = [permit.issued_at, own_use, now]
        else:
            limit_state.set_limit(limit, now)
        bucket = limit_state.bucket
        bucket.refill(now)
        if remaining is None and reset is not None:
            # A bucket's reset = time until full, so it also says how empty it is.
            remaining = int(limit - reset * bucket.rate)
        if remaining is None:
            return limit_state
        limit_state.learn(
            remaining=remaining,
            reset=reset,
            unseen_use=unseen_use,
            unseen=unseen,
            seq=permit.seq,
            sent_at=permit.issued_at,
            now=now,
        )
        # The header is the server's level when it admitted this request. Since then it has
        # refilled, and our other requests have drawn on it. Refill is counted from when we
        # sent it: a little early, so a little optimistic, which the safety floor absorbs.
        since = now - permit.issued_at
        server_now = min(bucket.limit, remaining + since * bucket.rate) - unseen_use
        bucket.sync(server_now, now)
        return limit_state

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

    async def _sleep_or_change(self, seconds: float) -> None:
        self._changed.clear()
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait((sleeping, changed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeping, changed):
                task.cancel()


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
        request_sent()
        try:
            outcome = await send()
        except Exception as exc:
            request_answered(None)
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
        spent = Usage(tokens=tokens, requests=1, cost_usd=price(tokens))
        request_answered(spent)
        usage += spent

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
