"""Baseline: how fast vecshift 0.4.0 re-embeds a pgvector table, at its default settings.

    .venv/bin/python -m benchmarks.vecshift_baseline --rows 5000 --dimensions 256

vecshift (PyPI ``vecshift==0.4.0``, Apache-2.0) is a third-party "zero-downtime embedding
migrations for pgvector" CLI. It is not a dependency of this project: ``ensure_vecshift``
installs the pinned release into its own virtualenv (``/var/tmp/vecshift-0.4-venv`` by
default) and this module only ever runs its ``vecshift`` executable as a subprocess.

What vecshift does here
-----------------------
``run_vecshift`` writes a job file (``vecshift.yaml``) and runs
``vecshift --no-env-file apply vecshift.yaml --yes --json`` with ``VECSHIFT_DSN`` (the database
URL) and ``OPENAI_API_KEY`` in its environment. The job names only what has to be named: the
table, its text column, and the model spec
``openai/<model>,url=<base_url>,dims=<dimensions>``. vecshift reads the base URL *only* from
that ``url=`` option (``vecshift/embeddings/spec.py``, ``parse_spec``: ``url =
values.get("url", preset.url)``); it ignores ``OPENAI_BASE_URL``. It posts to
``<url>/embeddings`` with httpx (``embeddings/providers.py``, ``OpenAICompatEmbedder._post``),
so the base URL must end in ``/v1`` for an OpenAI-shaped server. The ``openai`` provider (not
``compat``) is used because it is the one that reads ``OPENAI_API_KEY`` (``compat`` sends no key
unless ``key_env=`` names one), knows the model's price, and accepts ``dims=`` (its plan
refuses ``dims=`` for any model but ``text-embedding-3-*``). It sends a key over plain
``http://`` only to a local host (``providers.api_key``), which 127.0.0.1 is.

``apply`` then, in one process (``cli_apply.py`` → ``migrate/engine.py`` ``apply``):

1. inspects the table read-only and builds a plan (samples up to 2,000 rows for estimates);
2. adds the target column ``embedding_v2 vector(<dims>)`` to the *same* table (its default
   ``target.column``; ``jobs/spec.py`` ``Target``) and a ``BEFORE UPDATE`` trigger that clears
   it when the text changes;
3. backfills: pages the table in primary-key order, 256 rows at a time, embeds each page as
   4 concurrent requests of 64 texts, then writes the page back with one ``UPDATE ... SET
   embedding_v2 = $1::vector WHERE pk = $2 AND embedding_v2 IS NULL AND text = $3`` per row in
   one transaction (``connectors/pgvector/writer.py`` ``PgWriter.write``). Fetch, embed and
   write run one after another; nothing overlaps across pages. Catch-up passes follow for
   rows changed meanwhile (none here);
4. builds an HNSW index (cosine) on the new column with ``CREATE INDEX CONCURRENTLY``.

Its defaults that apply (none are overridden): batch 64 texts per request (``ModelSpec.
batch_size``), concurrency 4 requests (``providers.CONCURRENCY``), so 256 rows per page
(``chunk_rows = batch_size * CONCURRENCY``); up to 6 attempts per request
(``providers.MAX_ATTEMPTS``) on transport errors and 408/409/429/5xx, with exponential backoff
from 1 s (capped at 30 s) or the server's ``retry-after`` (capped at 60 s); a 120 s request
timeout; texts cut to 24,000 characters; float (JSON) vectors, not base64; ``vector`` (not
``halfvec``) column; HNSW index; no budget; no rate limit of its own.

What is timed
-------------
``VecshiftRun.seconds`` is the backfill alone: from vecshift's ``start`` event (printed after it
added the column and the trigger, just before fetching the first page) to its ``index``
``building`` event (printed once every row has its vector, just before the HNSW build). Each
JSON event line is timestamped as it arrives on the pipe (click flushes every line). Not in
``seconds`` but reported beside it: the install (``ensure_vecshift``, done before), the whole
subprocess (``total_seconds``: interpreter start-up, inspection and planning, ALTER TABLE,
backfill, index build) and the index build (``index_seconds``). vecshift has no separate plan
step to exclude: ``apply`` plans by itself.

What makes the comparison unfair
--------------------------------
- vecshift needs an existing vector column on the table: it is a migration tool, and refuses a
  table without one (``connectors/pgvector/inspect.py`` ``select_column``: "No vector columns
  found in table ..."). ``run_vecshift`` adds an empty ``embedding vector(<dims>)`` column when
  the table has none (a catalogue-only change; vecshift never reads its values during apply).
- vecshift writes into a new column of the source table by per-row ``UPDATE`` (a new version of
  every row, so the table roughly doubles in size until vacuum), where embedshift writes a
  separate table with COPY. That is vecshift's design, not a setting: it counts against it.
- Its pipeline is strictly serial per page (fetch, then embed, then write). Against the local
  server, which answers at once, this measures client-side cost: JSON float parsing, building
  vector literals with ``repr(float)``, and one round trip per row. With a real provider's
  latency, its throughput tends to 256 rows per (request latency + page write time).
- vecshift asks for JSON floats; clients that ask for base64 parse less. Its default, kept.
- The HNSW build is left out of ``seconds``; if the other side's figure includes index
  maintenance, compare against ``total_seconds`` too.
- Everything shares one small machine: PostgreSQL, the embedding server and the client
  compete for the same cores, so only ratios measured in the same session mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

VECSHIFT_VERSION = "0.4.0"
# A fixed path outside the repository, so the install survives between runs and vecshift's
# dependencies never mix with ours.
DEFAULT_VENV = Path("/var/tmp/vecshift-0.4-venv")  # noqa: S108 - a cache dir, not a temp file
TARGET_COLUMN = "embedding_v2"  # vecshift's default target.column (jobs/spec.py, Target)
PLACEHOLDER_COLUMN = "embedding"  # the "live" column vecshift insists on; see the docstring
JOB_NAME = "bench"
_MASK = "***"  # what a redacted secret shows as
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class VecshiftRun:
    rows: int
    """Rows that have a vector in ``embedding_v2`` afterwards (checked in the database)."""
    seconds: float
    """Backfill only: vecshift's ``start`` event to its ``index building`` event."""
    rows_per_second: float
    command: str
    """The command line, with its environment; the API key and any password redacted."""
    total_seconds: float
    """The whole ``vecshift apply`` subprocess, start-up and index build included."""
    index_seconds: float
    """The HNSW build after the backfill (0 when vecshift built none)."""
    tokens: int
    """Tokens vecshift counted, from the server's ``usage``."""
    job: str
    """The job file vecshift ran (it holds no secret: the key and DSN are in the environment)."""


def _installed_version(python: Path) -> str | None:
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vecshift'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_vecshift(venv: Path = DEFAULT_VENV) -> Path:
    """The ``vecshift`` executable of a virtualenv holding vecshift 0.4.0, installing it there
    first if needed (from PyPI). Never touches this project's environment."""
    python, executable = venv / "bin" / "python", venv / "bin" / "vecshift"
    if executable.exists() and _installed_version(python) == VECSHIFT_VERSION:
        return executable
    if not python.exists():
        # The base interpreter, not this venv's: the new venv must not see our packages.
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"vecshift=={VECSHIFT_VERSION}"],
        check=True,
    )
    if _installed_version(python) != VECSHIFT_VERSION or not executable.exists():
        raise RuntimeError(f"vecshift {VECSHIFT_VERSION} did not install into {venv}")
    return executable


def _split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or "public", name


def _table_columns(conn: psycopg.Connection[Any], schema: str, table: str) -> dict[str, str]:
    rows = conn.execute(
        """
        SELECT a.attname, t.typname FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
        """,
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchall()
    return {str(name): str(kind) for name, kind in rows}


def _primary_key(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    rows = conn.execute(
        """
        SELECT a.attname FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        WHERE i.indrelid = %s::regclass AND i.indisprimary
        """,
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _prepare_table(
    database_url: str, table: str, text_column: str, id_column: str, dimensions: int
) -> None:
    """Check the table is one vecshift can migrate from scratch, and give it the vector
    column vecshift requires if it has none."""
    schema, name = _split_table(table)
    with psycopg.connect(database_url, autocommit=True) as conn:
        columns = _table_columns(conn, schema, name)
        if text_column not in columns:
            raise ValueError(f"{table} has no column {text_column!r}")
        # vecshift has no setting for the row ID: it always uses the primary key, and only a
        # single-column one (cli_apply.py, "Apply needs a single-column primary key").
        if _primary_key(conn, schema, name) != [id_column]:
            raise ValueError(f"vecshift needs {id_column!r} to be {table}'s whole primary key")
        if TARGET_COLUMN in columns:
            # apply would resume and embed only the rows still missing a vector.
            raise ValueError(f"{table}.{TARGET_COLUMN} exists already: vecshift would resume")
        if not {"vector", "halfvec"} & set(columns.values()):
            if PLACEHOLDER_COLUMN in columns:
                raise ValueError(f"{table}.{PLACEHOLDER_COLUMN} exists and isn't a vector")
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN {} vector({})").format(
                    sql.Identifier(schema, name),
                    sql.Identifier(PLACEHOLDER_COLUMN),
                    sql.Literal(dimensions),
                )
            )


def _job_yaml(table: str, text_column: str, model_spec: str) -> str:
    # JSON strings are valid YAML scalars, so any value stays one value.
    return "\n".join(
        [
            "version: 1",
            f"name: {JOB_NAME}",
            "source:",
            "  type: pgvector",
            "  dsn_env: VECSHIFT_DSN",
            f"  table: {json.dumps(table)}",
            f"  text_column: {json.dumps(text_column)}",
            f"model: {json.dumps(model_spec)}",
            "",
        ]
    )


def _redacted_dsn(url: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    if params.get("password"):
        params["password"] = _MASK
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


@dataclass(frozen=True, slots=True)
class _Timed:
    at: float
    event: dict[str, Any]


def _run_streaming(
    argv: list[str], env: Mapping[str, str], cwd: Path, stderr_path: Path
) -> tuple[int, list[_Timed], float]:
    """Run vecshift, timestamping each JSON event line as it arrives: (code, events, wall)."""
    events: list[_Timed] = []
    started = time.perf_counter()
    with (
        stderr_path.open("w") as stderr,
        subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            at = time.perf_counter()
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(_Timed(at, event))
        code = process.wait()
    return code, events, time.perf_counter() - started


def _first(events: list[_Timed], kind: str, **data: Any) -> _Timed | None:
    for timed in events:
        if timed.event.get("event") == kind and all(
            timed.event.get(k) == v for k, v in data.items()
        ):
            return timed
    return None


def _count_vectors(database_url: str, table: str, text_column: str) -> tuple[int, int, set[int]]:
    """(rows with text, rows with a vector in the target column, their sizes)."""
    schema, name = _split_table(table)
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE {text} IS NOT NULL AND btrim({text}) <> ''), "
                "count({target}), array_agg(DISTINCT vector_dims({target})) "
                "FILTER (WHERE {target} IS NOT NULL) FROM {table}"
            ).format(
                text=sql.Identifier(text_column),
                target=sql.Identifier(TARGET_COLUMN),
                table=sql.Identifier(schema, name),
            )
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), set(row[2] or [])


def run_vecshift(
    *,
    database_url: str,
    table: str,
    text_column: str,
    id_column: str,
    base_url: str,
    api_key: str,
    model: str,
    dimensions: int,
    workdir: Path,
    executable: Path | None = None,
) -> VecshiftRun:
    """Re-embed every row of ``table`` with ``vecshift apply`` at its defaults; see the module
    docstring for what runs and what ``seconds`` covers (the backfill only: not the install,
    not vecshift's start-up and planning, not its HNSW build).

    ``base_url`` is the OpenAI-style base, ending in ``/v1``. vecshift writes the vectors into a
    new column ``embedding_v2`` of ``table``, which must not exist yet; ``id_column`` must be
    the table's single-column primary key (vecshift always keys rows by it). A table without
    any vector column gets an empty ``embedding`` column first, which vecshift requires.
    Raises ``RuntimeError`` when vecshift fails or leaves any row with text unembedded.
    """
    executable = executable or ensure_vecshift()
    _prepare_table(database_url, table, text_column, id_column, dimensions)
    # A fresh directory per run: vecshift keeps resumable state in .vecshift/ beside the job.
    workdir.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="vecshift-", dir=workdir))
    job = rundir / "vecshift.yaml"
    spec = f"openai/{model},url={base_url.rstrip('/')},dims={dimensions}"
    job.write_text(_job_yaml(table, text_column, spec), encoding="utf-8")
    # --no-env-file: a stray .env must not change the settings; --yes: apply otherwise
    # refuses without a terminal ("Not changing anything without confirmation"); --json:
    # one event per line, which is what the timing reads.
    argv = [str(executable), "--no-env-file", "apply", str(job), "--yes", "--json"]
    env = {
        **os.environ,
        "VECSHIFT_DSN": database_url,
        "OPENAI_API_KEY": api_key,
        "NO_COLOR": "1",  # plain error text on stderr, for the RuntimeError below
    }
    code, events, wall = _run_streaming(argv, env, rundir, rundir / "stderr.log")
    shown = (
        f"VECSHIFT_DSN={shlex.quote(_redacted_dsn(database_url))} OPENAI_API_KEY={_MASK} "
        + shlex.join(argv)
    )
    result = _first(events, "result")
    if code != 0 or result is None or result.event.get("status") != "complete":
        detail = (rundir / "stderr.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        status = result.event.get("status") if result else None
        raise RuntimeError(f"vecshift apply exited {code} (status {status}): {detail.strip()}")

    start = _first(events, "start")
    building = _first(events, "index", state="building")
    done = _first(events, "done")
    if start is None or done is None:
        raise RuntimeError("vecshift printed no start/done events; did its --json change?")
    backfilled = building or done
    index_seconds = done.at - building.at if building else 0.0

    with_text, embedded, sizes = _count_vectors(database_url, table, text_column)
    if embedded != with_text or sizes - {dimensions}:
        # vecshift reports "complete" (exit 0) even when the provider rejected rows: it splits
        # a refused request down to single texts and records each as failed (a wrong key
        # fails every row this way), so the database is the only trustworthy check.
        raise RuntimeError(
            f"vecshift left {with_text - embedded} of {with_text} rows without a vector "
            f"(sizes {sorted(sizes)}, expected {dimensions}; it reported "
            f"{result.event.get('rows_failed')} rows rejected: {result.event.get('message')})"
        )
    seconds = backfilled.at - start.at
    return VecshiftRun(
        rows=embedded,
        seconds=seconds,
        rows_per_second=embedded / seconds if seconds > 0 else float("inf"),
        command=shown,
        total_seconds=wall,
        index_seconds=index_seconds,
        tokens=int(result.event.get("tokens") or 0),
        job=job.read_text(encoding="utf-8"),
    )


@contextlib.contextmanager
def embedding_server(api_key: str) -> Iterator[str]:
    """The local OpenAI-compatible server, without rate limits; yields its base URL (…/v1)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rag_service.testing.embedding_server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # The key goes in the environment so that it never shows in the process list.
        env={**os.environ, "EMBEDDING_SERVER_API_KEY": api_key},
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url:
            raise RuntimeError("the embedding server did not start")
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    from rag_service.testing.corpus import CHUNK_SIZED, create_corpus
    from rag_service.testing.postgres import create_database, drop_database, postgres_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--dimensions", type=int, default=256)
    parser.add_argument("--model", default="text-embedding-3-small")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    args = parser.parse_args(argv)

    executable = ensure_vecshift(args.venv)  # before any timing, and outside the database's life
    api_key = "vecshift-baseline-key"
    with (
        postgres_server() as admin,
        tempfile.TemporaryDirectory(prefix="vecshift-bench-") as workdir,
    ):
        name, url = create_database(admin, prefix="bench_vecshift")
        try:
            create_corpus(
                url,
                table="documents",
                count=args.rows,
                source_dimensions=0,
                sentence_count=CHUNK_SIZED,
            )
            with embedding_server(api_key) as base_url:
                run = run_vecshift(
                    database_url=url,
                    table="documents",
                    text_column="content",
                    id_column="id",
                    base_url=base_url,
                    api_key=api_key,
                    model=args.model,
                    dimensions=args.dimensions,
                    workdir=Path(workdir),
                    executable=executable,
                )
        finally:
            drop_database(admin, name)
    print(f"vecshift {VECSHIFT_VERSION}: {run.command}")
    print(run.job, end="")
    print(
        f"{run.rows:,} rows, {args.dimensions} dims: backfill {run.seconds:.2f} s = "
        f"{run.rows_per_second:,.0f} rows/s; whole apply {run.total_seconds:.2f} s "
        f"(HNSW build {run.index_seconds:.2f} s); {run.tokens:,} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
