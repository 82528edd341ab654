"""Every mistake a user can make: one line naming the field and the fix, exit ≠ 0, no traceback,
no secret, and nothing changed."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from rag_service.errors import EXIT_PROVIDER_REFUSED, EXIT_SCHEMA_REFUSED
from rag_service.testing.corpus import create_corpus
from tests.helpers import Result, cli, flags


@pytest.fixture(scope="module")
def docs(database_url: str) -> str:
    create_corpus(database_url, table="docs_errors", count=60)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS no_pk, parted")
        conn.execute("CREATE TABLE no_pk (id bigint, content text, category text)")
        conn.execute("INSERT INTO no_pk VALUES (1, 'a', 'x'), (1, 'b', 'x')")
        conn.execute(
            "CREATE TABLE parted (id bigint, content text, category text, PRIMARY KEY (id)) "
            "PARTITION BY RANGE (id)"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS num_text (id bigint PRIMARY KEY, content int)")
    return "docs_errors"


def one_clear_line(result: Result, *fragments: str, code: int = 1) -> None:
    assert result.code == code, result
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("embedshift: error:")]
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_table(capsys: pytest.CaptureFixture[str], database_url: str, docs: str) -> None:
    result = cli(capsys, "migrate", "setup", *flags(database_url, "nope"))
    one_clear_line(result, "spec.database.table", "'nope' does not exist")


def test_unknown_column_lists_the_real_ones(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    result = cli(capsys, "migrate", "setup", *flags(database_url, docs), "--text-column", "body")
    one_clear_line(result, "textColumn", "'body' not found", "category, content, embedding, id")


def test_non_text_column(capsys: pytest.CaptureFixture[str], database_url: str, docs: str) -> None:
    result = cli(
        capsys, "migrate", "setup", "--database-url", database_url, "--table", "num_text",
        "--target", "local:hash@8",
    )  # fmt: skip
    one_clear_line(
        result,
        "textColumn",
        "is integer, not text",
        "nothing was changed",
        code=EXIT_SCHEMA_REFUSED,
    )


def test_id_column_that_is_not_unique(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    result = cli(capsys, "migrate", "setup", *flags(database_url, "no_pk"))
    one_clear_line(
        result, "idColumn", "not unique", "nothing was changed", code=EXIT_SCHEMA_REFUSED
    )


def test_partitioned_table_is_refused(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    result = cli(capsys, "migrate", "setup", *flags(database_url, "parted"))
    one_clear_line(result, "partitioned", "nothing was changed", code=EXIT_SCHEMA_REFUSED)


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--table", "docs; DROP TABLE docs", "not a plain SQL identifier"),
        ("--text-column", "content)--", "not a plain SQL identifier"),
        ("--table", "a.b.c", "must be 'table' or 'schema.table'"),
        ("--target", "openai/text-embedding-3-small", "provider:model@dimensions"),
        ("--target", "cohere:embed@768", "provider 'cohere' is not one of openai, google, local"),
        ("--target", "openai:text-embedding-3-small@4000", "gives 1–1536 dimensions"),
        ("--target", "google:gemini-embedding-001@64", "gives 128–3072 dimensions"),
        ("--target", "local:hash@3072", "set spec.target.index.halfvec: true"),
        ("--price", "free", "provider:model=USD_PER_MILLION_TOKENS"),
    ],
)
def test_bad_flags(
    capsys: pytest.CaptureFixture[str],
    database_url: str,
    docs: str,
    flag: str,
    value: str,
    fragment: str,
) -> None:
    argv = {
        **dict(zip(flags(database_url, docs)[::2], flags(database_url, docs)[1::2], strict=True)),
        flag: value,
    }
    result = cli(capsys, "migrate", "setup", *[x for kv in argv.items() for x in kv])
    one_clear_line(result, fragment, code=2)


def test_bad_shard_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(capsys, "migrate", "run", *flags(database_url, docs), "--shard", "4/4")
    assert exit_info.value.code == 2
    assert "needs 0 ≤ I < N" in capsys.readouterr().err


def test_missing_database_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    result = cli(capsys, "migrate", "status", "--table", "docs", "--target", "local:hash@8")
    one_clear_line(result, "DATABASE_URL is not set", code=2)


def test_unreachable_database_does_not_print_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "postgresql://app:s3cret-pw@127.0.0.1:9/rag"
    result = cli(capsys, "migrate", "setup", *flags(url, "docs"))
    one_clear_line(result, "cannot connect to the database", "host=127.0.0.1 port=9 dbname=rag")
    assert "s3cret-pw" not in result.err + result.out


def test_missing_api_key(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    docs: str,
) -> None:
    for name in ("OPENAI_API_KEY", "EMBEDSHIFT_TARGET_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    base = flags(database_url, docs, target="openai:text-embedding-3-small@768")
    assert cli(capsys, "migrate", "setup", *base).code == 0
    result = cli(capsys, "migrate", "run", *base)
    one_clear_line(
        result,
        "no API key",
        "EMBEDSHIFT_TARGET_API_KEY or OPENAI_API_KEY",
        code=EXIT_PROVIDER_REFUSED,
    )


def test_run_before_setup(capsys: pytest.CaptureFixture[str], database_url: str, docs: str) -> None:
    result = cli(capsys, "migrate", "run", *flags(database_url, docs, target="local:other@32"))
    one_clear_line(result, "run `embedshift migrate setup`")


def test_category_without_category_column(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    argv = ["--database-url", database_url, "--table", docs, "--target", "local:hash@16"]
    assert cli(capsys, "migrate", "setup", *argv).code == 0
    result = cli(capsys, "migrate", "run", *argv, "--category", "pricing")
    one_clear_line(result, "--category", "categoryColumn", code=2)


def test_existing_side_table_of_another_type_is_refused(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    base = flags(database_url, docs, target="local:hash@24")
    assert cli(capsys, "migrate", "setup", *base).code == 0
    result = cli(capsys, "migrate", "setup", *base, "--halfvec")
    one_clear_line(
        result, "already exists with embedding vector(24)", "halfvec(24)", code=EXIT_SCHEMA_REFUSED
    )


def test_halfvec_allows_more_than_2000_dimensions(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    base = flags(database_url, docs, target="local:hash@3072")
    result = cli(capsys, "migrate", "setup", *base, "--halfvec")
    assert result.code == 0, result.err
    assert cli(capsys, "migrate", "run", *base, "--halfvec").code == 0
    assert cli(capsys, "migrate", "index", *base, "--halfvec").code == 0
    verify = cli(capsys, "migrate", "verify", *base, "--halfvec")
    assert verify.code == 0, verify.out


def test_halfvec_above_4000_dimensions_is_refused(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    result = cli(
        capsys, "migrate", "setup", *flags(database_url, docs, "local:hash@4096"), "--halfvec"
    )
    one_clear_line(result, "4000-dimension limit for a halfvec index", code=2)


@pytest.mark.parametrize(
    ("manifest", "fragment"),
    [
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\nspec: {}\n", "expected apiVersion"),
        ("[not, a, mapping]\n", "must hold one EmbeddingMigration"),
        ("spec: {database: {table: docs\n", "not valid YAML"),
        (
            "apiVersion: embedshift.io/v1alpha1\nkind: EmbeddingMigration\nmetadata: {name: x}\n"
            "spec:\n  database: {table: docs, textColum: body}\n"
            "  target: {provider: local, model: hash, dimensions: 8}\n",
            "spec.database.textColum: unknown field",
        ),
        (
            "apiVersion: embedshift.io/v1alpha1\nkind: EmbeddingMigration\nmetadata: {name: x}\n"
            "spec:\n  database: {table: docs}\n"
            "  target: {provider: openai, model: text-embedding-3-small, dimensions: 0}\n",
            "spec.target.dimensions",
        ),
    ],
)
def test_bad_config_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, manifest: str, fragment: str
) -> None:
    path = tmp_path / "migration.yaml"
    path.write_text(manifest)
    result = cli(capsys, "migrate", "status", "--config", str(path), "--database-url", "x")
    one_clear_line(result, fragment, code=2)


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = cli(capsys, "migrate", "status", "--config", str(tmp_path / "nope.yaml"))
    one_clear_line(result, "--config: cannot read", code=2)


def test_refusals_change_nothing(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT count(*) FROM pg_class").fetchone()
    cli(capsys, "migrate", "setup", *flags(database_url, "no_pk"))
    cli(capsys, "migrate", "setup", *flags(database_url, "parted"))
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_class").fetchone() == before


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "-1", "ten"])
def test_a_budget_that_could_never_stop_the_backfill_is_refused(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str, budget: str
) -> None:
    """nan compares false with any spend, inf never stops, a negative is meaningless (issue 10,
    defect 1): refused before anything is embedded or spent."""
    before = _batches(database_url)
    with pytest.raises(SystemExit) as exit_info:
        cli(capsys, "migrate", "run", *flags(database_url, docs), f"--budget-usd={budget}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--budget-usd" in err and "Traceback" not in err
    assert _batches(database_url) == before  # nothing embedded, nothing spent


def _batches(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        exists = conn.execute("SELECT to_regclass('embedding_migration_status')").fetchone()
        if exists is None or exists[0] is None:
            return 0
        row = conn.execute("SELECT count(*) FROM embedding_migration_status").fetchone()
        return 0 if row is None else int(row[0])


@pytest.mark.parametrize("budget", [".nan", ".inf", "-1"])
def test_a_budget_in_the_spec_that_could_never_stop_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, database_url: str, docs: str, budget: str
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "apiVersion: embedshift.io/v1alpha1\nkind: EmbeddingMigration\n"
        "metadata: {name: m, namespace: default}\n"
        f"spec:\n  database: {{table: {docs}}}\n"
        "  source: {provider: local, model: hash, dimensions: 32}\n"
        "  target: {provider: local, model: hash, dimensions: 16}\n"
        f"  migration: {{budgetUSD: {budget}}}\n"
    )
    result = cli(
        capsys, "migrate", "run", "--config", str(manifest), "--database-url", database_url
    )
    one_clear_line(result, "spec.migration.budgetUSD", code=2)
