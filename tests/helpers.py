"""Small helpers shared by the migration tests: run the CLI, and count what is in the database."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from embedshift_operator.cli import build_parser, main
from rag_service.errors import EmbedshiftError
from rag_service.schema import layout_for
from rag_service.spec import DatabaseSpec, DataPlaneSpec, EmbeddingSpec

PYTHON = sys.executable


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """Run ``embedshift`` in this process, as a user would from a shell."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


async def cli_async(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """``cli`` with the command awaited on the test's own event loop, where a service under
    test runs too (``main`` would start a loop of its own)."""
    args = build_parser().parse_args(list(argv))
    capsys.readouterr()
    try:
        code: int = await args.handler(args)
    except EmbedshiftError as exc:
        print(f"embedshift: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def cli_subprocess(argv: Sequence[str], env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run(
        [PYTHON, "-m", "embedshift_operator.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def table_name(request: pytest.FixtureRequest, prefix: str = "docs") -> str:
    """A table name unique to the test (tests in a module share a database)."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")
    return f"{prefix}_{slug}"[:30]


def spec_for(table: str, target: str = "local:hash@768", **database: Any) -> DataPlaneSpec:
    return DataPlaneSpec(
        database=DatabaseSpec(table=table, category_column="category", **database),
        target=EmbeddingSpec.parse(target),
    )


def flags(
    url: str, table: str, target: str = "local:hash@768", source: str | None = None
) -> list[str]:
    """CLI flags for a corpus table; with ``source``, also its v1 column and model."""
    v1 = [] if source is None else ["--source-column", "embedding", "--source", source]
    return [
        "--database-url",
        url,
        "--table",
        table,
        "--category-column",
        "category",
        *v1,
        "--target",
        target,
    ]


@dataclass(frozen=True)
class Counts:
    embeddable: int  # source rows with text
    target_rows: int
    current: int  # target rows whose hash matches the source text now
    stale: int
    queued: int
    embedded_by_batches: int  # sum of rows over committed batches: counts every embedding stored

    @property
    def complete(self) -> bool:
        return self.current == self.embeddable == self.target_rows and self.stale == 0


def counts(url: str, spec: DataPlaneSpec) -> Counts:
    """Counted in SQL from the tables themselves, independent of the code under test."""
    layout = layout_for(spec, id_type="bigint")
    src, tgt, queue = layout.source.name, layout.target.name, layout.queue.name
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"""
            SELECT
              (SELECT count(*) FROM "{src}" WHERE content IS NOT NULL AND btrim(content) <> ''),
              (SELECT count(*) FROM "{tgt}"),
              (SELECT count(*) FROM "{tgt}" t JOIN "{src}" s USING (id)
                WHERE t.content_hash = sha256(convert_to(s.content, 'UTF8'))),
              (SELECT count(*) FROM "{tgt}" t JOIN "{src}" s USING (id)
                WHERE t.content_hash <> sha256(convert_to(s.content, 'UTF8'))),
              (SELECT count(*) FROM "{queue}"),
              (SELECT COALESCE(sum(rows), 0) FROM embedding_migration_status
                WHERE target_table = %s AND status = 'done')
            """,
            [tgt],
        ).fetchone()
    assert row is not None
    return Counts(*(int(v) for v in row))


def eventually(check: Callable[[], Any], what: str, within: float = 30.0, poll: float = 0.1) -> Any:
    """``check()``'s first truthy value, polled every ``poll`` s; fails naming ``what`` when
    ``within`` seconds pass without one (a blocking wait, for tests that run no event loop)."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(poll)


def routed_percentage(url: str, migration: str) -> int | None:
    """The routing row's percentage for ``migration`` (what every search replica follows);
    None before ``migrate setup`` created the table or the row."""
    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('embedshift_rollout') IS NOT NULL").fetchone()
        if not (exists and exists[0]):
            return None
        row = conn.execute(
            "SELECT percentage FROM embedshift_rollout WHERE migration = %s", [migration]
        ).fetchone()
    return None if row is None else int(row[0])
