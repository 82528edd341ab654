"""``embedshift rollout run`` for real, for tests and benchmarks: a manifest writer, the driver
as a child process, and reads of what users see (the routing row, the saved status).

The driver runs as ``python -m embedshift_operator.cli rollout run FILE --json``, a separate
process as shipped; nothing here imports the operator (the data plane never does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml

__all__ = ["FAST_STEPS", "Driver", "driving", "manifest", "routing", "status", "write"]

# Second-scale steps; the last one is long so the rollout stays Promoted (thresholds active).
FAST_STEPS: tuple[tuple[int, str], ...] = (
    (10, "1s"),
    (25, "1s"),
    (50, "1s"),
    (75, "1s"),
    (100, "1h"),
)


def manifest(
    *,
    name: str,
    prometheus_url: str,
    table: str = "docs",
    steps: tuple[tuple[int, str], ...] = FAST_STEPS,
    max_percentage: int = 100,
    shards: int = 2,
    analysis: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A small, fast EmbeddingMigration (namespace ``default``) over a
    :func:`rag_service.testing.corpus.create_corpus` table: ``local:hash`` 32-d → 16-d,
    second-scale steps, a 1 s check interval over a 5 s window. ``analysis`` overrides keys of
    ``spec.analysis``."""
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
def driving(
    path: Path, *, database_url: str, log_dir: Path, tick: float | None = None
) -> Iterator[Driver]:
    """Run the driver on ``path`` until the block ends (then SIGINT, as Ctrl-C).

    ``tick``: ``--tick`` seconds; None leaves the CLI's default (what users run).
    """
    env = {**os.environ, "DATABASE_URL": database_url}
    command = [sys.executable, "-m", "embedshift_operator.cli", "rollout", "run", str(path)]
    command += ["--json", "--log-dir", str(log_dir)]
    if tick is not None:
        command += ["--tick", str(tick)]
    process = subprocess.Popen(  # noqa: S603 (our own CLI)
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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
    """The status the driver saved for ``migration`` (None before it saved one)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('embedshift_rollout_status')").fetchone()
        if not exists or exists[0] is None:
            return None
        row = conn.execute(
            "SELECT status FROM embedshift_rollout_status WHERE migration = %s", [migration]
        ).fetchone()
        return None if row is None else dict(row[0])


def routing(database_url: str, migration: str) -> tuple[int, bool] | None:
    """The routing row's (percentage, emergency), or None before there is one."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('embedshift_rollout')").fetchone()
        if not exists or exists[0] is None:
            return None
        row = conn.execute(
            "SELECT percentage, emergency FROM embedshift_rollout WHERE migration = %s",
            [migration],
        ).fetchone()
        return None if row is None else (int(row[0]), bool(row[1]))
