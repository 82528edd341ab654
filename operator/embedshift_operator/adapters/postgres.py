"""The control plane's PostgreSQL: the status of local rollouts, the routing row, progress, lag.

- ``embedshift_rollout_status`` (next to the routing row, in the source table's schema): one row
  per migration ("namespace/name") holding the resource's status as JSON. It is what lets a
  killed ``embedshift rollout run`` resume exactly where it was: every counter the core needs is
  in that status, never in the driver's memory. (The kopf operator keeps status on the resource.)
- the routing row: :func:`rag_service.rollout_row.write_percentage` (UPDATE + NOTIFY in one
  transaction) and ``read_row``; the search replicas follow it.
- progress and the follower's lag, read through rag_service's own queries: the maintained counts
  (the counters ``migrate setup`` installs and the change queue), never a scan of the corpus.

Every database failure becomes :class:`rag_service.errors.DatabaseError` with one line and no
password, so drivers can turn it into a condition and retry instead of crashing.

Every statement the control loop sends runs under ``statement_timeout`` (``--statement-timeout``
of ``operator run`` and ``rollout run``, :data:`DEFAULT_STATEMENT_TIMEOUT`): a database that
hangs (a lock queue, a stuck replica) costs a tick that many seconds and an observation error the
core holds on to (Ready False, DatabaseUnreachable), never a loop stuck on one statement. It is
set when each connection opens, through libpq's ``options`` (:func:`control_conninfo`), so the
progress queries rag_service runs on the loop's behalf have it too. The Jobs' statements never
do: their ``DATABASE_URL`` is the Secret's, untouched (a backfill or an index build may run long).
A pooler that refuses the ``options`` startup parameter (PgBouncer unless it is listed in its
``ignore_startup_parameters``) needs ``--statement-timeout 0``, which sends none.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from embedshift_operator.core.model import ProgressObservation, RoutingObservation, SetPercentage
from embedshift_operator.resource import (
    CountsKind,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
)
from rag_service.errors import DatabaseError, EmbedshiftError
from rag_service.identifiers import TableName
from rag_service.progress import migration_progress
from rag_service.rollout_row import read_row, write_percentage
from rag_service.schema import (
    ROLLOUT_STATUS_TABLE,
    ROLLOUT_TABLE,
    first_line,
    ident,
    with_connection,
)

STATUS_TABLE = ROLLOUT_STATUS_TABLE
# Seconds any one statement of the control loop may run (see the module's docstring). A tick's
# progress costs O(changes) (maintained counters, :mod:`rag_service.progress`); 60 s still leaves
# room for a target set up by an older embedshift, which is counted by a full source ⟕ target
# scan until `migrate setup` runs again (about 4 s at 300k rows on two cores).
DEFAULT_STATEMENT_TIMEOUT = 60.0

__all__ = ["DEFAULT_STATEMENT_TIMEOUT", "STATUS_TABLE", "ControlStore", "control_conninfo"]

log = logging.getLogger(__name__)
# Migrations whose progress is counted by a full comparison (no counters), already logged.
_warned_exact: set[str] = set()

_T = TypeVar("_T")


def control_conninfo(url: str, statement_timeout: float | None) -> str:
    """``url`` as the control loop connects with it: every statement of its sessions cancelled
    after ``statement_timeout`` seconds (libpq's ``options``, after any the URL or
    ``PGOPTIONS`` already sets). None or 0: ``url`` unchanged. A string libpq cannot parse is
    returned as it is, for :func:`rag_service.schema.connect` to refuse without quoting it."""
    if not statement_timeout:
        return url
    try:
        options = conninfo_to_dict(url).get("options") or os.environ.get("PGOPTIONS", "")
    except psycopg.ProgrammingError:
        return url
    milliseconds = max(1, round(statement_timeout * 1000))
    return make_conninfo(url, options=f"{options} -c statement_timeout={milliseconds}".strip())


class ControlStore:
    """One migration's control-plane rows. Opens a short connection per call: a driver ticks
    every second or so, and a dropped connection must cost one tick, not the driver.
    ``statement_timeout``: seconds each statement may run (None: no limit)."""

    def __init__(
        self,
        *,
        url: str,
        spec: EmbeddingMigrationSpec,
        migration: str,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        self._url = url
        self._conninfo = control_conninfo(url, statement_timeout)
        self._timeout = statement_timeout
        self._spec = spec
        self._migration = migration
        schema = spec.database.table_name.schema
        self._status_table = TableName(STATUS_TABLE, schema)
        self._rollout_table = TableName(ROLLOUT_TABLE, schema)

    @property
    def migration(self) -> str:
        return self._migration

    def with_spec(self, spec: EmbeddingMigrationSpec) -> ControlStore:
        """The same migration under an edited spec (the driver re-reads the file each tick)."""
        return ControlStore(
            url=self._url, spec=spec, migration=self._migration, statement_timeout=self._timeout
        )

    async def _run(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]) -> _T:
        """``work`` on a short connection under the statement timeout."""

        async def timed(conn: psycopg.AsyncConnection[Any]) -> _T:
            try:
                return await work(conn)
            except psycopg.errors.QueryCanceled:
                raise DatabaseError(self._timed_out()) from None

        return await with_connection(self._conninfo, timed)

    def _timed_out(self) -> str:
        return (
            f"database: a statement ran longer than the control loop's statement timeout "
            f"({self._timeout:g} s) and was cancelled; if the database is only slow, raise "
            "--statement-timeout"
        )

    async def ensure_tables(self) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (\n"
                    "    migration text PRIMARY KEY,\n"
                    "    status jsonb NOT NULL,\n"
                    "    updated_at timestamptz NOT NULL DEFAULT now()\n"
                    ")"
                ).format(ident(self._status_table))
            )

        await self._run(work)

    async def load_status(self) -> EmbeddingMigrationStatus | None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
            cur = await conn.execute(
                sql.SQL("SELECT status FROM {} WHERE migration = %s").format(
                    ident(self._status_table)
                ),
                [self._migration],
            )
            return await cur.fetchone()

        row = await self._run(work)
        return None if row is None else EmbeddingMigrationStatus.model_validate(row[0])

    async def save_status(self, status: EmbeddingMigrationStatus) -> None:
        document = json.dumps(status.model_dump(mode="json", by_alias=True, exclude_none=True))

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                sql.SQL(
                    "INSERT INTO {} (migration, status) VALUES (%s, %s::jsonb)"
                    " ON CONFLICT (migration) DO UPDATE"
                    " SET status = EXCLUDED.status, updated_at = now()"
                ).format(ident(self._status_table)),
                [self._migration, document],
            )

        await self._run(work)

    async def routing(self) -> RoutingObservation | None:
        """The routing row, or None before ``setup`` created it."""

        async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
            exists = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", [self._rollout_table.regclass_text]
            )
            found = await exists.fetchone()
            if not found or not found[0]:
                return None
            return await read_row(conn, table=self._rollout_table, migration=self._migration)

        row = await self._run(work)
        if row is None:
            return None
        return RoutingObservation(
            percentage=row.percentage, emergency=row.emergency, reason=row.reason
        )

    async def set_percentage(self, action: SetPercentage) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await write_percentage(
                conn,
                table=self._rollout_table,
                migration=self._migration,
                percentage=action.percentage,
                reason=action.reason[:500],
                clear_emergency=action.clear_emergency,
            )

        await self._run(work)

    async def progress(self) -> ProgressObservation:
        """Counts per category, failed batches and the oldest queued change's age: the
        maintained counts, O(changes) a tick (no spend sums, no error list: the core reads
        neither)."""
        try:
            progress = await migration_progress(
                self._conninfo, self._spec.data_plane, errors=0, spend=False
            )
        except psycopg.errors.QueryCanceled:
            raise DatabaseError(self._timed_out()) from None
        except psycopg.Error as exc:
            raise DatabaseError(f"database: {first_line(exc)}") from None
        if progress.note and self._migration not in _warned_exact:
            # Once per process: the drivers tick every second, with a store made per tick.
            _warned_exact.add(self._migration)
            log.warning("%s: %s", self._migration, progress.note)
        return ProgressObservation(
            total=progress.total("source"),
            migrated=progress.total("current"),
            pending=progress.total("pending"),
            failed_batches=progress.failed_batches,
            oldest_pending_seconds=progress.oldest_pending_seconds,
            by_category={c.category: (c.source, c.current) for c in progress.categories},
            counts=CountsKind(progress.counts),
            counted_since=progress.counted_since,
        )

    async def drop_source(self, column: str) -> str | None:
        """Cleanup: drop the v1 embedding column (only ever asked for with dropSource).

        None once the column is gone (dropped now, or already); else why it is not, one line
        without secrets. Never raises: the outcome is the core's to record
        (:func:`embedshift_operator.core.settle_drop`), and a failure is retried with backoff.
        """
        table = self._spec.database.table_name

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("SET lock_timeout = '2s'")
            await conn.execute(
                sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(
                    ident(table), sql.Identifier(column)
                )
            )

        try:
            await self._run(work)
        except EmbedshiftError as exc:
            return str(exc)
        return None
