"""The search service's statement timeout: one session SET on every connection it opens (its
pool's, the routing row's follower, the record's wait and read), so that no statement of the
service runs unbounded. Below ``service`` and ``rollout_row``, which both use it."""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg import sql

# Every statement the service runs (``serve --statement-timeout``): a search's, the query
# cache's, the health checks' and the routing row's, set on each connection it opens.
STATEMENT_TIMEOUT_SECONDS: Final = 5.0


async def limit_statements(conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
    """Every later statement of ``conn``'s session runs under ``statement_timeout``: past it the
    server cancels it, and the caller sees a psycopg error (QueryCanceled), an error for that
    request. A session SET (as ``configure_connection``'s), not libpq's ``options``, which
    PgBouncer refuses. An idle LISTEN is no statement: its notifications are not cut off."""
    await conn.execute(
        sql.SQL("SET statement_timeout = {}").format(sql.Literal(max(1, round(seconds * 1000))))
    )
