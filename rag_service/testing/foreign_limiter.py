"""A rate-limited OpenAI-compatible embeddings endpoint written apart from our pacer.

The project's own server (:mod:`rag_service.testing.embedding_server`) and the pacer were written
together, so they share conventions a real API need not: its tokenizer, how it words a reset,
that the limit headers are always there. This one is written only from what OpenAI and Azure
OpenAI document about their headers, to find out how the pacer does on a limiter it was not
made for (issue 17 §3):

- a sliding log of admissions over ``window`` seconds (4 by default) for tokens and requests;
- its own tokenizer: about 4 tokens per 3 words (OpenAI's "750 words ≈ 1,000 tokens" rule),
  not our characters ÷ 3, reported back as ``usage.prompt_tokens``;
- ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` with reset = "the time until the
  rate limit resets to its initial state" (until the window is empty), written as Go durations
  (``6m0s``, ``1.5s``, ``20ms``) or, ``--reset-format seconds``, rounded up to whole seconds
  (``1s``, ``4s``) as OpenAI's examples show them;
- ``--headers azure``: only ``x-ratelimit-remaining-{requests,tokens}``, no limit or reset
  headers (Azure OpenAI's variant), ``retry-after-ms`` and ``retry-after`` on a 429;
- both limits can bind (``--rpw``, requests per window).

    python -m rag_service.testing.foreign_limiter --port 0 --tokens 20000 --rpw 40
    # prints its URL; GET /_stats returns every request's (time, tokens, status)

Standard library only; any key is accepted; vectors are zeros (only the pacing is under test).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

__all__ = ["ForeignLimiter", "go_duration", "main", "server_tokens"]

HeaderStyle = Literal["openai", "azure"]
ResetFormat = Literal["go", "seconds"]


def server_tokens(text: str) -> int:
    """This server's tokenizer: 4 tokens per 3 words, rounded up, at least 1. Pure."""
    return max(1, math.ceil(len(text.split()) * 4 / 3))


def go_duration(seconds: float, style: ResetFormat = "go") -> str:
    """A reset as OpenAI writes it: Go's ``time.Duration`` (``6m0s``, ``1.5s``, ``20ms``), or
    ``seconds``: rounded up to a whole second (``1s``, ``6m0s``). Pure."""
    if style == "seconds":
        whole = math.ceil(max(0.0, seconds) - 1e-9)
        minutes, secs = divmod(whole, 60)
        return f"{minutes}m{secs}s" if minutes else f"{secs}s"
    millis = math.ceil(max(0.0, seconds) * 1000 - 1e-9)
    if millis < 1000:
        return f"{millis}ms" if millis else "0s"
    minutes, rest = divmod(millis, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{text}" if minutes else text


class _Log:
    """At most ``limit`` in any ``window`` seconds: a log of what was admitted when."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.entries: deque[tuple[float, int]] = deque()
        self.used = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] + self.window <= now:
            self.used -= self.entries.popleft()[1]

    def fits_after(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` fits (0: now)."""
        self.expire(now)
        excess = self.used + amount - self.limit
        for at, taken in self.entries:
            if excess <= 0:
                break
            excess -= taken
            if excess <= 0:
                return at + self.window - now
        return 0.0 if excess <= 0 else self.window

    def until_empty(self, now: float) -> float:
        self.expire(now)
        return self.entries[-1][0] + self.window - now if self.entries else 0.0


class ForeignLimiter:
    """The endpoint's state: limits, settings and the record of every request."""

    def __init__(
        self,
        *,
        tokens: int,
        requests: int | None,
        window: float,
        headers: HeaderStyle,
        reset_format: ResetFormat,
        latency: float,
    ) -> None:
        self.tokens = _Log(tokens, window)
        self.requests = _Log(requests or 10**9, window)
        self.limits_requests = requests is not None
        self.headers = headers
        self.reset_format = reset_format
        self.latency = latency
        self.origin = time.monotonic()
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []

    def admit(self, tokens: int) -> tuple[int, dict[str, str]]:
        with self.lock:
            now = time.monotonic() - self.origin
            if tokens > self.tokens.limit:
                # Never admissible: OpenAI words this "Request too large", which a client splits.
                self.records.append({"time": now, "tokens": tokens, "status": 413})
                return 413, {}
            wait = max(self.tokens.fits_after(tokens, now), self.requests.fits_after(1, now))
            if wait <= 0:
                self.tokens.entries.append((now, tokens))
                self.tokens.used += tokens
                self.requests.entries.append((now, 1))
                self.requests.used += 1
            status = 200 if wait <= 0 else 429
            self.records.append({"time": now, "tokens": tokens, "status": status})
            headers = self._headers(now)
        if status == 429:
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            headers["retry-after"] = str(math.ceil(wait))
        return status, headers

    def _headers(self, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        pairs = [("tokens", self.tokens)]
        if self.limits_requests:
            pairs.append(("requests", self.requests))
        for name, log in pairs:
            log.expire(now)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, log.limit - log.used))
            if self.headers == "openai":
                out[f"x-ratelimit-limit-{name}"] = str(log.limit)
                out[f"x-ratelimit-reset-{name}"] = go_duration(
                    log.until_empty(now), self.reset_format
                )
        return out

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "records": list(self.records),
                "tokens_limit": self.tokens.limit,
                "requests_limit": self.requests.limit if self.limits_requests else None,
                "window": self.tokens.window,
                "monotonic_origin": self.origin,
            }


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        del format, args

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, self.server.limiter.stats(), {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(server_tokens(text) for text in texts)
        status, headers = self.server.limiter.admit(tokens)
        time.sleep(self.server.limiter.latency)
        if status == 413:
            message = f"Request too large for embeddings: Limit {self.server.limiter.tokens.limit}"
            error = {"message": message, "type": "tokens", "param": None}
            self._send(429, {"error": {**error, "code": "rate_limit_exceeded"}}, {})
            return
        if status == 429:
            message = "Rate limit reached. Please retry after the time in retry-after-ms."
            error = {"message": message, "type": "tokens", "param": None}
            self._send(429, {"error": {**error, "code": "rate_limit_exceeded"}}, headers)
            return
        row = base64.b64encode(bytes(4 * int(body.get("dimensions") or 1536))).decode()
        data = [{"object": "embedding", "index": i, "embedding": row} for i in range(len(texts))]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        payload = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        self._send(200, payload, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], limiter: ForeignLimiter) -> None:
        super().__init__(address, _Handler)
        self.limiter = limiter


def serve(limiter: ForeignLimiter, port: int = 0) -> tuple[_Server, str]:
    """Start serving in a thread; returns the server (``shutdown()`` it) and its base URL."""
    server = _Server(("127.0.0.1", port), limiter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag_service.testing.foreign_limiter")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens per window")
    parser.add_argument("--rpw", type=int, default=None, help="requests per window (none: off)")
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--headers", choices=("openai", "azure"), default="openai")
    parser.add_argument("--reset-format", choices=("go", "seconds"), default="go")
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args(argv)
    limiter = ForeignLimiter(
        tokens=args.tokens,
        requests=args.rpw,
        window=args.window,
        headers=args.headers,
        reset_format=args.reset_format,
        latency=args.latency,
    )
    server, url = serve(limiter, args.port)
    print(url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
