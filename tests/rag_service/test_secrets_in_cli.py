"""A Secret's value never appears in what the CLI or ``embedshift serve`` say: each shape of
:mod:`tests.secret_shapes`, carrying a random sentinel, given as the database URL or an API key.
The commands refuse a value libpq cannot use with one line naming what is wrong (exit 2), and a
usable one that cannot connect with one line (exit 1); neither quotes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_service.errors import EXIT_CONFIG, EXIT_PROVIDER_REFUSED, EXIT_RETRYABLE
from rag_service.testing.corpus import create_corpus
from tests.helpers import cli
from tests.kube_cluster import free_port
from tests.rag_service.test_redaction import PROBLEMS
from tests.secret_shapes import database_urls, header_values, sentinel

SENTINEL = sentinel()
EMBEDSHIFT = Path(sys.executable).with_name("embedshift")
URLS = database_urls(SENTINEL)


@pytest.mark.parametrize("shape", URLS)
@pytest.mark.parametrize("command", [["migrate", "setup"], ["migrate", "status"]])
def test_the_cli_never_quotes_a_database_url(
    capsys: pytest.CaptureFixture[str], shape: str, command: list[str]
) -> None:
    result = cli(
        capsys, *command, "--database-url", URLS[shape], "--table", "docs",
        "--target", "local:hash@8",
    )  # fmt: skip
    said = result.out + result.err
    assert SENTINEL not in said and SENTINEL[:8] not in said, said
    assert result.code == (EXIT_RETRYABLE if PROBLEMS[shape] is None else EXIT_CONFIG), said
    assert "Traceback" not in said
    if PROBLEMS[shape] is not None:
        assert "does not hold a usable PostgreSQL URL" in said, said


@pytest.mark.parametrize("shape", header_values(SENTINEL))
def test_the_cli_never_quotes_an_api_key(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    shape: str,
) -> None:
    create_corpus(database_url, table="docs_secret_keys", count=5)
    monkeypatch.setenv("EMBEDSHIFT_TARGET_API_KEY", header_values(SENTINEL)[shape])
    result = cli(
        capsys, "migrate", "run", "--database-url", database_url, "--table", "docs_secret_keys",
        "--target", "openai:text-embedding-3-small@256", "--target-base-url",
        "http://127.0.0.1:1/v1",
    )  # fmt: skip
    said = result.out + result.err
    assert SENTINEL not in said, said
    assert result.code == EXIT_PROVIDER_REFUSED, said
    assert "cannot be sent" in said, said


@pytest.mark.parametrize("shape", URLS)
def test_serve_never_quotes_a_database_url(shape: str, tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": URLS[shape], "EMBEDSHIFT_MIGRATION": "rag/docs"}
    with subprocess.Popen(
        [str(EMBEDSHIFT), "serve", "--port", str(free_port())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    ) as process:
        try:
            out, _ = process.communicate(timeout=8)
        except subprocess.TimeoutExpired:  # still waiting for its database: what it said so far
            process.terminate()
            out, _ = process.communicate(timeout=20)
    said = out.decode(errors="replace")
    assert SENTINEL not in said and SENTINEL[:8] not in said, said
    if PROBLEMS[shape] is not None:
        assert process.returncode == EXIT_CONFIG, said
        assert "does not hold a usable PostgreSQL URL" in said, said


@pytest.mark.parametrize("shape", header_values(SENTINEL))
@pytest.mark.parametrize(
    "command", [["serve", "--port", "1"], ["operator", "run", "--namespace", "rag"]]
)
def test_a_webhook_token_no_header_can_carry_is_refused_unquoted(
    shape: str, command: list[str], tmp_path: Path
) -> None:
    """Both webhooks compare ALERT_WEBHOOK_SECRET with what Alertmanager sends: a value no
    header can carry never matches, so both refuse to start (before any database or cluster),
    saying what is wrong without quoting it."""
    env = {
        **os.environ,
        "ALERT_WEBHOOK_SECRET": header_values(SENTINEL)[shape],
        "DATABASE_URL": "postgresql://app@127.0.0.1:1/rag",
        "EMBEDSHIFT_MIGRATION": "rag/docs",
        "KUBECONFIG": str(tmp_path / "none"),
    }
    done = subprocess.run(
        [str(EMBEDSHIFT), *command], env=env, capture_output=True, text=True, timeout=60,
        cwd=tmp_path, check=False,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert SENTINEL not in said and SENTINEL[:8] not in said, said
    assert done.returncode == EXIT_CONFIG, said
    assert "ALERT_WEBHOOK_SECRET cannot be a bearer token" in said, said


def test_help_names_the_environment_never_its_values(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("DATABASE_URL", "EMBEDSHIFT_TARGET_BASE_URL", "EMBEDSHIFT_PROMETHEUS_URL"):
        monkeypatch.setenv(variable, f"https://app:{SENTINEL}@example.test/v1")
    for command in (["migrate", "run"], ["serve"], ["rollout", "run"]):
        with pytest.raises(SystemExit):
            cli(capsys, *command, "--help")
        shown = capsys.readouterr().out
        assert SENTINEL not in shown, shown
    assert "(env EMBEDSHIFT_TARGET_BASE_URL: set)" in cli_help(capsys, "migrate", "run")


def cli_help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit):
        cli(capsys, *command, "--help")
    return " ".join(capsys.readouterr().out.split())
