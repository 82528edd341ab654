"""``embedshift rollout run | status | replay | pause | resume | abort``.

The commands read the same EmbeddingMigration YAML the operator reads. ``run`` is the local
driver (:mod:`embedshift_operator.local`); ``status FILE`` reads the status it saved in the
database, ``status NAME`` the status the operator wrote on the cluster (:mod:`.cluster`, as are
``pause``, ``resume`` and ``abort``); ``replay`` runs the core over recorded metric values
(:mod:`embedshift_operator.replay`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from embedshift_operator.adapters.postgres import ControlStore
from embedshift_operator.adapters.prometheus import PrometheusSource
from embedshift_operator.cli import cluster
from embedshift_operator.cli.flags import add_statement_timeout_flag, interval, promql_range
from embedshift_operator.core import MetricSourceError, plan_analysis
from embedshift_operator.local import LocalDriver, prometheus_token, resolve_environment
from embedshift_operator.replay import (
    SeriesError,
    parse_series,
    points_from_dicts,
    replay,
    series_from_ranges,
)
from embedshift_operator.resource import (
    CountsKind,
    EmbeddingMigration,
    EmbeddingMigrationStatus,
    Phase,
    load_migration,
    parse_duration,
)
from rag_service.criteria import Verdict
from rag_service.errors import ConfigError

RUN_EPILOG = """\
The driver re-reads FILE every tick: edit it to steer the rollout (set
spec.rollout.maxPercentage: 0 to route 0 % to v2 at once; change the steps or
the analysis to restart at the first step). Status lives in the database
(table embedshift_rollout_status), so Ctrl-C or a crash loses nothing: run
the same command again and it resumes. Secret references resolve from the
environment: {name: rag-db, key: url} is RAG_DB_URL (else DATABASE_URL).
"""

STATUS_EPILOG = """\
FILE or NAME: a FILE ends in .yaml, .yml or .json, holds a '/', or is a file here
(and no cluster flag is given); anything else is the NAME of an EmbeddingMigration.
The cluster is found as kubectl finds it: --kubeconfig, else KUBECONFIG, else
~/.kube/config, else the Pod's service account; the namespace is -n, else the
context's, else default. --json prints {"migration": "NS/NAME", "status": ...} for both.
"""

CHANGE_DETAILS = {
    "pause": "Rollback thresholds still act while paused: safety never pauses. Pausing a "
    "paused resource changes nothing.",
    "resume": "Only unpauses: a spec.rollout.maxPercentage cap stays; edit maxPercentage to "
    "lift it. Resuming a resource that is not paused changes nothing.",
    "abort": "The manual rollback: the operator routes 0 % to v2 at once and records "
    "RolledBack (ManualRollback); raising maxPercentage again retries from the first step.",
}

REPLAY_EPILOG = """\
series format (one check per line):
  {"at": "2026-11-17T10:00:00Z", "p95-latency": 0.31, "error-rate": null,
   "p95-latency-vs-v1": 0.31, "p95-latency-vs-v1.v1": 0.35,
   "cache-hit-rate": "error", "requests": 512, "alert": false}
  a number, null (no data) or "error" (the source failed) per criterion name;
  "<name>.v1": v1's value for maxRatioToV1 criteria (absent: equal to v2);
  "requests": v2 requests in the window (absent: enough traffic);
  "alert": true is a firing alert for this migration.
"""

_MARKS = {
    Verdict.PASS: "[green]✓ pass[/]",
    Verdict.FAIL: "[red]✗ fail[/]",
    Verdict.NODATA: "[yellow]? nodata[/]",
    Verdict.ERROR: "[red]! error[/]",
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = commands.add_parser(
        "rollout",
        help="run a migration's rollout on this machine, show where it stands, replay a "
        "policy, pause/resume/abort one on a cluster",
        description="Carry one EmbeddingMigration from re-embedding to 100 % on this machine, "
        "gated by Prometheus, without a cluster; or read and steer one the operator runs.",
    )
    actions = rollout.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = actions.add_parser(
        "run",
        help="drive the migration: Jobs as subprocesses, steps gated by Prometheus",
        description="Setup, re-embed (one subprocess per shard), index, verify, then shift "
        "traffic step by step while the success criteria hold; roll back to 0 % when a "
        "threshold breaks.",
        epilog=RUN_EPILOG,
    )
    p.add_argument("file", type=Path, metavar="FILE", help="the EmbeddingMigration YAML")
    p.add_argument(
        "--json", action="store_true", help="print events as JSON lines instead of a live view"
    )
    p.add_argument(
        "--until",
        type=_phases,
        default=frozenset(),
        metavar="PHASE[,PHASE]",
        help="exit once one of these phases is reached, e.g. Succeeded,Failed "
        "(default: run until Ctrl-C; the follower keeps v2 current meanwhile)",
    )
    p.add_argument(
        "--tick",
        type=interval,
        default=1.0,
        metavar="SECONDS",
        help="how often the file, Jobs and routing row are read (default 1)",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        help="where each Job's output goes (default ~/.local/state/embedshift/NS_NAME)",
    )
    add_statement_timeout_flag(p)
    p.set_defaults(handler=_run)

    p = actions.add_parser(
        "status",
        help="where a migration stands (phase, step, progress, last check, history)",
        description="FILE: read the status `rollout run` saved for FILE's migration. NAME: read "
        "the EmbeddingMigration NAME through the Kubernetes API (the status the operator wrote).",
        epilog=STATUS_EPILOG,
    )
    p.add_argument(
        "target",
        metavar="FILE|NAME",
        help="the EmbeddingMigration YAML, or the name of one on the cluster",
    )
    p.add_argument("--json", action="store_true", help="the status as JSON")
    cluster.add_cluster_flags(p)
    p.set_defaults(handler=_status)

    for action, change, summary in (
        ("pause", cluster.PAUSE, "hold the current step: set spec.rollout.paused: true"),
        ("resume", cluster.RESUME, "let the steps go on: set spec.rollout.paused: false"),
        ("abort", cluster.ABORT, "roll back to 0 % at once: set spec.rollout.maxPercentage: 0"),
    ):
        p = actions.add_parser(
            action,
            help=f"{summary} (on a cluster)".replace("%", "%%"),  # argparse %-formats help
            description=f"{summary[0].upper()}{summary[1:]} on the EmbeddingMigration NAME "
            f"(a merge patch through the Kubernetes API). {CHANGE_DETAILS[action]}",
            epilog=cluster.GITOPS_NOTE,
        )
        p.add_argument("name", metavar="NAME", help="the EmbeddingMigration's name")
        cluster.add_cluster_flags(p, wait=True)
        p.set_defaults(handler=functools.partial(cluster.change, wanted=change))

    p = actions.add_parser(
        "replay",
        help="what the rollout policy would have done over recorded metrics",
        description="Run the rollout core from the first step, as if the migration had just "
        "been verified, over recorded metric values, and print every decision: time, phase, "
        "percentage, reason. Tune a policy on last week's metrics before trusting it.",
        epilog=REPLAY_EPILOG,
    )
    p.add_argument("file", type=Path, metavar="FILE", help="the EmbeddingMigration YAML")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--metrics",
        type=Path,
        metavar="SERIES.jsonl",
        help="recorded checks, one JSON object per line (format below)",
    )
    source.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="fetch the series from this Prometheus instead (range queries of every criterion)",
    )
    p.add_argument(
        "--range",
        dest="range_",
        type=promql_range,
        default="7d",
        metavar="RANGE",
        help="with --prometheus-url: how far back (default 7d)",
    )
    p.add_argument(
        "--step",
        type=promql_range,
        help="with --prometheus-url: time between checks (default: spec.analysis.interval)",
    )
    p.add_argument("--all", action="store_true", help="print every check, not only the transitions")
    p.add_argument("--json", action="store_true", help="one JSON object per decision")
    p.set_defaults(handler=_replay)


def _phases(value: str) -> frozenset[Phase]:
    known = {p.value.lower(): p for p in Phase}
    phases = set()
    for part in value.split(","):
        phase = known.get(part.strip().lower())
        if phase is None:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not a phase; use {', '.join(p.value for p in Phase)}"
            )
        phases.add(phase)
    return frozenset(phases)


# ---- views ------------------------------------------------------------------------------------


class JsonLinesView:
    """``--json``: one JSON object per event (and per warning) on stdout."""

    def __init__(self) -> None:
        self._phase = ""
        self._percentage = 0

    def update(self, resource: EmbeddingMigration, status: EmbeddingMigrationStatus) -> None:
        self._phase, self._percentage = status.phase.value, status.percentage

    def event(self, time: datetime, kind: str, reason: str, message: str) -> None:
        self._print(
            {
                "event": "transition" if kind == "Normal" else "warning-event",
                "time": time.isoformat(),
                "type": kind,
                "reason": reason,
                "message": message,
            }
        )

    def warn(self, message: str) -> None:
        self._print({"event": "warning", "time": datetime.now(UTC).isoformat(), "message": message})

    def _print(self, record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)


class LiveView:
    """The live panel: phase, step and time in it, percentage, progress, criteria, events."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._events: deque[str] = deque(maxlen=8)
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._resource: EmbeddingMigration | None = None
        self._status: EmbeddingMigrationStatus | None = None

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, resource: EmbeddingMigration, status: EmbeddingMigrationStatus) -> None:
        self._resource, self._status = resource, status
        self._live.update(self._render())

    def event(self, time: datetime, kind: str, reason: str, message: str) -> None:
        style = "red" if kind == "Warning" else "cyan"
        self._events.append(f"[dim]{time:%H:%M:%S}[/] [{style}]{reason}[/] {message}")

    def warn(self, message: str) -> None:
        self._events.append(f"[yellow]warning[/] {message}")
        if self._resource and self._status:
            self._live.update(self._render())

    def _render(self) -> RenderableType:
        assert self._resource is not None and self._status is not None
        return render_status(self._resource, self._status, events=list(self._events))


def render_status(
    resource: EmbeddingMigration,
    status: EmbeddingMigrationStatus,
    *,
    events: list[str] | None = None,
    now: datetime | None = None,
) -> Group:
    """The status as people read it (``rollout status`` and the live view). Pure."""
    now = now or datetime.now(UTC)
    steps = resource.spec.rollout.steps
    step = ""
    if status.phase.routes_v2 or status.phase is Phase.ROLLED_BACK:
        index = min(status.step_index, len(steps) - 1)
        since = status.step_started_at
        held = f", {_ago(now - since)} in it" if since else ""
        step = f"  step {index + 1}/{len(steps)} ({steps[index].percentage} %{held})"
    header = Text.from_markup(
        f"[bold]{resource.key}[/]  [bold]{status.phase.value}[/]{step}  "
        f"v2 [bold]{status.percentage} %[/]"
    )
    bars = Table.grid(padding=(0, 1))
    bars.add_row(
        "traffic to v2",
        ProgressBar(total=100, completed=status.percentage, width=40),
        f"{status.percentage} %",
    )
    m = status.migration
    if m.total:
        lag = (
            f", follower lag {m.oldest_pending_seconds:.0f}s"
            if m.oldest_pending_seconds is not None
            else ""
        )
        bars.add_row(
            "re-embedded",
            ProgressBar(total=max(m.total, 1), completed=m.migrated, width=40),
            f"{m.migrated:,}/{m.total:,} ({m.pending:,} pending{lag}"
            f"{'; counted exactly' if m.counts is CountsKind.EXACT else ''})",
        )
    parts: list[RenderableType] = [header, bars]
    if status.analysis.results:
        table = Table("criterion", "kind", "value", "healthy", "verdict", "why", box=None)
        for r in status.analysis.results:
            value = "–" if r.value is None else f"{r.value:.4g}"
            mark = _MARKS[r.verdict] + (" (dry run)" if r.dry_run else "")
            table.add_row(r.name, r.kind.value, value, r.bound, mark, r.message[:60])
        when = status.analysis.time
        checks = resource.spec.analysis.successful_checks
        parts.append(
            Text(
                f"last check {when:%H:%M:%S} · {status.analysis.consecutive_passes}/{checks} "
                "consecutive passes"
                if when
                else ""
            )
        )
        parts.append(table)
    if status.message:
        parts.append(Text(status.message, style="dim"))
    if events:
        parts.append(Text.from_markup("\n".join(events)))
    return Group(*parts)


def _ago(delta: Any) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


# ---- commands ---------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console = Console(stderr=True, highlight=False)
    if args.json:
        view: Any = JsonLinesView()
        driver = LocalDriver(
            args.file,
            view=view,
            environ=os.environ,
            log_dir=args.log_dir,
            tick_seconds=args.tick,
            until=args.until,
            statement_timeout=args.statement_timeout,
        )
        status = await driver.run(stop)
    else:
        with LiveView(console) as live:
            driver = LocalDriver(
                args.file,
                view=live,
                environ=os.environ,
                log_dir=args.log_dir,
                tick_seconds=args.tick,
                until=args.until,
                statement_timeout=args.statement_timeout,
            )
            status = await driver.run(stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    if stop.is_set():
        print(
            f"embedshift: stopped at {status.phase.value} ({status.percentage} %); Jobs and the "
            "follower were stopped; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    return 0 if status.phase is not Phase.FAILED else 1


async def _status(args: argparse.Namespace) -> int:
    if cluster.is_file(args):
        return await _file_status(args, Path(args.target))
    with cluster.connect(args) as conn:
        resource = await cluster.read(conn, args.target)
    # Only the operator writes status: an empty one means it has not acted on the resource yet.
    status = None if resource.status == EmbeddingMigrationStatus() else resource.status
    hint = "no status yet: the operator has not acted on it (is it running? its logs say why)"
    return _show_status(
        args, resource, status, not_started=hint, notes=cluster.spec_notes(resource)
    )


async def _file_status(args: argparse.Namespace, path: Path) -> int:
    resource = load_migration(path)
    env = resolve_environment(resource, os.environ)
    store = ControlStore(url=env.database_url, spec=resource.spec, migration=resource.key)
    with contextlib.suppress(Exception):
        await store.ensure_tables()
    status = await store.load_status()
    hint = f"not started (run `embedshift rollout run {path}`)"
    return _show_status(args, resource, status, not_started=hint, notes=[])


def _show_status(
    args: argparse.Namespace,
    resource: EmbeddingMigration,
    status: EmbeddingMigrationStatus | None,
    *,
    not_started: str,
    notes: list[str],
) -> int:
    """``rollout status``'s output, whichever driver wrote the status."""
    if status is None:
        if args.json:
            print(json.dumps({"migration": resource.key, "status": None}))
        else:
            print(f"{resource.key}: {not_started}")
        return 0
    if args.json:
        document = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        print(json.dumps({"migration": resource.key, "status": document}))
        return 0
    console = Console(highlight=False)
    history = [
        f"[dim]{h.time:%Y-%m-%d %H:%M:%S}[/] {h.phase.value} {h.percentage} % [cyan]{h.reason}[/]"
        f" {h.message}"
        for h in status.history[-10:]
    ]
    shown = [f"[yellow]{escape(note)}[/]" for note in notes] + history
    console.print(render_status(resource, status, events=shown))
    return 0


async def _replay(args: argparse.Namespace) -> int:
    resource = load_migration(args.file)
    spec = resource.spec
    if args.metrics:
        try:
            lines = args.metrics.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--metrics: cannot read {args.metrics}: {exc.strerror}") from None
        try:
            points = parse_series(spec, lines)
        except SeriesError as exc:
            raise ConfigError(f"--metrics: {args.metrics}: {exc}") from None
    else:
        points = await _fetch_series(resource, args)
    if not points:
        raise ConfigError("the series is empty: nothing to replay")
    shown = 0
    last = None
    for decision in replay(spec, points, name=resource.metadata.name):
        first = last is None
        last = decision
        if not (decision.transition or args.all or first):
            continue
        shown += 1
        if args.json:
            print(
                json.dumps(
                    {
                        "at": decision.at.isoformat(),
                        "line": decision.line,
                        "phase": decision.phase.value,
                        "percentage": decision.percentage,
                        "reason": decision.reason,
                        "message": decision.message,
                        "transition": decision.transition,
                        "verdicts": {k: v.value for k, v in decision.verdicts.items()},
                    }
                )
            )
        else:
            failing = [k for k, v in decision.verdicts.items() if v is not Verdict.PASS]
            note = f"  [not passing: {', '.join(failing)}]" if failing and args.all else ""
            print(
                f"{decision.at:%Y-%m-%d %H:%M:%S}  {decision.phase.value:<12} "
                f"{decision.percentage:>3} %  {decision.reason}: {decision.message}{note}"
            )
    if last is not None and not args.json:
        print(
            f"-- {len(points)} checks replayed; ended {last.phase.value} at "
            f"{last.percentage} % ({shown} lines shown)"
        )
    return 0


async def _fetch_series(resource: EmbeddingMigration, args: argparse.Namespace) -> list[Any]:
    spec = resource.spec
    # Replay reads Prometheus only: no database URL is needed, just the token, if any.
    token = prometheus_token(resource, os.environ)
    plan = plan_analysis(spec, migration=resource.key)
    queries = {"requests": plan.requests_query}
    for planned in plan.queries:
        if planned.database_metric is None:
            queries[planned.criterion] = planned.query
        if planned.v1_query is not None:
            queries[f"{planned.criterion}.v1"] = planned.v1_query
    step = parse_duration(args.step or spec.analysis.interval)
    end = datetime.now(UTC)
    start = end - parse_duration(_go_duration(args.range_))
    async with PrometheusSource(url=args.prometheus_url, bearer_token=token) as src:
        try:
            ranges = await src.query_ranges(queries, start=start, end=end, step=step)
        except MetricSourceError as exc:
            raise ConfigError(f"--prometheus-url: {exc}") from None
    try:
        return points_from_dicts(spec, series_from_ranges(ranges, step))
    except SeriesError as exc:
        raise ConfigError(f"--prometheus-url: {exc}") from None


def _go_duration(promql: str) -> str:
    """A PromQL range (7d, 2w) as a Go duration (168h, 336h): Go has no days."""
    units = {"d": 24, "w": 24 * 7, "y": 24 * 365}
    if promql[-1] in units:
        return f"{int(promql[:-1]) * units[promql[-1]]}h"
    return promql
