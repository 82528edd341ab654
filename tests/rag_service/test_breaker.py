"""breaker.py: the circuit breaker's transitions as tables of (time, event, answer, state).

The clock is a plain function returning the time the table says; the breaker takes ``clock``
as a parameter for exactly this, so these tests need no sleeping and no patching.
"""

from __future__ import annotations

import json

import pytest

from rag_service.breaker import BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# (at, event, answer of allow() or None, state afterwards). The breaker in every table: 3
# failures within 10 s open it, a 20 s cooldown.
Step = tuple[float, str, bool | None, BreakerState]

TABLES: dict[str, list[Step]] = {
    "threshold failures within the window open it": [
        (0, "fail", None, CLOSED),
        (1, "fail", None, CLOSED),
        (2, "allow", True, CLOSED),
        (3, "fail", None, OPEN),
        (3, "allow", False, OPEN),
    ],
    "failures spread wider than the window never open it": [
        (0, "fail", None, CLOSED),
        (6, "fail", None, CLOSED),
        (10, "fail", None, CLOSED),  # the one at 0 is exactly 10 s old: out of the window
        (16, "fail", None, CLOSED),  # the one at 6 likewise
        (19.9, "fail", None, OPEN),  # 10, 16, 19.9: three within 10 s
    ],
    "successes in between do not forgive failures": [
        (0, "fail", None, CLOSED),
        (1, "ok", None, CLOSED),
        (2, "fail", None, CLOSED),
        (3, "ok", None, CLOSED),
        (4, "ok", None, CLOSED),
        (5, "fail", None, OPEN),
    ],
    "open refuses until the cooldown, then lets exactly one probe through": [
        (0, "fail", None, CLOSED),
        (0, "fail", None, CLOSED),
        (0, "fail", None, OPEN),
        (10, "allow", False, OPEN),
        (19.99, "allow", False, OPEN),
        (20, "allow", True, HALF_OPEN),  # the probe
        (20, "allow", False, HALF_OPEN),  # one at a time
        (25, "allow", False, HALF_OPEN),
    ],
    "a successful probe closes it and forgets the old failures": [
        (0, "fail", None, CLOSED),
        (0, "fail", None, CLOSED),
        (0, "fail", None, OPEN),
        (20, "allow", True, HALF_OPEN),
        (21, "ok", None, CLOSED),
        (21, "allow", True, CLOSED),
        (22, "allow", True, CLOSED),
        (22, "fail", None, CLOSED),  # a fresh count: one failure is not three
        (23, "fail", None, CLOSED),
        (24, "fail", None, OPEN),
    ],
    "a failed probe re-opens it with a fresh cooldown": [
        (0, "fail", None, CLOSED),
        (0, "fail", None, CLOSED),
        (0, "fail", None, OPEN),
        (20, "allow", True, HALF_OPEN),
        (22, "fail", None, OPEN),
        (40, "allow", False, OPEN),  # 20 s after the probe failed, not after the first opening
        (41.99, "allow", False, OPEN),
        (42, "allow", True, HALF_OPEN),
        (43, "ok", None, CLOSED),
    ],
    "a probe that never reports is given up after a cooldown": [
        (0, "fail", None, CLOSED),
        (0, "fail", None, CLOSED),
        (0, "fail", None, OPEN),
        (20, "allow", True, HALF_OPEN),  # this request is cancelled and never reports
        (39.99, "allow", False, HALF_OPEN),
        (40, "allow", True, HALF_OPEN),  # a new probe
        (40, "allow", False, HALF_OPEN),
        (41, "ok", None, CLOSED),
    ],
    "stragglers while open neither close it nor extend the cooldown": [
        (0, "fail", None, CLOSED),
        (0, "fail", None, CLOSED),
        (0, "fail", None, OPEN),
        (5, "ok", None, OPEN),  # a request that started before it opened
        (6, "fail", None, OPEN),
        (19, "fail", None, OPEN),
        (20, "allow", True, HALF_OPEN),
    ],
    "a closed breaker lets everything through": [
        (0, "allow", True, CLOSED),
        (0, "ok", None, CLOSED),
        (1, "fail", None, CLOSED),
        (1, "allow", True, CLOSED),
        (1000, "allow", True, CLOSED),
    ],
}


@pytest.mark.parametrize("steps", TABLES.values(), ids=TABLES.keys())
def test_transitions(steps: list[Step]) -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        failure_threshold=3, window_seconds=10, cooldown_seconds=20, clock=clock
    )
    for i, (at, event, answer, state) in enumerate(steps):
        clock.now = at
        if event == "allow":
            assert breaker.allow() is answer, f"step {i}: allow() at {at}"
        elif event == "ok":
            breaker.record_success()
        else:
            breaker.record_failure()
        assert breaker.state is state, f"step {i}: {event} at {at}"


def test_reading_the_state_never_changes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_seconds=5, clock=clock)
    breaker.record_failure()
    clock.now = 100
    assert breaker.state is OPEN
    breaker.snapshot()
    assert breaker.state is OPEN  # only allow() starts a probe
    assert breaker.allow() is True
    assert breaker.state is HALF_OPEN


def test_the_guides_defaults_five_failures_in_thirty_seconds_and_thirty_seconds_off() -> None:
    clock = Clock(1000.0)
    breaker = CircuitBreaker(clock=clock)
    for second in range(4):
        clock.now = 1000.0 + second * 7
        breaker.record_failure()
    assert breaker.state is CLOSED
    clock.now = 1029.0  # five failures between 1000 and 1029
    breaker.record_failure()
    assert breaker.state is OPEN
    clock.now = 1058.9
    assert breaker.allow() is False
    clock.now = 1059.0
    assert breaker.allow() is True


def test_snapshot_while_closed_open_and_half_open() -> None:
    clock = Clock(1_700_000_000.0)
    breaker = CircuitBreaker(
        failure_threshold=3, window_seconds=10, cooldown_seconds=20, clock=clock
    )
    breaker.record_failure()
    clock.now += 1
    breaker.record_failure()
    closed = breaker.snapshot()
    assert closed == {
        "state": "closed",
        "recentFailures": 2,
        "failureThreshold": 3,
        "windowSeconds": 10.0,
        "cooldownSeconds": 20.0,
        "openedAt": None,
        "nextProbeAt": None,
        "secondsUntilProbe": None,
        "probeInFlight": False,
    }

    clock.now += 1
    breaker.record_failure()
    opened_at = clock.now
    clock.now += 5
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["recentFailures"] == 3  # why it opened stays visible while they are recent
    assert snap["openedAt"] == opened_at
    assert snap["nextProbeAt"] == opened_at + 20
    assert snap["secondsUntilProbe"] == 15
    assert snap["probeInFlight"] is False

    clock.now = opened_at + 20
    assert breaker.allow()
    probing = breaker.snapshot()
    assert probing["state"] == "half_open"
    assert probing["probeInFlight"] is True
    assert probing["recentFailures"] == 0  # the failures have aged out of the window
    assert probing["nextProbeAt"] == opened_at + 40  # if this probe never reports
    json.dumps(probing)  # ready for the HTTP response as it is


def test_two_breakers_share_nothing() -> None:
    clock = Clock()
    v1 = CircuitBreaker(failure_threshold=1, clock=clock)
    v2 = CircuitBreaker(failure_threshold=1, clock=clock)
    v2.record_failure()
    assert (v1.state, v2.state) == (CLOSED, OPEN)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"window_seconds": 0}, "window_seconds"),
        ({"cooldown_seconds": 0}, "cooldown_seconds"),
        ({"cooldown_seconds": -1}, "cooldown_seconds"),
    ],
)
def test_nonsense_settings_are_refused(options: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(clock=Clock(), **options)  # type: ignore[arg-type]


def test_states_are_their_json_names() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]
    assert json.dumps(BreakerState.HALF_OPEN) == '"half_open"'  # a str, as kopf's enums are
