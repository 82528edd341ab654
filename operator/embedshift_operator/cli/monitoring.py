"""``embedshift compare``, ``embedshift baseline`` and ``embedshift monitor``: the guide's
monitoring commands, wired to :mod:`rag_service.compare` and :mod:`rag_service.monitor`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from embedshift_operator.cli.flags import (
    EF_SEARCH_HELP,
    add_spec_flags,
    ef_search,
    env,
    interval,
    positive,
    promql_range,
    resolve,
    whole,
)
from rag_service.alerts import WEBHOOK_SECRET_ENV, webhook_secret
from rag_service.compare import (
    BASELINE_FILE,
    DEFAULT_SAMPLE,
    Baseline,
    Measured,
    baseline_comparison_view,
    baseline_table,
    compare_table,
    criteria_text,
    deltas,
    judge_baseline,
    load_baseline,
    load_queries,
    measure,
    run_compare,
    save_baseline,
)
from rag_service.errors import ConfigError
from rag_service.monitor import (
    DEFAULT_INTERVAL_SECONDS,
    gather_snapshot,
    render_snapshot,
    snapshot_errors,
    watch,
)
from rag_service.routing import Version


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``compare``, ``baseline`` and ``monitor`` to the ``embedshift`` command line."""
    p = commands.add_parser(
        "compare",
        help="v1 against v2 on the same queries: overlap, recall, latency, similarity, cost",
        description="Embed and search each query on v1 and on v2 directly (no HTTP, no cache) "
        "and compare: overlap@k and rank-biased overlap of their top k, each index's recall "
        "against exact search, recall@k / MRR / nDCG@10 for labelled queries, latency p50/p95, "
        "average top-1 similarity and cost per 1,000 queries.",
    )
    add_spec_flags(p)
    _add_query_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=_compare_command)

    p = commands.add_parser(
        "baseline",
        help="record v1's figures; with --compare, judge v2 now against them",
        description="Without --compare: record v1's figures to --output, from Prometheus "
        "(--prometheus-url) or from a compare run of v1. With --compare: measure v2 now from "
        "the same kind of source and judge it against the guide's success criteria, bounds "
        f"inclusive: {criteria_text()}. A criterion the source cannot measure (the query cache "
        "in a compare run; critical errors, which a baseline does not record) is listed, not "
        "judged. Exit code 1 unless every judged criterion passes.",
    )
    add_spec_flags(p)
    p.add_argument(
        "--output",
        type=Path,
        default=Path(BASELINE_FILE),
        help=f"the baseline file (default {BASELINE_FILE})",
    )
    p.add_argument(
        "--compare", action="store_true", help="judge v2 now against the recorded baseline"
    )
    p.add_argument(
        "--prometheus-url",
        help="read the service's metrics from Prometheus instead of running queries",
    )
    p.add_argument(
        "--range",
        dest="range_",
        type=promql_range,
        metavar="RANGE",
        help="Prometheus window, e.g. 24h (default 24h, or the baseline's)",
    )
    _add_query_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=_baseline_command)

    p = commands.add_parser(
        "monitor",
        help="migration progress, rollout percentage, breakers and key metrics",
        description="Show the migration's progress, the routing row (effective percentage, "
        "emergency flag) and, with --service-url, the running service's circuit breakers and "
        "key metrics. Once (exit code 1 if a part could not be read), or with --continuous every "
        "--interval seconds until Ctrl-C (exit code 0).",
    )
    add_spec_flags(p)
    p.add_argument("--continuous", action="store_true", help="refresh until Ctrl-C (exit code 0)")
    p.add_argument(
        "--interval",
        type=interval,
        default=DEFAULT_INTERVAL_SECONDS,
        metavar="SECONDS",
        help=f"seconds between refreshes (default {DEFAULT_INTERVAL_SECONDS:.0f})",
    )
    p.add_argument(
        "--service-url",
        help="a running `embedshift serve`, e.g. http://localhost:8080, for breakers and metrics",
    )
    token = env(WEBHOOK_SECRET_ENV)
    p.add_argument(
        "--service-token",
        default=token,
        metavar="TOKEN",
        help="the bearer token --service-url's monitoring endpoints want: the service's "
        f"{WEBHOOK_SECRET_ENV}, read from that variable (better than this flag, which `ps` "
        "shows); never printed" + ("" if token else f" (env {WEBHOOK_SECRET_ENV}: unset)"),
    )
    p.add_argument(
        "--range",
        dest="range_",
        type=promql_range,
        default="24h",
        metavar="RANGE",
        help="the dashboard's window (default 24h)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line and refresh")
    p.set_defaults(handler=_monitor_command)


def _add_query_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("queries")
    which = g.add_mutually_exclusive_group()
    which.add_argument(
        "--queries",
        type=Path,
        metavar="FILE.jsonl",
        help='JSON lines: {"query": "...", "relevant": ["id", ...], "category": "..."} '
        "(relevant and category optional; category filters the search)",
    )
    which.add_argument(
        "--sample",
        type=positive,
        metavar="N",
        help=f"sample N queries: the first sentence of N random documents "
        f"(default {DEFAULT_SAMPLE})",
    )
    g.add_argument("--seed", type=whole, help="seed of --sample (default 0)")
    g.add_argument("-k", "--k", dest="k", type=positive, help="results per query (default 10)")
    g.add_argument("--ef-search", type=ef_search, metavar="N", help=EF_SEARCH_HELP)


def _print(renderable: Any) -> None:
    Console(file=sys.stdout, highlight=False, soft_wrap=False).print(renderable)


async def _compare_command(args: argparse.Namespace) -> int:
    spec, _, url, prices = resolve(args)
    cases = load_queries(args.queries) if args.queries else None
    report = await run_compare(
        url,
        spec,
        cases=cases,
        sample=args.sample,
        seed=args.seed or 0,
        k=args.k or 10,
        prices=prices,
        ef_search=args.ef_search,
        query_source=str(args.queries) if args.queries else None,
    )
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        _print(compare_table(report))
    return 0


async def _baseline_command(args: argparse.Namespace) -> int:
    path: Path = args.output
    recorded = load_baseline(path) if args.compare else None
    # From Prometheus (given, or the one the baseline was recorded from) nothing reads the
    # database, so DATABASE_URL is not needed.
    from_prometheus = bool(args.prometheus_url) or (
        recorded is not None and recorded.source == "prometheus"
    )
    spec, migration, url, prices = resolve(args, needs_database=not from_prometheus)

    async def measured_now(version: Version, like: Baseline | None) -> Measured:
        return await measure(
            url,
            spec,
            prices,
            migration=migration,
            version=version,
            like=like,
            prometheus_url=args.prometheus_url,
            range_=args.range_,
            queries=args.queries,
            sample=args.sample,
            seed=args.seed,
            k=args.k,
            ef_search=args.ef_search,
        )

    if not args.compare:
        measured = await measured_now(Version.V1, None)
        assert spec.source is not None  # measure() refuses a spec without one
        baseline = Baseline(
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=measured.source,
            version=Version.V1.value,
            model=spec.source.descriptor,
            migration=migration,
            metrics=measured.metrics,
            prometheus=measured.prometheus,
            compare=measured.compare,
        )
        await asyncio.to_thread(save_baseline, path, baseline)
        if args.json:
            print(json.dumps({"output": str(path), **baseline.as_dict()}))
            return 0
        _print(baseline_table(baseline, path))
        where = (
            f"Prometheus {baseline.prometheus['url']} over {baseline.prometheus['range']}"
            if baseline.prometheus
            else f"a compare run of {(baseline.compare or {}).get('count')} queries"
        )
        _print(f"recorded from {where}; compare v2 later with `embedshift baseline --compare`")
        return 0
    assert recorded is not None  # loaded above with --compare
    baseline = recorded
    measured = await measured_now(Version.V2, baseline)
    judgement = judge_baseline(baseline.metrics, measured.metrics, unmeasured=measured.unmeasured)
    if args.json:
        print(
            json.dumps(
                {
                    "baseline": baseline.as_dict(),
                    "current": {
                        "version": Version.V2.value,
                        "model": spec.target.descriptor,
                        "source": measured.source,
                        "prometheus": measured.prometheus,
                        "compare": measured.compare,
                        "metrics": measured.metrics,
                    },
                    "deltas": deltas(baseline.metrics, measured.metrics),
                    "criteria": [row.as_dict() for row in judgement.rows],
                    "notMeasured": judgement.not_measured_as_dicts(),
                    "ok": judgement.ok,
                }
            )
        )
    else:
        _print(
            baseline_comparison_view(
                baseline,
                measured.metrics,
                judgement,
                current_model=spec.target.descriptor,
                source=measured.describe(),
            )
        )
    return 0 if judgement.ok else 1


async def _monitor_command(args: argparse.Namespace) -> int:
    spec, migration, url, prices = resolve(args)
    service_url: str | None = args.service_url
    if service_url:
        parsed = httpx.URL(service_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(
                f"--service-url: {service_url!r} must be http:// or https:// with a host, "
                "e.g. http://localhost:8080"
            )
        service_url = service_url.rstrip("/")
    # A value no Authorization header can carry is refused now, in words that do not quote it.
    token = webhook_secret(args.service_token) if service_url else None

    async def gather() -> dict[str, Any]:
        return await gather_snapshot(
            url,
            spec,
            migration=migration,
            service_url=service_url,
            range_=args.range_,
            prices=prices,
            service_token=token,
        )

    console = Console(file=sys.stdout, highlight=False)
    if not args.continuous:
        snapshot = await gather()
        if args.json:
            print(json.dumps(snapshot), flush=True)
        else:
            console.print(render_snapshot(snapshot))
        return 1 if snapshot_errors(snapshot) else 0
    return await watch(gather, console=console, interval=args.interval, as_json=args.json)
