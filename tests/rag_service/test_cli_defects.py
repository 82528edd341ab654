"""Issue 10, defects 2, 3, 6, 7 and 9, as a careful user met them: each through the real CLI on a
real PostgreSQL, each refusal one line naming the flag (or field) and the fix, nothing changed.

2. a model of unknown price counted as $0: a budget could never stop it, and the dry run and
   status said "$0.0000";
3. ``migrate setup`` for another target re-pointed a routing row at 25 % at an empty side table
   and printed "at 0 %" whatever the row said;
6. an empty string flag was read as "not given", so the config silently won;
7. a misspelt ``--category`` embedded nothing and exited 0;
9. malformed YAML said neither line nor column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import psycopg
import pytest

from embedshift_operator.cli import main
from embedshift_operator.cli.flags import add_spec_flags
from rag_service.errors import EXIT_SCHEMA_REFUSED
from rag_service.testing import EmbeddingServer
from rag_service.testing.corpus import CATEGORIES, create_corpus
from tests.helpers import Result, counts, flags, spec_for

TABLE = "docs_defects"
UNPRICED = "openai:my-finetune@64"  # an OpenAI-compatible model no price list knows


@pytest.fixture(scope="module")
def docs(database_url: str) -> str:
    create_corpus(database_url, table=TABLE, count=60, source_dimensions=0)
    return TABLE


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """``cli``, but an argparse refusal (SystemExit) is a result too."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def refused(result: Result, *fragments: str, code: int = 2) -> str:
    """The one error line, after checking the exit code and that there is no traceback."""
    assert result.code == code, result
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if "error:" in line]
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def batches(url: str) -> int:
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('embedding_migration_status')").fetchone() == (None,):
            return 0
        row = conn.execute("SELECT count(*) FROM embedding_migration_status").fetchone()
        return 0 if row is None else int(row[0])


def manifest(
    tmp_path: Path, table: str, *, target: str = "local:hash@16", **migration: object
) -> Path:
    provider, rest = target.split(":", 1)
    model, dims = rest.split("@")
    path = tmp_path / "migration.yaml"
    path.write_text(
        "apiVersion: embedshift.io/v1alpha1\nkind: EmbeddingMigration\n"
        "metadata: {name: defects, namespace: default}\n"
        f"spec:\n  database: {{table: {table}, categoryColumn: category}}\n"
        f"  target: {{provider: {provider}, model: {model}, dimensions: {dims}}}\n"
        f"  migration: {json.dumps(migration)}\n"
    )
    return path


# ---- 2. a model of unknown price --------------------------------------------------------------


def test_a_budget_flag_on_a_model_of_unknown_price_is_refused(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    before = batches(database_url)
    result = run(
        capsys, "migrate", "run", *flags(database_url, docs, UNPRICED), "--budget-usd", "5"
    )
    refused(
        result,
        "--budget-usd",
        "no price is known for openai:my-finetune",
        "--price openai:my-finetune=USD_PER_MILLION_TOKENS",
    )
    assert batches(database_url) == before


def test_a_budget_in_the_spec_on_a_model_of_unknown_price_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, database_url: str, docs: str
) -> None:
    path = manifest(tmp_path, docs, target=UNPRICED, budgetUSD=5)
    for dry_run in ([], ["--dry-run"]):
        result = run(
            capsys,
            "migrate",
            "run",
            "--config",
            str(path),
            "--database-url",
            database_url,
            *dry_run,
        )
        refused(result, "spec.migration.budgetUSD", "no price is known for openai:my-finetune")


def test_a_price_in_the_manifest_lets_the_budget_stop_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, database_url: str, docs: str
) -> None:
    """In a cluster the Jobs take no --price: the model's usdPerMillionTokens is the way."""
    path = manifest(tmp_path, docs, target=UNPRICED, budgetUSD=5)
    text = path.read_text().replace(
        "dimensions: 64}", "dimensions: 64, usdPerMillionTokens: 1500000}"
    )
    path.write_text(text)
    base = ["migrate", "run", "--config", str(path), "--database-url", database_url, "--dry-run"]
    plan = json.loads(run(capsys, *base, "--json").out)
    assert plan["estimated_cost_usd"] == pytest.approx(plan["estimated_tokens"] * 1.5)
    shown = run(capsys, *base)
    assert shown.code == 0, shown.err
    assert "price unknown" not in shown.out
    # A --price on the command line still wins over the manifest.
    flag = json.loads(run(capsys, *base, "--json", "--price", "openai:my-finetune=0").out)
    assert flag["estimated_cost_usd"] == 0


def test_with_a_price_the_budget_is_accepted_and_the_dry_run_shows_the_cost(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    result = run(
        capsys, "migrate", "run", *flags(database_url, docs, UNPRICED), "--budget-usd", "5",
        "--price", "openai:my-finetune=1.5", "--dry-run",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "price unknown" not in result.out
    assert "≈ $0.00" in result.out  # 60 short documents at $1.50 per million tokens


def test_the_dry_run_says_price_unknown_not_zero(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    base = ["migrate", "run", *flags(database_url, docs, UNPRICED), "--dry-run"]
    text = run(capsys, *base)
    assert text.code == 0, text.err
    assert "price unknown" in text.out and "$0.0000" not in text.out
    plan = json.loads(run(capsys, *base, "--json").out)
    assert plan["estimated_tokens"] > 0
    assert plan["estimated_cost_usd"] is None  # null, not 0
    # The local provider computes on this machine: free by design, so $0 is the truth.
    local = run(capsys, "migrate", "run", *flags(database_url, docs, "local:hash@16"), "--dry-run")
    assert "≈ $0.0000" in local.out and "price unknown" not in local.out


def test_status_and_run_say_price_unknown_not_zero(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    docs: str,
    embedding_server: EmbeddingServer,
    embedding_api_key: str,
) -> None:
    monkeypatch.setenv("EMBEDSHIFT_TARGET_API_KEY", embedding_api_key)
    base = [
        *flags(database_url, docs, UNPRICED),
        "--target-base-url",
        embedding_server.openai_base_url,
    ]
    assert run(capsys, "migrate", "setup", *base).code == 0
    embedded = run(capsys, "migrate", "run", *base)
    assert embedded.code == 0, embedded.err
    assert "embedded 60 rows" in embedded.out and "price unknown" in embedded.out
    assert "$0.0000" not in embedded.out
    # The progress lines (stderr) say it too, and --json's figures are null, not 0.
    assert "price unknown" in embedded.err and "$0.0000" not in embedded.err
    again = run(capsys, "migrate", "run", *base, "--json", "--rescan")
    events = [json.loads(line) for line in again.out.splitlines()]
    assert events[-1]["event"] == "finished" and events[-1]["cost_usd"] is None
    status = run(capsys, "migrate", "status", *base)
    assert "price unknown" in status.out and "$0.0000" not in status.out
    document = json.loads(run(capsys, "migrate", "status", *base, "--json").out)
    assert document["tokens"] > 0 and document["costUSD"] is None
    watched = run(capsys, "monitor", *base)
    assert "price unknown" in watched.out and "$0.0000" not in watched.out
    snapshot = json.loads(run(capsys, "monitor", *base, "--json").out)
    assert snapshot["progress"]["costUSD"] is None
    priced = json.loads(
        run(capsys, "migrate", "status", *base, "--json", "--price", "openai:my-finetune=0").out
    )
    assert priced["costUSD"] == 0  # told it is free: then $0 is the truth


# ---- 3. setup and a routing row that routes traffic ---------------------------------------------


def _routing(url: str, migration: str) -> tuple[int, bool, str | None]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT percentage, emergency, target->>'table' FROM embedshift_rollout "
            "WHERE migration = %s",
            [migration],
        ).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1]), row[2]


def _set_routing(url: str, migration: str, percentage: int, *, emergency: bool = False) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE embedshift_rollout SET percentage = %s, emergency = %s WHERE migration = %s",
            [percentage, emergency, migration],
        )


def _exists(url: str, table: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT to_regclass(%s)", [table]).fetchone() != (None,)


@pytest.mark.parametrize("emergency", [False, True])
def test_setup_never_repoints_a_routing_row_that_routes_traffic(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str, emergency: bool
) -> None:
    key = f"default/repoint-{emergency}".lower()
    # Side tables of their own per case: the second target must not exist before.
    old, new = (
        ("local:hash@20", "local:hash@28") if emergency else ("local:hash@16", "local:hash@24")
    )
    first = [*flags(database_url, docs, old), "--migration", key]
    other = [*flags(database_url, docs, new), "--migration", key]
    old_table = spec_for(docs, old).target_table.name
    new_table = spec_for(docs, new).target_table.name
    assert run(capsys, "migrate", "setup", *first).code == 0
    _set_routing(database_url, key, 25, emergency=emergency)

    line = refused(
        run(capsys, "migrate", "setup", *other),
        f"routing row '{key}' routes 25 % of searches to {old_table}",
        "maxPercentage: 0",
        "another --migration name",
        "nothing was changed",
        code=EXIT_SCHEMA_REFUSED,
    )
    assert ("emergency flag" in line) is emergency
    assert _routing(database_url, key) == (25, emergency, old_table)
    assert not _exists(database_url, new_table)  # refused before any DDL
    assert run(capsys, "migrate", "setup", *other, "--dry-run").code == EXIT_SCHEMA_REFUSED

    # At 0 % nothing is routed by it: the new target may take the row (and keeps its 0 %).
    _set_routing(database_url, key, 0, emergency=emergency)
    moved = run(capsys, "migrate", "setup", *other)
    assert moved.code == 0, moved.err
    assert f"routing row '{key}' at 0 % to {new_table}" in moved.out
    assert _routing(database_url, key) == (0, emergency, new_table)


def test_setup_prints_what_the_routing_row_says(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    """Setup again for the same target while at 25 % is fine, changes nothing in the row, and
    says 25 %, not a hard-coded 0 %."""
    key = "default/readback"
    base = [*flags(database_url, docs, "local:hash@16"), "--migration", key]
    table = spec_for(docs, "local:hash@16").target_table.name
    first = run(capsys, "migrate", "setup", *base)
    assert f"routing row '{key}' at 0 % to {table}" in first.out
    _set_routing(database_url, key, 25, emergency=True)
    again = run(capsys, "migrate", "setup", *base)
    assert again.code == 0, again.err
    assert f"routing row '{key}' at 25 % to {table}, EMERGENCY" in again.out
    assert _routing(database_url, key) == (25, True, table)


# ---- 6. empty flags -----------------------------------------------------------------------------


def _string_flags() -> list[str]:
    """Every flag add_spec_flags declares that takes a value: a flag added later is covered."""
    parser = argparse.ArgumentParser()
    add_spec_flags(parser)
    return [
        action.option_strings[-1]
        for action in parser._actions
        if action.option_strings and action.nargs != 0 and action.dest != "help"
    ]


def test_every_string_flag_is_enumerated() -> None:
    assert {"--table", "--target", "--config", "--database-url", "--migration"} <= set(
        _string_flags()
    )


@pytest.mark.parametrize("flag", _string_flags())
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_flag_is_refused_not_ignored(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    database_url: str,
    docs: str,
    flag: str,
    value: str,
) -> None:
    """With a config that names everything, an empty flag used to be ignored (the config won)."""
    path = manifest(tmp_path, docs)
    assert (
        run(capsys, "migrate", "setup", "--config", str(path), "--database-url", database_url).code
        == 0
    )
    argv = {"--config": str(path), "--database-url": database_url, flag: value}
    result = run(capsys, "migrate", "status", *[x for kv in argv.items() for x in kv])
    refused(result, flag)


# ---- 7. a misspelt category ---------------------------------------------------------------------


def test_a_misspelt_category_is_refused_naming_the_known_ones(
    capsys: pytest.CaptureFixture[str], database_url: str, docs: str
) -> None:
    base = flags(database_url, docs, "local:hash@8")
    assert run(capsys, "migrate", "setup", *base).code == 0
    before = batches(database_url)
    known = ", ".join(sorted(CATEGORIES))
    for dry_run in ([], ["--dry-run"]):
        result = run(capsys, "migrate", "run", *base, "--category", "facilites", *dry_run)
        refused(result, "--category", "'facilites'", f"its categories are {known}")
    # One good and one bad: the bad one is named, and nothing runs.
    result = run(capsys, "migrate", "run", *base, "--category", "pricing", "--category", "")
    refused(result, "--category", "''", known)
    assert batches(database_url) == before
    assert counts(database_url, spec_for(docs, "local:hash@8")).target_rows == 0
    # Spelt right, it embeds that category only.
    assert run(capsys, "migrate", "run", *base, "--category", "facilities").code == 0
    with psycopg.connect(database_url) as conn:
        table = spec_for(docs, "local:hash@8").target_table.name
        cats = conn.execute(f'SELECT DISTINCT category FROM "{table}"').fetchall()
    assert cats == [("facilities",)]


def test_a_misspelt_category_in_the_spec_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, database_url: str, docs: str
) -> None:
    path = manifest(tmp_path, docs, target="local:hash@12", categories=["facilites"])
    base = ["--config", str(path), "--database-url", database_url]
    assert run(capsys, "migrate", "setup", *base).code == 0
    refused(run(capsys, "migrate", "run", *base), "spec.migration.categories", "'facilites'")


# ---- 9. malformed YAML --------------------------------------------------------------------------

HEAD = "apiVersion: embedshift.io/v1alpha1\nkind: EmbeddingMigration\nmetadata: {name: x}\n"


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        (
            "spec: {database: {table: docs\n",
            ("at line 5, column 1", "expected ',' or '}'", "flow mapping at line 4, column 18"),
        ),
        ("spec:\n\tdatabase: {}\n", ("at line 5, column 1", "'\\t'")),
        ("spec:\n  database: x: y\n", ("at line 5, column 14", "mapping values are not allowed")),
    ],
)
@pytest.mark.parametrize("command", ["--config", "rollout run", "rollout status"])
def test_malformed_yaml_names_line_and_column(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    body: str,
    fragments: tuple[str, ...],
    command: str,
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(HEAD + body)
    argv = (
        ["migrate", "status", "--config", str(path), "--database-url", "postgresql:///x"]
        if command == "--config"
        else [*command.split(), str(path)]
    )
    refused(run(capsys, *argv), f"{path} is not valid YAML", *fragments)
