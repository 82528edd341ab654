"""``embedshift``: the command line. Every mistake a user can make ends in one line and exit ≠ 0.

Configuration comes from ``--config FILE`` (an EmbeddingMigration manifest, the same YAML the
operator reads), flags, and environment variables (each flag names its variable in ``--help``).
Flags override the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from rag_service import __version__
from rag_service.errors import ConfigError, EmbedshiftError
from rag_service.indexes import build_index
from rag_service.migrate import DryRun, RunOptions, RunReport, Shard, plan_run, run_migration
from rag_service.progress import migration_progress
from rag_service.providers import api_key_from_env, make_provider
from rag_service.providers.pricing import PriceTable
from rag_service.schema import first_line, setup
from rag_service.spec import (
    DataPlaneSpec,
    EmbeddingSpec,
    load_resource,
    validation_message,
)
from rag_service.terminal import JsonLinesProgress, RichProgress
from rag_service.verify import verify

log = logging.getLogger("embedshift")

EXAMPLES = """\
examples:
  export DATABASE_URL=postgresql://user@host/db
  embedshift migrate setup  --table documents --text-column content --category-column category \\
                            --target openai:text-embedding-3-small@768
  embedshift migrate run    --config migration.yaml --dry-run --limit 10
  embedshift migrate run    --config migration.yaml --category facilities
  embedshift migrate index  --config migration.yaml
  embedshift migrate verify --config migration.yaml
  embedshift migrate status --config migration.yaml --json
"""


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _add_spec_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to migrate (flags override --config)")
    g.add_argument(
        "--config",
        type=Path,
        default=_env("EMBEDSHIFT_CONFIG"),
        help="an EmbeddingMigration manifest (env EMBEDSHIFT_CONFIG)",
    )
    g.add_argument(
        "--database-url",
        default=_env("DATABASE_URL"),
        help="PostgreSQL connection string (env DATABASE_URL)",
    )
    g.add_argument(
        "--table", default=_env("EMBEDSHIFT_TABLE"), help="source table, e.g. public.documents"
    )
    g.add_argument(
        "--id-column", default=_env("EMBEDSHIFT_ID_COLUMN"), help="unique id column (default id)"
    )
    g.add_argument(
        "--text-column",
        default=_env("EMBEDSHIFT_TEXT_COLUMN"),
        help="text column (default content)",
    )
    g.add_argument(
        "--category-column", default=_env("EMBEDSHIFT_CATEGORY_COLUMN"), help="category column"
    )
    g.add_argument(
        "--source-column", default=_env("EMBEDSHIFT_SOURCE_COLUMN"), help="v1 embedding column"
    )
    g.add_argument(
        "--target",
        default=_env("EMBEDSHIFT_TARGET"),
        help="target model as provider:model@dims, e.g. openai:text-embedding-3-small@768, "
        "google:gemini-embedding-001@1536, local:hash@768 (env EMBEDSHIFT_TARGET)",
    )
    g.add_argument(
        "--target-base-url", default=_env("EMBEDSHIFT_TARGET_BASE_URL"), help="API base URL"
    )
    g.add_argument(
        "--source", default=_env("EMBEDSHIFT_SOURCE"), help="v1 model, provider:model@dims"
    )
    g.add_argument(
        "--migration",
        default=_env("EMBEDSHIFT_MIGRATION"),
        help="routing key namespace/name (default: the manifest's, else default/<table>)",
    )
    g.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="PROVIDER:MODEL=USD",
        help="override a price in USD per 1M tokens (repeatable)",
    )
    g.add_argument(
        "--halfvec",
        action="store_true",
        default=None,
        help="store target vectors as halfvec (indexable up to 4000 dims; same on every command)",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedshift",
        description="Move a pgvector RAG corpus to a new embedding model, step by step.",
    )
    parser.add_argument("--version", action="version", version=f"embedshift {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    migrate = commands.add_parser(
        "migrate",
        help="set up, run, index, verify and inspect the re-embedding",
        description="Re-embed the corpus into a side table next to the source table.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    steps = migrate.add_subparsers(dest="step", metavar="STEP", required=True)

    p = steps.add_parser(
        "setup",
        help="create the side table, change queue + trigger, status and routing tables",
        description="Idempotent. Refuses (changing nothing) a partitioned table, a non-unique id "
        "column, or a vector index above 2000 dimensions without halfvec.",
    )
    _add_spec_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the SQL, change nothing")
    p.set_defaults(handler=_setup)

    p = steps.add_parser(
        "run",
        help="embed pending rows (resumable; safe to kill)",
        description="Backfill by primary key from the last checkpoint, then drain the change "
        "queue. Killing it at any moment loses nothing: rerun to resume.",
    )
    _add_spec_flags(p)
    p.add_argument(
        "--dry-run", action="store_true", help="show what would be embedded and the cost"
    )
    p.add_argument("--limit", type=_positive, help="embed at most N rows in this run")
    p.add_argument(
        "--category", action="append", default=None, help="only this category (repeatable)"
    )
    p.add_argument("--shard", type=_shard, default=Shard(), metavar="I/N", help="run shard I of N")
    p.add_argument("--batch-size", type=_positive, help="rows per transaction (default 100)")
    p.add_argument("--concurrency", type=_positive, help="batches embedding at once (default 4)")
    p.add_argument("--budget-usd", type=float, help="stop before spending more than this in total")
    p.add_argument(
        "--rescan", action="store_true", help="rescan the whole table, not just the queue"
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a progress bar")
    p.set_defaults(handler=_run)

    p = steps.add_parser("verify", help="check counts, dims, norms, staleness and index recall")
    _add_spec_flags(p)
    p.add_argument("--sample", type=_positive, default=50, help="queries for the recall check")
    p.add_argument("--k", type=_positive, default=10, help="neighbours compared per query")
    p.add_argument("--min-recall", type=float, default=0.9, help="fail below this recall@k")
    p.add_argument("--ef-search", type=_positive, help="hnsw.ef_search for the recall check")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=_verify)

    p = steps.add_parser(
        "index", help="build the target ANN index concurrently (repairs leftovers)"
    )
    _add_spec_flags(p)
    p.add_argument("--maintenance-work-mem", default="512MB", help="memory for the build")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=_index)

    p = steps.add_parser("status", help="per-category progress, errors, tokens and cost")
    _add_spec_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=_status)

    serve = commands.add_parser(
        "serve",
        help="run the search service: routed v1/v2 search, metrics, emergency webhook",
        description="Serve POST /api/rag/search, routing each user to v1 or v2 by the routing "
        "row's percentage (sticky per user). The guide's FF_* flags are honoured: "
        "FF_NEW_EMBEDDINGS_PERCENTAGE (start-up default), FF_ENABLE_GRADUAL_MIGRATION=false "
        "(pin v1), FF_USE_PARALLEL_RAG (shadow comparison), FF_ENABLE_PERFORMANCE_LOGGING, "
        "FF_ENABLE_QUERY_ANALYTICS. ALERT_WEBHOOK_SECRET enables POST /api/alerts/webhook.",
    )
    _add_spec_flags(serve)
    serve.add_argument("--host", default=_env("EMBEDSHIFT_HOST") or "127.0.0.1")
    serve.add_argument("--port", type=int, default=int(_env("EMBEDSHIFT_PORT") or 8080))
    serve.add_argument("--sticky-header", default="X-User-Id", help="header used for bucketing")
    serve.add_argument(
        "--prometheus-url",
        default=_env("EMBEDSHIFT_PROMETHEUS_URL"),
        help="the dashboard reads Prometheus instead of the service's own counters",
    )
    serve.add_argument(
        "--reread-seconds", type=float, default=5.0, help="re-read the routing row this often"
    )
    serve.add_argument("--ef-search", type=_positive, help="hnsw.ef_search (recall vs latency)")
    serve.add_argument("--max-query-chars", type=_positive, default=2000)
    serve.add_argument("--breaker-failures", type=_positive, default=5)
    serve.add_argument("--breaker-cooldown", type=float, default=30.0, help="seconds")
    serve.add_argument("--shadow-sample-rate", type=float, default=0.1)
    serve.set_defaults(handler=_serve)

    from rag_service import compare, monitor  # their handlers import this module lazily

    compare.register(commands, _add_spec_flags)
    monitor.register(commands, _add_spec_flags)
    return parser


def _shard(value: str) -> Shard:
    try:
        return Shard.parse(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--shard: ")) from None


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


# ---- configuration ----------------------------------------------------------------------------


def resolve(args: argparse.Namespace) -> tuple[DataPlaneSpec, str, str, PriceTable]:
    """(spec, migration key, database url, prices) from --config, flags and environment."""
    migration: str | None = None
    raw: dict[str, Any] = {}
    if args.config:
        resource = load_resource(args.config)
        raw = resource.spec.model_dump(by_alias=True, exclude_none=True)
        migration = resource.key
    database = raw.setdefault("database", {})
    for flag, field in (
        ("table", "table"),
        ("id_column", "idColumn"),
        ("text_column", "textColumn"),
        ("category_column", "categoryColumn"),
        ("source_column", "sourceEmbeddingColumn"),
    ):
        if getattr(args, flag):
            database[field] = getattr(args, flag)
    if "table" not in database:
        raise ConfigError("--table: which source table? pass --table (or --config FILE)")
    if args.target:
        target = EmbeddingSpec.parse(args.target, field="--target")
        raw["target"] = {
            **raw.get("target", {}),
            **target.model_dump(by_alias=True, include={"provider", "model", "dimensions"}),
        }
    if "target" not in raw:
        raise ConfigError(
            "--target: which model to migrate to? e.g. --target openai:text-embedding-3-small@768 "
            "(or --config FILE)"
        )
    if args.target_base_url:
        raw["target"]["baseURL"] = args.target_base_url
    if getattr(args, "halfvec", None):
        raw["target"].setdefault("index", {})["halfvec"] = True
    if args.source:
        source = EmbeddingSpec.parse(args.source, field="--source")
        raw["source"] = {
            **raw.get("source", {}),
            **source.model_dump(by_alias=True, include={"provider", "model", "dimensions"}),
        }
    try:
        spec = DataPlaneSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, prefix="spec", model=DataPlaneSpec)) from None
    spec.target.check_indexable()
    url = args.database_url
    if not url:
        raise ConfigError(
            "DATABASE_URL is not set: export DATABASE_URL=postgresql://user@host/db "
            "(or pass --database-url)"
        )
    migration = args.migration or migration or f"default/{spec.database.table_name.name}"
    prices = PriceTable().with_overrides(dict(PriceTable.parse_override(p) for p in args.price))
    return spec, migration, url, prices


# ---- commands ---------------------------------------------------------------------------------

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False)


async def _setup(args: argparse.Namespace) -> int:
    spec, migration, url, _ = resolve(args)
    statements = await setup(url, spec, migration=migration, dry_run=args.dry_run)
    if args.dry_run:
        print("\n\n".join(statements))
        return 0
    _out.print(
        f"setup done: {spec.target_table} ({spec.target.vector_type}({spec.target.dimensions})) "
        f"next to {spec.database.table_name}; routing row {migration!r} at 0 %"
    )
    return 0


def _options(args: argparse.Namespace, spec: DataPlaneSpec) -> RunOptions:
    m = spec.migration
    budget = args.budget_usd if args.budget_usd is not None else m.budget_usd
    if budget is not None and budget < 0:
        raise ConfigError("--budget-usd: must be zero or more")
    return RunOptions(
        limit=args.limit,
        categories=tuple(args.category if args.category is not None else m.categories),
        shard=args.shard,
        batch_size=args.batch_size or m.batch_size,
        concurrency=args.concurrency or m.concurrency,
        budget_usd=budget,
        rescan=args.rescan,
    )


async def _run(args: argparse.Namespace) -> int:
    spec, migration, url, prices = resolve(args)
    options = _options(args, spec)
    if args.dry_run:
        plan = await plan_run(url, spec, options=options, prices=prices)
        _print_dry_run(plan, as_json=args.json)
        return 0
    provider = make_provider(
        spec.target,
        api_key=api_key_from_env(spec.target, "target"),
        prices=prices,
        concurrency=options.concurrency,
        bulk=True,
    )
    progress = JsonLinesProgress(sys.stdout) if args.json else RichProgress(_err)
    try:
        report = await run_migration(
            url,
            spec,
            provider=provider,
            options=options,
            migration=migration,
            prices=prices,
            progress=progress,
        )
    finally:
        await provider.aclose()
    if not args.json:
        _print_run(report)
    return 0


def _print_dry_run(plan: DryRun, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": "dry-run", **asdict(plan)}))
        return
    note = "" if plan.setup_done else " (setup has not run yet: every row counts)"
    _out.print(f"dry run: would embed {plan.rows} rows with {plan.target}{note}")
    for category, rows in plan.by_category.items():
        _out.print(f"  {category or '(no category)'}: {rows} rows")
    _out.print(
        f"estimated ≈{plan.estimated_tokens:,} tokens ≈ ${plan.estimated_cost_usd:.4f} "
        "(tokens estimated as characters / 3); nothing was written"
    )
    if plan.sample:
        table = Table("id", "category", "text", title="first rows")
        for row in plan.sample:
            table.add_row(row["id"], row["category"] or "", row["text"])
        _out.print(table)


def _print_run(report: RunReport) -> None:
    _out.print(
        f"embedded {report.embedded} rows in {report.seconds:.1f}s "
        f"({report.rows_per_second:.0f} rows/s) with {report.target}; "
        f"{report.tokens:,} tokens, ${report.cost_usd:.4f}; {report.pending} pending"
        + ("; stopped at --limit" if report.stopped_by == "limit" else "")
        + (
            f"; {report.changed_while_embedding} rows changed while embedding and stay queued"
            if report.changed_while_embedding
            else ""
        )
    )


async def _verify(args: argparse.Namespace) -> int:
    spec, _, url, _ = resolve(args)
    result = await verify(
        url,
        spec,
        sample=args.sample,
        k=args.k,
        min_recall=args.min_recall,
        ef_search=args.ef_search,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        table = Table("check", "ok", "detail", title=f"verify {result.target}")
        for check in result.checks:
            table.add_row(check.name, "✓" if check.ok else "✗", check.detail)
        _out.print(table)
        cats = Table("category", "source", "current", "pending", "stale", "no text")
        for c in result.categories:
            cats.add_row(
                c.category or "(none)",
                *(str(v) for v in (c.source, c.current, c.pending, c.stale, c.no_text)),
            )
        _out.print(cats)
        _out.print("verification passed" if result.ok else "verification FAILED")
    return 0 if result.ok else 1


async def _index(args: argparse.Namespace) -> int:
    spec, _, url, _ = resolve(args)
    report = await build_index(url, spec, maintenance_work_mem=args.maintenance_work_mem)
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        _out.print(
            f"index {report.name}: {report.action} in {report.seconds:.1f}s\n  {report.definition}"
        )
    return 0


async def _status(args: argparse.Namespace) -> int:
    spec, _, url, _ = resolve(args)
    progress = await migration_progress(url, spec)
    if args.json:
        print(json.dumps(progress.as_dict()))
        return 0
    table = Table(
        "category", "source", "migrated", "pending", "stale", "%", title=f"status {progress.target}"
    )
    for c in progress.categories:
        share = 100.0 * c.current / c.source if c.source else 100.0
        table.add_row(
            c.category or "(none)",
            str(c.source),
            str(c.current),
            str(c.pending),
            str(c.stale),
            f"{share:.1f}",
        )
    _out.print(table)
    _out.print(
        f"{progress.batches} batches, {progress.failed_batches} failed; "
        f"{progress.tokens:,} tokens, ${progress.cost_usd:.4f}; {progress.queued} queued changes"
    )
    for error in progress.recent_errors:
        _out.print(
            f"  failed {error['at']} shard {error['shard']} "
            f"ids {error['firstId']}…{error['lastId']}: {error['error']}"
        )
    return 0


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rag_service.service import ServiceSettings, create_app

    spec, migration, url, prices = resolve(args)
    settings = ServiceSettings.from_env(
        database_url=url,
        spec=spec,
        migration=migration,
        sticky_header=args.sticky_header,
        prometheus_url=args.prometheus_url,
        reread_seconds=args.reread_seconds,
        ef_search=args.ef_search,
        max_query_chars=args.max_query_chars,
        breaker_failures=args.breaker_failures,
        breaker_cooldown_seconds=args.breaker_cooldown,
        shadow_sample_rate=args.shadow_sample_rate,
        prices=prices,
    )
    config = uvicorn.Config(
        create_app(settings), host=args.host, port=args.port, log_config=None, access_log=False
    )
    await uvicorn.Server(config).serve()
    return 0


# ---- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "openai", "google_genai", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args))
    except EmbedshiftError as exc:
        print(f"embedshift: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except psycopg.Error as exc:
        print(f"embedshift: error: database: {first_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "embedshift: interrupted; committed batches are kept, rerun to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
