"""cleanup.dropSource under ``embedshift rollout run`` (the real CLI, a real PostgreSQL): a DROP
that fails is not recorded as done, is a Warning and a condition, and is retried with backoff
until it commits; only then is ``sourceDroppedAt`` saved."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from embedshift_operator.adapters.postgres import ControlStore
from embedshift_operator.resource import (
    EmbeddingMigration,
    EmbeddingMigrationStatus,
    Phase,
    VerificationStatus,
    spec_hash,
)
from rag_service.schema import setup
from rag_service.testing.corpus import create_corpus
from rag_service.testing.rollout import driving, manifest, status, write
from tests.operator.local.harness import wait_for

pytestmark = pytest.mark.slow

NAME = "dropper"
KEY = f"default/{NAME}"
TABLE = "dropdocs"


def _column_exists(database_url: str) -> bool:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = %s AND column_name = 'embedding'",
            [TABLE],
        ).fetchone()
        return bool(row and row[0])


def _condition(saved: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    conditions = (saved or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), None)


def test_a_failing_drop_is_not_recorded_and_a_later_success_is(
    database_url: str, tmp_path: Path
) -> None:
    create_corpus(database_url, table=TABLE, count=30, source_dimensions=32)
    document = manifest(name=NAME, prometheus_url="http://127.0.0.1:9", table=TABLE, shards=1)
    document["spec"]["cleanup"] = {"dropSource": True, "retainSourceFor": "1s"}
    path = tmp_path / "migration.yaml"
    write(path, document)
    resource = EmbeddingMigration.model_validate(document)
    spec = resource.spec
    asyncio.run(setup(database_url, spec.data_plane, migration=KEY))
    # The migration succeeded an hour ago, as a driver that ran it would have saved.
    succeeded = datetime.now(UTC) - timedelta(hours=1)
    store = ControlStore(url=database_url, spec=spec, migration=KEY)
    asyncio.run(store.ensure_tables())
    asyncio.run(
        store.save_status(
            EmbeddingMigrationStatus(
                phase=Phase.SUCCEEDED,
                percentage=100,
                spec_hash=spec_hash(spec),
                phase_started_at=succeeded,
                step_started_at=succeeded,
                verification=VerificationStatus(ok=True, time=succeeded),
            )
        )
    )
    # A report someone built on the v1 column: the DROP cannot go through while it exists.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE VIEW dropdocs_report AS SELECT id, embedding FROM {TABLE}")

    with driving(path, database_url=database_url, log_dir=tmp_path / "logs", tick=0.2) as driver:

        def failed() -> dict[str, Any] | None:
            saved = status(database_url, KEY)
            condition = _condition(saved, "SourceDropped")
            return saved if condition and condition["reason"] == "DropSourceFailed" else None

        saved = wait_for("the failed DROP in status", failed, timeout=60, driver=driver)
        assert "sourceDroppedAt" not in saved
        assert saved["cleanup"]["dropFailures"] >= 1
        assert "depend on it" in saved["cleanup"]["lastError"]
        condition = _condition(saved, "SourceDropped")
        assert condition is not None and condition["status"] == "False"
        warnings = [e for e in driver.events if e.get("reason") == "DropSourceFailed"]
        assert warnings and warnings[0]["type"] == "Warning"
        assert "dropping column embedding failed (attempt 1)" in warnings[0]["message"]
        assert "retrying in 10 s" in warnings[0]["message"]
        assert _column_exists(database_url)

        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DROP VIEW dropdocs_report")

        def dropped() -> dict[str, Any] | None:
            saved = status(database_url, KEY)
            return saved if saved and saved.get("sourceDroppedAt") else None

        saved = wait_for("sourceDroppedAt after the retry", dropped, timeout=60, driver=driver)
        attempts = [e for e in driver.events if e.get("reason") == "DropSourceFailed"]

    assert not _column_exists(database_url)
    assert "cleanup" not in saved
    condition = _condition(saved, "SourceDropped")
    assert condition is not None and (condition["status"], condition["reason"]) == (
        "True",
        "SourceDropped",
    )
    assert [e["type"] for e in driver.events if e.get("reason") == "SourceDropped"] == ["Normal"]
    # Backoff, not a retry every 0.2 s tick: 10 s, then 20 s, … between attempts.
    assert 1 <= len(attempts) <= 3
    recorded = datetime.fromisoformat(saved["sourceDroppedAt"])
    first_failure = datetime.fromisoformat(warnings[0]["time"])
    assert recorded - first_failure >= timedelta(seconds=9)
