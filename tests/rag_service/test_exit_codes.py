"""The exit code tells a failure a rerun may mend from one it cannot (``rag_service.errors``): a
Kubernetes Job fails at once on the second kind (its podFailurePolicy) and retries the first."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from embedshift_operator.cli import main
from rag_service.errors import (
    EXIT_CONFIG,
    EXIT_RETRYABLE,
    EXIT_VERIFICATION,
    PERMANENT_EXIT_CODES,
)
from rag_service.testing.corpus import create_corpus
from tests.helpers import Result, cli, flags

TABLE = "docs_exit_codes"


@pytest.fixture(scope="module")
def indexed(database_url: str) -> list[str]:
    """A migrated, indexed corpus: ``migrate verify`` passes on it with the defaults."""
    create_corpus(database_url, table=TABLE, count=300)
    base = flags(database_url, TABLE)
    for step in ("setup", "run", "index"):
        assert main(["migrate", step, *base]) == 0, step
    return base


def error_line(result: Result) -> str:
    """The one ``embedshift: error:`` line, without its prefix (what a Job's status shows)."""
    assert "Traceback" not in result.err
    lines = [x for x in result.err.splitlines() if x.startswith("embedshift: error:")]
    assert len(lines) == 1, result.err
    return lines[0].removeprefix("embedshift: error:").strip()


def test_verify_failing_on_recall_exits_with_the_verification_code(
    capsys: pytest.CaptureFixture[str], indexed: list[str]
) -> None:
    assert cli(capsys, "migrate", "verify", *indexed).code == 0
    # ef_search 1 below k = 10: the index returns one neighbour of ten, recall ≈ 0.1.
    failed = cli(
        capsys, "migrate", "verify", *indexed, "--ef-search", "1", "--min-recall", "0.9", "--json"
    )
    assert failed.code == EXIT_VERIFICATION
    assert EXIT_VERIFICATION in PERMANENT_EXIT_CODES  # so the Job does not run it again
    checks = {c["name"]: c for c in json.loads(failed.out)["checks"]}  # stdout stays JSON
    assert not checks["index_recall"]["ok"]
    assert all(c["ok"] for name, c in checks.items() if name != "index_recall")
    line = error_line(failed)
    assert line.startswith("verification failed: index_recall: recall@10"), line
    assert "minimum 0.9" in line


def test_a_refused_spec_exits_2(
    capsys: pytest.CaptureFixture[str], indexed: list[str], tmp_path: Path, database_url: str
) -> None:
    manifest = tmp_path / "migration.yaml"
    manifest.write_text(
        "apiVersion: embedshift.io/v1alpha1\nkind: EmbeddingMigration\n"
        "metadata: {name: docs}\n"
        f"spec:\n  database: {{table: {TABLE}}}\n"
        "  target: {provider: openai, model: text-embedding-3-small, dimensions: -5}\n"
    )
    result = cli(
        capsys, "migrate", "verify", "--config", str(manifest), "--database-url", database_url
    )
    assert result.code == EXIT_CONFIG
    assert EXIT_CONFIG in PERMANENT_EXIT_CODES
    assert "dimensions" in error_line(result)


def test_an_unreachable_database_exits_with_the_retryable_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://embedshift:secret@127.0.0.1:{port}/rag"
    result = cli(capsys, "migrate", "verify", *flags(url, TABLE))
    assert result.code == EXIT_RETRYABLE
    assert EXIT_RETRYABLE not in PERMANENT_EXIT_CODES  # the Job retries it (backoffLimit)
    line = error_line(result)
    assert "cannot connect to the database" in line and "secret" not in line
