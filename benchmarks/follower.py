"""The follower under write load: how far behind the application's writes does it run, and from
what write rate on does it fall behind for good?

    .venv/bin/python -m benchmarks.follower [--rows 1000000] [--rates 100,500] [--duration 60]
        [--percentage 50] [--ceiling] [--writers 16] [--drain-timeout 60] [--latency 0]
        [--batch-size N] [--concurrency N] [--dimensions 256]

Issue 17 §2: 100 and 500 updates/s while the rollout is at 50 %: lag p50/p95 (goal p95 ≤ 5 s
at 100/s), and what the rate ceiling is.

Set-up, in a database of its own on a private PostgreSQL (``DATABASE_URL`` to use another
server): the sample corpus of ``--rows`` chunk-sized documents (60–120 words,
:data:`rag_service.testing.corpus.CHUNK_SIZED`, no v1 column), ``migrate setup`` for
``openai:text-embedding-3-small@<--dimensions>`` at the local embedding API
(:mod:`rag_service.testing.embedding_server` as a subprocess, no rate limit, ``--latency``
seconds added per request), the side table **filled by one SQL statement** (a constant vector
and each row's real content hash, as :mod:`benchmarks.control_loop` does: the backfill is not
what is measured here, and a million embeddings would take the run's whole budget), and the
routing row set to ``--percentage``. The percentage changes nothing the follower does (it reads
no routing row: it drains the change queue whatever share of searches v2 serves); it is set
because the issue states the load at 50 %.

Then ``embedshift migrate follow`` runs as shipped, a child process (``python -m
embedshift_operator.cli migrate follow``, the API key in ``EMBEDSHIFT_TARGET_API_KEY``), for the
whole benchmark, as a Deployment's follower would. For each rate of ``--rates`` (and, with
``--ceiling``, each rate after them, ×1.5 until one does not hold):

- **the writer**: ``--duration`` seconds of one-row transactions ``UPDATE documents SET content
  = content || ' Edited <n>.' WHERE id = …`` on ``--writers`` connections, **open loop**: update
  i is due at t0 + i/rate whatever the earlier ones took (a closed loop would slow down with the
  database and hide the overload). If the writer falls behind, the rate it achieved is shown.
  Each update re-words a row not re-worded before in this run while there are any (a row
  updated twice counts only its last update: the first one's text is gone).
- **the lag** of an update is when the side table held its text minus when it committed, both
  on the database's clock: the commit time is ``clock_timestamp()`` from the UPDATE's
  ``RETURNING`` (autocommit: the commit follows within a millisecond), the time it was held is
  the side row's ``embedded_at``, read once after the run for rows whose content hash matches
  the text the update left (``embedded_at`` is ``now()`` of the follower's write transaction, a
  few milliseconds before it commits; the hash guard means it can only hold the new text if it
  read it after the update committed). Nothing is polled per update while the load runs.
- **not drained**: the updates whose text was not in the side table ``--drain-timeout`` seconds
  after the writer stopped (they count as infinite lag in the percentiles).
- **throughput**: drained updates ÷ (last ``embedded_at`` − first commit).
- **RSS** of the follower from ``/proc/<pid>/status`` (VmRSS) every second: at the rate's start,
  its peak and at the end of the drain; **CPU** of the follower, PostgreSQL, the embedding
  server and this process (the writer) as cores used over the window, from ``/proc``; once a
  second the queue's depth (one ``count(*)`` of the queue table) and
  :func:`rag_service.progress.oldest_pending_seconds` (the lag ``migrate status`` reports, beside
  the lag measured here); the batches the follower recorded (its status rows: one commit and
  one API request each, at most) and its wake-ups (drains that settled something, from its log).

A rate **holds** when p95 ≤ 5 s, nothing is left undrained and the lag does not grow through
the run (the median lag of the last quarter of updates ≤ 2 × the first quarter's + 1 s).
``--ceiling`` stops at the first rate that does not hold, or that the writer did not reach (95 %
of it): each one-row commit waits for its WAL flush, so ``--writers`` connections give at most
``--writers`` ÷ the flush time updates per second. The writer, PostgreSQL, the embedding server
and the follower share this machine's cores, so the ceiling found is this machine's, not the
follower's alone: the CPU columns say which was busy.

Goal (issue 17): p95 ≤ 5 s (and nothing undrained) at 100 updates/s. Exit status 0 when the
goals that were measured are met (100/s not among the rates: nothing measured, 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.control_loop import ServerCpu, fill_side_table  # noqa: E402
from benchmarks.shards import target_spec  # noqa: E402
from rag_service.progress import oldest_pending_seconds  # noqa: E402
from rag_service.rollout_row import write_percentage  # noqa: E402
from rag_service.schema import layout_for, rollout_table, setup  # noqa: E402
from rag_service.spec import DataPlaneSpec  # noqa: E402
from rag_service.testing.corpus import CHUNK_SIZED, create_corpus  # noqa: E402
from rag_service.testing.postgres import create_database, drop_database, postgres_server  # noqa: E402

TABLE = "documents"
MIGRATION = "default/bench-follower"
API_KEY = "benchmark-key"
GOAL_RATE = 100
GOAL_P95_SECONDS = 5.0
CEILING_STEP = 1.5
# Below this share of the rate asked, the writer (not the follower) set the pace.
WRITER_SHORTFALL = 0.95
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# One log line per drain that settled something (rag_service/follow.py, _drain).
DRAIN_LINE = re.compile(r"follow: (\d+) rows embedded, (\d+) queued changes settled in ([\d.]+)s")


@dataclass
class Rss:
    """The follower's resident memory over one rate's window, in kB."""

    start: int = 0
    peak: int = 0
    end: int = 0


@dataclass
class Cpu:
    """Cores used over one window (CPU-seconds ÷ wall seconds); None: not readable."""

    follower: float
    server: float | None
    embedder: float
    writer: float


@dataclass
class RateResult:
    asked: float
    achieved: float
    updates: int  # distinct rows measured (the last update of each)
    lags: list[float]  # seconds, math.inf for the undrained, in schedule order
    throughput: float  # rows/s the side table caught up with
    max_queue: int
    max_oldest: float  # the product's own lag figure (oldest_pending_seconds), its largest sample
    batches: int  # catch-up batches the follower recorded (one status row and one commit each)
    passes: int
    rss: Rss
    cpu: Cpu
    seconds: float  # wall time of the window, drain included
    late_start: float  # the writer's worst delay behind schedule, seconds

    @property
    def undrained(self) -> int:
        return sum(1 for lag in self.lags if math.isinf(lag))

    def percentile(self, share: float) -> float:
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else math.nan

    @property
    def growing(self) -> bool:
        """Lag growing through the run: the queue is not keeping up, whatever p95 says yet."""
        quarter = max(1, len(self.lags) // 4)
        first, last = self.lags[:quarter], self.lags[-quarter:]
        return statistics.median(last) > 2 * statistics.median(first) + 1.0

    @property
    def writer_bound(self) -> bool:
        """The writer did not reach the rate asked: what held, held at a lower rate."""
        return self.achieved < WRITER_SHORTFALL * self.asked

    @property
    def held(self) -> bool:
        return self.percentile(0.95) <= GOAL_P95_SECONDS and not self.undrained and not self.growing


@dataclass
class Follower:
    """``embedshift migrate follow`` as a child process, its log in a file."""

    process: subprocess.Popen[bytes]
    log: Path
    samples: list[int] = field(default_factory=list)

    def rss_kb(self) -> int:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def alive(self) -> None:
        if self.process.poll() is not None:
            tail = "\n".join(self.log.read_text().splitlines()[-20:])
            raise SystemExit(f"the follower exited ({self.process.returncode}):\n{tail}")

    def log_size(self) -> int:
        return self.log.stat().st_size


def cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of one live process (its own threads, not its children)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def writer_cpu() -> float:
    times = os.times()
    return times.user + times.system


def data_plane(base_url: str, dimensions: int) -> DataPlaneSpec:
    return target_spec(base_url, dimensions)


def prepare(url: str, rows: int, spec: DataPlaneSpec, percentage: int) -> None:
    began = time.perf_counter()
    create_corpus(url, table=TABLE, count=rows, source_dimensions=0, sentence_count=CHUNK_SIZED)
    asyncio.run(setup(url, spec, migration=MIGRATION))
    side = layout_for(spec, id_type="bigint").target.name
    dims = spec.target.dimensions
    with psycopg.connect(url, autocommit=True) as conn:
        fill_side_table(conn, side=side, source=TABLE, dimensions=dims)
        conn.execute(f'VACUUM ANALYZE "{TABLE}"')
        conn.execute(f'VACUUM ANALYZE "{side}"')
        # The load's dirty pages written now, not by the checkpointer during the measurement.
        conn.execute("CHECKPOINT")

    async def route() -> None:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        async with conn:
            await write_percentage(
                conn,
                table=rollout_table(spec),
                migration=MIGRATION,
                percentage=percentage,
                reason="benchmark",
            )

    asyncio.run(route())
    print(f"prepared {rows:,} rows in {time.perf_counter() - began:.1f}s", flush=True)


def start_embedder(latency: float) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "rag_service.testing.embedding_server", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "EMBEDDING_SERVER_API_KEY": API_KEY},
    )
    assert process.stdout is not None
    address = process.stdout.readline().strip()
    if not address.startswith("http://"):
        process.kill()
        raise SystemExit(f"the embedding server printed {address!r}")
    return process, address


def start_follower(
    url: str, spec: DataPlaneSpec, args: argparse.Namespace, log_dir: Path
) -> Follower:
    command = [sys.executable, "-m", "embedshift_operator.cli", "migrate", "follow"]
    command += ["--table", TABLE, "--category-column", "category", "--migration", MIGRATION]
    command += ["--target", spec.target.descriptor, "--target-base-url", str(spec.target.base_url)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.concurrency:
        command += ["--concurrency", str(args.concurrency)]
    log = log_dir / "follower.log"
    # The URL and the key through the environment, as a pod gets them (never in `ps`).
    env = {**os.environ, "DATABASE_URL": url, "EMBEDSHIFT_TARGET_API_KEY": API_KEY}
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    follower = Follower(process, log)
    deadline = time.monotonic() + 120
    while "follow: following" not in log.read_text():
        follower.alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"the follower did not start within 120 s; see {log}")
        time.sleep(0.2)
    return follower


class Ids:
    """Row ids in a shuffled order, each re-worded once before any is re-worded again."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rows = rows
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if not self.order:
                self.order = list(range(1, self.rows + 1))
                self.rng.shuffle(self.order)
            part = min(count - len(taken), len(self.order))
            taken += self.order[-part:]
            del self.order[-part:]
        return taken


async def load(
    url: str,
    *,
    ids: Sequence[int],
    rate: float,
    writers: int,
    label: str,
) -> tuple[list[datetime | None], float, float]:
    """Run the updates open-loop; (commit time per update, seconds taken, worst lateness)."""
    conns = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(writers)]
    committed: list[datetime | None] = [None] * len(ids)
    loop = asyncio.get_running_loop()
    next_index = 0
    late = 0.0
    t0 = loop.time() + 0.1

    async def write(conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal next_index, late
        while next_index < len(ids):
            i = next_index
            next_index += 1
            wait = t0 + i / rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                late = max(late, -wait)
            cur = await conn.execute(
                f'UPDATE "{TABLE}" SET content = content || %s WHERE id = %s '
                "RETURNING clock_timestamp()",
                [f" Edited {label}-{i}.", ids[i]],
            )
            row = await cur.fetchone()
            committed[i] = row[0] if row else None

    try:
        await asyncio.gather(*(write(conn) for conn in conns))
    finally:
        for conn in conns:
            await conn.close()
    return committed, loop.time() - t0, late


async def sample(
    url: str,
    spec: DataPlaneSpec,
    follower: Follower,
    stop: asyncio.Event,
    depths: list[int],
    oldest: list[float],
) -> None:
    """Once a second: the follower's RSS, the queue's depth (one count of a table that holds
    only what is pending) and ``oldest_pending_seconds``, what ``migrate status`` reports as the
    lag, to set beside the lag measured per update."""
    queue = layout_for(spec, id_type="bigint").queue.name
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    async with conn:
        while not stop.is_set():
            follower.samples.append(follower.rss_kb())
            cur = await conn.execute(f'SELECT count(*) FROM "{queue}"')
            row = await cur.fetchone()
            depths.append(int(row[0]) if row else 0)
            oldest.append(await oldest_pending_seconds(conn, spec) or 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def drained(url: str, queue: str, within: float) -> None:
    """Until the queue is empty (its entries leave in the follower's write transaction) or
    ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    async with conn:
        while time.monotonic() < deadline:
            cur = await conn.execute(f'SELECT count(*) FROM "{queue}"')
            row = await cur.fetchone()
            if not row or int(row[0]) == 0:
                return
            await asyncio.sleep(0.5)


async def lags(
    url: str, side: str, ids: Sequence[int], committed: Sequence[datetime | None]
) -> tuple[list[float], float]:
    """Per measured update (the last of each id), in schedule order: embedded_at − commit, or
    inf when the side table does not hold the update's text; and the catch-up throughput."""
    last: dict[int, int] = {}
    for i, row_id in enumerate(ids):
        if committed[i] is not None:
            last[row_id] = i  # a later update of the same id replaces the earlier one
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    async with conn:
        cur = await conn.execute(
            f'SELECT t.id, t.embedded_at FROM "{side}" t JOIN "{TABLE}" s ON s.id = t.id '
            "WHERE t.id = ANY(%s) AND t.content_hash = sha256(convert_to(s.content, 'UTF8'))",
            [list(last)],
        )
        held = {int(r[0]): r[1] for r in await cur.fetchall()}
    result: list[float] = []
    first: datetime | None = None
    newest: datetime | None = None
    for i in sorted(last.values()):
        commit = committed[i]
        assert commit is not None
        first = commit if first is None or commit < first else first
        at = held.get(ids[i])
        if at is None:
            result.append(math.inf)
            continue
        newest = at if newest is None or at > newest else newest
        result.append(max(0.0, (at - commit).total_seconds()))
    done = sum(1 for lag in result if not math.isinf(lag))
    span = (newest - first).total_seconds() if newest and first else 0.0
    return result, done / span if span > 0 else math.nan


def measure(
    url: str,
    spec: DataPlaneSpec,
    follower: Follower,
    embedder: int,
    server: ServerCpu | None,
    ids: Ids,
    rate: float,
    args: argparse.Namespace,
    label: str,
) -> RateResult:
    layout = layout_for(spec, id_type="bigint")
    queue, side = layout.queue.name, layout.target.name
    chosen = ids.take(max(1, round(rate * args.duration)))
    follower.alive()
    # What an earlier rate left queued would be served first and delay this rate's updates.
    asyncio.run(drained(url, queue, args.drain_timeout))
    log_from = follower.log_size()
    follower.samples.clear()
    rss_start = follower.rss_kb()
    cpu_before = (
        cpu_seconds(follower.process.pid),
        server.seconds() if server else None,
        cpu_seconds(embedder),
        writer_cpu(),
    )
    batches_before = status_rows(url, spec)
    began = time.monotonic()
    depths: list[int] = []
    oldest: list[float] = []

    async def run() -> tuple[list[datetime | None], float, float]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(url, spec, follower, stop, depths, oldest))
        try:
            written = await load(url, ids=chosen, rate=rate, writers=args.writers, label=label)
            await drained(url, queue, args.drain_timeout)
        finally:
            stop.set()
            await sampler
        return written

    committed, wrote, late = asyncio.run(run())
    seconds = time.monotonic() - began
    cpu_after = (
        cpu_seconds(follower.process.pid),
        server.seconds() if server else None,
        cpu_seconds(embedder),
        writer_cpu(),
    )
    rss_end = follower.rss_kb()
    batches_after = status_rows(url, spec)
    follower.alive()
    measured, throughput = asyncio.run(lags(url, side, chosen, committed))
    with follower.log.open("rb") as log:
        log.seek(log_from)
        passes = len(DRAIN_LINE.findall(log.read().decode(errors="replace")))
    done = sum(1 for c in committed if c is not None)
    db_before, db_after = cpu_before[1], cpu_after[1]
    return RateResult(
        asked=rate,
        achieved=done / wrote if wrote > 0 else math.nan,
        updates=len(measured),
        lags=measured,
        throughput=throughput,
        max_queue=max(depths, default=0),
        max_oldest=max(oldest, default=0.0),
        batches=batches_after - batches_before,
        passes=passes,
        rss=Rss(rss_start, max([rss_start, rss_end, *follower.samples]), rss_end),
        cpu=Cpu(
            follower=(cpu_after[0] - cpu_before[0]) / seconds,
            server=None
            if db_before is None or db_after is None
            else (db_after - db_before) / seconds,
            embedder=(cpu_after[2] - cpu_before[2]) / seconds,
            writer=(cpu_after[3] - cpu_before[3]) / seconds,
        ),
        seconds=seconds,
        late_start=late,
    )


def status_rows(url: str, spec: DataPlaneSpec) -> int:
    """Batches recorded for the target so far (an index-only count: (target_table, status))."""
    layout = layout_for(spec, id_type="bigint")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT count(*) FROM "{layout.status.name}" WHERE target_table = %s',
            [str(layout.target)],
        ).fetchone()
    return int(row[0]) if row else 0


def lag_text(seconds: float) -> str:
    return "undrained" if math.isinf(seconds) else f"{seconds:.2f}"


HEADER = (
    "rate asked | achieved | updates | lag p50 | p95 | max (s) | not drained | throughput | "
    "max queue | max oldestPending s | batches (rows each) | wake-ups | "
    "follower RSS start/peak/end MB | CPU cores follower/PG/API/writer | held"
)


def row(r: RateResult) -> str:
    cpu = r.cpu
    pg = "n/a" if cpu.server is None else f"{cpu.server:.2f}"
    behind = f" (≤{r.late_start:.1f}s late)" if r.late_start > 1.0 else ""
    return (
        f"{r.asked:,.0f}/s | {r.achieved:,.1f}/s{behind} | {r.updates:,} | "
        f"{lag_text(r.percentile(0.5))} | {lag_text(r.percentile(0.95))} | "
        f"{lag_text(max(r.lags, default=math.nan))} | {r.undrained:,} | "
        f"{r.throughput:,.1f}/s | {r.max_queue:,} | {r.max_oldest:.1f} | "
        f"{r.batches:,} ({r.updates / r.batches if r.batches else 0:.1f}) | {r.passes:,} | "
        f"{r.rss.start / 1024:.0f}/{r.rss.peak / 1024:.0f}/{r.rss.end / 1024:.0f} | "
        f"{cpu.follower:.2f}/{pg}/{cpu.embedder:.2f}/{cpu.writer:.2f} | "
        + ("yes" if r.held else "NO" + (" (growing)" if r.growing else ""))
        + (" (writer-bound)" if r.writer_bound else "")
    )


def rates(text: str) -> list[float]:
    found = [float(part) for part in text.split(",") if part.strip()]
    if not found or any(rate <= 0 for rate in found):
        raise argparse.ArgumentTypeError(f"{text!r}: rates per second, comma-separated, > 0")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=1_000_000)
    parser.add_argument("--rates", type=rates, default=[100.0, 500.0], help="updates/s, a,b,…")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per rate")
    parser.add_argument("--percentage", type=int, default=50, help="the routing row's share")
    parser.add_argument(
        "--ceiling", action="store_true", help="then ×1.5 the last rate until one does not hold"
    )
    parser.add_argument("--max-rate", type=float, default=10_000.0, help="stop --ceiling here")
    parser.add_argument(
        "--writers",
        type=int,
        default=16,
        help="writer connections (each commit waits for its WAL flush)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds the queue may take to empty"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per API request")
    parser.add_argument("--batch-size", type=int, help="the follower's --batch-size")
    parser.add_argument("--concurrency", type=int, help="the follower's --concurrency")
    parser.add_argument("--dimensions", type=int, default=256, help="target dimensions")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()

    print(
        f"{os.cpu_count()} cores, shared by the writer (this process), PostgreSQL, the embedding "
        "server and the follower: a ceiling found here is this machine's",
        flush=True,
    )
    started = time.monotonic()
    results: list[RateResult] = []
    embedder, address = start_embedder(args.latency)
    try:
        with postgres_server() as admin, tempfile.TemporaryDirectory(prefix="follower-") as tmp:
            server = ServerCpu.find(admin)
            name, url = create_database(admin, prefix="bench_follower")
            try:
                spec = data_plane(f"{address}/v1", args.dimensions)
                prepare(url, args.rows, spec, args.percentage)
                follower = start_follower(url, spec, args, Path(tmp))
                try:
                    ids = Ids(args.rows, args.seed)
                    rss = follower.rss_kb() / 1024
                    print(f"follower pid {follower.process.pid}, RSS {rss:.0f} MB", flush=True)
                    # Warm-up, not reported: connections, the HTTP client, plans, caches.
                    measure(
                        url,
                        spec,
                        follower,
                        embedder.pid,
                        None,
                        ids,
                        20.0,
                        argparse.Namespace(**{**vars(args), "duration": 1.0}),
                        "warm",
                    )
                    print(HEADER, flush=True)
                    for index, rate in enumerate(args.rates):
                        results.append(
                            measure(
                                url,
                                spec,
                                follower,
                                embedder.pid,
                                server,
                                ids,
                                rate,
                                args,
                                f"r{index}",
                            )
                        )
                        print(row(results[-1]), flush=True)
                    if args.ceiling:
                        ceiling(url, spec, follower, embedder.pid, server, ids, args, results)
                finally:
                    stop_follower(follower)
            finally:
                drop_database(admin, name)
    finally:
        embedder.terminate()
        embedder.wait(timeout=10)
    print(f"took {time.monotonic() - started:.0f}s")
    return report(results)


def ceiling(
    url: str,
    spec: DataPlaneSpec,
    follower: Follower,
    embedder: int,
    server: ServerCpu | None,
    ids: Ids,
    args: argparse.Namespace,
    results: list[RateResult],
) -> None:
    held = [r.asked for r in results if r.held and not r.writer_bound]
    rate = max(r.asked for r in results)
    if not results[-1].held or results[-1].writer_bound:
        why = "the writer did not reach it" if results[-1].writer_bound else "it does not hold"
        print(
            f"ceiling: not stepped up from {results[-1].asked:,.0f}/s ({why}); highest held: "
            + (f"{max(held):,.0f}/s" if held else "none")
        )
        return
    while rate * CEILING_STEP <= args.max_rate:
        rate = math.ceil(rate * CEILING_STEP)
        results.append(
            measure(url, spec, follower, embedder, server, ids, rate, args, f"c{len(results)}")
        )
        print(row(results[-1]), flush=True)
        if results[-1].writer_bound:
            # Its lags were measured at the rate achieved, so they say nothing of this rate.
            print(
                f"ceiling: the writer reached only {results[-1].achieved:,.0f}/s of {rate:,.0f}/s "
                "(raise --writers, or the machine is saturated: see the CPU column)"
            )
            break
        if not results[-1].held:
            break
        held.append(rate)
    top = max(held, default=None)
    print(
        "ceiling: highest rate that held (p95 ≤ 5 s, all drained, lag not growing): "
        + ("none" if top is None else f"{top:,.0f}/s")
        + (
            f" (stopped at --max-rate {args.max_rate:,.0f})"
            if results[-1].held and not results[-1].writer_bound
            else ""
        )
    )


def stop_follower(follower: Follower) -> None:
    if follower.process.poll() is None:
        follower.process.send_signal(signal.SIGTERM)
        try:
            follower.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            follower.process.kill()
            follower.process.wait()
    tail = follower.log.read_text().splitlines()[-1:]
    if tail:
        print(f"follower: exit {follower.process.returncode}; {tail[0]}")


def report(results: list[RateResult]) -> int:
    goal = [r for r in results if r.asked == GOAL_RATE]
    if not goal:
        print(f"goal (p95 ≤ {GOAL_P95_SECONDS:g} s at {GOAL_RATE}/s): not measured in this run")
        return 0
    ok = all(r.percentile(0.95) <= GOAL_P95_SECONDS and not r.undrained for r in goal)
    print(
        f"goal (p95 ≤ {GOAL_P95_SECONDS:g} s, all drained, at {GOAL_RATE}/s): "
        + ("met" if ok else "NOT met")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
