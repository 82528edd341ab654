"""Running ``embedshift rollout run`` for real: a manifest writer, the driver as a subprocess,
and reads of what users see (the routing row, the saved status, the local Jobs table)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import yaml

T = TypeVar("T")

PYTHON = sys.executable
# Second-scale steps; the last one is long so the rollout stays Promoted (thresholds active).
FAST_STEPS = ((10, "1s"), (25, "1s"), (50, "1s"), (75, "1s"), (100, "1h"))


def manifest(
    *,
    name: str,
    prometheus_url: str,
    table: str = "docs",
    steps: tuple[tuple[int, str], ...] = (
        (10, "1s"),
        (25, "1s"),
        (50, "1s"),
        (75, "1s"),
        (100, "1h"),
    ),
    max_percentage: int = 100,
    shards: int = 2,
    analysis: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A small, fast EmbeddingMigration: second-scale steps, a 1 s check interval."""
    return {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "database": {
                "table": table,
                "textColumn": "content",
                "categoryColumn": "category",
                "sourceEmbeddingColumn": "embedding",
            },
            "source": {"provider": "local", "model": "hash", "dimensions": 32},
            "target": {"provider": "local", "model": "hash", "dimensions": 16},
            "migration": {"batchSize": 100, "shards": shards, "parallelism": 2},
            "rollout": {
                "steps": [{"percentage": p, "minDuration": d} for p, d in steps],
                "maxPercentage": max_percentage,
            },
            "analysis": {
                "prometheus": {"url": prometheus_url},
                "interval": "1s",
                "window": "5s",
                "minRequests": 10,
                "successfulChecks": 2,
                **(analysis or {}),
            },
        },
    }


def write(path: Path, document: dict[str, Any]) -> None:
    """Replace the file atomically, as an editor or `git pull` would."""
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(document, sort_keys=False))
    partial.replace(path)


@dataclass
class Driver:
    """``embedshift rollout run FILE --json`` as a child process, its events collected."""

    process: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def interrupt(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def reasons(self) -> list[str]:
        return [e.get("reason", "") for e in self.events]


@contextmanager
def driving(path: Path, *, database_url: str, log_dir: Path) -> Iterator[Driver]:
    env = {**os.environ, "DATABASE_URL": database_url}
    process = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "embedshift_operator.cli",
            "rollout",
            "run",
            str(path),
            "--json",
            "--tick",
            "0.3",
            "--log-dir",
            str(log_dir),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    driver = Driver(process)

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip():
                driver.events.append(json.loads(line))

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            driver.stderr.append(line.rstrip())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    try:
        yield driver
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for reader in readers:
            reader.join(timeout=5)


def status(database_url: str, migration: str) -> dict[str, Any] | None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('embedshift_rollout_status')").fetchone()
        if not exists or exists[0] is None:
            return None
        row = conn.execute(
            "SELECT status FROM embedshift_rollout_status WHERE migration = %s", [migration]
        ).fetchone()
        return None if row is None else dict(row[0])


def routing(database_url: str, migration: str) -> tuple[int, bool] | None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('embedshift_rollout')").fetchone()
        if not exists or exists[0] is None:
            return None
        row = conn.execute(
            "SELECT percentage, emergency FROM embedshift_rollout WHERE migration = %s",
            [migration],
        ).fetchone()
        return None if row is None else (int(row[0]), bool(row[1]))


def launches(database_url: str, migration: str) -> dict[str, int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, launches FROM embedshift_local_jobs WHERE migration = %s "
            "AND kind <> 'follower'",
            [migration],
        ).fetchall()
        return {str(name): int(n) for name, n in rows}


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    driver: Driver | None = None,
    every: float = 0.05,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with the driver's story if not."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if driver is not None and driver.process.poll() is not None:
            raise AssertionError(
                f"the driver exited ({driver.process.returncode}) before {what}:\n"
                + "\n".join(driver.stderr[-20:])
            )
        if time.monotonic() > deadline:
            story = "" if driver is None else "\n".join(map(json.dumps, driver.events[-15:]))
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{story}")
        time.sleep(every)


def phase_is(database_url: str, migration: str, *phases: str) -> Callable[[], Any]:
    def probe() -> Any:
        current = status(database_url, migration)
        return current if current and current.get("phase") in phases else None

    return probe


def job_states(database_url: str, migration: str) -> dict[str, tuple[str, str, int | None]]:
    """{name: (kind, state, supervisor pid)} of the local Jobs and the follower."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, kind, state, pid FROM embedshift_local_jobs WHERE migration = %s",
            [migration],
        ).fetchall()
        return {str(n): (str(k), str(s), p) for n, k, s, p in rows}


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
