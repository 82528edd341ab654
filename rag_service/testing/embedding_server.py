"""A local stand-in for the OpenAI and Gemini embedding APIs, for tests and benchmarks.

It speaks both wire protocols well enough that the real SDKs cannot tell the difference, so the
providers are tested as they run in production: base64 float32 answers (what the OpenAI SDK asks
for by default), OpenAI's and Google's error bodies, the ``x-ratelimit-*`` headers,
tokens- and requests-per-minute limits enforced with 429s by a token bucket, a sliding window or
a fixed window (:func:`make_limiter`), and injected latency, 5xx errors, exhausted quota and
wrong dimensions. Vectors come from the local provider's :class:`HashEmbedder`, seeded with the
model name, so they are deterministic and mean something (shared words → close vectors).

In-process::

    with EmbeddingServer(tpm=60_000) as server:
        client = AsyncOpenAI(base_url=server.openai_base_url, api_key="k")
        ...
        server.error_rate = 0.2          # knobs can change while it runs
        server.requests                  # what it received, thread-safe snapshot

As a subprocess (benchmarks, other languages)::

    python -m rag_service.testing.embedding_server --port 0 --tpm 60000
    # prints its URL; POST /_control {"tpm": 1000, "reset": true}; GET /_stats

Standard library only (``http.server``), so it adds no dependency to the test suite.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np

from rag_service.providers.local import HashEmbedder

__all__ = [
    "LIMITER_STYLES",
    "MAX_GOOGLE_BATCH",
    "MAX_OPENAI_INPUTS",
    "MAX_OPENAI_REQUEST_TOKENS",
    "RESET_REPORTS",
    "BucketLimiter",
    "EmbeddingServer",
    "FixedLimiter",
    "Limiter",
    "LimiterStyle",
    "RecordedRequest",
    "ResetReport",
    "SlidingLimiter",
    "count_tokens",
    "format_duration",
    "main",
    "make_limiter",
]

MAX_OPENAI_INPUTS = 2048
MAX_OPENAI_REQUEST_TOKENS = 300_000
MAX_OPENAI_INPUT_TOKENS = 8192
MAX_GOOGLE_BATCH = 100
GOOGLE_FULL_DIMENSIONS = 3072

_OPENAI_NATIVE_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
_GOOGLE_NATIVE_DIMENSIONS = {"gemini-embedding-001": 3072, "text-embedding-004": 768}

_TOKEN = re.compile(r"\w+|[^\w\s]")
_GOOGLE_PATH = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:]+):batchEmbedContents$")

Endpoint = Literal["openai", "google"]


def count_tokens(text: str) -> int:
    """The server's tokenizer: runs of word characters and single punctuation marks, at least one
    per non-empty text. Not BPE, but deterministic and in the same ballpark. Pure."""
    return len(_TOKEN.findall(text)) or (1 if text else 0)


def format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format (Go's ``time.Duration``): ``6m0s``, ``1.5s``,
    ``120ms``, ``0s``. Pure."""
    milliseconds = math.ceil(max(0.0, seconds) * 1000)
    if milliseconds == 0:
        return "0s"
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return f"{out}{secs}s"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it (``time``: seconds since the server started, when it
    was admitted or refused)."""

    time: float
    endpoint: Endpoint
    model: str
    inputs: int
    tokens: int
    dimensions: int | None
    task_types: tuple[str, ...]
    encoding_format: str | None
    status: int
    error: str | None
    # The token limiter's room right after the decision (None without a TPM limit): lets a
    # benchmark measure throughput between two moments the limiter was equally empty.
    tokens_left: float | None = None


LimiterStyle = Literal["bucket", "sliding", "fixed"]
ResetReport = Literal["first", "empty"]
LIMITER_STYLES: tuple[LimiterStyle, ...] = ("bucket", "sliding", "fixed")
RESET_REPORTS: tuple[ResetReport, ...] = ("first", "empty")


class Limiter:
    """One rate limit as a server enforces it; pure, driven by the caller's clock.

    ``limit`` is what ``x-ratelimit-limit-*`` reports: the most admitted per ``window`` seconds.
    ``room(now)`` is ``remaining``, ``reset_seconds(now)`` is ``reset``, ``wait_for`` is how long
    until ``amount`` fits (a 429's ``retry-after``), ``take`` admits it.
    """

    style: LimiterStyle = "bucket"

    def __init__(self, limit: int, window: float, now: float) -> None:
        self.limit = limit
        self.window = window
        self.started = now

    def room(self, now: float) -> float:
        raise NotImplementedError

    def wait_for(self, amount: float, now: float) -> float:
        raise NotImplementedError

    def take(self, amount: float, now: float) -> None:
        raise NotImplementedError

    def reset_seconds(self, now: float) -> float:
        raise NotImplementedError

    def drain(self, now: float) -> None:
        """Use all the room, as if another client had just spent it."""
        self.take(self.room(now), now)

    def headers(self, name: str, now: float) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{name}`` as OpenAI words them."""
        return {
            f"x-ratelimit-limit-{name}": str(self.limit),
            f"x-ratelimit-remaining-{name}": str(max(0, math.floor(self.room(now)))),
            f"x-ratelimit-reset-{name}": format_duration(self.reset_seconds(now)),
        }

    def budget(self, start: float, end: float) -> tuple[float, float, float]:
        """The most this limiter, fresh (full room) at ``start``, can admit over a run that
        ends at ``end``: ``(from, to, tokens)``, counting admissions in ``[from, to)`` (to
        included for the bucket). Bucket: the initial allowance plus the refill, over the whole
        run. Windows: LIMIT per whole window only, a partial window's room being unknowable
        in advance: sliding, the whole windows from ``start``; fixed, the whole aligned windows
        after it."""
        return start, end, self.limit + self.limit / self.window * (end - start)

    def share_of_budget(self, admitted: Sequence[tuple[float, float]], end: float) -> float:
        """Tokens admitted (``(time, amount)`` pairs, the first at the run's start) ÷ the most
        this limiter could admit over the run ending at ``end`` (see :meth:`budget`)."""
        start, stop, most = self.budget(admitted[0][0], end)
        counted = sum(
            amount
            for at, amount in admitted
            if start <= at < stop or (at == stop and self.style == "bucket")
        )
        return counted / most


class BucketLimiter(Limiter):
    """A continuous token bucket: capacity ``limit``, refilled ``limit/window`` a second (with a
    60-s window, how OpenAI describes its per-minute limits). ``reset`` = until full."""

    style: LimiterStyle = "bucket"

    def __init__(self, limit: int, window: float, now: float) -> None:
        super().__init__(limit, window, now)
        self.level = float(limit)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            rate = self.limit / self.window
            self.level = min(self.limit, self.level + (now - self.updated) * rate)
            self.updated = now

    def room(self, now: float) -> float:
        self._refill(now)
        return self.level

    def wait_for(self, amount: float, now: float) -> float:
        self._refill(now)
        return max(0.0, (amount - self.level) * self.window / self.limit)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def reset_seconds(self, now: float) -> float:
        self._refill(now)
        return (self.limit - self.level) * self.window / self.limit


class SlidingLimiter(Limiter):
    """At most ``limit`` admitted in any ``window`` seconds (a sliding log). ``reset`` is either
    the time until the first room frees (the oldest admission leaves the window) or until the
    window is empty (the newest leaves): servers report both, so both are modelled."""

    style: LimiterStyle = "sliding"

    def __init__(
        self, limit: int, window: float, now: float, reset_report: ResetReport = "first"
    ) -> None:
        super().__init__(limit, window, now)
        self.reset_report = reset_report
        self.log: deque[tuple[float, float]] = deque()  # (admitted at, amount)
        self.used = 0.0

    def _expire(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - self.window:
            self.used -= self.log.popleft()[1]
        if not self.log:
            self.used = 0.0  # no float residue once empty

    def room(self, now: float) -> float:
        self._expire(now)
        return self.limit - self.used

    def wait_for(self, amount: float, now: float) -> float:
        self._expire(now)
        excess = self.used + amount - self.limit
        if excess <= 1e-9:
            return 0.0
        for admitted, taken in self.log:
            excess -= taken
            if excess <= 1e-9:
                return admitted + self.window - now
        return self.window  # larger than the limit: refused as too large before this

    def take(self, amount: float, now: float) -> None:
        self._expire(now)
        self.log.append((now, amount))
        self.used += amount

    def reset_seconds(self, now: float) -> float:
        self._expire(now)
        if not self.log:
            return 0.0
        admitted = self.log[0][0] if self.reset_report == "first" else self.log[-1][0]
        return admitted + self.window - now

    def budget(self, start: float, end: float) -> tuple[float, float, float]:
        windows = _whole_windows(end - start, self.window)
        return start, start + windows * self.window, windows * self.limit


class FixedLimiter(Limiter):
    """At most ``limit`` admitted per window ``[k·window, (k+1)·window)`` from the limiter's
    start; the count starts again at each boundary. ``reset`` = until the next boundary."""

    style: LimiterStyle = "fixed"

    def __init__(self, limit: int, window: float, now: float) -> None:
        super().__init__(limit, window, now)
        self.origin = now  # period boundaries are counted from here
        self.current = 0
        self.used = 0.0

    def _roll(self, now: float) -> None:
        index = math.floor((now - self.origin) / self.window)
        if index != self.current:
            self.current, self.used = index, 0.0

    def room(self, now: float) -> float:
        self._roll(now)
        return self.limit - self.used

    def wait_for(self, amount: float, now: float) -> float:
        self._roll(now)
        if self.used + amount <= self.limit:
            return 0.0
        return self.origin + (self.current + 1) * self.window - now

    def take(self, amount: float, now: float) -> None:
        self._roll(now)
        self.used += amount

    def reset_seconds(self, now: float) -> float:
        self._roll(now)
        if self.used <= 0:
            return 0.0
        return self.origin + (self.current + 1) * self.window - now

    def budget(self, start: float, end: float) -> tuple[float, float, float]:
        first = self.origin + math.ceil((start - self.origin) / self.window) * self.window
        windows = _whole_windows(end - first, self.window)
        return first, first + windows * self.window, windows * self.limit


def _whole_windows(span: float, window: float) -> int:
    windows = math.floor(span / window + 1e-9)
    if windows < 1:
        raise ValueError(f"a run of {span:.1f} s holds no whole {window:g}-s window")
    return windows


def make_limiter(
    per_minute: int,
    now: float,
    *,
    style: LimiterStyle = "bucket",
    window: float = 60.0,
    reset_report: ResetReport = "first",
) -> Limiter:
    """A limiter with the same per-minute budget whatever its style: LIMIT = per_minute ×
    window / 60 per window (at least 1), so a 60-s window's limit is the per-minute figure and a
    4-s window's is a fifteenth of it. The bucket keeps OpenAI's model (capacity = the
    per-minute limit, refilled over 60 s) unless a window is given."""
    limit = max(1, round(per_minute * window / 60.0))
    if style == "sliding":
        return SlidingLimiter(limit, window, now, reset_report)
    if style == "fixed":
        return FixedLimiter(limit, window, now)
    return BucketLimiter(limit, window, now)


@dataclass(frozen=True)
class _Verdict:
    status: int
    error: str | None = None  # an error code for the record and the body
    message: str = ""
    retry_after: float | None = None


class _ApiError(Exception):
    """A 4xx found while reading a request; carries the status and the API's words."""

    def __init__(self, status: int, message: str, code: str | None, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.kind = kind  # OpenAI's error ``type`` or Google's ``status``


class EmbeddingServer:
    """The server: bound on construction (so ``url`` is known), serving after ``start()``.

    Knobs are plain attributes, read on every request, so a test can change them mid-run:
    ``tpm``/``rpm`` (per-minute limits, None = unlimited), ``limiter``/``window``/``reset_report``
    (how they are enforced, see :func:`make_limiter`), ``latency`` (seconds added per request),
    ``error_rate`` (share answered 500/503, from a seeded RNG), ``insufficient_quota``,
    ``wrong_dimensions``, ``quota_after`` (out of quota after that many successful requests),
    ``api_key`` (None accepts any key).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        tpm: int | None = None,
        rpm: int | None = None,
        latency: float = 0.0,
        error_rate: float = 0.0,
        insufficient_quota: bool = False,
        wrong_dimensions: bool = False,
        quota_after: int | None = None,
        seed: int = 0,
        limiter: LimiterStyle = "bucket",
        window: float = 60.0,
        reset_report: ResetReport = "first",
    ) -> None:
        self._lock = threading.Lock()
        self._started_at = time.monotonic()
        self._tpm: int | None = None
        self._rpm: int | None = None
        self._limiter: LimiterStyle = "bucket"
        self._window = 60.0
        self._reset_report: ResetReport = "first"
        self._tokens: Limiter | None = None
        self._requests: Limiter | None = None
        self._records: list[RecordedRequest] = []
        self._embedders: dict[tuple[str, int], tuple[threading.Lock, HashEmbedder]] = {}
        self._rng = random.Random(seed)
        self.seed = seed
        self.api_key = api_key
        self.latency = latency
        self.error_rate = error_rate
        self.insufficient_quota = insufficient_quota
        self.wrong_dimensions = wrong_dimensions
        self.quota_after = quota_after
        self._succeeded = 0
        self.limiter = limiter
        self.window = window
        self.reset_report = reset_report
        self.tpm = tpm
        self.rpm = rpm
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.app = self
        self._thread: threading.Thread | None = None

    # -- addresses

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def google_base_url(self) -> str:
        # google-genai appends /{api_version}/models/...; every version is served.
        return self.url

    # -- knobs that need the lock

    # The per-minute figures are the budget; the limiter style and window only say how it is
    # enforced. Changing any of them starts fresh limiters (full room).

    @property
    def tpm(self) -> int | None:
        return self._tpm

    @tpm.setter
    def tpm(self, value: int | None) -> None:
        self._tpm = value or None
        self._rebuild()

    @property
    def rpm(self) -> int | None:
        return self._rpm

    @rpm.setter
    def rpm(self, value: int | None) -> None:
        self._rpm = value or None
        self._rebuild()

    @property
    def limiter(self) -> LimiterStyle:
        """How the limits are enforced: ``bucket`` (continuous refill), ``sliding`` (at most
        LIMIT in any ``window`` seconds) or ``fixed`` (LIMIT per window from the start)."""
        return self._limiter

    @limiter.setter
    def limiter(self, value: LimiterStyle) -> None:
        if value not in LIMITER_STYLES:
            raise ValueError(f"limiter must be one of {', '.join(LIMITER_STYLES)}, not {value!r}")
        self._limiter = value
        self._rebuild()

    @property
    def window(self) -> float:
        """Seconds per window; LIMIT per window = the per-minute figure × window / 60."""
        return self._window

    @window.setter
    def window(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"window must be a number of seconds above 0, not {value!r}")
        self._window = float(value)
        self._rebuild()

    @property
    def reset_report(self) -> ResetReport:
        """What a sliding window's ``x-ratelimit-reset-*`` says: ``first`` = until the first
        room frees, ``empty`` = until the window is empty."""
        return self._reset_report

    @reset_report.setter
    def reset_report(self, value: ResetReport) -> None:
        if value not in RESET_REPORTS:
            raise ValueError(f"reset_report must be one of {', '.join(RESET_REPORTS)}")
        self._reset_report = value
        self._rebuild()

    def _make(self, per_minute: int | None) -> Limiter | None:
        if not per_minute:
            return None
        return make_limiter(
            per_minute,
            self._now(),
            style=self._limiter,
            window=self._window,
            reset_report=self._reset_report,
        )

    def _rebuild(self) -> None:
        with self._lock:
            self._tokens = self._make(self._tpm)
            self._requests = self._make(self._rpm)

    def drain(self) -> None:
        """Use all the room, as if another client had just spent the whole budget."""
        with self._lock:
            for limiter in (self._tokens, self._requests):
                if limiter:
                    limiter.drain(self._now())

    def reset(self) -> None:
        """Forget the requests received and start the limiters afresh (full room)."""
        with self._lock:
            self._records.clear()
        self._rebuild()

    def configure(self, knobs: Mapping[str, Any]) -> None:
        """Set knobs from a JSON object (``POST /_control``); ``reset``/``drain`` are actions."""
        unknown = set(knobs) - {*_KNOBS, "reset", "drain"}
        if unknown:
            raise ValueError(f"unknown knobs: {', '.join(sorted(unknown))}")
        for name, value in knobs.items():
            if name in _KNOBS:
                setattr(self, name, value)
        if knobs.get("seed") is not None:
            with self._lock:
                self._rng = random.Random(knobs["seed"])
        if knobs.get("reset"):
            self.reset()
        if knobs.get("drain"):
            self.drain()

    def knobs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _KNOBS if name not in ("api_key", "seed")}

    # -- what it saw

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received, in arrival order."""
        with self._lock:
            return list(self._records)

    def stats(self) -> dict[str, Any]:
        """Counts and the full record, as ``GET /_stats`` serves them."""
        records = self.requests
        by_status: dict[str, int] = {}
        for record in records:
            by_status[str(record.status)] = by_status.get(str(record.status), 0) + 1
        ok = [r for r in records if r.status == 200]
        limiter = self._tokens
        return {
            "requests": len(records),
            "by_status": by_status,
            # When the token limiter started (full), on the records' clock: a benchmark rebuilds
            # it with make_limiter to compute the run's budget (fixed windows count from here).
            "tokens_limiter_started": limiter.started if limiter else None,
            # time.monotonic() when the records' clock read 0: another process on this machine
            # can place its own moments (a deadline) on the records' clock.
            "monotonic_origin": self._started_at,
            "ok_tokens": sum(r.tokens for r in ok),
            "ok_inputs": sum(r.inputs for r in ok),
            "max_inputs": max((r.inputs for r in records), default=0),
            "knobs": self.knobs(),
            "records": [asdict(r) for r in records],
        }

    # -- life cycle

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"embedding-server:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- used by the handler

    def _now(self) -> float:
        return time.monotonic() - self._started_at

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._records.append(record)

    def _vectors(self, model: str, dimensions: int, texts: Sequence[str]) -> np.ndarray[Any, Any]:
        key = (model, dimensions)
        with self._lock:
            entry = self._embedders.get(key)
            if entry is None:
                entry = (threading.Lock(), HashEmbedder(dimensions, seed=model))
                self._embedders[key] = entry
        lock, embedder = entry
        with lock:  # HashEmbedder's memo is not thread-safe
            return embedder.embed(texts)

    def _admit(self, tokens: int) -> tuple[_Verdict, dict[str, str], float, float | None]:
        """Decide a well-formed request's fate: quota, injected error, rate limit or success.
        Returns the verdict, the rate-limit headers as they stand after it, when it was made,
        and the token bucket's level after it."""
        with self._lock:
            now = self._now()
            verdict = self._decide(tokens, now)
            headers = self._rate_headers(now)
            left = self._tokens.room(now) if self._tokens else None
        return verdict, headers, now, left

    def _decide(self, tokens: int, now: float) -> _Verdict:
        if self.insufficient_quota or (
            self.quota_after is not None and self._succeeded >= self.quota_after
        ):
            return _Verdict(429, "insufficient_quota")
        if self.error_rate and self._rng.random() < self.error_rate:
            return _Verdict(self._rng.choice((500, 503)), "server_error")
        if self._tokens and tokens > self._tokens.limit:
            return _Verdict(
                429,
                "rate_limit_exceeded",
                f"Request too large for embeddings on tokens per min (TPM): "
                f"Limit {self._tokens.limit}, Requested {tokens}. "
                "The input or output tokens must be reduced in order to run successfully.",
            )
        waits: list[tuple[float, str, Limiter, float]] = []
        if self._tokens:
            waits.append(
                (self._tokens.wait_for(tokens, now), "tokens per min (TPM)", self._tokens, tokens)
            )
        if self._requests:
            waits.append(
                (self._requests.wait_for(1, now), "requests per min (RPM)", self._requests, 1)
            )
        wait, what, limiter, amount = max(waits, default=(0.0, "", None, 0), key=lambda w: w[0])
        if wait > 0 and limiter is not None:
            used = int(limiter.limit - limiter.room(now))
            return _Verdict(
                429,
                "rate_limit_exceeded",
                f"Rate limit reached for embeddings on {what}: Limit {limiter.limit}, "
                f"Used {used}, Requested {int(amount)}. Please try again in "
                f"{format_duration(wait)}. Visit https://platform.openai.com/account/rate-limits "
                "to learn more.",
                retry_after=wait,
            )
        if self._tokens:
            self._tokens.take(tokens, now)
        if self._requests:
            self._requests.take(1, now)
        self._succeeded += 1
        return _Verdict(200)

    def _rate_headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, limiter in (("requests", self._requests), ("tokens", self._tokens)):
            if limiter:
                headers.update(limiter.headers(name, now))
        return headers


_KNOBS = (
    "api_key",
    "limiter",
    "window",
    "reset_report",
    "tpm",
    "rpm",
    "latency",
    "error_rate",
    "insufficient_quota",
    "wrong_dimensions",
    "quota_after",
    "seed",
)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many SDK connections at once (a backfill with concurrency); the default 5 drops some.
    request_queue_size = 128
    app: EmbeddingServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a cancelled request) is normal, not a server bug.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


_OPENAI_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
_OPENAI_SERVER_ERRORS = {
    500: "The server had an error while processing your request. Sorry about that!",
    503: "The engine is currently overloaded, please try again later.",
}
_GOOGLE_ERRORS = {
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
}


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as the SDKs' connection pools expect (every answer carries Content-Length).
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    server_version = "embedshift-test-server/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: tests and benchmarks read the record instead

    # -- plumbing

    def _body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _send(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/_stats":
            self._send(200, self.server.app.stats())
        elif self.path in ("/", "/_health"):
            self._send(200, {"status": "ok", "url": self.server.app.url})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        try:
            body = self._body()
        except (ValueError, UnicodeDecodeError):
            body = _INVALID_JSON
        path = self.path.split("?", 1)[0]
        if path == "/_control":
            self._control(body)
        elif path == "/v1/embeddings":
            self._openai(body)
        elif match := _GOOGLE_PATH.match(path):
            self._google(body, match[2])
        else:
            self._send(404, {"error": {"message": f"no route {path}", "type": "not_found"}})

    def _control(self, body: Any) -> None:
        app = self.server.app
        try:
            if not isinstance(body, dict):
                raise ValueError("POST /_control takes a JSON object of knobs")
            app.configure(body)
        except (ValueError, TypeError) as exc:
            self._send(400, {"error": str(exc)})
            return
        self._send(200, app.knobs())

    # -- OpenAI

    def _openai_error(
        self,
        status: int,
        message: str,
        *,
        type_: str,
        code: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        self._send(status, body, headers)

    def _openai(self, body: Any) -> None:
        app = self.server.app
        started = app._now()
        if app.api_key is not None:
            auth = self.headers.get("authorization") or ""
            given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
            if given != app.api_key:
                if given:
                    # OpenAI echoes a masked key; so do we, so clients are tested for leaks.
                    masked = given[:3] + "*" * max(0, len(given) - 7) + given[-4:]
                    message = (
                        f"Incorrect API key provided: {masked}. You can find your API key at "
                        "https://platform.openai.com/account/api-keys."
                    )
                else:
                    message = (
                        "You didn't provide an API key. You need to provide your API key in an "
                        "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                        "YOUR_KEY)."
                    )
                app._record(
                    _record(started, "openai", body, 0, 0, None, (), 401, "invalid_api_key")
                )
                self._openai_error(
                    401, message, type_="invalid_request_error", code="invalid_api_key"
                )
                return
        try:
            model, texts, dimensions, encoding, tokens = _read_openai(body)
        except _ApiError as err:
            app._record(_record(started, "openai", body, 0, 0, None, (), err.status, err.code))
            self._openai_error(err.status, err.message, type_=err.kind, code=err.code)
            return
        verdict, headers, decided_at, tokens_left = app._admit(tokens)
        if app.latency > 0:
            time.sleep(app.latency)
        record = RecordedRequest(
            time=decided_at,
            endpoint="openai",
            model=model,
            inputs=len(texts),
            tokens=tokens,
            dimensions=dimensions,
            task_types=(),
            encoding_format=encoding,
            status=verdict.status,
            error=verdict.error,
            tokens_left=tokens_left,
        )
        if verdict.status != 200:
            if verdict.retry_after is not None:
                headers["retry-after"] = str(math.ceil(verdict.retry_after))
                headers["retry-after-ms"] = str(math.ceil(verdict.retry_after * 1000))
            if verdict.error == "insufficient_quota":
                message = _OPENAI_QUOTA_MESSAGE
            else:
                message = verdict.message or _OPENAI_SERVER_ERRORS.get(verdict.status, "")
            type_ = {
                "insufficient_quota": "insufficient_quota",
                "rate_limit_exceeded": "tokens",
                "server_error": "server_error",
            }.get(verdict.error or "", "server_error")
            code = None if verdict.error == "server_error" else verdict.error
            app._record(record)
            self._openai_error(verdict.status, message, type_=type_, code=code, headers=headers)
            return
        size = dimensions or _OPENAI_NATIVE_DIMENSIONS.get(model, 1536)
        if app.wrong_dimensions:
            size += 1
        vectors = app._vectors(model, size, texts).astype("<f4")
        data: list[dict[str, Any]] = []
        for index, row in enumerate(vectors):
            embedding: Any = (
                base64.b64encode(row.tobytes()).decode() if encoding == "base64" else row.tolist()
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        app._record(record)
        self._send(200, payload, headers)

    # -- Google

    def _google_error(
        self,
        status: int,
        message: str,
        google_status: str,
        details: list[dict[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        error: dict[str, Any] = {"code": status, "message": message, "status": google_status}
        if details:
            error["details"] = details
        self._send(status, {"error": error}, headers)

    def _google(self, body: Any, path_model: str) -> None:
        app = self.server.app
        started = app._now()
        if app.api_key is not None:
            given = self.headers.get("x-goog-api-key") or _query_key(self.path)
            if not given:
                app._record(_record(started, "google", body, 0, 0, None, (), 403, "no_key"))
                self._google_error(
                    403,
                    "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to call "
                    "this API.",
                    "PERMISSION_DENIED",
                )
                return
            if given != app.api_key:
                app._record(
                    _record(started, "google", body, 0, 0, None, (), 400, "API_KEY_INVALID")
                )
                self._google_error(
                    400,
                    "API key not valid. Please pass a valid API key.",
                    "INVALID_ARGUMENT",
                    [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID",
                            "domain": "googleapis.com",
                            "metadata": {"service": "generativelanguage.googleapis.com"},
                        }
                    ],
                )
                return
        try:
            texts, dimensions, task_types, tokens = _read_google(body, path_model)
        except _ApiError as err:
            app._record(_record(started, "google", body, 0, 0, None, (), err.status, err.code))
            self._google_error(err.status, err.message, err.kind)
            return
        verdict, _, decided_at, tokens_left = app._admit(tokens)
        if app.latency > 0:
            time.sleep(app.latency)
        record = RecordedRequest(
            time=decided_at,
            endpoint="google",
            model=path_model,
            inputs=len(texts),
            tokens=tokens,
            dimensions=dimensions,
            task_types=task_types,
            encoding_format=None,
            status=verdict.status,
            error=verdict.error,
            tokens_left=tokens_left,
        )
        if verdict.status == 429:
            per_day = verdict.error == "insufficient_quota"
            quota_id = (
                "EmbedContentRequestsPerDayPerProjectPerModel-FreeTier"
                if per_day
                else "EmbedContentInputTokensPerMinutePerProjectPerModel"
            )
            delay = 86_400.0 if per_day else (verdict.retry_after or 1.0)
            app._record(record)
            self._google_error(
                429,
                "You exceeded your current quota, please check your plan and billing details."
                if per_day
                else "Resource has been exhausted (e.g. check quota).",
                "RESOURCE_EXHAUSTED",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/"
                                "embed_content_input_token_count",
                                "quotaId": quota_id,
                                "quotaDimensions": {"model": path_model},
                            }
                        ],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{math.ceil(delay * 1000) / 1000:g}s",
                    },
                ],
            )
            return
        if verdict.status != 200:
            google_status, message = _GOOGLE_ERRORS.get(verdict.status, _GOOGLE_ERRORS[500])
            app._record(record)
            self._google_error(verdict.status, message, google_status)
            return
        size = dimensions or _GOOGLE_NATIVE_DIMENSIONS.get(path_model, 768)
        requested = size
        if app.wrong_dimensions:
            size += 1
        vectors = app._vectors(path_model, size, texts)
        if requested < GOOGLE_FULL_DIMENSIONS:
            # gemini-embedding-001 normalises only its full 3072-d output; truncated (MRL)
            # vectors come back at whatever length they have, and clients must normalise.
            scales = np.array([_scale(text) for text in texts], dtype=np.float32)
            vectors = vectors * scales[:, None]
        payload = {"embeddings": [{"values": row.tolist()} for row in vectors]}
        app._record(record)
        self._send(200, payload)


_INVALID_JSON = object()


def _scale(text: str) -> float:
    """A deterministic length in [0.5, 1.5) that is never 1, per text."""
    return 0.5 + (zlib.crc32(text.encode()) % 997) / 997 + 1e-3


def _query_key(path: str) -> str | None:
    _, _, query = path.partition("?")
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "key" and value:
            return value
    return None


def _record(
    started: float,
    endpoint: Endpoint,
    body: Any,
    inputs: int,
    tokens: int,
    dimensions: int | None,
    task_types: tuple[str, ...],
    status: int,
    error: str | None,
) -> RecordedRequest:
    model = body.get("model") if isinstance(body, dict) else None
    return RecordedRequest(
        time=started,
        endpoint=endpoint,
        model=model if isinstance(model, str) else "",
        inputs=inputs,
        tokens=tokens,
        dimensions=dimensions,
        task_types=task_types,
        encoding_format=None,
        status=status,
        error=error,
    )


def _invalid(message: str, code: str | None = None) -> _ApiError:
    return _ApiError(400, message, code, "invalid_request_error")


def _read_openai(body: Any) -> tuple[str, list[str], int | None, str, int]:
    """Validate an OpenAI embeddings body as the API does; (model, texts, dims, format, tokens)."""
    if body is _INVALID_JSON or not isinstance(body, dict):
        raise _invalid("We could not parse the JSON body of your request.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter")
    raw_input = body.get("input")
    texts: list[str]
    if isinstance(raw_input, str):
        texts = [raw_input]
    elif isinstance(raw_input, list) and all(isinstance(t, str) for t in raw_input):
        texts = list(raw_input)
    else:
        raise _invalid(
            "'$.input' is invalid. Please check the API reference: "
            "https://platform.openai.com/docs/api-reference."
        )
    if not texts or any(t == "" for t in texts):
        raise _invalid(
            "'$.input' is invalid. Please check the API reference: "
            "https://platform.openai.com/docs/api-reference."
        )
    if len(texts) > MAX_OPENAI_INPUTS:
        raise _invalid(
            f"'$.input' is invalid: at most {MAX_OPENAI_INPUTS} inputs per request, "
            f"got {len(texts)}."
        )
    counts = [count_tokens(t) for t in texts]
    for count in counts:
        if count > MAX_OPENAI_INPUT_TOKENS:
            raise _invalid(
                f"This model's maximum context length is {MAX_OPENAI_INPUT_TOKENS} tokens, however "
                f"you requested {count} tokens ({count} in your prompt; 0 for the completion). "
                "Please reduce your prompt; or completion length."
            )
    tokens = sum(counts)
    if tokens > MAX_OPENAI_REQUEST_TOKENS:
        raise _ApiError(
            400,
            f"Requested {tokens} tokens, max {MAX_OPENAI_REQUEST_TOKENS} tokens per request",
            "max_tokens_per_request",
            "max_tokens_per_request",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if model == "text-embedding-ada-002":
            raise _invalid("This model does not support specifying dimensions.")
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            raise _invalid(f"Invalid value for 'dimensions' = {dimensions}. Must be at least 1.")
        native = _OPENAI_NATIVE_DIMENSIONS.get(model)
        if native is not None and dimensions > native:
            raise _invalid(f"This model does not support more than {native} dimensions.")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _invalid(f"'{encoding}' is not one of ['float', 'base64'] - 'encoding_format'")
    return model, texts, dimensions, encoding, tokens


def _read_google(body: Any, path_model: str) -> tuple[list[str], int | None, tuple[str, ...], int]:
    """Validate a batchEmbedContents body; (texts, dims, task types seen, tokens)."""

    def invalid(message: str) -> _ApiError:
        return _ApiError(400, message, "INVALID_ARGUMENT", "INVALID_ARGUMENT")

    if body is _INVALID_JSON or not isinstance(body, dict):
        raise invalid("Invalid JSON payload received.")
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise invalid("* BatchEmbedContentsRequest.requests: requests must not be empty\n")
    if len(requests) > MAX_GOOGLE_BATCH:
        raise invalid(
            f"* BatchEmbedContentsRequest.requests: at most {MAX_GOOGLE_BATCH} requests can be "
            "in one batch\n"
        )
    texts: list[str] = []
    dimensions: set[int] = set()
    task_types: list[str] = []
    for i, request in enumerate(requests):
        if not isinstance(request, dict):
            raise invalid(f"* BatchEmbedContentsRequest.requests[{i}]: invalid request\n")
        model = str(request.get("model", "")).removeprefix("models/")
        if model != path_model:
            raise invalid(
                f"* BatchEmbedContentsRequest.requests[{i}].model: model must match the model "
                "in the URL\n"
            )
        parts = (request.get("content") or {}).get("parts") or []
        text = "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
        if not parts:
            raise invalid(
                f"* BatchEmbedContentsRequest.requests[{i}].content.parts: contents.parts must "
                "not be empty\n"
            )
        texts.append(text)
        size = request.get("outputDimensionality")
        if size is not None:
            if not isinstance(size, int) or not 1 <= size <= GOOGLE_FULL_DIMENSIONS:
                raise invalid(
                    f"* BatchEmbedContentsRequest.requests[{i}].output_dimensionality: must be "
                    f"between 1 and {GOOGLE_FULL_DIMENSIONS}\n"
                )
            dimensions.add(size)
        task = request.get("taskType")
        if isinstance(task, str) and task not in task_types:
            task_types.append(task)
    if len(dimensions) > 1:
        raise invalid("* all requests in a batch must ask for the same output_dimensionality\n")
    tokens = sum(count_tokens(t) for t in texts)
    return texts, next(iter(dimensions), None), tuple(task_types), tokens


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rag_service.testing.embedding_server",
        description="A local OpenAI + Gemini embedding API for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tpm", type=int, default=None, help="tokens per minute limit")
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute limit")
    parser.add_argument(
        "--limiter",
        choices=LIMITER_STYLES,
        default="bucket",
        help="how the limits are enforced: a continuous token bucket, a sliding window (at most "
        "LIMIT in any --window seconds) or a fixed window (default: bucket)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=60.0,
        help="seconds per window; the headers' LIMIT is the per-minute figure × window / 60, so "
        "every style has the same per-minute budget (default: 60)",
    )
    parser.add_argument(
        "--reset-report",
        choices=RESET_REPORTS,
        default="first",
        help="what a sliding window's x-ratelimit-reset-* says: time until the first room frees "
        "(first) or until the window is empty (empty) (default: first)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share answered 500/503")
    parser.add_argument("--insufficient-quota", action="store_true")
    parser.add_argument("--wrong-dimensions", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="seeds the error injection")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("EMBEDDING_SERVER_API_KEY"),
        help="required key (default: $EMBEDDING_SERVER_API_KEY; unset accepts any key)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; the first line on stdout is the URL."""
    args = _parse_args(argv)
    server = EmbeddingServer(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        tpm=args.tpm,
        rpm=args.rpm,
        limiter=args.limiter,
        window=args.window,
        reset_report=args.reset_report,
        latency=args.latency,
        error_rate=args.error_rate,
        insufficient_quota=args.insufficient_quota,
        wrong_dimensions=args.wrong_dimensions,
        seed=args.seed,
    )
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with server:
        print(server.url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
