"""The routing row (``embedshift_rollout``): followed by every search replica, written by the
operator and by the emergency webhook.

The follower LISTENs on ``embedshift_rollout`` for immediacy and re-reads the row every few
seconds as well, so a lost notification costs seconds, not correctness. When the row is missing
or the database is unreachable it keeps the last value it knew; before it has ever read one it
uses the start-up default (``FF_NEW_EMBEDDINGS_PERCENTAGE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from pydantic import ValidationError

from rag_service.errors import ConfigError
from rag_service.identifiers import TableName
from rag_service.schema import (
    ROLLOUT_CHANNEL,
    ROLLOUT_TABLE,
    connect,
    ident,
    recorded_spec,
    rollout_table,
    table_exists,
)
from rag_service.spec import DataPlaneSpec, validation_message
from rag_service.statement_timeout import STATEMENT_TIMEOUT_SECONDS, limit_statements

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingRow:
    """What the replicas route by. ``source`` says where the value came from."""

    percentage: int
    emergency: bool = False
    reason: str = ""
    updated_at: datetime | None = None
    source: str = "default"  # default | database | local-emergency
    # The side table v2 reads (the target descriptor ``migrate setup`` wrote); None before that.
    target: str | None = None
    # A digest of the data plane ``migrate setup`` recorded (the source and target descriptors):
    # it changes when setup records another one for the key, so a follower notices a re-setup.
    record: str | None = field(default=None, compare=False)


async def read_row(
    conn: psycopg.AsyncConnection[Any], *, table: TableName, migration: str
) -> RoutingRow | None:
    cur = await conn.execute(
        sql.SQL(
            "SELECT percentage, emergency, reason, updated_at, target->>'table', "
            "md5(coalesce(source::text, '') || '|' || coalesce(target::text, '')) FROM {} "
            "WHERE migration = %s"
        ).format(ident(table)),
        [migration],
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return RoutingRow(
        percentage=int(row[0]),
        emergency=bool(row[1]),
        reason=str(row[2]),
        updated_at=row[3],
        source="database",
        target=row[4],
        record=row[5],
    )


async def read_routing(url: str, spec: DataPlaneSpec, *, migration: str) -> RoutingRow | None:
    """``migration``'s row next to ``spec``'s source table, on a short connection; None when
    there is none (or no routing table yet)."""
    table = rollout_table(spec)
    conn = await connect(url, autocommit=True)
    async with conn:
        if not await table_exists(conn, table):
            return None
        return await read_row(conn, table=table, migration=migration)


async def read_recorded(
    url: str,
    *,
    migration: str,
    schema: str | None = None,
    statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS,
) -> DataPlaneSpec | None:
    """The data plane ``migrate setup`` recorded for ``migration`` (table, columns, v1 column,
    both models), or None when no routing row holds one.

    The routing table lives next to the source table, whose schema is what is being looked up,
    so every schema's routing table is read; ``schema`` (a table the caller was given) picks
    one when several hold the key. DatabaseUnavailable when the database cannot be reached.
    Its statements run under ``statement_timeout_seconds``, as the service's own do.
    """
    conn = await connect(url, autocommit=True)
    async with conn:
        await limit_statements(conn, statement_timeout_seconds)
        cur = await conn.execute(
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = %s AND c.relkind = 'r' AND has_table_privilege(c.oid, 'SELECT') "
            "ORDER BY n.nspname",
            [ROLLOUT_TABLE],
        )
        found: list[tuple[TableName, dict[str, Any]]] = []
        for (namespace,) in await cur.fetchall():
            table = TableName(ROLLOUT_TABLE, str(namespace))
            row = await (
                await conn.execute(
                    sql.SQL("SELECT source, target FROM {} WHERE migration = %s").format(
                        ident(table)
                    ),
                    [migration],
                )
            ).fetchone()
            raw = None if row is None else recorded_spec(row[0], row[1])
            if raw is not None:
                found.append((table, raw))
    if len(found) > 1:
        chosen = [(t, raw) for t, raw in found if t.schema == schema]
        if len(chosen) != 1:
            where = " and ".join(str(t) for t, _ in found)
            raise ConfigError(
                f"--migration {migration}: recorded in {where}; give --table SCHEMA.TABLE to "
                "choose the schema"
            )
        found = chosen
    if not found:
        return None
    ((table, raw),) = found
    try:
        return DataPlaneSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"routing row {migration!r} in {table}: the recorded "
            f"{validation_message(exc, prefix='spec', model=DataPlaneSpec)}; rerun `embedshift "
            f"migrate setup` for {migration}"
        ) from None


async def declare_emergency(
    conn: psycopg.AsyncConnection[Any], *, table: TableName, migration: str, reason: str
) -> None:
    """Set ``emergency`` on the row and NOTIFY, in one transaction: every replica follows."""
    async with conn.transaction():
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (migration, percentage, emergency, reason) VALUES (%s, 0, true, %s)"
                " ON CONFLICT (migration) DO UPDATE SET emergency = true, reason = EXCLUDED.reason,"
                " updated_at = now()"
            ).format(ident(table)),
            [migration, reason],
        )
        await conn.execute("SELECT pg_notify(%s, %s)", [ROLLOUT_CHANNEL, migration])


async def write_percentage(
    conn: psycopg.AsyncConnection[Any],
    *,
    table: TableName,
    migration: str,
    percentage: int,
    reason: str,
    clear_emergency: bool = False,
) -> None:
    """The control plane's write: set the percentage and NOTIFY, in one transaction.

    ``emergency`` is left as it is unless ``clear_emergency``: a webhook may set it at any
    moment, and only a deliberate (re)start of the rollout may clear it.
    """
    if not 0 <= percentage <= 100:
        raise ValueError(f"percentage {percentage} is not within 0–100")
    async with conn.transaction():
        await conn.execute(
            sql.SQL(
                "INSERT INTO {t} AS r (migration, percentage, reason) VALUES (%s, %s, %s)"
                " ON CONFLICT (migration) DO UPDATE SET percentage = EXCLUDED.percentage,"
                " reason = EXCLUDED.reason,"
                " emergency = CASE WHEN %s THEN false ELSE r.emergency END,"
                " updated_at = now()"
            ).format(t=ident(table)),
            [migration, percentage, reason, clear_emergency],
        )
        await conn.execute("SELECT pg_notify(%s, %s)", [ROLLOUT_CHANNEL, migration])


class RoutingFollower:
    """Keeps ``current`` in step with the routing row. One LISTEN connection per replica.

    ``on_record`` is called (without arguments, on the event loop) after the first read of the
    row and whenever the data plane recorded in it changes (``migrate setup`` recorded another
    spec for the key): ``embedshift serve`` then reads the record again and switches to it.
    Its connection's statements (the re-reads) run under ``statement_timeout_seconds``, as the
    service's pooled ones do; the LISTEN waiting between them is no statement.
    """

    def __init__(
        self,
        *,
        url: str,
        migration: str,
        default_percentage: int = 0,
        schema: str | None = None,
        reread_seconds: float = 5.0,
        on_record: Callable[[], None] | None = None,
        statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS,
    ) -> None:
        self._url = url
        self._statement_timeout = statement_timeout_seconds
        self._migration = migration
        self._table = TableName(ROLLOUT_TABLE, schema)
        self._reread = reread_seconds
        self._row = RoutingRow(percentage=default_percentage)
        self._local_emergency: RoutingRow | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_record = on_record
        self._record: str | None = None
        self._read_once = False

    @property
    def current(self) -> RoutingRow:
        """The row to route by: a local emergency wins until the database row is newer."""
        return self._local_emergency or self._row

    @property
    def migration(self) -> str:
        return self._migration

    @property
    def table(self) -> TableName:
        """The routing table it reads (``embedshift_rollout`` in the source table's schema)."""
        return self._table

    def declare_local_emergency(self, reason: str) -> None:
        """Switch this replica to v1 now, before (or without) the database agreeing."""
        self._local_emergency = replace(
            self._row, emergency=True, reason=reason, source="local-emergency"
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="embedshift-routing-follower")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _apply(self, row: RoutingRow | None) -> None:
        if row is None:
            return  # no row (yet): keep what we knew
        if self._local_emergency is not None and not row.emergency:
            # The database catches up with our local emergency, or clears it later: a row
            # written after we declared it is the operator's newer decision.
            local_at = self._local_emergency.updated_at
            if row.updated_at is None or local_at is None or row.updated_at <= local_at:
                return
        self._local_emergency = None  # the database row now decides
        before = self._row
        self._row = row
        if (before.percentage, before.emergency, before.reason) != (
            row.percentage,
            row.emergency,
            row.reason,
        ):
            log.info(
                "routing for %s: %d%% to v2%s",
                self._migration,
                row.percentage,
                f", EMERGENCY ({row.reason})" if row.emergency else "",
            )

    async def _read(self, conn: psycopg.AsyncConnection[Any]) -> None:
        row = await read_row(conn, table=self._table, migration=self._migration)
        self._apply(row)
        if row is None or (self._read_once and row.record == self._record):
            return
        self._read_once, self._record = True, row.record
        if self._on_record is not None:
            self._on_record()

    async def _follow(self) -> None:
        backoff = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=5
                )
                async with conn:
                    await limit_statements(conn, self._statement_timeout)
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ROLLOUT_CHANNEL)))
                    await self._read(conn)
                    backoff = 0.5
                    while True:
                        async for notify in conn.notifies(timeout=self._reread):
                            if notify.payload in ("", self._migration):
                                break
                        await self._read(conn)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "routing row unreachable (%s); keeping %d%% and retrying in %.1fs",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    self.current.percentage,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


async def wake_on_notify(
    url: str,
    *,
    migration: str,
    every: float,
    wake: asyncio.Event,
    statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS,
) -> None:
    """Set ``wake`` at once, whenever a NOTIFY on ``embedshift_rollout`` names ``migration``
    (``migrate setup`` sends one), right after each LISTEN starts, and at least every ``every``
    seconds, the database reachable or not. Runs until cancelled; what to read on a wake is
    the caller's (``embedshift serve`` waiting for the record of its migration). Its
    connection runs under ``statement_timeout_seconds``, as the service's do."""
    wake.set()  # read once at once, before the first connection succeeds or fails
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=5)
            async with conn:
                await limit_statements(conn, statement_timeout_seconds)
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ROLLOUT_CHANNEL)))
                wake.set()  # a record written before the LISTEN started is read now
                while True:
                    async for notify in conn.notifies(timeout=every):
                        if notify.payload in ("", migration):
                            break
                    wake.set()
        except (psycopg.Error, OSError):
            # The caller's read reports the failure; this only keeps the pace.
            await asyncio.sleep(every)
            wake.set()
