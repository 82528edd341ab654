"""A circuit breaker for the v2 search path: after repeated failures, serve v1 for a while.

The guide: "The system automatically falls back to V1 if V2 fails repeatedly." A state machine
with an injected clock and no I/O, so every transition is a table-driven test:

- CLOSED: requests pass. ``failure_threshold`` failures within the last ``window_seconds``
  open the breaker. Successes do not forgive failures inside the window: a v2 that fails one
  request in three is broken, however many succeed in between.
- OPEN: requests are refused (the app serves v1) until ``cooldown_seconds`` after opening.
- HALF_OPEN: the first ``allow()`` after the cooldown lets one probe through; further requests
  are refused while it runs. Its success closes the breaker (and forgets the failures), its
  failure opens it again with a fresh cooldown. A probe that never reports (a cancelled
  request) is given up after ``cooldown_seconds``, and the next ``allow()`` sends a new one, so
  a lost outcome cannot wedge the breaker half-open.

The breaker cannot tell a probe's outcome from that of a request started before it opened; a
search taking longer than the cooldown is rare enough that such a straggler may decide the
probe. Not thread-safe: use it from one event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        window_seconds: float = 30,
        cooldown_seconds: float = 30,
        clock: Callable[[], float],
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1; got {failure_threshold}")
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive; got {window_seconds}")
        if cooldown_seconds <= 0:
            raise ValueError(f"cooldown_seconds must be positive; got {cooldown_seconds}")
        self._threshold = failure_threshold
        self._window = float(window_seconds)
        self._cooldown = float(cooldown_seconds)
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures: deque[float] = deque()  # times of failures while closed, oldest first
        self._opened_at: float | None = None
        self._probe_started_at: float | None = None

    @property
    def state(self) -> BreakerState:
        # A read never transitions: OPEN stays OPEN until someone asks ``allow()``.
        return self._state

    def allow(self) -> bool:
        """Whether this request may use the protected path (v2). May start a half-open probe."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            assert self._opened_at is not None
            if now < self._opened_at + self._cooldown:
                return False
            self._state = BreakerState.HALF_OPEN
        assert self._state is BreakerState.HALF_OPEN
        if self._probe_started_at is not None and now < self._probe_started_at + self._cooldown:
            return False  # one probe at a time
        self._probe_started_at = now
        return True

    def record_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._close()
        # CLOSED: nothing to forgive (see the module docstring); OPEN: a straggler, ignored.

    def record_failure(self) -> None:
        now = self._clock()
        if self._state is BreakerState.HALF_OPEN:
            self._open(now)
        elif self._state is BreakerState.CLOSED:
            self._failures.append(now)
            self._prune(now)
            if len(self._failures) >= self._threshold:
                self._open(now)
        # OPEN: a straggler; extending the cooldown for it would only delay recovery.

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state for ``GET /api/monitoring/circuit-breaker``.

        Times are in the clock's units (epoch seconds when the clock is ``time.time``);
        ``secondsUntilProbe`` is relative and so meaningful with any clock.
        """
        now = self._clock()
        self._prune(now)
        next_probe: float | None = None
        if self._state is BreakerState.OPEN:
            assert self._opened_at is not None
            next_probe = self._opened_at + self._cooldown
        elif self._state is BreakerState.HALF_OPEN:
            started = self._probe_started_at
            next_probe = now if started is None else max(now, started + self._cooldown)
        return {
            "state": self._state.value,
            "recentFailures": len(self._failures),
            "failureThreshold": self._threshold,
            "windowSeconds": self._window,
            "cooldownSeconds": self._cooldown,
            "openedAt": self._opened_at,
            "nextProbeAt": next_probe,
            "secondsUntilProbe": None if next_probe is None else max(0.0, next_probe - now),
            "probeInFlight": self._state is BreakerState.HALF_OPEN
            and self._probe_started_at is not None
            and now < self._probe_started_at + self._cooldown,
        }

    def _prune(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self._window:
            self._failures.popleft()

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._probe_started_at = None
        # The failures stay (they age out of the window) so the snapshot shows why it opened.

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._opened_at = None
        self._probe_started_at = None
        self._failures.clear()
