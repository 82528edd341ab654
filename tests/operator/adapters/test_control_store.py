"""The control loop's PostgreSQL (ControlStore) on a real database: every statement it sends runs
under the statement timeout, and a timeout is an observation error the core holds on to; the
cleanup DROP reports what happened instead of raising. The Jobs' URL never has the timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from embedshift_operator.adapters.postgres import ControlStore, control_conninfo
from embedshift_operator.core import Observations, decide
from embedshift_operator.local import resolve_environment
from embedshift_operator.resource import (
    ConditionType,
    EmbeddingMigration,
    EmbeddingMigrationStatus,
    Phase,
    spec_hash,
)
from embedshift_operator.ticking import read_database
from rag_service.errors import DatabaseError
from rag_service.schema import setup
from rag_service.testing.corpus import create_corpus
from rag_service.testing.rollout import manifest

KEY = "default/docs"
TABLE = "docs"


@pytest.fixture(scope="module")
def resource(database_url: str) -> EmbeddingMigration:
    create_corpus(database_url, table=TABLE, count=40, source_dimensions=32)
    document = manifest(name="docs", prometheus_url="http://127.0.0.1:9", table=TABLE)
    document["spec"]["cleanup"] = {"dropSource": True, "retainSourceFor": "1s"}
    return EmbeddingMigration.model_validate(document)


@pytest.fixture(scope="module")
def ready(database_url: str, resource: EmbeddingMigration) -> EmbeddingMigration:
    """``migrate setup`` has run: the side table, the queue and the routing row exist."""
    asyncio.run(setup(database_url, resource.spec.data_plane, migration=KEY))
    return resource


@contextmanager
def locked(database_url: str, table: str, mode: str = "ACCESS EXCLUSIVE") -> Iterator[None]:
    """Another session holds ``table`` in ``mode`` until the block ends (a migration, a VACUUM
    FULL, a forgotten transaction in psql)."""
    with psycopg.connect(database_url) as other:
        other.execute(f"LOCK TABLE {table} IN {mode} MODE")
        try:
            yield
        finally:
            other.rollback()


def setting(conninfo: str, name: str) -> str:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(f"SHOW {name}").fetchone()
        assert row is not None
        return str(row[0])


def column_exists(database_url: str, column: str = "embedding") -> bool:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = %s AND column_name = %s",
            [TABLE, column],
        ).fetchone()
        return bool(row and row[0])


# ---- statement_timeout -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(10.0, "10s"), (0.25, "250ms"), (0.0001, "1ms"), (None, "0"), (0.0, "0")],
)
def test_a_control_loop_connection_has_the_statement_timeout(
    database_url: str, seconds: float | None, shown: str
) -> None:
    assert setting(control_conninfo(database_url, seconds), "statement_timeout") == shown


def test_the_timeout_adds_to_the_options_the_url_already_has(database_url: str) -> None:
    url = make_conninfo(database_url, options="-c work_mem=7MB")
    conninfo = control_conninfo(url, 3.0)
    assert setting(conninfo, "work_mem") == "7MB"
    assert setting(conninfo, "statement_timeout") == "3s"


def test_an_unusable_url_is_left_for_connect_to_refuse_without_quoting_it() -> None:
    url = "postgresql://user:p@ss@host/db?sslmode=bogus%"
    assert control_conninfo(url, 10.0) == url


def test_the_jobs_get_the_database_url_without_the_timeout(
    database_url: str, resource: EmbeddingMigration
) -> None:
    environment = resolve_environment(resource, {"DATABASE_URL": database_url})
    assert environment.children["DATABASE_URL"] == database_url
    assert setting(environment.children["DATABASE_URL"], "statement_timeout") == "0"


async def test_a_statement_past_the_timeout_is_an_observation_error_the_core_holds(
    database_url: str, ready: EmbeddingMigration
) -> None:
    spec = ready.spec
    store = ControlStore(url=database_url, spec=spec, migration=KEY, statement_timeout=0.5)
    assert await store.routing() is not None  # unlocked: read at once

    started = time.monotonic()
    with locked(database_url, "embedshift_rollout"), locked(database_url, TABLE):
        reading = await read_database(store, with_progress=True)
    elapsed = time.monotonic() - started

    assert elapsed < 5, "each read gave up after 0.5 s instead of waiting for the lock"
    assert reading.routing is None and reading.progress is None
    assert len(reading.errors) == 2  # the routing row and the progress counts
    for error in reading.errors:
        assert "statement timeout (0.5 s) and was cancelled" in error
        assert "--statement-timeout" in error

    # Held like any other observation error: Ready False, the phase and percentage unchanged.
    status = EmbeddingMigrationStatus(
        phase=Phase.PROGRESSING, percentage=10, spec_hash=spec_hash(spec)
    )
    observations = Observations(database_error="; ".join(reading.errors))
    decision = decide(spec, status, observations, datetime.now(UTC), name="docs")
    ready_condition = next(c for c in decision.status.conditions if c.type is ConditionType.READY)
    assert (ready_condition.status, ready_condition.reason) == ("False", "DatabaseUnreachable")
    assert "statement timeout" in ready_condition.message
    assert (decision.status.phase, decision.status.percentage) == (Phase.PROGRESSING, 10)


async def test_a_lock_released_within_the_timeout_is_waited_for(
    database_url: str, ready: EmbeddingMigration
) -> None:
    store = ControlStore(url=database_url, spec=ready.spec, migration=KEY, statement_timeout=0.3)
    with locked(database_url, "embedshift_rollout"), pytest.raises(DatabaseError):
        await store.routing()
    patient = ControlStore(url=database_url, spec=ready.spec, migration=KEY, statement_timeout=30)
    with psycopg.connect(database_url) as other:
        other.execute("LOCK TABLE embedshift_rollout IN ACCESS EXCLUSIVE MODE")

        async def release() -> None:
            await asyncio.sleep(0.5)
            other.rollback()

        releasing = asyncio.create_task(release())
        assert await patient.routing() is not None
        await releasing


# ---- the cleanup DROP ------------------------------------------------------------------------


async def test_drop_source_says_why_it_failed_and_succeeds_once_nothing_stands_in_the_way(
    database_url: str, ready: EmbeddingMigration
) -> None:
    store = ControlStore(url=database_url, spec=ready.spec, migration=KEY)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE VIEW docs_v1 AS SELECT id, embedding FROM {TABLE}")

    depended = await store.drop_source("embedding")
    assert depended is not None
    assert "other objects depend on it" in depended
    assert column_exists(database_url)

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP VIEW docs_v1")
    started = time.monotonic()
    with locked(database_url, TABLE, mode="ACCESS SHARE"):  # a long SELECT in another session
        busy = await store.drop_source("embedding")
    assert busy is not None and "lock timeout" in busy
    assert time.monotonic() - started < 5  # its lock_timeout, not forever
    assert column_exists(database_url)

    assert await store.drop_source("embedding") is None
    assert not column_exists(database_url)
    assert await store.drop_source("embedding") is None  # gone already: still done
