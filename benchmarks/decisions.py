"""Rollout decisions: synthetic rollouts through ``decide()``, beside a Flagger-like policy.

    .venv/bin/python benchmarks/decisions.py [--rollouts 1000] [--seed 1]

Each rollout is one scenario's v2, checked every 30 s (``analysis.interval``) from the first step
until it reaches Succeeded, is rolled back, or 1,000 checks (8 h 20 min) pass ("held"). The
series depends on the percentage each policy chose, so it is generated check by check: traffic
at the current percentage flows for one interval, then the check reads the last 5 minutes
(``analysis.window``, 10 intervals), as ``rate(…[5m])`` and ``histogram_quantile`` would.

**Time scale.** The guide's 72 h steps are 8,640 checks each; here every step's ``minDuration``
is 50 min (100 checks) and the 100 % hold is 33m20s (67 checks, the guide's 48 h : 72 h). The
interval and window stay real, so detection is measured in real checks; only the wait between
promotions is compressed (a healthy rollout takes ≥ 200 min to 100 % instead of 12 days).

**The world** (per rollout, seeded; ``random.Random`` passed explicitly):

- traffic: 20 searches/s in total (3/s for ``low-traffic``) times a slow load wave (log-AR(1),
  ρ = 0.98 per interval); Poisson counts, split between v1 and v2 by the percentage;
- latency: each interval's v2 p95 ≈ 0.30 s (lognormal across rollouts, ±8 %), 5–25 % below
  v1's (v2 has smaller vectors), both following load; the window's p95 is the p95 of the
  mixture of its intervals' lognormal latencies (shape σ = 0.5, weighted by requests), plus the
  sampling error of a p95 from N requests (≈ 0.95/√N relative);
- errors: Poisson at ≈ 0.05 % of requests; top-1 similarity ≈ 0.77; query-cache hits ≈ 78 %
  (binomial); cost: 12 tokens per cache miss at $0.02/1M tokens (v2, text-embedding-3-small)
  and $0.10/1M (v1, ada-002); critical errors 0.

**Scenarios** (v2 is degraded in the four marked †; the "fault onset" is the first interval the
fault is in the data):

- ``healthy``; ``flaky``: healthy, with 2 % of checks missing one series, 1 % of checks with one
  query failing, v2-only latency spikes (1 % of intervals, 2–6 × for 30 s) and error blips (0.5 %
  of intervals at 2–5 %); ``low-traffic``: 3 searches/s, so 10 % is below ``minRequests`` (100
  in 5 min) much of the time; ``metric-gaps``: 1–4 stretches of 3–20 checks where every series
  is absent; ``prometheus-down``: one stretch of 20–240 checks where every query fails;
- † ``degraded-latency``: v2 p95 0.9–2.0 s from the start (the guide: ≤ 0.8 s, roll back > 1.2 s);
  † ``degraded-relevance``: v2 top-1 similarity 0.60–0.68 (the guide: ≥ 0.7; no rollback
  threshold watches it); † ``error-bursts``: from within the first 30 min, every 10–40 min,
  2–5 intervals at 60–100 % errors; † ``fault-at-50``: healthy until the percentage reaches 50,
  then v2 p95 1.0–2.5 s (a capacity fault that only appears under load).

**Policies.** ``default``: ``decide()`` with the spec's defaults (the guide's criteria and
thresholds, ``successfulChecks`` 3, ``minRequests`` 100, ``noData``/``onError`` hold), driven
through :class:`embedshift_operator.replay.Replayer` from a verified status. ``flagger-like``:
:func:`flagger_decide` below, Flagger's canary analysis on the same criteria, the same queries,
the same traffic gate and the same steps: every check where any criterion is not a pass
(no data and errors included) is a failed check; failed checks accumulate over the whole
rollout and the 5th (``threshold: 5``) rolls back; after a step's ``minDuration`` the first
check with no failure promotes; reaching 100 % ends its analysis (Flagger's promotion).

**Figures.** false promotion: a degraded v2 reached 100 %; false rollback: rolled back before
any fault was in the data; checks to detect: from the fault onset to the rollback, both counted;
time to 100 %: from the first step, healthy scenarios only. The rollout seeds are shared by the
two policies, so both see the same world until their percentages differ.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from embedshift_operator.replay import Replayer, SeriesPoint, Value
from embedshift_operator.resource import (
    EmbeddingMigrationSpec,
    Phase,
    parse_duration,
    parse_migration,
)
from rag_service.criteria import Bound, Verdict, judge

INTERVAL = timedelta(seconds=30)
WINDOW = 10  # intervals in the 5 min window
STEP_MINUTES = 50  # 100 checks per step
LAST_STEP = "33m20s"  # 67 checks: the guide's 48 h at 100 % against 72 h per step
PERCENTAGES = (10, 25, 50, 75, 100)
MAX_CHECKS = 1000
START = datetime(2026, 11, 24, tzinfo=UTC)

LATENCY_SHAPE = 0.5  # σ of log latency within one interval
Z95 = 1.6448536269514722
TOKENS_PER_QUERY = 12
PRICE_V2 = 0.02e-6  # USD per token
PRICE_V1 = 0.10e-6

HEALTHY = ("healthy", "flaky", "low-traffic", "metric-gaps", "prometheus-down")
DEGRADED = ("degraded-latency", "degraded-relevance", "error-bursts", "fault-at-50")
SCENARIOS = (*HEALTHY, *DEGRADED)


def bench_spec() -> EmbeddingMigrationSpec:
    steps = [
        {"percentage": p, "minDuration": LAST_STEP if p == 100 else f"{STEP_MINUTES}m"}
        for p in PERCENTAGES
    ]
    raw = {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "metadata": {"name": "bench"},
        "spec": {
            "database": {"table": "documents"},
            "source": {"provider": "openai", "model": "text-embedding-ada-002", "dimensions": 1536},
            "target": {"provider": "openai", "model": "text-embedding-3-small", "dimensions": 768},
            "rollout": {"steps": steps},
            "analysis": {"interval": "30s", "window": "5m"},
        },
    }
    return parse_migration(raw, where="benchmark spec").spec


# ---- sampling ---------------------------------------------------------------------------------


def poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def binomial(rng: random.Random, n: int, p: float) -> int:
    if n == 0:
        return 0
    return min(n, max(0, round(rng.gauss(n * p, math.sqrt(n * p * (1 - p))))))


def window_p95(parts: Sequence[tuple[int, float]]) -> float | None:
    """p95 of a mixture of lognormal latencies, one per interval (weight: its requests)."""
    total = sum(n for n, _ in parts)
    if total == 0:
        return None
    p95s = [p for n, p in parts if n]
    lo, hi = min(p95s), max(p95s)
    if hi <= lo * 1.15:  # near-equal intervals: the weighted geometric mean is within 1 %
        return math.exp(sum(n * math.log(p) for n, p in parts if n) / total)
    scale = LATENCY_SHAPE * math.sqrt(2)
    logs = [(n / total, math.log(p) - Z95 * LATENCY_SHAPE) for n, p in parts if n]
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        x = math.log(mid)
        tail = sum(w * 0.5 * math.erfc((x - mu) / scale) for w, mu in logs)
        lo, hi = (mid, hi) if tail > 0.05 else (lo, mid)
    return math.sqrt(lo * hi)


# ---- the world --------------------------------------------------------------------------------


@dataclass
class Interval:
    n1: int
    n2: int
    e2: int
    h1: int
    h2: int
    p95_1: float
    p95_2: float
    sim2: float


@dataclass
class World:
    """One rollout's service and Prometheus, advanced one interval per check."""

    scenario: str
    rng: random.Random
    rate: float = 0.0
    load_sigma: float = 0.25
    load: float = 0.0
    v2_p95: float = 0.0
    v1_p95: float = 0.0
    error_rate: float = 0.0
    hit2: float = 0.0
    hit1: float = 0.0
    sim2: float = 0.0
    fault_p95: float = 0.0
    bursts: dict[int, float] = field(default_factory=dict)  # interval -> error rate
    gaps: set[int] = field(default_factory=set)  # checks where every series is absent
    down: set[int] = field(default_factory=set)  # checks where every query fails
    onset: int | None = None  # first check with the fault in the data
    intervals: deque[Interval] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def __post_init__(self) -> None:
        rng = self.rng
        low = self.scenario == "low-traffic"
        self.rate = (3.0 if low else 20.0) * math.exp(rng.gauss(0, 0.15))
        self.load_sigma = 0.35 if low else 0.25
        self.load = rng.gauss(0, self.load_sigma)
        self.v2_p95 = 0.30 * math.exp(rng.gauss(0, 0.08))
        self.v1_p95 = self.v2_p95 / rng.uniform(0.75, 0.95)
        self.error_rate = 0.0005 * math.exp(rng.gauss(0, 0.3))
        self.hit2, self.hit1 = rng.uniform(0.74, 0.82), rng.uniform(0.74, 0.82)
        self.sim2 = rng.uniform(0.74, 0.80)
        if self.scenario == "degraded-latency":
            self.v2_p95 = rng.uniform(0.9, 2.0)
        elif self.scenario == "degraded-relevance":
            self.sim2 = rng.uniform(0.60, 0.68)
        elif self.scenario == "fault-at-50":
            self.fault_p95 = rng.uniform(1.0, 2.5)
        elif self.scenario == "error-bursts":
            start = rng.randrange(0, 60)
            while start < MAX_CHECKS:
                rate = rng.uniform(0.6, 1.0)
                for i in range(rng.randint(2, 5)):
                    self.bursts[start + i] = rate
                start += rng.randint(20, 80)
        elif self.scenario == "metric-gaps":
            for _ in range(rng.randint(1, 4)):
                start = rng.randrange(0, 700)
                self.gaps.update(range(start, start + rng.randint(3, 20)))
        elif self.scenario == "prometheus-down":
            start = rng.randrange(0, 450)
            self.down.update(range(start, start + rng.randint(20, 240)))

    def check(self, k: int, percentage: int, keys: Sequence[tuple[str, str, str]]) -> SeriesPoint:
        """Advance one interval at ``percentage``, then read the window as check ``k``."""
        rng = self.rng
        self.load = 0.98 * self.load + math.sqrt(1 - 0.98**2) * rng.gauss(0, self.load_sigma)
        mean = self.rate * math.exp(self.load) * INTERVAL.total_seconds()
        share = percentage / 100
        n2, n1 = poisson(rng, mean * share), poisson(rng, mean * (1 - share))
        slow = math.exp(0.15 * self.load + rng.gauss(0, 0.03))  # shared: load, infrastructure
        p95_2 = self.v2_p95 * slow * math.exp(rng.gauss(0, 0.03))
        p95_1 = self.v1_p95 * slow * math.exp(rng.gauss(0, 0.03))
        error_rate = self.error_rate
        faulty = self.scenario in ("degraded-latency", "degraded-relevance")
        if self.scenario == "fault-at-50" and percentage >= 50:
            p95_2, faulty = self.fault_p95 * slow, True
        if k in self.bursts:
            error_rate, faulty = self.bursts[k], True
        if self.scenario == "flaky":
            if rng.random() < 0.01:
                p95_2 *= rng.uniform(2, 6)
            if rng.random() < 0.005:
                error_rate = rng.uniform(0.02, 0.05)
        if faulty and self.onset is None:
            self.onset = k
        self.intervals.append(
            Interval(
                n1=n1,
                n2=n2,
                e2=poisson(rng, n2 * error_rate),
                h1=binomial(rng, n1, self.hit1),
                h2=binomial(rng, n2, self.hit2),
                p95_1=p95_1,
                p95_2=p95_2,
                sim2=self.sim2 + rng.gauss(0, 0.005),
            )
        )
        return self.read(k, keys)

    def read(self, k: int, keys: Sequence[tuple[str, str, str]]) -> SeriesPoint:
        at = START + (k + 1) * INTERVAL
        if k in self.down:
            return SeriesPoint(at=at, values=dict.fromkeys(_all(keys), "error"), requests="error")
        if k in self.gaps:
            return SeriesPoint(at=at, values=dict.fromkeys(_all(keys)), requests=None)
        rng = self.rng
        window = list(self.intervals)
        n2 = sum(i.n2 for i in window)
        n1 = sum(i.n1 for i in window)
        metrics: dict[tuple[str, str], float | None] = {("critical_errors", "v2"): 0.0}
        for version, n, p95 in (
            ("v2", n2, window_p95([(i.n2, i.p95_2) for i in window])),
            ("v1", n1, window_p95([(i.n1, i.p95_1) for i in window])),
        ):
            if p95 is not None:
                p95 *= math.exp(rng.gauss(0, 0.95 / math.sqrt(n)))
            metrics[("p95_latency_seconds", version)] = p95
        if n2:
            metrics[("error_rate", "v2")] = sum(i.e2 for i in window) / n2
            metrics[("cache_hit_rate", "v2")] = sum(i.h2 for i in window) / n2
            similarity = sum(i.n2 * i.sim2 for i in window) / n2
            metrics[("avg_top_similarity", "v2")] = similarity + rng.gauss(0, 0.08 / math.sqrt(n2))
            misses = sum(i.n2 - i.h2 for i in window)
            metrics[("cost_per_1k_queries_usd", "v2")] = (
                1000 * misses * TOKENS_PER_QUERY * PRICE_V2 / n2
            )
        if n1:
            misses = sum(i.n1 - i.h1 for i in window)
            metrics[("cost_per_1k_queries_usd", "v1")] = (
                1000 * misses * TOKENS_PER_QUERY * PRICE_V1 / n1
            )
        values: dict[str, Value] = {}
        for key, metric, version in keys:
            values[key] = metrics.get((metric, version))
        if self.scenario == "flaky":
            if rng.random() < 0.02:
                values[rng.choice(list(values))] = None
            if rng.random() < 0.01:
                values[rng.choice(list(values))] = "error"
        return SeriesPoint(at=at, values=values, requests=float(n2))


def _all(keys: Sequence[tuple[str, str, str]]) -> list[str]:
    return [key for key, _, _ in keys]


def series_keys(spec: EmbeddingMigrationSpec) -> list[tuple[str, str, str]]:
    """(series field, metric, version) for every criterion of ``spec`` (and its v1 side)."""
    keys = []
    for _, criterion in spec.analysis.criteria():
        assert criterion.metric is not None
        keys.append((criterion.name, criterion.metric, "v2"))
        if criterion.bound.compares_versions:
            keys.append((criterion.name + ".v1", criterion.metric, "v1"))
    return keys


# ---- the Flagger-like policy ------------------------------------------------------------------


@dataclass(frozen=True)
class FlaggerPolicy:
    steps: tuple[tuple[int, int], ...]  # (percentage, checks before it may be promoted)
    criteria: tuple[tuple[str, Bound], ...]
    min_requests: int
    threshold: int = 5


@dataclass(frozen=True)
class FlaggerState:
    phase: Literal["Progressing", "Promoted", "RolledBack"] = "Progressing"
    step: int = 0
    step_started: int = -1  # check number (the first step starts one interval before check 0)
    failed_checks: int = 0
    failures: tuple[str, ...] = ()  # why each failed check failed (its first failing criterion)

    def percentage(self, policy: FlaggerPolicy) -> int:
        return 0 if self.phase == "RolledBack" else policy.steps[self.step][0]


def flagger_decide(
    policy: FlaggerPolicy, state: FlaggerState, point: SeriesPoint, check: int
) -> FlaggerState:
    """Flagger's canary analysis, on our criteria. Pure."""
    if state.phase != "Progressing":
        return state
    requests = point.requests
    failure = ""
    if requests == "error":
        failure = "traffic gate error"
    elif requests is None or (isinstance(requests, float) and requests < policy.min_requests):
        failure = "traffic gate nodata"
    for name, bound in policy.criteria:
        if failure:
            break
        value = point.values.get(name)
        v1 = point.values.get(name + ".v1") if bound.compares_versions else None
        if value == "error" or v1 == "error":
            failure = f"{name} error"
        else:
            assert not isinstance(value, str) and not isinstance(v1, str)
            verdict = judge(value, bound, v1_value=v1)
            failure = "" if verdict is Verdict.PASS else f"{name} {verdict.value}"
    if failure:
        count = state.failed_checks + 1
        failures = (*state.failures, failure)
        phase: Literal["Progressing", "RolledBack"] = (
            "RolledBack" if count >= policy.threshold else "Progressing"
        )
        return replace(state, phase=phase, failed_checks=count, failures=failures)
    if check - state.step_started >= policy.steps[state.step][1]:
        step = state.step + 1
        last = step == len(policy.steps) - 1
        return replace(
            state, step=step, step_started=check, phase="Promoted" if last else "Progressing"
        )
    return state


def flagger_policy(spec: EmbeddingMigrationSpec) -> FlaggerPolicy:
    return FlaggerPolicy(
        steps=tuple(
            (s.percentage, round(parse_duration(s.min_duration) / INTERVAL))
            for s in spec.rollout.steps
        ),
        criteria=tuple((c.name, c.bound) for _, c in spec.analysis.criteria()),
        min_requests=spec.analysis.min_requests,
    )


# ---- running rollouts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    scenario: str
    checks: int  # checks run
    reached_100: int | None  # check at which 100 % was reached
    rolled_back: int | None  # check at which it was rolled back
    onset: int | None
    failures: tuple[str, ...] = ()  # flagger-like: why each failed check failed

    @property
    def false_rollback(self) -> bool:
        return self.rolled_back is not None and (
            self.onset is None or self.rolled_back < self.onset
        )

    @property
    def false_promotion(self) -> bool:
        return self.scenario in DEGRADED and self.reached_100 is not None


class Clock:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0


def run_default(
    spec: EmbeddingMigrationSpec,
    scenario: str,
    seed: int,
    keys: Sequence[tuple[str, str, str]],
    clock: Clock,
) -> Outcome:
    world = World(scenario, random.Random(seed))
    replayer = Replayer(spec, START, name="bench")
    percentage = replayer.status.percentage
    reached = rolled = None
    k = 0
    for k in range(MAX_CHECKS):
        point = world.check(k, percentage, keys)
        began = time.perf_counter()
        decision = replayer.feed(point)
        clock.seconds += time.perf_counter() - began
        clock.calls += 1
        percentage = decision.percentage
        if percentage == 100 and reached is None:
            reached = k
        if decision.phase is Phase.ROLLED_BACK:
            rolled = k
            break
        if decision.phase is Phase.SUCCEEDED:
            break
    return Outcome(scenario, k + 1, reached, rolled, world.onset)


def run_flagger(
    policy: FlaggerPolicy, scenario: str, seed: int, keys: Sequence[tuple[str, str, str]]
) -> Outcome:
    world = World(scenario, random.Random(seed))
    state = FlaggerState()
    reached = rolled = None
    k = 0
    for k in range(MAX_CHECKS):
        point = world.check(k, state.percentage(policy), keys)
        state = flagger_decide(policy, state, point, k)
        if state.phase == "Promoted":
            reached = k
            break
        if state.phase == "RolledBack":
            rolled = k
            break
    return Outcome(scenario, k + 1, reached, rolled, world.onset, state.failures)


# ---- report -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def row(policy: str, scenario: str, outcomes: Sequence[Outcome]) -> list[str]:
    n = len(outcomes)
    reached = [o.reached_100 for o in outcomes if o.reached_100 is not None]
    rolled = [(o.rolled_back, o.onset) for o in outcomes if o.rolled_back is not None]
    held = sum(o.reached_100 is None and o.rolled_back is None for o in outcomes)
    detect = median([at - onset + 1 for at, onset in rolled if onset is not None and at >= onset])
    to_100 = median([(k + 1) * INTERVAL.total_seconds() / 60 for k in reached])
    healthy = scenario in HEALTHY
    return [
        scenario,
        policy,
        str(n),
        str(len(reached)),
        str(len(rolled)),
        str(held),
        "–" if healthy else str(sum(o.false_promotion for o in outcomes)),
        str(sum(o.false_rollback for o in outcomes)),
        "–" if detect is None else f"{detect:g}",
        f"{to_100:.1f} min" if healthy and to_100 is not None else "–",
    ]


HEADER = [
    "scenario",
    "policy",
    "rollouts",
    "to 100 %",
    "rolled back",
    "held",
    "false promotions",
    "false rollbacks",
    "median checks onset → rollback",
    "median time to 100 % (healthy)",
]


def table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _noop(x: int) -> int:
    return x + 1


def baseline_calls_per_second(calls: int = 2_000_000) -> float:
    """A trivial Python function call loop: the machine's speed in this run."""
    began = time.perf_counter()
    total = 0
    for i in range(calls):
        total = _noop(i)
    assert total == calls
    return calls / (time.perf_counter() - began)


GUIDE_CHECKS = (4 * 72 + 48) * 3600 // 30  # checks in the guide's 14-day schedule at 30 s


def summary(name: str, outcomes: Sequence[Outcome]) -> list[str]:
    degraded = [o for o in outcomes if o.scenario in DEGRADED]
    healthy = [o for o in outcomes if o.scenario in HEALTHY]
    false_promotions = sum(o.false_promotion for o in degraded)
    false_rollbacks = sum(o.false_rollback for o in healthy)
    # every check made while v2 was still healthy, in any scenario (before a fault's onset)
    clean = sum(o.checks if o.onset is None else min(o.checks, o.onset) for o in outcomes)
    all_false = sum(o.false_rollback for o in outcomes)
    lines = [
        f"{name}: false promotions {false_promotions} of {len(degraded)} degraded; false "
        f"rollbacks {false_rollbacks} of {len(healthy)} healthy "
        f"({100 * false_rollbacks / max(1, len(healthy)):.1f} %); {all_false} rollbacks in "
        f"{clean} checks of a still-healthy v2 in all scenarios",
    ]
    if clean and not all_false:
        # Rule of three: with none in N checks, the per-check rate is < 3/N (95 %), if checks
        # were independent (overlapping windows make them less so: the bound is optimistic).
        bound = 3 / clean
        lines.append(
            f"  per-check false-rollback rate < {bound:.1e} (95 %); over the guide's "
            f"{GUIDE_CHECKS:,}-check schedule that bounds a false rollback at "
            f"< {100 * (1 - (1 - bound) ** GUIDE_CHECKS):.0f} %"
        )
    rolled = [o.rolled_back for o in healthy if o.rolled_back is not None]
    if rolled:
        lines.append(f"  median check of a false rollback: {median(rolled):g}")
    causes = Counter(f for o in healthy for f in o.failures)
    if causes:
        total = sum(causes.values())
        top = ", ".join(f"{c} {100 * n / total:.0f} %" for c, n in causes.most_common(6))
        lines.append(f"  failed checks of healthy rollouts by first failing criterion: {top}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=1000, help="rollouts per policy")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    began = time.perf_counter()
    before = baseline_calls_per_second()
    spec = bench_spec()
    keys = series_keys(spec)
    policy = flagger_policy(spec)
    seeds = random.Random(args.seed)
    plan = [(SCENARIOS[i % len(SCENARIOS)], seeds.getrandbits(64)) for i in range(args.rollouts)]
    clock = Clock()
    default = [run_default(spec, s, seed, keys, clock) for s, seed in plan]
    flagger = [run_flagger(policy, s, seed, keys) for s, seed in plan]
    after = baseline_calls_per_second()
    elapsed = time.perf_counter() - began

    rows = []
    for scenario in SCENARIOS:
        for name, outcomes in (("default", default), ("flagger-like", flagger)):
            rows.append(row(name, scenario, [o for o in outcomes if o.scenario == scenario]))
    print(table(rows))
    print()
    for name, outcomes in (("default", default), ("flagger-like", flagger)):
        print("\n".join(summary(name, outcomes)))
    baseline = (before + after) / 2
    rate = clock.calls / clock.seconds
    print(
        f"elapsed {elapsed:.1f} s; decide() (through Replayer.feed): {clock.calls} decisions, "
        f"{rate:,.0f}/s; trivial call loop {baseline:,.0f}/s (before {before:,.0f}, after "
        f"{after:,.0f}); ratio {rate / baseline:.2e} (one decision ≈ {baseline / rate:,.0f} "
        f"trivial calls)"
    )


if __name__ == "__main__":
    main()
