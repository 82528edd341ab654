"""``embedshift monitor``: where the migration and the rollout stand (the guide's
``monitor:migration [--continuous]``).

One snapshot gathers, each part on its own so one failing part does not hide the others:

- migration progress, counted from the tables (:func:`rag_service.progress.migration_progress`);
- the routing row (:func:`rag_service.rollout_row.read_row`): the configured percentage, the
  emergency flag and reason, and the *effective* percentage (0 during an emergency);
- with ``--service-url``, a running ``embedshift serve``'s circuit breakers
  (``GET /api/monitoring/circuit-breaker``) and key metrics
  (``GET /api/monitoring/dashboard?range=...``), asked with the service's bearer token
  (``ALERT_WEBHOOK_SECRET``): a refusal (401, 403, 503) is an error saying what to do.

The snapshot is a JSON-ready dict (``--json`` prints it, one object per line and refresh);
:func:`render_snapshot` turns it into rich renderables and is pure, so it renders a captured
JSON as well as a live one. :func:`watch` (``--continuous``) refreshes every ``interval``
seconds (default 300, the guide's "every 5 minutes") in place on a terminal, or as successive
blocks otherwise, until Ctrl-C, which exits 0. The ``embedshift monitor`` command is
:mod:`embedshift_operator.cli.monitoring`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import psycopg
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rag_service.alerts import WEBHOOK_SECRET_ENV
from rag_service.criteria import DASHBOARD_METRICS
from rag_service.errors import ConfigError, EmbedshiftError
from rag_service.progress import migration_progress
from rag_service.providers.pricing import PriceTable, spend_text
from rag_service.redaction import redact
from rag_service.rollout_row import read_row
from rag_service.schema import ROLLOUT_TABLE, connect, first_line
from rag_service.spec import DataPlaneSpec

__all__ = [
    "DEFAULT_INTERVAL_SECONDS",
    "gather_snapshot",
    "render_snapshot",
    "snapshot_errors",
    "watch",
]

DEFAULT_INTERVAL_SECONDS = 300.0
SERVICE_TIMEOUT_SECONDS = 10.0

T = TypeVar("T")


# ---- gathering --------------------------------------------------------------------------------


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EmbedshiftError) else first_line(exc)


async def _progress(url: str, spec: DataPlaneSpec, prices: PriceTable) -> dict[str, Any]:
    progress = (await migration_progress(url, spec)).as_dict()
    if not prices.knows(spec.target):
        progress["costUSD"] = None  # counted at an unknown price: not $0
    return progress


async def _routing(url: str, spec: DataPlaneSpec, migration: str) -> dict[str, Any] | None:
    table = spec.database.table_name.sibling(ROLLOUT_TABLE)
    conn = await connect(url, autocommit=True)
    async with conn:
        try:
            row = await read_row(conn, table=table, migration=migration)
        except psycopg.errors.UndefinedTable:
            raise ConfigError(
                f"{table} does not exist: run `embedshift migrate setup` first"
            ) from None
    if row is None:
        return None
    return {
        "percentage": row.percentage,
        "effectivePercentage": 0 if row.emergency else row.percentage,
        "emergency": row.emergency,
        "reason": row.reason,
        "updatedAt": row.updated_at.isoformat() if row.updated_at else None,
    }


# What a refusal by the service means to the one running the monitor.
_REFUSED = {
    401: f"the service wants its bearer token: set {WEBHOOK_SECRET_ENV} to the service's "
    "(or pass --service-token)",
    403: f"the service refused the token: {WEBHOOK_SECRET_ENV} (or --service-token) is not the "
    "service's",
}


async def _get_json(
    client: httpx.AsyncClient, path: str, *, token: str | None = None, **params: str
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = await client.get(path, params=params, headers=headers)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"GET {path}: {first_line(exc) or type(exc).__name__}") from None
    if response.status_code in _REFUSED:
        raise ConnectionError(
            f"GET {path}: HTTP {response.status_code}: {_REFUSED[response.status_code]}"
        )
    if response.status_code == 503:  # the service says why: no secret set, not serving yet
        raise ConnectionError(f"GET {path}: HTTP 503: {_detail(response, token)}")
    if response.status_code != 200:
        raise ConnectionError(f"GET {path}: HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError:
        raise ConnectionError(f"GET {path}: the answer is not JSON") from None


def _detail(response: httpx.Response, token: str | None) -> str:
    """The service's own words (FastAPI's ``detail``), one line, never the token."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return redact(str(detail), [token]) if isinstance(detail, str) else "unavailable"


async def _service(
    service_url: str, *, range_: str, http_timeout: float, token: str | None = None
) -> dict[str, Any]:
    """The service's breakers and dashboard; a part that fails is None, its error listed."""
    out: dict[str, Any] = {"url": service_url, "circuitBreaker": None, "dashboard": None}
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=service_url, timeout=http_timeout) as client:
        answers: tuple[Any, ...] = await asyncio.gather(
            _get_json(client, "/api/monitoring/circuit-breaker", token=token),
            _get_json(client, "/api/monitoring/dashboard", token=token, range=range_),
            return_exceptions=True,
        )
    for key, value in zip(("circuitBreaker", "dashboard"), answers, strict=True):
        if isinstance(value, BaseException):
            if not isinstance(value, Exception):
                raise value
            errors.append(_message(value))
        else:
            out[key] = value
    out["errors"] = errors
    return out


async def gather_snapshot(
    url: str,
    spec: DataPlaneSpec,
    *,
    migration: str,
    service_url: str | None = None,
    range_: str = "24h",
    http_timeout: float = SERVICE_TIMEOUT_SECONDS,
    prices: PriceTable | None = None,
    service_token: str | None = None,
) -> dict[str, Any]:
    """One snapshot, JSON-ready. Failures are recorded under ``errors`` (part → one line), never
    raised: a monitor must keep showing what it can while the database or service is down.
    ``service_token``: the bearer token the service's monitoring endpoints want (its
    ``ALERT_WEBHOOK_SECRET``); sent to ``service_url`` only, never shown."""
    snapshot: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "migration": migration,
        "target": spec.target.descriptor,
        "progress": None,
        "routing": None,
        "service": None,
        "errors": {},
    }
    errors: dict[str, str] = snapshot["errors"]

    async def part(name: str, work: Awaitable[Any]) -> None:
        try:
            snapshot[name] = await work
        except (EmbedshiftError, psycopg.Error, OSError) as exc:
            errors[name] = _message(exc)

    parts = [
        part("progress", _progress(url, spec, prices or PriceTable())),
        part("routing", _routing(url, spec, migration)),
    ]
    if service_url:
        parts.append(
            part(
                "service",
                _service(
                    service_url, range_=range_, http_timeout=http_timeout, token=service_token
                ),
            )
        )
    await asyncio.gather(*parts)
    if snapshot["routing"] is None and "routing" not in errors:
        errors["routing"] = (
            f"no routing row for {migration!r}: run `embedshift migrate setup` with this "
            "--migration (or --config) first"
        )
    service = snapshot["service"]
    if service and service.get("errors"):
        errors["service"] = "; ".join(service["errors"])
    return snapshot


def snapshot_errors(snapshot: Mapping[str, Any]) -> dict[str, str]:
    """``{part: message}`` of what could not be gathered. Pure."""
    errors = snapshot.get("errors") or {}
    return {str(k): str(v) for k, v in errors.items()}


# ---- rendering --------------------------------------------------------------------------------


def _figure(values: Mapping[str, Any], name: str) -> float | None:
    """A dashboard figure (named as in ``DASHBOARD_METRICS``); anything not a number is None."""
    value = values.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.1f} ms"


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f} %"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


def _usd(value: float | None) -> str:
    return "–" if value is None else f"${value:.6f}"


# The key-metrics table: a column per dashboard metric, in DASHBOARD_METRICS's order.
_COLUMNS: dict[str, tuple[str, Callable[[float | None], str]]] = {
    "requests": ("requests", lambda v: _num(v, ",.0f")),
    "avg_latency_seconds": ("avg latency", _ms),
    "p95_latency_seconds": ("p95 latency", _ms),
    "error_rate": ("error rate", lambda v: _pct(v, 2)),
    "cache_hit_rate": ("cache hit rate", _pct),
    "avg_top_similarity": ("avg similarity", _num),
    "cost_per_1k_queries_usd": ("cost per 1k queries", _usd),
}


def _routing_view(routing: Mapping[str, Any] | None) -> RenderableType:
    if not routing:
        return Text("v2 traffic: unknown (no routing row)", style="yellow")
    effective = int(routing.get("effectivePercentage", 0))
    configured = int(routing.get("percentage", 0))
    updated = routing.get("updatedAt") or "never"
    if routing.get("emergency"):
        return Text.assemble(
            ("EMERGENCY: ", "bold red"),
            (f"v2 traffic {effective} % (configured {configured} %)", "red"),
            f" — {routing.get('reason') or 'no reason given'}; row updated {updated}",
        )
    return Text(f"v2 traffic: {effective} % (emergency off; row updated {updated})")


def _progress_view(progress: Mapping[str, Any]) -> list[RenderableType]:
    table = Table(
        "category",
        "documents",
        "migrated",
        "pending",
        "stale",
        "done",
        title=f"migration to {progress.get('target', '?')}",
    )
    by_category: Mapping[str, Mapping[str, Any]] = progress.get("byCategory") or {}
    for name, c in by_category.items():
        source = int(c.get("source", 0))
        current = int(c.get("current", 0))
        table.add_row(
            name or "(none)",
            f"{source:,}",
            f"{current:,}",
            f"{int(c.get('pending', source - current)):,}",
            f"{int(c.get('stale', 0)):,}",
            _pct(current / source if source else 1.0),
        )
    total = int(progress.get("total", 0))
    migrated = int(progress.get("migrated", 0))
    table.add_row(
        Text("total", style="bold"),
        f"{total:,}",
        f"{migrated:,}",
        f"{int(progress.get('pending', 0)):,}",
        f"{int(progress.get('stale', 0)):,}",
        _pct(migrated / total if total else 1.0),
    )
    lines: list[RenderableType] = [
        table,
        Text(
            f"{int(progress.get('batches', 0))} batches, "
            f"{int(progress.get('failedBatches', 0))} failed; "
            f"{int(progress.get('tokens', 0)):,} tokens, "
            f"{spend_text(progress.get('costUSD', 0.0))}; "
            f"{int(progress.get('queued', 0))} queued changes"
        ),
    ]
    for error in progress.get("recentErrors") or []:
        lines.append(
            Text(
                f"  failed {error.get('at')} shard {error.get('shard')} ids "
                f"{error.get('firstId')}…{error.get('lastId')}: {error.get('error')}",
                style="red",
            )
        )
    return lines


def _service_view(service: Mapping[str, Any]) -> list[RenderableType]:
    out: list[RenderableType] = []
    breakers: Mapping[str, Mapping[str, Any]] | None = service.get("circuitBreaker")
    if breakers:
        table = Table(
            "version",
            "breaker",
            "failures",
            "next probe",
            title=f"circuit breakers {service['url']}",
        )
        for version, b in breakers.items():
            state = str(b.get("state", "?"))
            until = b.get("secondsUntilProbe")
            table.add_row(
                version,
                Text(state, style="bold red" if state == "open" else ""),
                f"{b.get('recentFailures', '?')}/{b.get('failureThreshold', '?')} "
                f"in {b.get('windowSeconds', '?')}s",
                "–" if until is None else f"in {float(until):.0f}s",
            )
        out.append(table)
    dashboard: Mapping[str, Any] | None = service.get("dashboard")
    if dashboard:
        versions: Mapping[str, Mapping[str, Any]] = dashboard.get("versions") or {}
        table = Table(
            "version",
            *(_COLUMNS[name][0] for name in DASHBOARD_METRICS),
            title=f"key metrics over {dashboard.get('range', '?')} "
            f"(from {dashboard.get('source', '?')})",
        )
        for version, values in versions.items():
            table.add_row(
                version,
                *(_COLUMNS[name][1](_figure(values, name)) for name in DASHBOARD_METRICS),
            )
        out.append(table)
        seen = f"the service routes {dashboard.get('percentage', '?')} % to v2" + (
            " (EMERGENCY)" if dashboard.get("emergency") else ""
        )
        out.append(Text(seen))
    return out


def render_snapshot(snapshot: Mapping[str, Any], *, footer: str | None = None) -> Group:
    """The snapshot as rich renderables: header, routing, progress, service, errors. Pure."""
    parts: list[RenderableType] = [
        Text.assemble(
            ("embedshift monitor ", "bold"),
            f"{snapshot.get('migration', '?')} → {snapshot.get('target', '?')} "
            f"at {snapshot.get('time', '?')}",
        ),
        _routing_view(snapshot.get("routing")),
    ]
    progress = snapshot.get("progress")
    if progress:
        parts.extend(_progress_view(progress))
    service = snapshot.get("service")
    if service:
        parts.extend(_service_view(service))
    for name, message in snapshot_errors(snapshot).items():
        parts.append(Text(f"{name}: {message}", style="bold red"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


# ---- refreshing ------------------------------------------------------------------------------


async def _until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        stopper.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``; True as soon as ``stop`` is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def watch(
    gather: Callable[[], Awaitable[dict[str, Any]]],
    *,
    console: Console,
    interval: float,
    as_json: bool,
) -> int:
    """Print ``gather()``'s snapshot every ``interval`` seconds until Ctrl-C (then return 0):
    in place on a terminal, else one block (or with ``as_json`` one JSON line) per refresh. A
    failed part shows as an error and the next refresh retries."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        installed = False
    footer = f"refreshing every {interval:g} s; Ctrl-C to stop"
    live: Live | None = None
    try:
        if console.is_terminal and not as_json:
            live = Live(console=console, auto_refresh=False, redirect_stdout=False)
            live.start()
        while not stop.is_set():
            snapshot = await _until_stopped(gather(), stop)
            if snapshot is None:
                break
            if as_json:
                print(json.dumps(snapshot), flush=True)
            elif live is not None:
                live.update(render_snapshot(snapshot, footer=footer), refresh=True)
            else:
                console.print(render_snapshot(snapshot))
                console.rule()
            if await _sleep_or_stop(stop, interval):
                break
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Ctrl-C when the handler could not be installed: stopping is what the user asked for.
        pass
    finally:
        if live is not None:
            live.stop()
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
    return 0
