"""Every table embedshift owns, and ``setup``: inspect the source, refuse what is unsafe, then DDL.

What ``setup`` installs next to the user's source table (which is never rewritten):

- the **target side table** (one per source table and target model): source id → vector, content
  hash, model, category copy. Its id references the source with ``ON DELETE CASCADE``, so deleted
  documents lose their vectors, and dropping the side table undoes everything. Its comment
  records the one embedding identity whose vectors it holds (:class:`SideTableIdentity`).
- the **pending queue** and a trigger on the source: every insert, and every update of the text,
  upserts the id with a fresh ``seq`` and notifies ``FOLLOW_CHANNEL`` (wakes ``migrate follow``).
  Workers delete only the ``(id, seq)`` pairs they read, so a change that races a worker stays
  queued and is never lost.
- ``embedding_migration_status`` (one row per batch: rows, tokens, cost, errors; successful
  batches older than an hour folded into one row per shard, phase and hour, ``batches`` saying
  how many: :func:`rag_service.progress.fold_batch_rows`), the backfill checkpoint, and the
  routing row table ``embedshift_rollout`` that rag_service follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from rag_service.errors import ConfigError, DatabaseError, DatabaseUnavailable, SchemaRefused
from rag_service.identifiers import TableName, derived_identifier
from rag_service.redaction import (
    database_url_problem,
    describe_database_url,
    redact,
    url_secrets,
)
from rag_service.spec import DataPlaneSpec, EmbeddingSpec

log = logging.getLogger(__name__)

# What psycopg executes: a plain SQL string or a composition of identifiers and literals.
Query = sql.SQL | sql.Composed

STATUS_TABLE = "embedding_migration_status"
CHECKPOINT_TABLE = "embedshift_backfill_checkpoint"
ROLLOUT_TABLE = "embedshift_rollout"
ROLLOUT_CHANNEL = "embedshift_rollout"
# The local rollout driver's status (``embedshift rollout run``), one JSON row per migration next
# to the routing row: written by the operator package, read by the service's dashboard page.
ROLLOUT_STATUS_TABLE = "embedshift_rollout_status"
# One channel for every target's queue; the payload is the side table's name (``str(target)``, as
# in the status rows), so one LISTEN serves a process that follows many targets.
FOLLOW_CHANNEL = "embedshift_pending"
QUERY_CACHE_TABLE = "embedshift_query_cache"
# The maintained progress counters of every target in the schema (see ``counter_statements``).
COUNTS_TABLE = "embedshift_progress_counts"

_TEXT_TYPES = {"text", "character varying", "character", "citext"}
_LOCK_TIMEOUT = "2s"
_LOCK_ATTEMPTS = 6


def ident(table: TableName) -> sql.Identifier:
    """``table`` as a quoted, possibly schema-qualified SQL identifier."""
    return sql.Identifier(table.schema, table.name) if table.schema else sql.Identifier(table.name)


@dataclass(frozen=True)
class Layout:
    """Resolved names and catalog facts for one (source table, target model). Immutable."""

    source: TableName
    target: TableName
    queue: TableName
    queue_seq: TableName
    trigger_function: TableName
    trigger_name: str
    index_name: str
    status: TableName
    checkpoint: TableName
    rollout: TableName
    id_column: str
    text_column: str
    category_column: str | None
    source_embedding_column: str | None
    id_type: str
    target_spec: EmbeddingSpec
    source_spec: EmbeddingSpec | None

    # SQL fragments over the source aliased ``s``; composed, never formatted from user input.
    @property
    def s_id(self) -> sql.Composable:
        return sql.SQL("s.{}").format(sql.Identifier(self.id_column))

    @property
    def s_text(self) -> sql.Composable:
        return sql.SQL("s.{}").format(sql.Identifier(self.text_column))

    @property
    def s_category(self) -> sql.Composable:
        if self.category_column is None:
            return sql.SQL("NULL::text")
        return sql.SQL("s.{}::text").format(sql.Identifier(self.category_column))

    @property
    def s_hash(self) -> sql.Composable:
        """The content hash, always computed by the server so reader and guard agree."""
        return sql.SQL("sha256(convert_to({}, 'UTF8'))").format(self.s_text)

    @property
    def s_embeddable(self) -> sql.Composable:
        """Rows with no text cannot be embedded; they are reported, never queued as pending."""
        return sql.SQL("({0} IS NOT NULL AND btrim({0}, E' \\t\\r\\n') <> '')").format(self.s_text)

    @property
    def vector_type(self) -> sql.Composable:
        return sql.SQL("{}({})").format(
            sql.SQL(self.target_spec.vector_type), sql.Literal(self.target_spec.dimensions)
        )

    @property
    def migration_target(self) -> str:
        return self.target_spec.descriptor

    # The maintained counters' names: derived, not fields, so every Layout has them.
    @property
    def counts(self) -> TableName:
        return self.source.sibling(COUNTS_TABLE)

    @property
    def source_counter(self) -> TableName:
        return self.source.sibling(derived_identifier(self.target.name, "count_source"))

    @property
    def vector_counter(self) -> TableName:
        return self.source.sibling(derived_identifier(self.target.name, "count_vectors"))

    def counter_trigger(self, event: str) -> str:
        return derived_identifier(self.target.name, "count", event)


@dataclass(frozen=True)
class SourceFacts:
    """What the catalog says about the source table."""

    relkind: str
    columns: dict[str, str]  # name → format_type
    id_is_unique: bool


def parse_database_url(url: str) -> dict[str, str] | None:
    """libpq's own reading of a connection string (the parameters it names); None when libpq
    refuses it. Its refusal quotes the string, so it is never shown (see
    :mod:`rag_service.redaction`)."""
    try:
        parsed = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return None
    return {k: str(v) for k, v in parsed.items() if v is not None}


def check_database_url(url: str, *, source: str = "the database URL") -> None:
    """ConfigError naming ``source`` and what is wrong, without quoting the URL, when libpq
    cannot use it (see :func:`rag_service.redaction.database_url_problem`)."""
    problem = database_url_problem(url, parse_database_url(url))
    if problem is not None:
        raise ConfigError(f"{source} does not hold a usable PostgreSQL URL: {problem}")


def database_error_text(exc: BaseException, url: str) -> str:
    """The first line of what libpq or the server said about ``url``, with the URL's secrets
    (password, user, every parameter but host, port and database) redacted."""
    return redact(first_line(exc), url_secrets(url, parse_database_url(url)))


async def connect(url: str, *, autocommit: bool = False) -> psycopg.AsyncConnection[Any]:
    """Connect, turning an unusable URL into a ConfigError and an unreachable server into one
    line, neither of them quoting the URL's secrets."""
    check_database_url(url)
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database ({describe_url(url)}): "
            f"{database_error_text(exc, url)}; check DATABASE_URL (or --database-url)"
        ) from None


_T = TypeVar("_T")


async def with_connection(
    url: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]
) -> _T:
    """Run ``work`` on a short autocommit connection; a database failure is one DatabaseError
    line without the URL's secrets. For callers that tick: a dropped connection costs one call."""
    try:
        conn = await connect(url, autocommit=True)
        async with conn:
            return await work(conn)
    except psycopg.Error as exc:
        raise DatabaseError(f"database: {database_error_text(exc, url)}") from None


def describe_url(url: str) -> str:
    """Host, port and database of a connection string, never the password. Pure."""
    return describe_database_url(parse_database_url(url))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def inspect_source(conn: psycopg.AsyncConnection[Any], spec: DataPlaneSpec) -> Layout:
    """Read the catalog, refuse a source embedshift cannot handle, and resolve every name.

    Raises DatabaseError/SchemaRefused naming the table or column; changes nothing.
    """
    db = spec.database
    source = db.table_name
    facts = await _source_facts(conn, source, db.id_column)
    if facts is None:
        raise DatabaseError(
            f"spec.database.table: table {str(source)!r} does not exist (check the name and "
            "schema, e.g. public.documents)"
        )
    if facts.relkind == "p":
        raise SchemaRefused(
            f"spec.database.table: {source} is a partitioned table; embedshift cannot install its "
            "trigger and foreign key safely on it. Point it at one partition, or migrate a "
            "non-partitioned copy (nothing was changed)"
        )
    if facts.relkind not in ("r",):
        raise SchemaRefused(
            f"spec.database.table: {source} is not an ordinary table (relkind {facts.relkind!r}); "
            "name the table that holds the documents (nothing was changed)"
        )
    wanted = {
        "idColumn": db.id_column,
        "textColumn": db.text_column,
        "categoryColumn": db.category_column,
        "sourceEmbeddingColumn": db.source_embedding_column,
    }
    for field, column in wanted.items():
        if column is not None and column not in facts.columns:
            known = ", ".join(sorted(facts.columns))
            raise DatabaseError(
                f"spec.database.{field}: column {column!r} not found in {source}; "
                f"its columns are {known}"
            )
    text_type = facts.columns[db.text_column].split("(")[0]
    if text_type not in _TEXT_TYPES:
        raise SchemaRefused(
            f"spec.database.textColumn: {source}.{db.text_column} is {text_type}, not text; "
            "name the column that holds the document text (nothing was changed)"
        )
    if not facts.id_is_unique:
        raise SchemaRefused(
            f"spec.database.idColumn: {source}.{db.id_column} is not unique (no primary key or "
            "unique index on that column alone); add one, or name the table's primary key "
            "(nothing was changed)"
        )
    return layout_for(spec, id_type=facts.columns[db.id_column])


def rollout_table(spec: DataPlaneSpec) -> TableName:
    """The routing row table, in the source table's schema. Pure."""
    return spec.database.table_name.sibling(ROLLOUT_TABLE)


def layout_for(spec: DataPlaneSpec, *, id_type: str) -> Layout:
    """Every name embedshift uses for ``spec``. Pure."""
    source = spec.database.table_name
    target = spec.target_table
    return Layout(
        source=source,
        target=target,
        queue=source.sibling(derived_identifier(target.name, "pending")),
        queue_seq=source.sibling(derived_identifier(target.name, "pending_seq")),
        trigger_function=source.sibling(derived_identifier(target.name, "enqueue")),
        trigger_name=derived_identifier(target.name, "trigger"),
        index_name=derived_identifier(target.name, spec.target.index.type),
        status=source.sibling(STATUS_TABLE),
        checkpoint=source.sibling(CHECKPOINT_TABLE),
        rollout=rollout_table(spec),
        id_column=spec.database.id_column,
        text_column=spec.database.text_column,
        category_column=spec.database.category_column,
        source_embedding_column=spec.database.source_embedding_column,
        id_type=id_type,
        target_spec=spec.target,
        source_spec=spec.source,
    )


async def _source_facts(
    conn: psycopg.AsyncConnection[Any], table: TableName, id_column: str
) -> SourceFacts | None:
    cur = await conn.execute("SELECT to_regclass(%s)::oid", [table.regclass_text])
    row = await cur.fetchone()
    if row is None or row[0] is None:
        return None
    oid = row[0]
    cur = await conn.execute("SELECT relkind::text FROM pg_class WHERE oid = %s", [oid])
    relkind = (await cur.fetchone() or ("?",))[0]
    cur = await conn.execute(
        """
        SELECT attname, format_type(atttypid, atttypmod)
        FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped
        """,
        [oid],
    )
    columns = {name: typ for name, typ in await cur.fetchall()}
    cur = await conn.execute(
        """
        SELECT EXISTS (
            SELECT 1 FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1
              AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = %s
        )
        """,
        [oid, id_column],
    )
    unique = bool((await cur.fetchone() or (False,))[0])
    return SourceFacts(relkind=relkind, columns=columns, id_is_unique=unique)


async def table_exists(conn: psycopg.AsyncConnection[Any], table: TableName) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table.regclass_text])
    row = await cur.fetchone()
    return bool(row and row[0])


async def existing_vector_type(conn: psycopg.AsyncConnection[Any], layout: Layout) -> str | None:
    """``vector(768)`` (or halfvec) of an existing side table, None if it does not exist."""
    if not await table_exists(conn, layout.target):
        return None
    cur = await conn.execute(
        """
        SELECT format_type(atttypid, atttypmod) FROM pg_attribute
        WHERE attrelid = to_regclass(%s) AND attname = 'embedding' AND NOT attisdropped
        """,
        [layout.target.regclass_text],
    )
    row = await cur.fetchone()
    return str(row[0]) if row else "missing"


def setup_statements(
    layout: Layout, *, migration: str, record_identity: bool = True
) -> list[Query]:
    """The idempotent DDL ``setup`` runs, in order. Pure.

    ``record_identity``: write the side table's identity record; ``setup`` leaves it out when
    the table already holds that very record, as ``COMMENT`` would queue behind a ``CREATE INDEX
    CONCURRENTLY`` on the table for nothing.
    """
    src = ident(layout.source)
    tgt = ident(layout.target)
    queue = ident(layout.queue)
    sid = sql.Identifier(layout.id_column)
    id_type = sql.SQL(layout.id_type)
    statements: list[Query] = [
        sql.SQL("CREATE EXTENSION IF NOT EXISTS vector"),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {tgt} (\n"
            "    id {id_type} PRIMARY KEY REFERENCES {src} ({sid})"
            " ON DELETE CASCADE ON UPDATE CASCADE,\n"
            "    embedding {vtype} NOT NULL,\n"
            "    content_hash bytea NOT NULL,\n"
            "    model text NOT NULL DEFAULT {model},\n"
            "    category text,\n"
            "    embedded_at timestamptz NOT NULL DEFAULT now()\n"
            ")"
        ).format(
            tgt=tgt,
            id_type=id_type,
            src=src,
            sid=sid,
            vtype=layout.vector_type,
            model=sql.Literal(layout.target_spec.descriptor),
        ),
        *(
            [
                sql.SQL("COMMENT ON TABLE {} IS {}").format(
                    tgt, sql.Literal(side_table_identity(layout.target_spec).record())
                )
            ]
            if record_identity
            else []
        ),
        sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(ident(layout.queue_seq)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {queue} (\n"
            "    id {id_type} PRIMARY KEY REFERENCES {src} ({sid})"
            " ON DELETE CASCADE ON UPDATE CASCADE,\n"
            "    seq bigint NOT NULL,\n"
            "    enqueued_at timestamptz NOT NULL DEFAULT now()\n"
            ")"
        ).format(queue=queue, id_type=id_type, src=src, sid=sid),
        _trigger_function(layout),
        sql.SQL(
            "CREATE OR REPLACE TRIGGER {name} AFTER INSERT OR UPDATE OF {cols} ON {src}\n"
            "    FOR EACH ROW EXECUTE FUNCTION {fn}()"
        ).format(
            name=sql.Identifier(layout.trigger_name),
            cols=sql.SQL(", ").join(
                sql.Identifier(c) for c in (layout.text_column, layout.category_column) if c
            ),
            src=src,
            fn=ident(layout.trigger_function),
        ),
        *counter_statements(layout),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {status} (\n"
            "    id bigserial PRIMARY KEY,\n"
            "    migration text NOT NULL,\n"
            "    target_table text NOT NULL,\n"
            "    target text NOT NULL,\n"
            "    shard text NOT NULL,\n"
            "    phase text NOT NULL,\n"
            "    status text NOT NULL CHECK (status IN ('done', 'failed')),\n"
            "    first_id text,\n"
            "    last_id text,\n"
            "    rows integer NOT NULL DEFAULT 0,\n"
            "    skipped integer NOT NULL DEFAULT 0,\n"
            "    tokens bigint NOT NULL DEFAULT 0,\n"
            "    cost_usd numeric(16, 8) NOT NULL DEFAULT 0,\n"
            "    by_category jsonb NOT NULL DEFAULT '{{}}',\n"
            "    error text,\n"
            "    worker text,\n"
            "    started_at timestamptz NOT NULL,\n"
            "    finished_at timestamptz NOT NULL DEFAULT now(),\n"
            "    batches integer NOT NULL DEFAULT 1\n"
            ")"
        ).format(status=ident(layout.status)),
        # A table made by an older setup: its rows are one batch each, as the default says.
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS batches integer NOT NULL DEFAULT 1"
        ).format(ident(layout.status)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (target_table, status, id)").format(
            sql.Identifier(derived_identifier(STATUS_TABLE, "target")), ident(layout.status)
        ),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (\n"
            "    target_table text NOT NULL,\n"
            "    shard_index integer NOT NULL,\n"
            "    shard_count integer NOT NULL,\n"
            "    categories text NOT NULL,\n"
            "    last_id text,\n"
            "    completed_at timestamptz,\n"
            "    updated_at timestamptz NOT NULL DEFAULT now(),\n"
            "    PRIMARY KEY (target_table, shard_index, shard_count, categories)\n"
            ")"
        ).format(ident(layout.checkpoint)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (\n"
            "    migration text PRIMARY KEY,\n"
            "    percentage integer NOT NULL DEFAULT 0 CHECK (percentage BETWEEN 0 AND 100),\n"
            "    emergency boolean NOT NULL DEFAULT false,\n"
            "    reason text NOT NULL DEFAULT '',\n"
            "    source jsonb,\n"
            "    target jsonb,\n"
            "    updated_at timestamptz NOT NULL DEFAULT now()\n"
            ")"
        ).format(ident(layout.rollout)),
        *query_cache_table(layout.source.schema),
        # A new row routes 0 %. An existing row keeps its percentage, and its target too while
        # it routes traffic (percentage > 0) to another side table: ``check_routing_row`` refuses
        # that case with a message first; the WHERE keeps a row raised meanwhile as it is.
        sql.SQL(
            "INSERT INTO {} AS r (migration, percentage, source, target) "
            "VALUES ({}, 0, {}, {})\n"
            "    ON CONFLICT (migration) DO UPDATE\n"
            "    SET source = EXCLUDED.source, target = EXCLUDED.target, updated_at = now()\n"
            "    WHERE r.percentage = 0 OR r.target IS NULL\n"
            "       OR r.target->>'table' = EXCLUDED.target->>'table'"
        ).format(
            ident(layout.rollout),
            sql.Literal(migration),
            sql.Literal(json.dumps(_source_descriptor(layout))),
            sql.Literal(json.dumps(_target_descriptor(layout))),
        ),
        # Delivered at commit: a search service waiting for this record, or serving an older
        # one, reads it at once instead of at its next re-read.
        sql.SQL("SELECT pg_notify({}, {})").format(
            sql.Literal(ROLLOUT_CHANNEL), sql.Literal(migration)
        ),
    ]
    return statements


def query_cache_table(schema: str | None) -> list[Query]:
    """The search service's shared query-embedding cache (see ``rag_service.query_cache``), in
    order and idempotent: the table, and an index on ``created_at``, by which the background
    prune filters (past the TTL) and orders (the oldest over the row cap)."""
    table = ident(TableName(QUERY_CACHE_TABLE, schema))
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (\n"
            "    descriptor text NOT NULL,\n"
            "    query_hash bytea NOT NULL,\n"
            "    embedding vector NOT NULL,\n"
            "    created_at timestamptz NOT NULL DEFAULT now(),\n"
            "    PRIMARY KEY (descriptor, query_hash)\n"
            ")"
        ).format(table),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (created_at)").format(
            sql.Identifier(derived_identifier(QUERY_CACHE_TABLE, "created_at")), table
        ),
    ]


# The descriptors are the record ``embedshift serve --migration KEY`` serves from: the data plane
# (table, columns, v1 column, both models as configured) is written here once, by ``setup``, and
# read back by ``recorded_spec``. ``model`` is the readable form; ``spec`` the whole model (base
# URL, price, rate limits, index settings), without the Secret reference only the operator reads.
_NOT_RECORDED = {"api_key_secret_ref"}


def _model_record(spec: EmbeddingSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=_NOT_RECORDED)


def _source_descriptor(layout: Layout) -> dict[str, Any]:
    return {
        "table": str(layout.source),
        "idColumn": layout.id_column,
        "textColumn": layout.text_column,
        "categoryColumn": layout.category_column,
        "embeddingColumn": layout.source_embedding_column,
        "model": layout.source_spec.descriptor if layout.source_spec else None,
        "spec": _model_record(layout.source_spec),
    }


def _target_descriptor(layout: Layout) -> dict[str, Any]:
    return {
        "table": str(layout.target),
        "embeddingColumn": "embedding",
        "vectorType": layout.target_spec.vector_type,
        "model": layout.target_spec.descriptor,
        "index": layout.index_name,
        "spec": _model_record(layout.target_spec),
    }


def recorded_spec(source: Any, target: Any) -> dict[str, Any] | None:
    """The data-plane spec (the manifest's camelCase mapping, unvalidated) that ``setup``
    recorded in a routing row's ``source`` and ``target`` descriptors; None when the row holds
    none (an emergency declared before any setup writes a bare row). Pure."""
    if not isinstance(source, dict) or not isinstance(target, dict) or not source.get("table"):
        return None
    database = {
        field: source.get(key)
        for field, key in (
            ("table", "table"),
            ("idColumn", "idColumn"),
            ("textColumn", "textColumn"),
            ("categoryColumn", "categoryColumn"),
            ("sourceEmbeddingColumn", "embeddingColumn"),
        )
        if source.get(key) is not None
    }
    raw: dict[str, Any] = {"database": database, "target": _recorded_model(target)}
    if source.get("model"):
        raw["source"] = _recorded_model(source)
    return raw


def _recorded_model(descriptor: dict[str, Any]) -> dict[str, Any]:
    recorded = descriptor.get("spec")
    if isinstance(recorded, dict):
        return dict(recorded)
    # A row written before ``spec`` was recorded: what its readable form says.
    model = EmbeddingSpec.parse(str(descriptor.get("model")), field="routing row model")
    raw = model.model_dump(mode="json", by_alias=True, include={"provider", "model", "dimensions"})
    if descriptor.get("vectorType") == "halfvec":
        raw["index"] = {"halfvec": True}
    return raw


def _trigger_function(layout: Layout) -> Query:
    """Queue inserted rows, and rows whose text or category changed.

    ``seq`` changes on every enqueue, so a worker's ``DELETE ... WHERE seq = <what it read>``
    cannot remove an entry that a later change renewed. Category changes are queued rather than
    copied here: a copy made by the trigger cannot see a vector row that a worker has written but
    not yet committed, and would be lost; the catch-up refreshes the copy instead (no re-embed).

    Compared as bytes (``::text COLLATE "C"``): a ``citext`` column, or one with a
    case-insensitive collation, calls 'Pool' and 'pool' equal, yet their content hashes differ;
    an unqueued change would leave a stale vector that nothing re-embeds (and the maintained
    counters, which take every unqueued vector as current, would count it as migrated).

    The NOTIFY wakes ``migrate follow``. PostgreSQL delivers it at commit (never for a rollback)
    and folds identical notifications of one transaction into one, so a bulk UPDATE of a million
    rows costs one message, not a million.
    """
    changed = [sql.SQL("TG_OP = 'INSERT'")] + [
        sql.SQL('NEW.{0}::text COLLATE "C" IS DISTINCT FROM OLD.{0}::text COLLATE "C"').format(
            sql.Identifier(column)
        )
        for column in (layout.text_column, layout.category_column)
        if column
    ]
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $embedshift$\n"
        "BEGIN\n"
        "    IF {changed} THEN\n"
        "        INSERT INTO {queue} (id, seq) VALUES (NEW.{sid}, nextval({seq}))\n"
        "        ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, enqueued_at = now();\n"
        "        PERFORM pg_notify({channel}, {payload});\n"
        "    END IF;\n"
        "    RETURN NULL;\n"
        "END\n"
        "$embedshift$"
    ).format(
        fn=ident(layout.trigger_function),
        changed=sql.SQL(" OR ").join(changed),
        queue=ident(layout.queue),
        sid=sql.Identifier(layout.id_column),
        seq=sql.Literal(str(ident(layout.queue_seq).as_string())),
        channel=sql.Literal(FOLLOW_CHANNEL),
        payload=sql.Literal(str(layout.target)),
    )


# ---- maintained progress counters -----------------------------------------------------------
#
# What the control loop reads every tick must cost O(changes), never O(corpus) (DESIGN.md, Data).
# Per (target, category) three numbers are maintained: embeddable source rows, source rows
# without text, and side-table rows (by the side table's category copy). Statement-level AFTER
# triggers with transition tables add one signed row per category per statement to
# ``COUNTS_TABLE``; nothing is ever updated in place, so concurrent writers of the source never
# wait on a shared counter row, and a rolled-back statement's rows roll back with it. The
# control loop folds the rows into one per category now and then
# (:func:`rag_service.progress.compact_counters`). What is migrated, stale or pending is derived
# from these and the change queue (:mod:`rag_service.progress`).
#
# PostgreSQL's rules for transition tables shape this: one event per trigger (so INSERT, UPDATE
# and DELETE are three triggers), no ``UPDATE OF`` column list (so every UPDATE of the source
# fires, and the function adds a row only when a category's numbers changed), AFTER ... FOR EACH
# STATEMENT only. COPY, ``ON CONFLICT DO UPDATE`` and foreign-key cascades fire them too (a
# cascaded DELETE of n side rows is one statement with n old rows). TRUNCATE has no transition
# table: its trigger adds the negation of what is counted.

_COUNTER_EVENTS = ("insert", "update", "delete", "truncate")
_SEED_ATTEMPTS = 5


def counter_statements(layout: Layout) -> list[Query]:
    """The counters' table, functions and triggers, idempotent and in order. Pure."""
    counts = ident(layout.counts)
    statements: list[Query] = [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (\n"
            "    target_table text NOT NULL,\n"
            "    category text NOT NULL,\n"
            "    embeddable bigint NOT NULL DEFAULT 0,\n"
            "    no_text bigint NOT NULL DEFAULT 0,\n"
            "    vectors bigint NOT NULL DEFAULT 0,\n"
            "    seeded_at timestamptz\n"
            ")"
        ).format(counts),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (target_table)").format(
            sql.Identifier(derived_identifier(COUNTS_TABLE, "target")), counts
        ),
        _counter_function(
            layout,
            layout.source_counter,
            category=sql.SQL("COALESCE({}, '')").format(layout.s_category),
            embeddable=layout.s_embeddable,
            alias="s",
        ),
        _counter_function(
            layout,
            layout.vector_counter,
            category=sql.SQL("COALESCE(t.category, '')"),
            embeddable=None,
            alias="t",
        ),
    ]
    for table, function in (
        (layout.source, layout.source_counter),
        (layout.target, layout.vector_counter),
    ):
        for event in _COUNTER_EVENTS:
            referencing = {
                "insert": "REFERENCING NEW TABLE AS embedshift_new ",
                "update": "REFERENCING OLD TABLE AS embedshift_old NEW TABLE AS embedshift_new ",
                "delete": "REFERENCING OLD TABLE AS embedshift_old ",
                "truncate": "",
            }[event]
            statements.append(
                sql.SQL(
                    "CREATE OR REPLACE TRIGGER {name} AFTER {event} ON {table}\n"
                    "    {referencing}FOR EACH STATEMENT EXECUTE FUNCTION {fn}()"
                ).format(
                    name=sql.Identifier(layout.counter_trigger(event)),
                    event=sql.SQL(event.upper()),
                    table=ident(table),
                    referencing=sql.SQL(referencing),
                    fn=ident(function),
                )
            )
    return statements


def _counter_function(
    layout: Layout,
    name: TableName,
    *,
    category: sql.Composable,
    embeddable: sql.Composable | None,
    alias: str,
) -> Query:
    """One trigger function for all four events of one table. ``embeddable``: the source's
    (its rows count as embeddable or without text); None: the side table's (its rows count as
    vectors). ``category`` and ``embeddable`` read a row aliased ``alias``. Pure."""
    if embeddable is None:
        counted = sql.SQL("0::bigint, 0::bigint, sum(c.n)")
        nonzero = sql.SQL("sum(c.n) <> 0")
        negated = sql.SQL("0, 0, -sum(vectors)")
        negated_nonzero = sql.SQL("sum(vectors) <> 0")
        embeddable = sql.SQL("true")
    else:
        counted = sql.SQL(
            "COALESCE(sum(c.n) FILTER (WHERE c.embeddable), 0),"
            " COALESCE(sum(c.n) FILTER (WHERE NOT c.embeddable), 0), 0::bigint"
        )
        nonzero = sql.SQL(
            "COALESCE(sum(c.n) FILTER (WHERE c.embeddable), 0) <> 0"
            " OR COALESCE(sum(c.n) FILTER (WHERE NOT c.embeddable), 0) <> 0"
        )
        negated = sql.SQL("-sum(embeddable), -sum(no_text), 0")
        negated_nonzero = sql.SQL("sum(embeddable) <> 0 OR sum(no_text) <> 0")
    rows = sql.SQL(
        "SELECT {category} AS category, {embeddable} AS embeddable, {sign}::bigint AS n "
        "FROM {transition} {alias}"
    )

    def side(transition: str, sign: int) -> sql.Composable:
        return rows.format(
            category=category,
            embeddable=embeddable,
            sign=sql.Literal(sign),
            transition=sql.Identifier(transition),
            alias=sql.Identifier(alias),
        )

    def add(source: sql.Composable) -> sql.Composable:
        return sql.SQL(
            "INSERT INTO {counts} (target_table, category, embeddable, no_text, vectors)\n"
            "        SELECT {target}, c.category, {counted} FROM ({source}) c\n"
            "        GROUP BY c.category HAVING {nonzero};"
        ).format(
            counts=ident(layout.counts),
            target=sql.Literal(str(layout.target)),
            counted=counted,
            source=source,
            nonzero=nonzero,
        )

    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $embedshift$\n"
        "BEGIN\n"
        "    IF TG_OP = 'INSERT' THEN\n"
        "        {insert}\n"
        "    ELSIF TG_OP = 'DELETE' THEN\n"
        "        {delete}\n"
        "    ELSIF TG_OP = 'UPDATE' THEN\n"
        "        {update}\n"
        "    ELSE\n"
        # TRUNCATE holds ACCESS EXCLUSIVE: no writer of this table is in flight, so what is
        # counted for it now is exactly what the truncate removed.
        "        INSERT INTO {counts} (target_table, category, embeddable, no_text, vectors)\n"
        "        SELECT {target}, category, {negated} FROM {counts}\n"
        "        WHERE target_table = {target} GROUP BY category HAVING {negated_nonzero};\n"
        "    END IF;\n"
        "    RETURN NULL;\n"
        "END\n"
        "$embedshift$"
    ).format(
        fn=ident(name),
        insert=add(side("embedshift_new", 1)),
        delete=add(side("embedshift_old", -1)),
        update=add(
            sql.SQL("{} UNION ALL {}").format(side("embedshift_new", 1), side("embedshift_old", -1))
        ),
        counts=ident(layout.counts),
        target=sql.Literal(str(layout.target)),
        negated=negated,
        negated_nonzero=negated_nonzero,
    )


def seed_statements(layout: Layout) -> list[Query]:
    """Count the source and side table once and make that the counters' whole state. Pure.

    Run in one REPEATABLE READ transaction (:func:`seed_counters`): the DELETE removes exactly the
    counter rows its snapshot sees, whose changes the counts of the same snapshot include; rows
    of transactions it does not see stay and add on top. The ``''`` row carries ``seeded_at``:
    it marks the target as seeded even when it has no rows, and a fold keeps it.
    """
    target = sql.Literal(str(layout.target))
    return [
        sql.SQL("DELETE FROM {} WHERE target_table = {}").format(ident(layout.counts), target),
        sql.SQL(
            "INSERT INTO {counts} (target_table, category, embeddable, no_text, vectors, "
            "seeded_at)\n"
            "SELECT {target}, category, sum(embeddable), sum(no_text), sum(vectors),\n"
            "    CASE WHEN category = '' THEN now() END\n"
            "FROM (\n"
            "    SELECT COALESCE({cat}, '') AS category, count(*) FILTER (WHERE {embeddable})"
            " AS embeddable,\n"
            "        count(*) FILTER (WHERE NOT {embeddable}) AS no_text, 0 AS vectors\n"
            "    FROM {src} s GROUP BY 1\n"
            "    UNION ALL\n"
            "    SELECT COALESCE(t.category, ''), 0, 0, count(*) FROM {tgt} t GROUP BY 1\n"
            "    UNION ALL SELECT '', 0, 0, 0\n"
            ") c GROUP BY category"
        ).format(
            counts=ident(layout.counts),
            target=target,
            cat=layout.s_category,
            embeddable=layout.s_embeddable,
            src=ident(layout.source),
            tgt=ident(layout.target),
        ),
    ]


def requeue_statement(layout: Layout) -> Query:
    """Queue every vector that is not current (or whose category copy is not the row's) and is
    not queued: what the counters' reading takes for granted, restored. Pure.

    Only ever found after writes that bypassed the trigger (a trigger disabled, a replica's
    ``session_replication_role``, the queue emptied by hand); the catch-up then settles them
    as it settles any change. Returns the ids queued.
    """
    return sql.SQL(
        "INSERT INTO {queue} (id, seq)\n"
        "SELECT t.id, nextval({seq}) FROM {tgt} t JOIN {src} s ON {sid} = t.id\n"
        "WHERE ({embeddable} AND t.content_hash = {hash}"
        " AND t.category IS NOT DISTINCT FROM {cat}) IS NOT TRUE\n"
        "  AND NOT EXISTS (SELECT 1 FROM {queue} q WHERE q.id = t.id)\n"
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    ).format(
        queue=ident(layout.queue),
        seq=sql.Literal(str(ident(layout.queue_seq).as_string())),
        tgt=ident(layout.target),
        src=ident(layout.source),
        sid=layout.s_id,
        embeddable=layout.s_embeddable,
        hash=layout.s_hash,
        cat=layout.s_category,
    )


async def seed_counters(
    conn: psycopg.AsyncConnection[Any], layout: Layout, *, repair: bool = False
) -> int:
    """Count once, exactly (:func:`seed_statements`); with ``repair``, first queue the vectors
    the counters' reading would take for current (:func:`requeue_statement`), in the same
    snapshot. Returns how many were queued. ``conn`` must be in autocommit mode.

    Not in ``setup``'s DDL transaction: there the CREATE TRIGGERs hold the source's SHARE ROW
    EXCLUSIVE lock, and a full count under it would stop the application's writes for as long
    as it reads (seconds on millions of rows). After that transaction commits the triggers
    count every change; this snapshot's DELETE drops the counter rows of the changes it sees
    and keeps the others, so none is missed or counted twice.

    Writers only ever add counter rows, which never conflict with the DELETE; a fold deletes
    rows too, so seeds and folds take the target's counter lock (:func:`counter_lock`): the seed
    waits for it (a session lock, taken before its snapshot), a fold that finds it held skips
    its turn. A serialization failure all the same is retried.
    """
    lock = counter_lock(layout)
    await conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [lock])
    try:
        return await _seed_locked(conn, layout, repair=repair)
    finally:
        # A session that was lost has released its lock already; its error is the one to see.
        with contextlib.suppress(psycopg.OperationalError):
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", [lock])


def counter_lock(layout: Layout) -> str:
    """The advisory lock that keeps a seed and a fold of ``layout``'s counters apart. Pure."""
    return f"embedshift:{layout.target}:counters"


async def _seed_locked(conn: psycopg.AsyncConnection[Any], layout: Layout, *, repair: bool) -> int:
    for attempt in range(1, _SEED_ATTEMPTS + 1):
        try:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                queued = 0
                if repair:
                    cur = await conn.execute(requeue_statement(layout))
                    queued = len(await cur.fetchall())
                    if queued:
                        await conn.execute(
                            "SELECT pg_notify(%s, %s)", [FOLLOW_CHANNEL, str(layout.target)]
                        )
                for statement in seed_statements(layout):
                    await conn.execute(statement)
            return queued
        except psycopg.errors.SerializationFailure:
            if attempt == _SEED_ATTEMPTS:
                raise DatabaseError(
                    f"counting {layout.target}'s progress: concurrent changes kept interrupting "
                    f"it ({attempt} tries); run `embedshift migrate setup` again"
                ) from None
            await asyncio.sleep(0.2 * attempt * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


async def check_target_compatible(conn: psycopg.AsyncConnection[Any], layout: Layout) -> None:
    """Refuse a side table that exists with another vector type or size (nothing changed)."""
    existing = await existing_vector_type(conn, layout)
    wanted = f"{layout.target_spec.vector_type}({layout.target_spec.dimensions})"
    if existing is not None and existing != wanted:
        raise SchemaRefused(
            f"spec.target: {layout.target} already exists with embedding {existing}, but the spec "
            f"asks for {wanted}; drop that table to start over or fix target.dimensions / "
            "target.index.halfvec (nothing was changed)"
        )


# ---- which embedding identity a side table belongs to -------------------------------------------

# Marks a side table's comment as embedshift's identity record (and its format's version), so a
# comment written by someone else is never read as one.
_IDENTITY_MARK = "embedshiftSideTable"
_IDENTITY_VERSION = 1
_TEXT_DEFAULT = re.compile(r"^'((?:[^']|'')*)'::text$")

SideTableState = Literal["new", "recorded", "adoptable"]


@dataclass(frozen=True)
class SideTableIdentity:
    """What decides a target's vectors. The side table is named after the source table, model
    name and dimensions only, so targets that differ in provider or endpoint (or whose names
    slug alike) would share it and mix their vectors: each table records the one identity it
    holds. Price and rate limits change no vector and are not part of it; the vector type is
    read from the column itself (:func:`check_target_compatible`)."""

    provider: str
    model: str
    dimensions: int
    base_url_digest: str | None  # None: the provider's default endpoint

    def readable(self) -> str:
        endpoint = (
            f"baseURL digest {self.base_url_digest}"
            if self.base_url_digest is not None
            else "the provider's default baseURL"
        )
        return f"{self.provider}:{self.model}@{self.dimensions} ({endpoint})"

    def record(self) -> str:
        """The JSON kept as the side table's comment (``obj_description``)."""
        return json.dumps(
            {
                _IDENTITY_MARK: _IDENTITY_VERSION,
                "provider": self.provider,
                "model": self.model,
                "dimensions": self.dimensions,
                "baseURLDigest": self.base_url_digest,
            },
            sort_keys=True,
        )

    @classmethod
    def from_record(cls, comment: str | None) -> SideTableIdentity | None:
        """The identity a comment records; None when it is no identity record (an older
        embedshift wrote none). ValueError for a record this version cannot read."""
        try:
            raw = json.loads(comment) if comment else None
        except ValueError:
            return None
        if not isinstance(raw, dict) or _IDENTITY_MARK not in raw:
            return None
        digest = raw.get("baseURLDigest")
        if (
            raw[_IDENTITY_MARK] != _IDENTITY_VERSION
            or not isinstance(raw.get("provider"), str)
            or not isinstance(raw.get("model"), str)
            or type(raw.get("dimensions")) is not int
            or not (digest is None or isinstance(digest, str))
        ):
            raise ValueError("unreadable identity record")
        return cls(raw["provider"], raw["model"], raw["dimensions"], digest)


def side_table_identity(spec: EmbeddingSpec) -> SideTableIdentity:
    """The identity of the vectors ``spec`` makes. Pure."""
    return SideTableIdentity(
        provider=spec.provider.value,
        model=spec.model,
        dimensions=spec.dimensions,
        base_url_digest=_endpoint_digest(spec.base_url),
    )


def _endpoint_digest(base_url: str | None) -> str | None:
    """A digest of the endpoint ``base_url`` names; the URL itself is never recorded, as it may
    carry a password. Its userinfo is left out too (credentials change no vector, and a digest
    of a password can be guessed offline), and so are a trailing slash and the case of scheme
    and host, which name the same endpoint. Pure."""
    if base_url is None:
        return None
    text = base_url.strip()
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (
            f":{parts.port}" if parts.port is not None else ""
        )
        text = urlunsplit(
            (parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, parts.fragment)
        )
    except ValueError:  # an invalid port or IPv6 host: digested as written
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def check_side_table_identity(
    conn: psycopg.AsyncConnection[Any], layout: Layout
) -> SideTableState:
    """Refuse a side table that holds another embedding identity's vectors (nothing changed).

    ``new``: the table does not exist yet. ``recorded``: it records this identity.
    ``adoptable``: made by an older embedshift, which recorded none, and every sign of its
    model (the ``model`` column's default and values) names this target's descriptor; ``setup``
    records the identity then, the others use the table as it is.
    """
    wanted = side_table_identity(layout.target_spec)
    cur = await conn.execute(
        "SELECT c IS NOT NULL, obj_description(c, 'pg_class') FROM to_regclass(%s) AS c",
        [layout.target.regclass_text],
    )
    exists, comment = await cur.fetchone() or (False, None)
    if not exists:
        return "new"
    try:
        recorded = SideTableIdentity.from_record(comment)
    except ValueError:
        raise SchemaRefused(
            f"spec.target: {layout.target} records its embedding identity in a form this "
            "version of embedshift cannot read (a newer one wrote it); use that version "
            "(nothing was changed)"
        ) from None
    if recorded == wanted:
        return "recorded"
    if recorded is not None:
        raise _identity_refused(layout, recorded.readable(), wanted)
    other = await _unrecorded_model(conn, layout)
    if other is None:
        return "adoptable"
    raise _identity_refused(
        layout, f"{other} (made by an older embedshift, which recorded no baseURL)", wanted
    )


async def _unrecorded_model(conn: psycopg.AsyncConnection[Any], layout: Layout) -> str | None:
    """The model, other than the target's descriptor, that an unrecorded side table's ``model``
    column names in its default or any row; None when it names only the target's."""
    descriptor = layout.target_spec.descriptor
    cur = await conn.execute(
        """
        SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = to_regclass(%s) AND a.attname = 'model' AND NOT a.attisdropped
        """,
        [layout.target.regclass_text],
    )
    column = await cur.fetchone()
    if column is None:
        return "an unknown model (it has no model column)"
    default = _TEXT_DEFAULT.match(column[0] or "")
    if default is None:
        return "an unknown model (its model column has no default)"
    if default[1].replace("''", "'") != descriptor:
        return default[1].replace("''", "'")
    cur = await conn.execute(
        sql.SQL("SELECT model FROM {} WHERE model IS DISTINCT FROM %s LIMIT 1").format(
            ident(layout.target)
        ),
        [descriptor],
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])


def _identity_refused(layout: Layout, held: str, wanted: SideTableIdentity) -> SchemaRefused:
    return SchemaRefused(
        f"spec.target: side table {layout.target} holds vectors of {held}, not of this spec's "
        f"target {wanted.readable()}; the two must not share it (it is named after the table, "
        "model and dimensions only, so their vectors would mix). Set spec.target back to what "
        f"the table holds, or, once no routing row sends searches to it, drop it (DROP TABLE "
        f"{layout.target} CASCADE) and run `embedshift migrate setup` again (nothing was "
        "changed)"
    )


async def check_routing_row(
    conn: psycopg.AsyncConnection[Any], layout: Layout, *, migration: str
) -> None:
    """Refuse to re-point a routing row that routes traffic at another side table.

    "Routes traffic" means a percentage above 0, emergency flag or not: the flag only holds v1
    until a retry clears it, and the percentage then applies again, to whatever the row names.
    """
    if not await table_exists(conn, layout.rollout):
        return
    # Imported here: rollout_row builds on this module.
    from rag_service.rollout_row import read_row

    row = await read_row(conn, table=layout.rollout, migration=migration)
    if row is None or row.percentage == 0 or row.target in (None, str(layout.target)):
        return
    held = " (its emergency flag holds v1 until a retry clears it)" if row.emergency else ""
    raise SchemaRefused(
        f"routing row {migration!r} routes {row.percentage} % of searches to {row.target}"
        f"{held}; setup for {layout.target} would point them at an empty side table. Roll it "
        "back to 0 % first (spec.rollout.maxPercentage: 0, `embedshift rollout abort`), or set "
        "up this target under another --migration name (nothing was changed)"
    )


async def setup(
    url: str, spec: DataPlaneSpec, *, migration: str, dry_run: bool = False
) -> list[str]:
    """Install everything (idempotent) and return the SQL; with ``dry_run``, change nothing.

    The whole setup is one transaction under a short ``lock_timeout`` retried with backoff, so it
    never queues behind a long query holding the source table and never half-applies.
    """
    spec.target.check_indexable()
    conn = await connect(url, autocommit=True)
    async with conn:
        layout = await inspect_source(conn, spec)
        state = await check_side_table_identity(conn, layout)
        await check_target_compatible(conn, layout)
        await check_routing_row(conn, layout, migration=migration)
        statements = setup_statements(
            layout, migration=migration, record_identity=state != "recorded"
        )
        rendered = [s.as_string(conn) + ";" for s in statements]
        rendered.append("-- then, once, in a REPEATABLE READ transaction: the counters' seed")
        rendered += [s.as_string(conn) + ";" for s in seed_statements(layout)]
        if dry_run:
            return rendered
        await run_with_lock_retry(conn, statements, what=f"setup of {layout.target}")
        await seed_counters(conn, layout)
        if state == "adoptable":
            log.warning(
                "setup: adopted %s, made by an older embedshift that recorded no embedding "
                "identity: its model column names only %s, so it now records %s",
                layout.target,
                layout.target_spec.descriptor,
                side_table_identity(layout.target_spec).readable(),
            )
        log.info("setup: %s ready for %s (queue %s)", layout.target, layout.source, layout.queue)
        return rendered


async def run_with_lock_retry(
    conn: psycopg.AsyncConnection[Any],
    statements: Sequence[Query],
    *,
    what: str,
    attempts: int = _LOCK_ATTEMPTS,
) -> None:
    """Run ``statements`` in one transaction with a short lock_timeout, retrying on lock waits."""
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(_LOCK_TIMEOUT))
                )
                for statement in statements:
                    await conn.execute(statement)
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == attempts:
                raise DatabaseError(
                    f"{what}: a long-running query keeps a lock on the table; gave up after "
                    f"{attempts} tries of {_LOCK_TIMEOUT} each (nothing was changed); retry when "
                    "it is done"
                ) from None
            delay = min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("%s: lock not available, retrying in %.1fs", what, delay)
            await asyncio.sleep(delay)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise DatabaseError(f"{what}: permission denied: {first_line(exc)}") from None


def category_filter(layout: Layout, categories: Sequence[str]) -> sql.Composable:
    """SQL true for source rows (aliased ``s``) in ``categories``, all rows if empty. Pure."""
    if not categories:
        return sql.SQL("true")
    if layout.category_column is None:
        raise ConfigError(
            "--category: the spec has no categoryColumn, so rows cannot be chosen by category; "
            "set spec.database.categoryColumn (or --category-column)"
        )
    return sql.SQL("{} = ANY({})").format(layout.s_category, sql.Literal(list(categories)))


_KNOWN_CATEGORIES_SHOWN = 20


async def check_categories(
    conn: psycopg.AsyncConnection[Any], layout: Layout, categories: Sequence[str], *, field: str
) -> None:
    """Refuse categories no source row has, naming the ones it does (a misspelt category would
    embed nothing and succeed). Cheap when they exist: one probe per category, each ending at
    its first row; only a refusal reads the column's distinct values."""
    if not categories:
        return
    category_filter(layout, categories)  # no category column: that refusal first
    cur = await conn.execute(
        sql.SQL(
            "SELECT c FROM unnest(CAST(%s AS text[])) WITH ORDINALITY AS w(c, n)\n"
            "WHERE NOT EXISTS (SELECT 1 FROM {src} s WHERE {cat} = w.c) ORDER BY n"
        ).format(src=ident(layout.source), cat=layout.s_category),
        [list(categories)],
    )
    unknown = [str(r[0]) for r in await cur.fetchall()]
    if not unknown:
        return
    cur = await conn.execute(
        sql.SQL(
            "SELECT DISTINCT {cat} FROM {src} s WHERE {cat} IS NOT NULL ORDER BY 1 LIMIT {n}"
        ).format(
            cat=layout.s_category,
            src=ident(layout.source),
            n=sql.Literal(_KNOWN_CATEGORIES_SHOWN + 1),
        )
    )
    known = [str(r[0]) for r in await cur.fetchall()]
    listed = ", ".join(known[:_KNOWN_CATEGORIES_SHOWN]) + (
        ", …" if len(known) > _KNOWN_CATEGORIES_SHOWN else ""
    )
    raise ConfigError(
        f"{field}: no row of {layout.source} has {layout.category_column} "
        f"{', '.join(map(repr, unknown))}; "
        + (f"its categories are {listed}" if known else "it has no categories yet")
        + " (nothing was changed)"
    )
