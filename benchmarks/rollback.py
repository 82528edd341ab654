"""Rollback latency: from a breach Prometheus shows, or a ``maxPercentage: 0`` edit, to v2 at 0 %.

    .venv/bin/python benchmarks/rollback.py [--repeats 10] [--interval 1s 5s] [--rows 600]

Real parts throughout: a private PostgreSQL + pgvector, a corpus of ``--rows`` documents, a real
Prometheus scraping (every 0.5 s) an exporter of the metric contract whose v2 error share this
script sets (:class:`rag_service.testing.traffic.ContractTraffic`), and ``embedshift rollout run
FILE --json`` as a subprocess with ``--tick`` at its default (1 s): the product as shipped. The
migration uses second-scale steps and a 5 s analysis window; the default rollback thresholds
(v2 error rate > 10 %, ``for: 1``) are in force. For each analysis interval, each repeat:

(b) with v2 routed, wait a random 0–interval, then atomically replace the file with
    ``maxPercentage: 0`` and time until the routing row (``embedshift_rollout``) reads 0 %.
    Goal ≤ 2 s. The file is then set back to 100 (a retry from step 1) and v2 routed again.
(a) with v2 routed, wait a random 0–interval, set v2's error share to 50 %, poll Prometheus
    (every 20 ms) with the very PromQL the criterion uses (``rag_service.criteria.metric_query``)
    until it shows the breach, and time from the query that first showed it until the routing
    row reads 0 %. Goal ≤ one interval + 1 s. Then v2 heals, the window empties of errors, and
    an edit of the file (a retry) routes v2 again.

The routing row is polled every 10 ms on an open connection. Each rollback is checked to be the
one measured (history reason ``ThresholdBreached`` or ``ManualRollback``), and its history entry
time (the ``now`` of the driver's tick that acted, wall clock) splits each latency into the wait
for that tick and the tick's own work until the row was written.

Baseline, measured in the same run (5 samples per repeat, interleaved): the floor of any driver,
a direct ``UPDATE embedshift_rollout … ; SELECT pg_notify(…)`` in one transaction on an open
psycopg connection, then a read-back of the row on another. Also shown: the same with a fresh
connection for the write, as the driver's ``ControlStore`` does. Exit status 0 means every
repeat met its goal.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import psycopg
from prometheus_client import CollectorRegistry

from rag_service.criteria import metric_query
from rag_service.testing.corpus import create_corpus
from rag_service.testing.postgres import create_database, drop_database, postgres_server
from rag_service.testing.prometheus import PrometheusProcess, running_prometheus, serving_metrics
from rag_service.testing.rollout import Driver, driving, manifest, routing, status, write
from rag_service.testing.traffic import ContractTraffic, VersionTraffic

T = TypeVar("T")

NAME = "rollback"
MIGRATION = f"default/{NAME}"
FLOOR_ROW = "bench/floor"
TABLE = "docs"
WINDOW = "5s"
SCRAPE = "500ms"
THRESHOLD = 0.10  # the default rollback threshold: v2 error rate > 10 %
HEALTHY = VersionTraffic(
    provider="local", model="hash", requests_per_second=40, cost_usd_per_request=0.0
)
DEGRADED = replace(HEALTHY, error_share=0.5)
ROW_POLL = 0.01
PROMETHEUS_POLL = 0.02
FLOOR_PER_REPEAT = 5
PIPELINE = 300  # seconds for setup → run → index → verify on a busy 2-core box
ROUTED = ("Progressing", "Promoted")
ERROR_RATE = metric_query("error_rate", version="v2", migration=MIGRATION, window=WINDOW)


@dataclass
class Sample:
    seconds: float
    wait: float  # from the event to the start of the driver's tick that acted
    percentage: int  # v2's share just before the rollback
    period: float | None = None  # (a): the acting check's start − the previous check's start
    phase: float | None = None  # (a): where in that period the breach became visible (0–1)


@dataclass
class Block:
    """One analysis interval's measurements."""

    interval: str
    breach: list[Sample] = field(default_factory=list)
    edit: list[Sample] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    floor_connect: list[float] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before / after
    breach_to_visible: list[float] = field(default_factory=list)  # degrade → Prometheus shows it

    @property
    def seconds(self) -> float:
        return _duration(self.interval)


def _duration(interval: str) -> float:
    return float(interval.removesuffix("s"))


class Stopwatch:
    """Monotonic time for differences, wall time to line up with the driver's history."""

    def __init__(self) -> None:
        self.offset = time.time() - time.perf_counter()

    def wall(self, perf: float) -> float:
        return perf + self.offset


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    driver: Driver,
    every: float = 0.05,
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if driver.process.poll() is not None:
            tail = "\n".join(driver.stderr[-20:])
            code = driver.process.returncode
            raise SystemExit(f"the driver exited ({code}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            events = "\n".join(str(e) for e in driver.events[-10:])
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}:\n{events}")
        time.sleep(every)


class World:
    def __init__(
        self,
        url: str,
        prometheus: PrometheusProcess,
        traffic: ContractTraffic,
        path: Path,
        driver: Driver,
    ) -> None:
        self.url = url
        self.prometheus = prometheus
        self.traffic = traffic
        self.path = path
        self.driver = driver
        self.http = httpx.Client(base_url=prometheus.url, timeout=10)
        self.poller = psycopg.connect(url, autocommit=True)
        self.writer = psycopg.connect(url, autocommit=True)
        self.clock = Stopwatch()
        self.document: dict[str, Any] = {}
        self.retries = 0

    def close(self) -> None:
        self.http.close()
        self.poller.close()
        self.writer.close()

    # ---- reads --------------------------------------------------------------------------------

    def error_rate(self) -> float | None:
        answer = self.http.get("/api/v1/query", params={"query": ERROR_RATE}).json()
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def healed(self) -> bool:
        value = self.error_rate()
        return value is not None and value < 0.001

    def last_check(self) -> float | None:
        """When the driver's latest analysis check started (wall clock), from its status."""
        row = self.poller.execute(
            "SELECT status->'analysis'->>'time' FROM embedshift_rollout_status "
            "WHERE migration = %s",
            [MIGRATION],
        ).fetchone()
        return None if row is None or row[0] is None else datetime.fromisoformat(row[0]).timestamp()

    def percentage(self) -> int:
        row = self.poller.execute(
            "SELECT percentage FROM embedshift_rollout WHERE migration = %s", [MIGRATION]
        ).fetchone()
        assert row is not None
        return int(row[0])

    def routed(self) -> int | None:
        current = status(self.url, MIGRATION)
        if current is None or current.get("phase") not in ROUTED:
            return None
        row = routing(self.url, MIGRATION)
        return row[0] if row and row[0] > 0 else None

    def rolled_back_by(self, reason: str) -> dict[str, Any] | None:
        current = status(self.url, MIGRATION)
        if current is None or current.get("phase") != "RolledBack":
            return None
        last: dict[str, Any] = current["history"][-1]
        if last["reason"] != reason:
            raise SystemExit(f"rolled back for {last['reason']} ({last['message']}), not {reason}")
        return last

    # ---- the file -----------------------------------------------------------------------------

    def apply(self, document: dict[str, Any]) -> None:
        self.document = document
        write(self.path, document)

    def retry(self) -> None:
        """A retry after a rollback: a commit that changes the rollout (here, the last step's
        hold), as DESIGN asks; the driver restarts at step 1."""
        self.retries += 1
        self.document["spec"]["rollout"]["steps"][-1]["minDuration"] = f"{60 + self.retries}m"
        self.apply(self.document)

    def set_cap(self, cap: int) -> float:
        self.document["spec"]["rollout"]["maxPercentage"] = cap
        started = time.perf_counter()
        self.apply(self.document)
        return started

    # ---- measurements -------------------------------------------------------------------------

    def until_zero(
        self, since: float, checks: set[float] | None = None, timeout: float = 30
    ) -> float:
        """Poll the routing row every 10 ms; the time it first read 0 %. ``checks`` collects the
        start times of the driver's checks seen meanwhile."""
        while True:
            if self.percentage() == 0:
                return time.perf_counter()
            if checks is not None and (checked := self.last_check()) is not None:
                checks.add(checked)
            if time.perf_counter() - since > timeout:
                raise SystemExit(f"the routing row was not at 0 % {timeout:.0f}s after the event")
            time.sleep(ROW_POLL)

    def wait_routed(self, what: str) -> int:
        return wait_until(what, self.routed, timeout=60, driver=self.driver, every=0.05)

    def floor(self, block: Block, rng: random.Random) -> None:
        """The floor of any driver: UPDATE + NOTIFY in one transaction, read back elsewhere."""
        for _ in range(FLOOR_PER_REPEAT):
            block.floor.append(self._floor_once(self.writer))
            started = time.perf_counter()
            with psycopg.connect(self.url, autocommit=True) as fresh:
                block.floor_connect.append(self._floor_once(fresh) + time.perf_counter() - started)
            time.sleep(rng.uniform(0, 0.02))

    def _floor_once(self, writer: psycopg.Connection[Any]) -> float:
        started = time.perf_counter()
        with writer.transaction():
            writer.execute(
                "UPDATE embedshift_rollout SET percentage = 0, reason = 'floor', "
                "updated_at = now() WHERE migration = %s",
                [FLOOR_ROW],
            )
            writer.execute("SELECT pg_notify('embedshift_rollout', %s)", [FLOOR_ROW])
        row = self.poller.execute(
            "SELECT percentage FROM embedshift_rollout WHERE migration = %s", [FLOOR_ROW]
        ).fetchone()
        elapsed = time.perf_counter() - started
        assert row is not None and row[0] == 0
        self.writer.execute(
            "UPDATE embedshift_rollout SET percentage = 50 WHERE migration = %s", [FLOOR_ROW]
        )
        return elapsed

    def edit_to_zero(self, block: Block, rng: random.Random) -> Sample:
        percentage = self.wait_routed("v2 routed before the edit")
        time.sleep(rng.uniform(0, block.seconds))
        percentage = self.percentage() or percentage
        started = self.set_cap(0)
        zero = self.until_zero(started)
        entry = wait_until(
            "the ManualRollback status",
            lambda: self.rolled_back_by("ManualRollback"),
            timeout=10,
            driver=self.driver,
        )
        tick = datetime.fromisoformat(entry["time"]).timestamp()
        self.set_cap(100)
        return Sample(zero - started, tick - self.clock.wall(started), percentage)

    def breach_to_zero(self, block: Block, rng: random.Random) -> Sample:
        percentage = self.wait_routed("v2 routed before the breach")
        time.sleep(rng.uniform(0, block.seconds))
        percentage = self.percentage() or percentage
        degraded = time.perf_counter()
        self.traffic.set_traffic(MIGRATION, "v2", DEGRADED)
        visible = None
        checks: set[float] = set()
        while visible is None:
            if (checked := self.last_check()) is not None:
                checks.add(checked)
            sent = time.perf_counter()
            value = self.error_rate()
            if value is not None and value > THRESHOLD:
                visible = sent
            elif self.percentage() == 0:
                raise SystemExit(
                    "the routing row reached 0 % before this script saw the breach in Prometheus"
                )
            elif sent - degraded > 30:
                raise SystemExit(f"Prometheus did not show the breach in 30 s (last {value})")
            else:
                time.sleep(max(0.0, PROMETHEUS_POLL - (time.perf_counter() - sent)))
        block.breach_to_visible.append(visible - degraded)
        # A check that started before the breach was visible may save its status after it:
        # the previous check is the latest one seen, before or after, that is not the acting one.
        zero = self.until_zero(visible, checks)
        entry = wait_until(
            "the ThresholdBreached status",
            lambda: self.rolled_back_by("ThresholdBreached"),
            timeout=10,
            driver=self.driver,
        )
        tick = datetime.fromisoformat(entry["time"]).timestamp()
        # v2 heals; once the window holds no error, a retry routes it again.
        self.traffic.set_traffic(MIGRATION, "v2", HEALTHY)
        wait_until(
            "the window to heal",
            self.healed,
            timeout=60,
            driver=self.driver,
            every=0.1,
        )
        self.retry()
        period = phase = None
        earlier = [c for c in checks if c < tick - 0.001]
        if earlier:
            period = tick - max(earlier)
            phase = (self.clock.wall(visible) - max(earlier)) / period
        return Sample(zero - visible, tick - self.clock.wall(visible), percentage, period, phase)


def run_block(world: World, interval: str, repeats: int, seed: int) -> Block:
    block = Block(interval)
    rng = random.Random(seed)
    events = len(world.driver.events)
    changed = world.document["spec"]["analysis"]["interval"] != interval
    document = manifest(
        name=NAME,
        prometheus_url=world.prometheus.url,
        table=TABLE,
        shards=1,
        analysis={"interval": interval, "window": WINDOW},
    )
    document["spec"]["rollout"]["steps"][-1]["minDuration"] = "60m"
    document["spec"]["rollout"]["maxPercentage"] = 100
    world.apply(document)
    if changed:
        wait_until(
            f"the driver to take the {interval} interval",
            lambda: any(e.get("reason") == "RolloutChanged" for e in world.driver.events[events:]),
            timeout=30,
            driver=world.driver,
        )
    block.load = (os.getloadavg()[0], 0.0)
    for repeat in range(repeats):
        world.floor(block, rng)
        edit = world.edit_to_zero(block, rng)
        block.edit.append(edit)
        breach = world.breach_to_zero(block, rng)
        block.breach.append(breach)
        print(
            f"  {interval} repeat {repeat + 1:2}: breach → 0 % {breach.seconds * 1000:6.0f} ms "
            f"(tick waited {breach.wait * 1000:5.0f}, check period {_ms(breach.period)}, "
            f"breach at {'n/a' if breach.phase is None else f'{breach.phase:.2f}'} of it, "
            f"from {breach.percentage:3} %); "
            f"edit → 0 % {edit.seconds * 1000:6.0f} ms "
            f"(tick waited {edit.wait * 1000:5.0f}, from {edit.percentage:3} %); "
            f"floor {statistics.median(block.floor[-FLOOR_PER_REPEAT:]) * 1000:.1f} ms",
            flush=True,
        )
    block.load = (block.load[0], os.getloadavg()[0])
    return block


def _ms(seconds: float | None) -> str:
    return "  n/a" if seconds is None else f"{seconds * 1000:5.0f}"


def _summary(values: list[float]) -> tuple[float, float, float]:
    array = np.array(values)
    return (
        float(np.percentile(array, 50)),
        float(np.percentile(array, 95)),
        float(array.max()),
    )


def model(block: Block) -> dict[str, tuple[float, float, float]]:
    """What a uniform landing predicts: an event that lands uniformly within a period P waits
    U(0, P) for the tick that acts, then that tick's work W (measured: latency − wait). For (a)
    P is the check period measured here, for (b) the tick period (check period ÷ ticks per
    check). Returns label → (median, p95, max)."""
    periods = [x.period for x in block.breach if x.period is not None]
    if not periods:
        return {}
    check = statistics.median(periods)
    tick = check / max(1, round(check))
    work_a = statistics.median(x.seconds - x.wait for x in block.breach)
    work_b = statistics.median(x.seconds - x.wait for x in block.edit)
    return {
        "(model) (a) U(0, check period) + W": (
            check / 2 + work_a,
            0.95 * check + work_a,
            check + work_a,
        ),
        "(model) (b) U(0, tick period) + W": (
            tick / 2 + work_b,
            0.95 * tick + work_b,
            tick + work_b,
        ),
    }


def report(blocks: list[Block]) -> bool:
    all_met = True
    print()
    print(
        f"{'interval':>8}  {'measure':<34} {'n':>3} {'median':>9} {'p95':>9} {'max':>9} "
        f"{'× floor (median)':>17} {'goal':>7}  verdict"
    )
    for block in blocks:
        floor = statistics.median(block.floor)
        rows: list[tuple[str, list[float], float | None, bool]] = [
            (
                "(a) breach visible → 0 %",
                [s.seconds for s in block.breach],
                block.seconds + 1,
                True,
            ),
            ("    of which: wait for the tick", [s.wait for s in block.breach], None, False),
            ("(b) maxPercentage: 0 edit → 0 %", [s.seconds for s in block.edit], 2.0, True),
            ("    of which: wait for the tick", [s.wait for s in block.edit], None, False),
            ("floor: UPDATE+NOTIFY, read back", block.floor, None, False),
            ("floor with a fresh connection", block.floor_connect, None, True),
            ("(info) degrade → breach visible", block.breach_to_visible, None, False),
            ("(info) (a) check period", [s.period for s in block.breach if s.period], None, False),
        ]
        for label, values, goal, ratio in rows:
            if not values:
                continue
            median, p95, top = _summary(values)
            times = f"{median / floor:16,.0f}×" if ratio else ""
            verdict = ""
            if goal is not None:
                within = sum(v <= goal for v in values)
                met = within == len(values)
                all_met = all_met and met
                verdict = f"{'met' if met else 'MISSED'} ({within}/{len(values)} within)"
            print(
                f"{block.interval:>8}  {label:<34} {len(values):>3} {median * 1000:7.1f}ms "
                f"{p95 * 1000:7.1f}ms {top * 1000:7.1f}ms {times:>17} "
                f"{f'{goal:.0f} s' if goal else '':>7}  {verdict}"
            )
        for label, (median, p95, top) in model(block).items():
            print(
                f"{block.interval:>8}  {label:<34} {'':>3} {median * 1000:7.1f}ms "
                f"{p95 * 1000:7.1f}ms {top * 1000:7.1f}ms"
            )
        phases = [x.phase for x in block.breach if x.phase is not None]
        if phases:
            quartiles = np.percentile(np.array(phases), [25, 50, 75])
            print(
                f"{'':>8}  where in the check period the breach became visible ({len(phases)}): "
                f"quartiles {quartiles[0]:.2f} / {quartiles[1]:.2f} / {quartiles[2]:.2f} "
                "(uniform: 0.25 / 0.50 / 0.75)"
            )
        print(
            f"{'':>8}  load average (1 min) {block.load[0]:.2f} before, {block.load[1]:.2f} after"
        )
    return all_met


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="per interval (default 10)")
    parser.add_argument(
        "--interval",
        nargs="+",
        choices=["1s", "2s", "5s"],
        default=["1s", "5s"],
        help="spec.analysis.interval values to measure (default 1s 5s)",
    )
    parser.add_argument("--rows", type=int, default=600, help="corpus size (default 600)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()
    print(
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
        f"{args.repeats} repeats per interval {' '.join(args.interval)}",
        flush=True,
    )

    workdir = Path(tempfile.mkdtemp(prefix="embedshift-bench-rollback-"))
    registry = CollectorRegistry()
    traffic_plan = {MIGRATION: {"v1": HEALTHY, "v2": HEALTHY}}
    with postgres_server() as admin:
        name, url = create_database(admin, prefix="bench_rollback")
        try:
            create_corpus(url, table=TABLE, count=args.rows, source_dimensions=32)
            with (
                ContractTraffic(registry, traffic_plan) as traffic,
                serving_metrics(registry) as target,
                running_prometheus(targets=[target], scrape_interval=SCRAPE) as prometheus,
            ):
                prometheus.wait_for_scrape(timeout=30, scrapes=2)
                path = workdir / "rollback.yaml"
                first = manifest(
                    name=NAME,
                    prometheus_url=prometheus.url,
                    table=TABLE,
                    shards=1,
                    analysis={"interval": args.interval[0], "window": WINDOW},
                )
                first["spec"]["rollout"]["steps"][-1]["minDuration"] = "60m"
                write(path, first)
                with driving(path, database_url=url, log_dir=workdir / "logs") as driver:
                    world = World(url, prometheus, traffic, path, driver)
                    try:
                        world.document = first
                        print("migrating the corpus (setup, run, index, verify) …", flush=True)
                        world.wait_routed("the first routed step")
                        world.writer.execute(
                            "INSERT INTO embedshift_rollout (migration, percentage) "
                            "VALUES (%s, 50) ON CONFLICT (migration) DO NOTHING",
                            [FLOOR_ROW],
                        )
                        blocks = [
                            run_block(world, interval, args.repeats, args.seed + i)
                            for i, interval in enumerate(args.interval)
                        ]
                    finally:
                        world.close()
        finally:
            drop_database(admin, name)
            shutil.rmtree(workdir, ignore_errors=True)
    all_met = report(blocks)
    print(f"elapsed {time.monotonic() - started:.0f} s")
    sys.exit(0 if all_met else 1)


if __name__ == "__main__":
    main()
