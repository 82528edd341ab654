"""Jobs and the follower as local processes: the ``embedshift rollout run`` runner.

Each Job runs under a small supervisor process (``python -m
embedshift_operator.adapters.subprocess_jobs``) in its own session, so it outlives a driver that
is killed (``kill -9``, a closed laptop lid): the rerun driver finds it still running, or finished,
and never launches it twice. The supervisor retries a failing command ``backoffLimit`` times, but
not one that exited with a code no rerun mends (:data:`~rag_service.errors.PERMANENT_EXIT_CODES`),
as a Kubernetes Job and its ``podFailurePolicy`` do; it then records the outcome and the CLI's
error line, saying whether it was retried, in ``embedshift_local_jobs``, the same database the
migration lives in. A supervisor that died without recording (its pid is gone) leaves the Job
*interrupted*, which the runner reports as unknown so the core asks for it again; the commands
themselves are resumable and kill-safe.

The follower is the same supervisor in ``--forever`` mode: it restarts ``migrate follow`` after a
crash, with backoff, until it is told to stop (SIGTERM), and one follower per migration runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from embedshift_operator.core.model import EnsureFollower, JobObservation, RunJob
from embedshift_operator.resource import JobState
from rag_service.errors import PERMANENT_EXIT_CODES
from rag_service.identifiers import TableName
from rag_service.schema import ident, with_connection

JOBS_TABLE = "embedshift_local_jobs"
FOLLOWER_KIND = "follower"
_RUNNING, _SUCCEEDED, _FAILED, _INTERRUPTED = "Running", "Succeeded", "Failed", "Interrupted"

__all__ = ["JOBS_TABLE", "SubprocessJobs"]


def _create_table(table: TableName) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (\n"
        "    migration text NOT NULL,\n"
        "    name text NOT NULL,\n"
        "    kind text NOT NULL,\n"
        "    args jsonb NOT NULL,\n"
        "    state text NOT NULL,\n"
        "    pid integer,\n"
        "    attempts integer NOT NULL DEFAULT 0,\n"
        "    launches integer NOT NULL DEFAULT 0,\n"
        "    exit_code integer,\n"
        "    message text NOT NULL DEFAULT '',\n"
        "    started_at timestamptz NOT NULL DEFAULT now(),\n"
        "    finished_at timestamptz,\n"
        "    PRIMARY KEY (migration, name)\n"
        ")"
    ).format(ident(table))


def _alive(pid: int | None, name: str) -> bool:
    """Whether ``pid`` is still this Job's supervisor (not a zombie, not a reused pid)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and name.encode() in cmdline


class SubprocessJobs:
    """Runs RunJob and EnsureFollower actions as supervised local processes.

    ``command`` is how to call ``embedshift`` (e.g. ``[sys.executable, "-m",
    "embedshift_operator.cli"]``); ``common_args`` follow every subcommand (``--config FILE
    --migration NS/NAME``); ``env`` is the children's environment (database URL and API keys
    resolved from the spec's secret references). Job output goes to ``log_dir/<name>.log``.
    """

    def __init__(
        self,
        *,
        url: str,
        migration: str,
        schema: str | None,
        command: Sequence[str],
        common_args: Sequence[str],
        env: Mapping[str, str],
        log_dir: Path,
        backoff_limit: int = 2,
    ) -> None:
        self._url = url
        self._migration = migration
        self._table = TableName(JOBS_TABLE, schema)
        self._command = list(command)
        self._common = list(common_args)
        self._env = dict(env)
        self._log_dir = log_dir
        self._backoff_limit = backoff_limit
        self._spawned: list[asyncio.subprocess.Process] = []

    async def ensure_table(self) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(_create_table(self._table))

        await with_connection(self._url, work)

    async def _rows(self, conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        cur = await conn.execute(
            sql.SQL("SELECT name, kind, state, pid, message FROM {} WHERE migration = %s").format(
                ident(self._table)
            ),
            [self._migration],
        )
        return list(await cur.fetchall())

    async def _mark(self, conn: psycopg.AsyncConnection[Any], name: str, state: str) -> None:
        await conn.execute(
            sql.SQL(
                "UPDATE {} SET state = %s, finished_at = now() "
                "WHERE migration = %s AND name = %s AND state = 'Running'"
            ).format(ident(self._table)),
            [state, self._migration, name],
        )

    async def observe(self) -> dict[str, JobObservation]:
        """Every Job of this migration the runner knows: Running, Succeeded or Failed.

        An interrupted Job (its supervisor died, or Ctrl-C stopped it) is left out: to the core
        it is a Job not seen yet, which it asks for again under the same name.
        """

        async def work(conn: psycopg.AsyncConnection[Any]) -> dict[str, JobObservation]:
            seen: dict[str, JobObservation] = {}
            for name, kind, state, pid, message in await self._rows(conn):
                if kind == FOLLOWER_KIND:
                    continue
                if state == _RUNNING and not _alive(pid, name):
                    await self._mark(conn, name, _INTERRUPTED)
                    continue
                if state in (_RUNNING, _SUCCEEDED, _FAILED):
                    seen[name] = JobObservation(state=JobState(state), message=message)
            return seen

        result: dict[str, JobObservation] = await with_connection(self._url, work)
        return result

    async def run_job(self, action: RunJob) -> bool:
        """Start the Job unless it is running or finished. True when it was started."""
        return await self._start(action.name, action.kind.value, action.args, forever=False)

    async def ensure_follower(self, action: EnsureFollower) -> bool:
        """Keep one follower: stop followers under other names, start this one if needed."""

        async def others(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, int | None]]:
            return [
                (name, pid)
                for name, kind, state, pid, _ in await self._rows(conn)
                if kind == FOLLOWER_KIND and name != action.name and state == _RUNNING
            ]

        for name, pid in await with_connection(self._url, others):
            await self._terminate(name, pid)
        return await self._start(action.name, FOLLOWER_KIND, action.args, forever=True)

    async def _start(self, name: str, kind: str, args: Sequence[str], *, forever: bool) -> bool:
        async def claim(conn: psycopg.AsyncConnection[Any]) -> bool:
            async with conn.transaction():
                cur = await conn.execute(
                    sql.SQL(
                        "SELECT state, pid FROM {} WHERE migration = %s AND name = %s FOR UPDATE"
                    ).format(ident(self._table)),
                    [self._migration, name],
                )
                row = await cur.fetchone()
                if row is not None:
                    state, pid = row
                    if state in (_SUCCEEDED, _FAILED) and not forever:
                        return False
                    if state == _RUNNING and _alive(pid, name):
                        return False
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {t} (migration, name, kind, args, state, launches) "
                        "VALUES (%s, %s, %s, %s::jsonb, 'Running', 1) "
                        "ON CONFLICT (migration, name) DO UPDATE SET state = 'Running', "
                        "launches = {t}.launches + 1, "
                        "pid = NULL, exit_code = NULL, message = '', started_at = now(), "
                        "finished_at = NULL, args = EXCLUDED.args"
                    ).format(t=ident(self._table)),
                    [self._migration, name, kind, json.dumps(list(args))],
                )
                return True

        if not await with_connection(self._url, claim):
            return False
        self._log_dir.mkdir(parents=True, exist_ok=True)
        supervisor = [
            sys.executable,
            "-m",
            "embedshift_operator.adapters.subprocess_jobs",
            "--migration",
            self._migration,
            "--job",
            name,
            "--table",
            str(self._table),
            "--retries",
            str(self._backoff_limit),
            "--log",
            str(self._log_dir / f"{name}.log"),
            *(["--forever"] if forever else []),
            "--",
            *self._command,
            *args,
            *self._common,
        ]
        process = await asyncio.create_subprocess_exec(
            *supervisor,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlive a killed driver; Ctrl-C reaches it through stop()
        )
        self._spawned.append(process)

        async def record(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                sql.SQL(
                    "UPDATE {} SET pid = %s WHERE migration = %s AND name = %s AND pid IS NULL"
                ).format(ident(self._table)),
                [process.pid, self._migration, name],
            )

        await with_connection(self._url, record)
        return True

    async def _terminate(self, name: str, pid: int | None, *, grace: float = 10.0) -> None:
        if pid and _alive(pid, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            # Not our child after a driver restart: no event to wait on, so poll its pid.
            while _alive(pid, name) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if _alive(pid, name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Stop every Job and the follower of this migration (Ctrl-C): they are recorded as
        interrupted and run again, resuming, when the driver runs again."""

        async def running(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, int | None]]:
            return [
                (name, pid)
                for name, _, state, pid, _ in await self._rows(conn)
                if state == _RUNNING
            ]

        for name, pid in await with_connection(self._url, running):
            await self._terminate(name, pid)
        for process in self._spawned:
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(process.wait(), timeout=5)
        self._spawned.clear()


# ---- the supervisor process ---------------------------------------------------------------------


def _supervise(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="embedshift local Job supervisor (internal)")
    parser.add_argument("--migration", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--forever", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    url = os.environ.get("DATABASE_URL", "")
    table = TableName.parse(args.table, field="--table")
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    def update(**fields: Any) -> None:
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields
        )
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                sql.SQL("UPDATE {} SET {} WHERE migration = %s AND name = %s").format(
                    ident(table), assignments
                ),
                [*fields.values(), args.migration, args.job],
            )

    update(pid=os.getpid())
    attempt = 0
    backoff = 1.0
    cli_error = last_line = ""
    code = 1
    args.log.parent.mkdir(parents=True, exist_ok=True)
    while not stopping:
        attempt += 1
        cli_error = last_line = ""
        update(attempts=attempt)
        with args.log.open("ab") as log:
            log.write(f"--- attempt {attempt}: {' '.join(command[-8:])}\n".encode())
            log.flush()
            # The command is the driver's own argv for embedshift, never user input.
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE)  # noqa: S603
            assert child.stderr is not None
            for line in child.stderr:
                log.write(line)
                text = line.decode(errors="replace").strip()
                # The CLI's own one-line error is the message; else the last line it wrote.
                if text.startswith("embedshift: error:"):
                    cli_error = text.removeprefix("embedshift: error:").strip()
                elif text:
                    last_line = text
            code = child.wait()
        if code == 0 and not args.forever:
            update(state=_SUCCEEDED, exit_code=0, message="", finished_at=_now())
            return 0
        if stopping:
            break
        permanent = code in PERMANENT_EXIT_CODES
        if not args.forever and (permanent or attempt > args.retries):
            how = "not retried" if permanent else f"failed {attempt} times"
            why = (cli_error or last_line)[:900]
            message = f"{why} (exited {code}, {how})" if why else f"exited {code}, {how}"
            update(state=_FAILED, exit_code=code, message=message, finished_at=_now())
            return 1
        time.sleep(backoff)
        backoff = min(backoff * 2, 30.0)
    update(state=_INTERRUPTED, exit_code=code, finished_at=_now())
    return 0


def _now() -> datetime:
    return datetime.now(UTC)


if __name__ == "__main__":
    sys.exit(_supervise())
