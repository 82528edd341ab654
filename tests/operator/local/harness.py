"""Test-only reads and waits around ``embedshift rollout run``. The manifest writer, the driver
as a subprocess and the routing-row and status reads are shared with the benchmarks in
:mod:`rag_service.testing.rollout`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from rag_service.testing.rollout import Driver, status

T = TypeVar("T")


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
