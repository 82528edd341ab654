"""Do shard Jobs on one rate-limited API key share it, and how far does sharding scale here?

    .venv/bin/python -m benchmarks.shards [--rows 1000000] [--shards 1,2,4] [--tpm 300000]
        [--duration 60] [--warmup 5] [--latency 0.2] [--unlimited] [--only-unlimited]
        [--batch-size 100] [--concurrency 4] [--limiter bucket --window 60 --reset-report first]

Issue 17 §2. In Kubernetes, N shard Jobs (``embedshift migrate run --shard i/N``) run together
against one embedding API key; each process has its own pacer (``rag_service.providers.retry``)
that learns the key's limit from the server's ``x-ratelimit-*`` headers, so the pacers share the
key without talking to each other. This runs exactly that on one machine, with nothing mocked:

- one database on a private PostgreSQL (``DATABASE_URL`` to use another server) holding the
  sample corpus (:func:`rag_service.testing.corpus.create_corpus`, chunk-sized documents of
  60–120 words, ids 1..rows, no v1 column), created **once** and reused by every cell;
- ``migrate setup`` once, for ``openai:text-embedding-3-small@256`` at the local embedding API's
  base URL (``rag_service.testing.embedding_server`` as a subprocess, started as
  ``benchmarks.ratelimit`` starts it). One server serves the whole run: the side table records
  its endpoint (the base URL's digest, port included) as part of its identity, so a server on
  another port would be refused by the workers. Between cells it is reset through
  ``POST /_control`` (``{"tpm": …, "reset": true}``: its record cleared, its limiter full, as
  a fresh server's);
- per cell, the side table reset (``TRUNCATE`` of the side table, the status and checkpoint
  tables: the queue stays empty, as nothing writes the source; the counters' TRUNCATE trigger
  keeps them right) and a ``CHECKPOINT``, so no cell inherits another's rows or dirty pages; then
  N real ``migrate run --shard i/N`` processes started together (the API key in
  ``EMBEDSHIFT_TARGET_API_KEY``, as the operator's Jobs get it) and stopped by SIGTERM
  ``--duration`` seconds after the server admitted the first request. The clock starts there,
  not at the spawn: on a shared 2-core machine, N Pythons importing the SDKs at once take
  seconds to tens of seconds before they send anything (in a cluster each pod has its own
  CPU); the table shows that start-up ("first request"). On SIGTERM ``migrate run`` starts no
  new batch and writes the ones under way, as in a deleted Job's pod (the tokens of requests
  admitted before the SIGTERM count as used, as they would be billed; none is started after
  it). At 1M rows a cell never finishes the corpus: cells are time-bounded on purpose.

**Rate-limited cells** (a ``--tpm`` limit, enforced by ``--limiter``, default a 60-s bucket):
from the server's own record of every request, as ``benchmarks/ratelimit.py`` computes them,

- the budget used: tokens admitted ÷ the most the limiter could admit over the run
  (:meth:`rag_service.testing.embedding_server.Limiter.share_of_budget`), the run starting at
  the first admission and ending at the SIGTERM (target ≥ 0.95). The admissions are sorted by
  the time they were decided first: the server records a request when it answers, not when it
  admits it;
- the share of requests answered 429 (target < 1 %).

**Unlimited cells** (``--unlimited``; ``--only-unlimited`` skips the limited ones): no limit, so
the shards run as fast as this machine lets them. Measured over a steady window, from
``--warmup`` seconds after the first admission and once every shard has committed a batch
(imports, connections and opening counts of pending rows are left out) to the SIGTERM, or to
the moment every worker had exited when the corpus was finished first: rows committed (the
status table's rows) ÷ the window, and the CPU each part used in it, in cores (CPU-seconds ÷
seconds) and in CPU-ms per row, from ``/proc/<pid>/stat`` (user + system): PostgreSQL (every
server process and what the postmaster reaped from exited backends,
:class:`benchmarks.control_loop.ServerCpu`), the embedding server and the workers; "other" is
the machine's busy time from ``/proc/stat`` less those (other programs on a shared machine).
The verdict says where the scaling stops, what holds the cores there, and, from the CPU per
row, the ceiling of this machine and where PostgreSQL alone would be the limit. The embedding
server is one Python process whose handlers hold the GIL while they hash and encode: at about
one core it is the test double, not embedshift or PostgreSQL, that limits, and the verdict
says so.

Exit status 0 when every rate-limited cell met both targets (the unlimited cells have no
target: they describe); 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.control_loop import CLOCK_TICKS, ServerCpu, _stat  # noqa: E402
from benchmarks.ratelimit import API_KEY, budget_from_record, server_stats, start_server  # noqa: E402
from rag_service.schema import ident, layout_for, setup  # noqa: E402
from rag_service.spec import DataPlaneSpec  # noqa: E402
from rag_service.testing.corpus import CHUNK_SIZED, create_corpus  # noqa: E402
from rag_service.testing.postgres import create_database, drop_database, postgres_server  # noqa: E402

TABLE = "documents"
MIGRATION = "default/bench-shards"
MODEL = "text-embedding-3-small"
DIMENSIONS = 256
GOAL_BUDGET = 0.95
GOAL_REFUSED = 0.01
# A worker that has not exited this long after SIGTERM (it writes its batches under way first)
# is killed.
KILL_AFTER = 10.0
# The longest the workers may take to send their first request before the cell starts anyway.
START_TIMEOUT = 120.0


@dataclass
class Sample:
    """Counters read at one moment of a cell."""

    at: float  # time.monotonic()
    rows: int  # rows committed so far (the status table)
    postgres: float | None  # CPU-seconds; None: not readable (a remote server)
    server: float
    workers: float
    machine: float  # busy CPU-seconds of the whole machine


@dataclass
class Cell:
    mode: str  # "limited" or "unlimited"
    shards: int
    tpm: int
    started: float
    deadline: float  # when the workers were told to stop (SIGTERM), time.monotonic()
    window: tuple[Sample, Sample]
    finished_early: bool  # every worker exited before the deadline (the corpus was done)
    exit_codes: list[int]
    failed_batches: int
    stats: dict[str, Any] = field(repr=False)
    errors: list[str] = field(default_factory=list)

    @property
    def first_request(self) -> float | None:
        """Seconds from the workers' start to the server's first admission (their start-up:
        imports, connections, the opening count of pending rows); None: none admitted."""
        times = [r["time"] for r in self.stats["records"] if r["status"] == 200]
        if not times:
            return None
        return float(min(times) + self.stats["monotonic_origin"]) - self.started

    @property
    def rows(self) -> int:
        return self.window[1].rows

    @property
    def seconds(self) -> float:
        return self.window[1].at - self.window[0].at

    @property
    def rows_per_second(self) -> float:
        return (self.window[1].rows - self.window[0].rows) / self.seconds

    def cores(self, part: str) -> float | None:
        before, after = getattr(self.window[0], part), getattr(self.window[1], part)
        if before is None or after is None:
            return None
        return float(after - before) / self.seconds


# -- CPU from /proc


def process_seconds(pid: int) -> float:
    """CPU-seconds of a process so far: its own and its reaped children's (user + system).
    A zombie (exited, not yet reaped) still reports its times; 0 once it is gone."""
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS


def exited(pid: int) -> bool:
    """Whether a child has exited (a zombie: this process reaps it later, so that its CPU
    times stay readable until the window closes)."""
    try:
        return _stat(pid)[0] in ("Z", "X")
    except OSError:
        return True


def machine_seconds() -> float:
    """Busy CPU-seconds of the whole machine (every core), from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / CLOCK_TICKS


# -- the corpus, the spec, the server


def target_spec(base_url: str, dimensions: int = DIMENSIONS) -> DataPlaneSpec:
    """What the workers' flags resolve to (``--table --category-column --target
    --target-base-url``): setup must record the same identity, endpoint included."""
    return DataPlaneSpec.model_validate(
        {
            "database": {"table": TABLE, "categoryColumn": "category"},
            "target": {
                "provider": "openai",
                "model": MODEL,
                "dimensions": dimensions,
                "baseURL": base_url,
            },
        }
    )


def control(url: str, knobs: dict[str, Any]) -> None:
    """``POST /_control``: set the server's knobs (``reset`` clears its record and refills)."""
    request = urllib.request.Request(  # noqa: S310 (the local server's http URL)
        f"{url}/_control",
        data=json.dumps(knobs).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30):  # noqa: S310
        pass


def reset_side_table(url: str, spec: DataPlaneSpec) -> None:
    """An empty side table, status and checkpoint (the queue is empty: nothing writes the
    source), and a CHECKPOINT so the last cell's dirty pages are not written during this one."""
    layout = layout_for(spec, id_type="bigint")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("TRUNCATE {}, {}, {}").format(
                ident(layout.target), ident(layout.status), ident(layout.checkpoint)
            )
        )
        conn.execute("CHECKPOINT")


def committed(url: str, spec: DataPlaneSpec) -> tuple[int, int]:
    """(rows committed, failed batches) from the status table (a few thousand rows at most)."""
    layout = layout_for(spec, id_type="bigint")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT COALESCE(sum(rows), 0), count(*) FILTER (WHERE status = 'failed') FROM {}"
            ).format(ident(layout.status))
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def shards_committed(url: str, spec: DataPlaneSpec) -> int:
    """How many shards have committed a batch so far."""
    layout = layout_for(spec, id_type="bigint")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(DISTINCT shard) FROM {}").format(ident(layout.status))
        ).fetchone()
    return int(row[0]) if row else 0


# -- one cell


def worker_command(args: argparse.Namespace, base_url: str, index: int, count: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "embedshift_operator.cli",
        "migrate",
        "run",
        "--table",
        TABLE,
        "--category-column",
        "category",
        "--target",
        f"openai:{MODEL}@{DIMENSIONS}",
        "--target-base-url",
        base_url,
        "--migration",
        MIGRATION,
        "--shard",
        f"{index}/{count}",
        "--batch-size",
        str(args.batch_size),
        "--concurrency",
        str(args.concurrency),
        "--json",  # JSON lines to stdout (discarded) rather than a progress bar on stderr
    ]


def sample(
    url: str, spec: DataPlaneSpec, pg: ServerCpu | None, server: int, workers: list[int]
) -> Sample:
    rows, _ = committed(url, spec)
    return Sample(
        at=time.monotonic(),
        rows=rows,
        postgres=pg.seconds() if pg else None,
        server=process_seconds(server),
        workers=sum(process_seconds(pid) for pid in workers),
        machine=machine_seconds(),
    )


def first_admission(server_url: str, pids: Sequence[int]) -> float | None:
    """When the server admitted its first request (``time.monotonic()``), polled from its
    record; None when every worker exited first or none came within :data:`START_TIMEOUT`."""
    until = time.monotonic() + START_TIMEOUT
    while time.monotonic() < until:
        stats = server_stats(server_url)
        times = [r["time"] for r in stats["records"] if r["status"] == 200]
        if times:
            return float(min(times) + stats["monotonic_origin"])
        if all(exited(pid) for pid in pids):
            return None
        time.sleep(0.2)
    return None


def run_cell(
    args: argparse.Namespace,
    *,
    mode: str,
    shards: int,
    db_url: str,
    spec: DataPlaneSpec,
    server: subprocess.Popen[str],
    server_url: str,
    pg: ServerCpu | None,
) -> Cell:
    tpm = args.tpm if mode == "limited" else 0
    reset_side_table(db_url, spec)
    control(server_url, {"tpm": tpm, "reset": True})
    # No EMBEDSHIFT_* of the caller's (EMBEDSHIFT_CONFIG would add a manifest's settings).
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSHIFT_")}
    env.update(DATABASE_URL=db_url, EMBEDSHIFT_TARGET_API_KEY=API_KEY)
    with contextlib.ExitStack() as stack:
        # Each worker's stderr, read back only when it ended in an error.
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(shards)]
        return _run_workers(
            args, mode, shards, tpm, db_url, spec, server, server_url, pg, env, logs
        )


def _run_workers(
    args: argparse.Namespace,
    mode: str,
    shards: int,
    tpm: int,
    db_url: str,
    spec: DataPlaneSpec,
    server: subprocess.Popen[str],
    server_url: str,
    pg: ServerCpu | None,
    env: dict[str, str],
    logs: Sequence[IO[str]],
) -> Cell:
    started = time.monotonic()
    workers = [
        subprocess.Popen(
            worker_command(args, f"{server_url}/v1", index, shards),
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for index, log in enumerate(logs)
    ]
    pids = [w.pid for w in workers]
    try:
        # The cell's clock starts at the first admission, not at the spawn: on a shared 2-core
        # machine N Pythons importing the SDKs at once take seconds to tens of seconds to send
        # anything (in a cluster each pod has its own CPU), and a run shortened by that would
        # measure the start-up, not how the pacers share the key.
        begun = first_admission(server_url, pids) or time.monotonic()
        deadline = begun + args.duration
        time.sleep(max(0.0, begun + min(args.warmup, args.duration / 2) - time.monotonic()))
        # The steady window opens once every shard has committed a batch too: a shard still
        # importing would put its start-up in the window's CPU and leave its rows out.
        while (
            shards_committed(db_url, spec) < shards
            and time.monotonic() < begun + args.duration / 2
            and not all(exited(pid) for pid in pids)
        ):
            time.sleep(0.25)
        first = sample(db_url, spec, pg, server.pid, pids)
        finished_early = False
        while time.monotonic() < deadline:
            if all(exited(pid) for pid in pids):
                finished_early = True
                break
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        last = sample(db_url, spec, pg, server.pid, pids)
        deadline = min(deadline, time.monotonic())  # the run's end: now, as they are stopped
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        codes = []
        for worker in workers:
            try:
                codes.append(worker.wait(timeout=KILL_AFTER))
            except subprocess.TimeoutExpired:
                worker.kill()
                codes.append(worker.wait())
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    # The server records a request when it has answered it: the ones admitted just before the
    # SIGTERM are written a latency later, whether or not anyone still listens.
    time.sleep(args.latency + 0.5)
    stats = server_stats(server_url)
    _, failed = committed(db_url, spec)
    errors = []
    for worker, code, log in zip(workers, codes, logs, strict=True):
        # 143 is how a worker stopped by SIGTERM ends (-SIGTERM if the signal came before its
        # handler was installed); 0 is a worker that finished the corpus.
        if code not in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
            log.seek(0)
            tail = log.read().strip().splitlines()[-3:]
            errors.append(f"worker pid {worker.pid} exit {code}: {' | '.join(tail)}")
    return Cell(
        mode=mode,
        shards=shards,
        tpm=tpm,
        started=started,
        deadline=deadline,
        window=(first, last),
        finished_early=finished_early,
        exit_codes=codes,
        failed_batches=failed,
        stats=stats,
        errors=errors,
    )


# -- the rate limit, from the server's record


@dataclass(frozen=True)
class BudgetUse:
    budget: float
    requests: int
    refused: int
    ok_tokens: int

    @property
    def refused_share(self) -> float:
        return self.refused / self.requests if self.requests else 0.0

    @property
    def met(self) -> bool:
        return self.budget >= GOAL_BUDGET and self.refused_share < GOAL_REFUSED


def budget_use(cell: Cell, args: argparse.Namespace) -> BudgetUse:
    """As ``benchmarks.ratelimit.run_cell`` computes it: the limiter rebuilt as the server
    started it, the run from the first admission to the SIGTERM on the records' clock."""
    stats = cell.stats
    _, budget, refused = budget_from_record(stats, tpm=cell.tpm, deadline=cell.deadline, args=args)
    return BudgetUse(budget, len(stats["records"]), refused, int(stats["ok_tokens"]))


# -- reports


def describe_cell(cell: Cell, args: argparse.Namespace) -> str:
    line = (
        f"  {cell.shards} shard(s): {cell.rows:,} rows committed, "
        f"{cell.rows_per_second:,.0f} rows/s over {cell.seconds:.1f} s"
        + (" (corpus finished early)" if cell.finished_early else "")
        + (
            "; no request admitted"
            if cell.first_request is None
            else f"; first request {cell.first_request:.1f} s after the start"
        )
    )
    if cell.mode == "limited":
        use = budget_use(cell, args)
        line += (
            f"; budget used {use.budget:.3f}, 429s {use.refused} of {use.requests} "
            f"({use.refused_share:.2%})"
        )
        records = cell.stats["records"]
        if use.refused and records:
            # When the refusals came (from the first request): at the start, while pacers that
            # have not heard from the server yet spend the same room, or all along.
            origin = min(r["time"] for r in records)
            at = sorted(r["time"] - origin for r in records if r["status"] == 429)
            line += " at +" + ", +".join(f"{t:.1f}" for t in at[:8]) + " s"
    if cell.failed_batches:
        line += f"; {cell.failed_batches} FAILED batches"
    return line


def limited_table(cells: list[Cell], args: argparse.Namespace) -> bool:
    print(
        f"\nrate-limited: one key, {args.tpm:,} TPM ({args.limiter}, {args.window:g}-s window), "
        f"latency {args.latency * 1000:.0f} ms, {args.duration:g} s per cell"
    )
    print(
        "| shards | first request | requests | tokens admitted | rows committed | budget used "
        "| 429s | met |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for cell in cells:
        use = budget_use(cell, args)
        met = use.met and not cell.errors
        ok &= met
        first = "-" if cell.first_request is None else f"{cell.first_request:.1f} s"
        print(
            f"| {cell.shards} | {first} | {use.requests} | {use.ok_tokens:,} "
            f"| {cell.rows:,} "
            f"| {use.budget:.3f} | {use.refused} ({use.refused_share:.2%}) | "
            f"{'yes' if met else '**no**'} |"
        )
    print(f"targets: budget used ≥ {GOAL_BUDGET}, 429s < {GOAL_REFUSED:.0%} of requests")
    return ok


PARTS = {"postgres": "PostgreSQL", "server": "embedding server", "workers": "workers"}


def unlimited_table(cells: list[Cell], args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    print(
        f"\nunlimited: no rate limit, latency {args.latency * 1000:.0f} ms, batch "
        f"{args.batch_size} × concurrency {args.concurrency} per worker, {cores} cores; CPU in "
        "cores over the steady window, and in CPU-ms per row committed"
    )
    print(
        "| shards | window | rows/s | × 1 shard | PostgreSQL | embedding server | workers "
        "| other | machine busy | ms/row PG / server / workers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = cells[0].rows_per_second if cells else 0.0

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    for cell in cells:
        ours = [cell.cores(part) for part in PARTS]
        machine = cell.cores("machine") or 0.0
        other = machine - sum(c or 0.0 for c in ours)
        per_row = " / ".join(
            "n/a"
            if c is None or not cell.rows_per_second
            else f"{c / cell.rows_per_second * 1000:.3f}"
            for c in ours
        )
        print(
            f"| {cell.shards} | {cell.seconds:.0f} s"
            + (" (done early)" if cell.finished_early else "")
            + f" | {cell.rows_per_second:,.0f} | "
            f"{cell.rows_per_second / base if base else 0:.2f} | {shown(ours[0])} | "
            f"{shown(ours[1])} | {shown(ours[2])} | {other:.2f} | {machine:.2f} | {per_row} |"
        )
    # A corpus finished before or soon after the window opened measures the run's tail, not
    # its pace: left out of the verdict.
    measured = [c for c in cells if not c.finished_early or c.rows_per_second * c.seconds >= 1000]
    if len(measured) < len(cells):
        print("cells whose corpus was done by the window's start are left out: raise --rows")
    for line in verdict(measured, cores):
        print(line)


def verdict(cells: list[Cell], cores: int) -> list[str]:
    """Where the scaling stops, what holds the cores there, and where PostgreSQL would be the
    limit, from the figures alone."""
    if not cells or not cells[0].rows_per_second:
        return []
    stop = None
    for before, after in itertools.pairwise(cells):
        if after.rows_per_second < 1.15 * before.rows_per_second:
            stop = after
            break
    last = stop or cells[-1]
    used = {part: last.cores(part) or 0.0 for part in PARTS}
    busiest = max(used, key=lambda part: used[part])
    machine = last.cores("machine") or 0.0
    other = max(0.0, machine - sum(used.values()))
    before = cells[cells.index(last) - 1]
    lines = [
        (
            f"scaling stops after {before.shards} shard{'s' if before.shards > 1 else ''} "
            f"({before.rows_per_second:,.0f} rows/s, "
            f"{before.rows_per_second / cells[0].rows_per_second:.2f}× one shard; "
            f"{last.shards} give {last.rows_per_second:,.0f})"
            if stop
            else f"throughput still grows at {last.shards} shards"
        )
        + (
            f": the machine's {cores} cores are busy ({machine:.2f})"
            if machine >= 0.9 * cores
            else ": the embedding server is at one core, all its GIL lets it use"
            if used["server"] >= 0.9
            else f": the cores are not saturated ({machine:.2f} of {cores}), so it is latency"
            " (the server's, the pipeline's) that bounds it"
        )
        + f"; the largest share goes to the {PARTS[busiest]}, {used[busiest]:.2f} cores"
    ]
    if other >= 0.25:
        lines.append(
            f"the machine was shared: other programs used {other:.2f} cores of {cores}, so "
            "rows/s are lower bounds and the scaling is theirs as much as ours; the CPU per row "
            "below is what to compare"
        )
    # CPU per row at the most shards: PostgreSQL's grows with the shard count, since every
    # shard pages the whole id range and drops the other shards' rows (shard_filter).
    most = cells[-1]
    if not most.rows_per_second:
        return lines
    per_row = {part: (most.cores(part) or 0.0) / most.rows_per_second for part in PARTS}
    total = sum(per_row.values())
    trend = ", ".join(
        f"{(cell.cores('postgres') or 0.0) / cell.rows_per_second * 1000:.3f} ms at {cell.shards}"
        for cell in cells
        if cell.rows_per_second
    )
    if total > 0 and per_row["postgres"] > 0:
        lines.append(
            f"CPU per row at {most.shards} shards: PostgreSQL {per_row['postgres'] * 1000:.3f} "
            f"ms, embedding server {per_row['server'] * 1000:.3f} ms, workers "
            f"{per_row['workers'] * 1000:.3f} ms (PostgreSQL's by shard count: {trend}). On "
            f"{cores} idle cores shared by all three, as here, the ceiling is "
            f"≈{cores / total:,.0f} rows/s; PostgreSQL alone is the limit only once the workers "
            f"and the embedding run elsewhere (separate pods, a remote API), at "
            f"≈{cores / per_row['postgres']:,.0f} rows/s for {cores} cores of database at this "
            f"shard count (its share here: {per_row['postgres'] / total:.0%} of the CPU per row)"
        )
    return lines


# -- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=lambda v: int(v.replace("_", "")), default=1_000_000)
    parser.add_argument("--shards", default="1,2,4", help="shard counts, comma-separated")
    parser.add_argument("--tpm", type=int, default=300_000, help="the key's tokens per minute")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per cell")
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="unlimited: seconds left out at a cell's start"
    )
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    parser.add_argument("--unlimited", action="store_true", help="also run the unlimited cells")
    parser.add_argument(
        "--only-unlimited", action="store_true", help="run the unlimited cells only"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="migrate run --batch-size")
    parser.add_argument("--concurrency", type=int, default=4, help="migrate run --concurrency")
    parser.add_argument("--limiter", choices=("bucket", "sliding", "fixed"), default="bucket")
    parser.add_argument("--window", type=float, default=60.0, help="limiter window, seconds")
    parser.add_argument("--reset-report", choices=("first", "empty"), default="first")
    args = parser.parse_args()
    counts = [int(s) for s in args.shards.split(",") if s.strip()]
    modes = (["limited"] if not args.only_unlimited else []) + (
        ["unlimited"] if args.unlimited or args.only_unlimited else []
    )
    began = time.monotonic()
    cells: dict[str, list[Cell]] = {mode: [] for mode in modes}
    with postgres_server() as admin:
        pg = ServerCpu.find(admin)
        if pg is None:
            print("PostgreSQL's CPU cannot be read from /proc (remote server?): n/a below")
        name, db_url = create_database(admin, prefix="bench_shards")
        # start_server reads tpm, latency, limiter, window and reset_report; tpm 0 is no limit.
        server_args = argparse.Namespace(**{**vars(args), "tpm": 0})
        server, server_url = start_server(server_args)
        try:
            spec = target_spec(f"{server_url}/v1")
            at = time.monotonic()
            create_corpus(
                db_url, table=TABLE, count=args.rows, source_dimensions=0,
                sentence_count=CHUNK_SIZED,
            )  # fmt: skip
            asyncio.run(setup(db_url, spec, migration=MIGRATION))
            print(f"corpus of {args.rows:,} rows + setup in {time.monotonic() - at:.1f} s")
            for mode in modes:
                print(f"{mode}:", flush=True)
                for shards in counts:
                    cell = run_cell(
                        args,
                        mode=mode,
                        shards=shards,
                        db_url=db_url,
                        spec=spec,
                        server=server,
                        server_url=server_url,
                        pg=pg,
                    )
                    cells[mode].append(cell)
                    print(describe_cell(cell, args), flush=True)
                    for error in cell.errors:
                        print(f"    {error}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
            drop_database(admin, name)
    ok = True
    if "limited" in cells:
        ok = limited_table(cells["limited"], args)
    if "unlimited" in cells:
        unlimited_table(cells["unlimited"], args)
        ok &= not any(cell.errors for cell in cells["unlimited"])
    print(f"\nwhole run {(time.monotonic() - began) / 60:.1f} min")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
