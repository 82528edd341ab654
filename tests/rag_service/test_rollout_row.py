"""The connections ``rollout_row`` opens for the search service run under the service's
statement_timeout (``limit_statements``, as its pool's do), on a real PostgreSQL; the LISTEN
they wait in is no statement, so a notification past the timeout still arrives."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from rag_service.identifiers import TableName
from rag_service.rollout_row import (
    RoutingFollower,
    read_recorded,
    wake_on_notify,
    write_percentage,
)
from rag_service.schema import ROLLOUT_TABLE, connect, ident, setup
from rag_service.statement_timeout import STATEMENT_TIMEOUT_SECONDS
from rag_service.testing.corpus import corpus_spec, create_corpus

TABLE = "rollout_row_docs"
KEY = "default/rollout-row"


@pytest.fixture(scope="module")
def recorded(database_url: str) -> str:
    """A table set up for ``KEY``: its routing row exists (0 %) and records the data plane."""
    create_corpus(database_url, table=TABLE, count=20, source_dimensions=8)
    spec = corpus_spec(TABLE, source_dimensions=8, target="local:hash@16")
    asyncio.run(setup(database_url, spec, migration=KEY))
    return database_url


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[psycopg.AsyncConnection[Any]]:
    """Every async connection opened from now on, in order (the code under test's included)."""
    connections: list[psycopg.AsyncConnection[Any]] = []
    original = psycopg.AsyncConnection.connect

    async def spy(*args: Any, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        conn = await original(*args, **kwargs)
        connections.append(conn)
        return conn

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", spy)
    return connections


async def eventually(check: Callable[[], Any], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


async def shown_timeout(conn: psycopg.AsyncConnection[Any]) -> str:
    """``SHOW statement_timeout`` on ``conn`` (queued behind its owner's current wait)."""
    row = await (await conn.execute("SHOW statement_timeout")).fetchone()
    assert row is not None
    return str(row[0])


async def test_a_followers_connection_runs_under_the_statement_timeout(
    recorded: str, opened: list[psycopg.AsyncConnection[Any]]
) -> None:
    for seconds, shown in ((0.75, "750ms"), (None, "5s")):
        opened.clear()
        chosen = {} if seconds is None else {"statement_timeout_seconds": seconds}
        follower = RoutingFollower(url=recorded, migration=KEY, reread_seconds=0.2, **chosen)
        await follower.start()
        try:
            await eventually(lambda f=follower: f.current.source == "database", "the first read")
            assert len(opened) == 1
            assert await shown_timeout(opened[0]) == shown
        finally:
            await follower.aclose()
    assert STATEMENT_TIMEOUT_SECONDS == 5.0  # the service's default, shown as 5s above


async def test_a_notification_past_the_timeout_still_reaches_the_follower(recorded: str) -> None:
    """The follower idles in LISTEN far longer than its statement_timeout (and re-reads only
    every 60 s): the NOTIFY of a new percentage reaches it all the same, at once."""
    follower = RoutingFollower(
        url=recorded, migration=KEY, reread_seconds=60, statement_timeout_seconds=0.2
    )
    await follower.start()
    try:
        await eventually(lambda: follower.current.source == "database", "the first read")
        await asyncio.sleep(1.0)  # five timeouts of idle LISTEN
        conn = await connect(recorded, autocommit=True)
        async with conn:
            await write_percentage(
                conn, table=TableName(ROLLOUT_TABLE), migration=KEY, percentage=30, reason="t"
            )
        await eventually(lambda: follower.current.percentage == 30, "the NOTIFY", within=5)
    finally:
        await follower.aclose()
        conn = await connect(recorded, autocommit=True)
        async with conn:
            await write_percentage(
                conn, table=TableName(ROLLOUT_TABLE), migration=KEY, percentage=0, reason="t"
            )


async def test_the_record_waits_connection_runs_under_the_statement_timeout(
    recorded: str, opened: list[psycopg.AsyncConnection[Any]]
) -> None:
    wake = asyncio.Event()
    task = asyncio.create_task(
        wake_on_notify(
            recorded, migration=KEY, every=0.2, wake=wake, statement_timeout_seconds=0.75
        )
    )
    try:
        await eventually(lambda: bool(opened), "the LISTEN connection")
        assert await shown_timeout(opened[0]) == "750ms"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_reading_the_record_is_cancelled_at_the_statement_timeout(recorded: str) -> None:
    """The routing table locked (say, by a schema change): reading the record gives up at the
    statement timeout instead of waiting for the lock."""
    found = await read_recorded(recorded, migration=KEY, statement_timeout_seconds=0.3)
    assert found is not None and found.database.table_name.name == TABLE
    with psycopg.connect(recorded) as locker:
        locker.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                ident(TableName(ROLLOUT_TABLE))
            )
        )
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):  # not TimeoutError: no endless wait
            await asyncio.wait_for(
                read_recorded(recorded, migration=KEY, statement_timeout_seconds=0.3), 10
            )
        waited = time.monotonic() - started
        locker.rollback()
    assert 0.25 <= waited < 3, waited
