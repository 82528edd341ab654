"""``embedshift migrate setup|run|verify|index|status``: the re-embedding, step by step."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from embedshift_operator.cli.flags import (
    EF_SEARCH_HELP,
    add_spec_flags,
    count_or_auto,
    ef_search,
    fraction,
    interval,
    memory_size,
    memory_size_or_auto,
    positive,
    resolve,
    shard,
    usd,
)
from rag_service.errors import ConfigError, VerificationFailed
from rag_service.follow import DEFAULT_SWEEP_SECONDS, follow_command
from rag_service.indexes import DEFAULT_MEMORY_CAP, build_index, memory_text
from rag_service.migrate import DryRun, RunOptions, RunReport, Shard, plan_run, run_migration
from rag_service.progress import MigrationProgress, migration_progress
from rag_service.providers import PriceTable, api_key_from_env, make_provider
from rag_service.providers.pricing import spend_text
from rag_service.rollout_row import read_routing
from rag_service.schema import setup
from rag_service.signals import stop_on_signals
from rag_service.spec import DataPlaneSpec, EmbeddingSpec
from rag_service.terminal import JsonLinesProgress, RichProgress
from rag_service.verify import verify

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


_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate`` and its steps to the ``embedshift`` command line."""
    migrate = commands.add_parser(
        "migrate",
        help="set up, run, index, verify and inspect the re-embedding",
        description="Re-embed the corpus into a side table next to the source table.",
        epilog=EXAMPLES,
    )
    steps = migrate.add_subparsers(dest="step", metavar="STEP", required=True)

    p = steps.add_parser(
        "setup",
        help="create the side table, change queue + trigger, status and routing tables",
        description="Idempotent. Refuses (changing nothing) a partitioned table, a non-unique id "
        "column, or a vector index above 2000 dimensions without halfvec.",
    )
    add_spec_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the SQL, change nothing")
    p.set_defaults(handler=_setup)

    p = steps.add_parser(
        "run",
        help="embed pending rows (resumable; safe to kill)",
        description="Backfill by primary key from the last checkpoint, then drain the change "
        "queue. Killing it at any moment loses nothing: rerun to resume.",
    )
    add_spec_flags(p)
    p.add_argument(
        "--dry-run", action="store_true", help="show what would be embedded and the cost"
    )
    p.add_argument("--limit", type=positive, metavar="N", help="embed at most N rows in this run")
    p.add_argument(
        "--category", action="append", default=None, help="only this category (repeatable)"
    )
    p.add_argument("--shard", type=shard, default=Shard(), metavar="I/N", help="run shard I of N")
    p.add_argument("--batch-size", type=positive, help="rows per transaction (default 100)")
    p.add_argument("--concurrency", type=positive, help="batches embedding at once (default 4)")
    p.add_argument(
        "--budget-usd",
        type=usd,
        help="stop before spending more than this many US dollars in total (default: "
        "spec.migration.budgetUSD, else no limit)",
    )
    p.add_argument(
        "--rescan", action="store_true", help="rescan the whole table, not just the queue"
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a progress bar")
    p.set_defaults(handler=_run)

    p = steps.add_parser("verify", help="check counts, dims, norms, staleness and index recall")
    add_spec_flags(p)
    p.add_argument(
        "--sample", type=positive, default=50, metavar="N", help="queries for the recall check"
    )
    p.add_argument(
        "--k", type=positive, default=10, metavar="K", help="neighbours compared per query"
    )
    p.add_argument(
        "--min-recall",
        type=fraction,
        default=0.9,
        metavar="RECALL",
        help="fail below this recall@k of the index against exact search, 0-1",
    )
    p.add_argument("--ef-search", type=ef_search, metavar="N", help=EF_SEARCH_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=_verify)

    p = steps.add_parser(
        "index", help="build the target ANN index concurrently (repairs leftovers)"
    )
    add_spec_flags(p)
    p.add_argument(
        "--maintenance-work-mem",
        type=memory_size_or_auto,
        default=None,
        metavar="SIZE|auto",
        help="the build's maintenance_work_mem, in PostgreSQL's units (512MB, 4GB); default "
        "auto: the HNSW graph's estimated size, so it is built in memory (several times faster "
        "than spilling to disk), never less than the server's setting",
    )
    p.add_argument(
        "--max-maintenance-work-mem",
        type=memory_size,
        default=DEFAULT_MEMORY_CAP,
        metavar="SIZE",
        help=f"the most auto asks for (default {memory_text(DEFAULT_MEMORY_CAP)}): size it to "
        "what the database server can spare",
    )
    p.add_argument(
        "--parallel-workers",
        type=count_or_auto,
        default=None,
        metavar="N|auto",
        help="max_parallel_maintenance_workers for the build; default auto: the server's own "
        "setting (PostgreSQL's default is 2; more workers than the database server has cores "
        "is slower); 0 builds in one process (needed when the server's /dev/shm cannot hold "
        "the graph)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=_index)

    p = steps.add_parser(
        "status",
        help="per-category progress, errors, tokens and cost",
        description="Counts come from the counters setup installed and the change queue "
        "(maintained, cheap at any size); --exact compares the whole source with the side "
        "table instead, and counts the counters again if they drifted.",
    )
    add_spec_flags(p)
    p.add_argument(
        "--exact",
        action="store_true",
        help="count by a full comparison of source and side table (reads the whole corpus)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=_status)

    p = steps.add_parser(
        "follow",
        help="keep the side table current while the application writes (runs until stopped)",
        description="Drain the change queue as it fills: LISTEN for the trigger's notifications "
        "and sweep the queue every --sweep-seconds in case one was lost. One follower per "
        "target drains at a time (a second one waits and takes over). SIGTERM or Ctrl-C "
        "finishes the batch in flight and exits 0.",
    )
    add_spec_flags(p)
    p.add_argument(
        "--sweep-seconds",
        type=interval,
        default=DEFAULT_SWEEP_SECONDS,
        help=f"sweep the queue this often even without a notification "
        f"(default {DEFAULT_SWEEP_SECONDS:g})",
    )
    p.add_argument(
        "--batch-size", type=positive, help="rows per transaction (default: the spec's, 100)"
    )
    p.add_argument(
        "--concurrency", type=positive, help="batches embedding at once (default: the spec's, 4)"
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of log lines")
    p.set_defaults(handler=_follow)


async def _follow(args: argparse.Namespace) -> int:
    spec, migration, url, prices = resolve(args)
    return await follow_command(
        url,
        spec,
        migration=migration,
        prices=prices,
        sweep_seconds=args.sweep_seconds,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        json_lines=args.json,
    )


async def _setup(args: argparse.Namespace) -> int:
    spec, migration, url, _ = resolve(args)
    statements = await setup(url, spec, migration=migration, dry_run=args.dry_run)
    if args.dry_run:
        print("\n\n".join(statements))
        return 0
    # What the row says now, read back: setup never changes an existing row's percentage.
    row = await read_routing(url, spec, migration=migration)
    routing = (
        "no routing row"
        if row is None
        else f"routing row {migration!r} at {row.percentage} % to {row.target or '(no target)'}"
        + (f", EMERGENCY ({row.reason})" if row.emergency else "")
    )
    _out.print(
        f"setup done: {spec.target_table} ({spec.target.vector_type}({spec.target.dimensions})) "
        f"next to {spec.database.table_name}; {routing}"
    )
    return 0


def _known_cost(amount: float, spec: DataPlaneSpec, prices: PriceTable) -> float | None:
    """``amount``, or None when it was counted at an unknown price (so it says nothing)."""
    return amount if prices.knows(spec.target) else None


def _usd(amount: float | None, target: EmbeddingSpec) -> str:
    """A cost as printed. Unknown is said so: "$0" would be a lie (``PriceTable.price``)."""
    if amount is not None:
        return spend_text(amount)
    key = PriceTable.key(target.provider.value, target.model)
    return f"{spend_text(None)} (--price {key}=USD_PER_MILLION_TOKENS sets it)"


def _options(args: argparse.Namespace, spec: DataPlaneSpec, prices: PriceTable) -> RunOptions:
    m = spec.migration
    budget = args.budget_usd if args.budget_usd is not None else m.budget_usd
    if budget is not None and budget < 0:
        raise ConfigError("--budget-usd: must be zero or more")
    defaults = RunOptions()
    options = RunOptions(
        limit=args.limit,
        categories=tuple(args.category if args.category is not None else m.categories),
        shard=args.shard,
        batch_size=args.batch_size or m.batch_size,
        concurrency=args.concurrency or m.concurrency,
        budget_usd=budget,
        rescan=args.rescan,
        categories_from="--category" if args.category is not None else defaults.categories_from,
        budget_from="--budget-usd" if args.budget_usd is not None else defaults.budget_from,
    )
    if options.budget_usd is not None:  # before the provider asks for an API key
        prices.require_price(
            spec.target.provider.value, spec.target.model, field=options.budget_from
        )
    return options


async def _run(args: argparse.Namespace) -> int:
    spec, migration, url, prices = resolve(args)
    options = _options(args, spec, prices)
    if args.dry_run:
        plan = await plan_run(url, spec, options=options, prices=prices)
        _print_dry_run(plan, spec.target, as_json=args.json)
        return 0
    provider = make_provider(
        spec.target,
        api_key=api_key_from_env(spec.target, "target"),
        prices=prices,
        concurrency=options.concurrency,
        bulk=True,
    )
    priced = prices.knows(spec.target)
    progress = (
        JsonLinesProgress(sys.stdout, priced=priced)
        if args.json
        else RichProgress(_err, priced=priced)
    )
    async with stop_on_signals() as stop:
        try:
            report = await run_migration(
                url,
                spec,
                provider=provider,
                options=options,
                migration=migration,
                prices=prices,
                progress=progress,
                stop=stop,
            )
        finally:
            await provider.aclose()
    if not args.json:
        _print_run(report, cost=_usd(_known_cost(report.cost_usd, spec, prices), spec.target))
    if report.stopped_by == "signal":
        # Not 0: a Job whose worker was stopped has not finished its shard.
        name = stop.signum.name if stop.signum else "a signal"
        print(
            f"embedshift: stopped by {name}: what the API answered was written; rerun to resume",
            file=sys.stderr,
        )
        return stop.exit_code
    return 0


def _print_dry_run(plan: DryRun, target: EmbeddingSpec, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": "dry-run", **asdict(plan)}))
        return
    note = "" if plan.setup_done else " (setup has not run yet: every row counts)"
    _out.print(f"dry run: would embed {plan.rows} rows with {plan.target}{note}")
    for category, rows in plan.by_category.items():
        _out.print(f"  {category or '(no category)'}: {rows} rows")
    _out.print(
        f"estimated ≈{plan.estimated_tokens:,} tokens (characters / 3)"
        + (
            f", {_usd(None, target)}"
            if plan.estimated_cost_usd is None
            else f" ≈ {_usd(plan.estimated_cost_usd, target)}"
        )
        + "; nothing was written"
    )
    if plan.sample:
        table = Table("id", "category", "text", title="first rows")
        for row in plan.sample:
            table.add_row(row["id"], row["category"] or "", row["text"])
        _out.print(table)


def _print_run(report: RunReport, *, cost: str) -> None:
    _out.print(
        f"embedded {report.embedded} rows in {report.seconds:.1f}s "
        f"({report.rows_per_second:.0f} rows/s) with {report.target}; "
        f"{report.tokens:,} tokens, {cost}; "
        + ("stopped early" if report.stopped_by == "signal" else f"{report.pending} pending")
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
    if not result.ok:
        # Its own exit code, so a Job fails at once (a rerun measures the same) with this line.
        failed = "; ".join(f"{c.name}: {c.detail}" for c in result.checks if not c.ok)
        raise VerificationFailed(f"verification failed: {failed}")
    return 0


async def _index(args: argparse.Namespace) -> int:
    spec, _, url, _ = resolve(args)
    report = await build_index(
        url,
        spec,
        maintenance_work_mem=args.maintenance_work_mem,
        max_maintenance_work_mem=args.max_maintenance_work_mem,
        parallel_workers=args.parallel_workers,
    )
    if args.json:
        print(json.dumps(asdict(report)))
        return 0
    settings = (
        f" (maintenance_work_mem {memory_text(report.maintenance_work_mem)}, up to "
        f"{report.parallel_workers} parallel workers)"
        if report.maintenance_work_mem is not None
        else ""
    )
    _out.print(
        f"index {report.name}: {report.action} in {report.seconds:.1f}s{settings}\n"
        f"  {report.definition}"
    )
    return 0


async def _status(args: argparse.Namespace) -> int:
    spec, _, url, prices = resolve(args)
    progress = await migration_progress(url, spec, exact=args.exact)
    cost = _known_cost(progress.cost_usd, spec, prices)
    if args.json:
        document = progress.as_dict()
        if cost is None:
            document["costUSD"] = None  # counted at an unknown price: not $0
        print(json.dumps(document))
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
        f"{progress.tokens:,} tokens, {_usd(cost, spec.target)}; {progress.queued} queued changes"
    )
    for error in progress.recent_errors:
        _out.print(
            f"  failed {error['at']} shard {error['shard']} "
            f"ids {error['firstId']}…{error['lastId']}: {error['error']}"
        )
    _out.print(_counts_line(progress))
    return 0


def _counts_line(progress: MigrationProgress) -> str:
    """How the table's figures were obtained; queued, batches, tokens and errors are always
    read directly. Pure."""
    if progress.counts == "maintained":
        since = (
            progress.counted_since.isoformat(timespec="seconds") if progress.counted_since else "?"
        )
        return (
            f"counts: maintained (counters counted whole at {since}, kept by triggers since, "
            "and the change queue); `--exact` compares the whole tables"
        )
    if progress.note:
        return f"counts: exact; {progress.note}"
    check = progress.counters
    return "counts: exact (full comparison)" + (f"; {check.describe()}" if check else "")
