"""The local runner's Jobs (``embedshift rollout run``) fail as a Kubernetes Job does: at once on
an exit code no rerun mends, after ``backoffLimit`` retries on any other. Each Job is the real
``embedshift`` CLI under the real supervisor, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import psycopg
import pytest

from embedshift_operator.adapters.subprocess_jobs import JOBS_TABLE, SubprocessJobs
from embedshift_operator.core.model import JobObservation, RunJob
from embedshift_operator.resource import JobKind, JobState
from rag_service.errors import EXIT_CONFIG, EXIT_RETRYABLE, PERMANENT_EXIT_CODES
from rag_service.testing.corpus import create_corpus
from rag_service.testing.rollout import manifest, write

MIGRATION = "default/failing"
TABLE = "failing_docs"
CLI = [sys.executable, "-m", "embedshift_operator.cli"]
RETRIES = 1  # one retry (1 s of back-off) shows retrying as well as the default 2 would
UNREACHABLE = "postgresql://embedshift@/nowhere?host=/nonexistent-embedshift-socket-dir"


def _runner(url: str, tmp_path: Path, spec: Path) -> SubprocessJobs:
    return SubprocessJobs(
        url=url,
        migration=MIGRATION,
        schema=None,
        command=CLI,
        common_args=["--config", str(spec), "--migration", MIGRATION],
        env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        log_dir=tmp_path / "logs",
        backoff_limit=RETRIES,
    )


def _spec(tmp_path: Path, **migration: object) -> Path:
    document = manifest(name="failing", prometheus_url="http://127.0.0.1:1", table=TABLE)
    document["spec"]["migration"].update(migration)
    path = tmp_path / "migration.yaml"
    write(path, document)
    return path


def _attempts(url: str, name: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT attempts FROM {JOBS_TABLE} WHERE migration = %s AND name = %s",
            [MIGRATION, name],
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _finished(runner: SubprocessJobs, name: str, *, within: float) -> JobObservation:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        seen = (await runner.observe()).get(name)
        if seen is not None and seen.state is not JobState.RUNNING:
            return seen
        assert loop.time() < deadline, f"Job {name} still running after {within} s: {seen}"
        await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_a_refused_spec_fails_the_job_at_once_with_the_cli_line(
    database_url: str, tmp_path: Path
) -> None:
    create_corpus(database_url, table=TABLE, count=20, source_dimensions=32)
    runner = _runner(database_url, tmp_path, _spec(tmp_path, categories=["no-such-category"]))
    await runner.ensure_table()
    name = "failing-migrate-0of1"
    action = RunJob(name=name, kind=JobKind.MIGRATE, args=("migrate", "run", "--shard", "0/1"))
    try:
        # Setup does not read the categories: it succeeds, and the shard Job refuses them.
        setup = RunJob(name="failing-setup", kind=JobKind.SETUP, args=("migrate", "setup"))
        assert await runner.run_job(setup) is True
        assert await _finished(runner, setup.name, within=60) == JobObservation(JobState.SUCCEEDED)
        assert await runner.run_job(action) is True
        seen = await _finished(runner, name, within=60)
    finally:
        await runner.stop()

    assert EXIT_CONFIG in PERMANENT_EXIT_CODES
    assert seen.state is JobState.FAILED
    # The CLI's own line, once, and that no retry ran: the command ran once.
    assert seen.message.startswith("spec.migration.categories: no row of ")
    assert "'no-such-category'" in seen.message
    assert seen.message.endswith(f"(exited {EXIT_CONFIG}, not retried)")
    assert "embedshift: error:" not in seen.message and "\n" not in seen.message
    assert _attempts(database_url, name) == 1


@pytest.mark.asyncio
async def test_an_unreachable_database_is_retried_backoff_limit_times(
    database_url: str, tmp_path: Path
) -> None:
    # The supervisor records in the real database; only the command is sent elsewhere.
    runner = _runner(database_url, tmp_path, _spec(tmp_path))
    await runner.ensure_table()
    name = "unreachable-setup"
    action = RunJob(
        name=name,
        kind=JobKind.SETUP,
        args=("migrate", "setup", "--database-url", UNREACHABLE),
    )
    try:
        assert await runner.run_job(action) is True
        seen = await _finished(runner, name, within=90)
    finally:
        await runner.stop()

    assert EXIT_RETRYABLE not in PERMANENT_EXIT_CODES
    assert seen.state is JobState.FAILED
    assert seen.message.endswith(f"(exited {EXIT_RETRYABLE}, failed {RETRIES + 1} times)")
    assert "nonexistent-embedshift-socket-dir" in seen.message  # the CLI's line says where
    assert _attempts(database_url, name) == RETRIES + 1
