"""``embedshift serve``: the search service (routed v1/v2 search, metrics, emergency webhook)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedshift_operator.cli.flags import (
    EF_SEARCH_HELP,
    add_spec_flags,
    duration,
    ef_search,
    env,
    fraction,
    interval,
    port,
    positive,
    resolve,
)
from rag_service.errors import ConfigError, DatabaseUnavailable
from rag_service.identifiers import TableName
from rag_service.spec import API_VERSION, KIND, DataPlaneSpec

if TYPE_CHECKING:
    from rag_service.providers.pricing import PriceTable
    from rag_service.service import RecordWatch, ServiceSettings

log = logging.getLogger("embedshift.serve")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``embedshift`` command line."""
    from rag_service.query_cache import SHARED_MAX_ROWS, SHARED_TTL_SECONDS
    from rag_service.service import (
        MAX_BODY_BYTES,
        SEARCH_TIMEOUT_SECONDS,
        STATEMENT_TIMEOUT_SECONDS,
    )

    serve = commands.add_parser(
        "serve",
        help="run the search service: routed v1/v2 search, metrics, emergency webhook",
        description="Serve POST /api/rag/search, routing each user to v1 or v2 by the routing "
        "row's percentage (sticky per user). What it serves (the table, its id, text, category "
        "and v1 columns, both models) is what `embedshift migrate setup` recorded for "
        "--migration NAMESPACE/NAME, so DATABASE_URL, the migration and the API keys are all "
        "it needs. Until setup has recorded it, serve waits: it listens, GET /healthz answers, "
        "GET /readyz is 503 saying what it waits for, and it serves the record as soon as it "
        "appears (a NOTIFY from setup, or the next re-read). When setup records another data "
        "plane for the key (a new target, table or source), serve switches to it between "
        "requests. No --migration (nor --table) or no DATABASE_URL is an error at once (exit "
        "2). A --config manifest replaces the record (and is not followed) and the flags "
        "below override either; without a record, --table, --source and --target name what to "
        "serve. GET /healthz is the liveness probe; GET /readyz the readiness probe (the "
        "database, once there is a record). The guide's FF_* flags are honoured: "
        "FF_NEW_EMBEDDINGS_PERCENTAGE (start-up default), FF_ENABLE_GRADUAL_MIGRATION=false "
        "(pin v1), FF_USE_PARALLEL_RAG (shadow comparison), FF_ENABLE_PERFORMANCE_LOGGING, "
        "FF_ENABLE_QUERY_ANALYTICS. ALERT_WEBHOOK_SECRET enables POST /api/alerts/webhook and "
        "what shows alerts or the rollout (GET /api/alerts/webhook, /api/monitoring/rollout, "
        "/api/monitoring/dashboard, /api/monitoring/circuit-breaker), each only for requests "
        "carrying it as their bearer token (401 without, 403 with another); unset, they answer "
        "503. /healthz, /readyz, the v1/v2 health, /metrics, the search and the /dashboard page "
        "itself stay open.",
    )
    add_spec_flags(
        serve,
        migration_help="the migration to serve, namespace/name (env EMBEDSHIFT_MIGRATION; "
        "default: the manifest's, else default/<table>): serve reads what `embedshift migrate "
        "setup` recorded for it, waits for that record (live, not ready) until setup has "
        "written it, and switches when setup records another data plane for it",
    )
    serve.add_argument(
        "--host",
        default=env("EMBEDSHIFT_HOST") or "127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (env EMBEDSHIFT_HOST, "
        "default 127.0.0.1)",
    )
    serve.add_argument(
        "--port",
        type=port,
        default=env("EMBEDSHIFT_PORT") or "8080",  # a string: argparse checks it like a flag
        help="TCP port to listen on (env EMBEDSHIFT_PORT, default 8080)",
    )
    serve.add_argument("--sticky-header", default="X-User-Id", help="header used for bucketing")
    serve.add_argument(
        "--prometheus-url",
        default=env("EMBEDSHIFT_PROMETHEUS_URL"),
        help="the dashboard reads Prometheus instead of the service's own counters "
        "(env EMBEDSHIFT_PROMETHEUS_URL)",
    )
    serve.add_argument(
        "--reread-seconds",
        type=interval,
        default=5.0,
        metavar="SECONDS",
        help="re-read the routing row this often, and the record while waiting for it (a "
        "NOTIFY wakes it sooner)",
    )
    serve.add_argument("--ef-search", type=ef_search, metavar="N", help=EF_SEARCH_HELP)
    serve.add_argument(
        "--allow-version-override",
        action="store_true",
        help="serve the X-Embedding-Version: v1|v2 header (it forces a version, for testing) "
        "to requests that carry the webhook's bearer token (ALERT_WEBHOOK_SECRET, needed); "
        "forced searches are counted apart (embedshift_search_forced_total), never in the "
        "series the criteria read, and an emergency still serves v1. Default: off, the header "
        "is answered 403",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=positive,
        default=env("EMBEDSHIFT_MAX_BODY_BYTES") or str(MAX_BODY_BYTES),
        metavar="N",
        help=f"refuse a request body over N bytes with 413 before reading it (env "
        f"EMBEDSHIFT_MAX_BODY_BYTES, default {MAX_BODY_BYTES})",
    )
    serve.add_argument(
        "--max-query-chars",
        type=positive,
        default=2000,
        metavar="N",
        help="refuse longer queries with 422 (bounds embedding cost per request)",
    )
    serve.add_argument(
        "--breaker-failures",
        type=positive,
        default=5,
        metavar="N",
        help="failures of one version within the breaker window that open its circuit breaker",
    )
    serve.add_argument(
        "--breaker-cooldown",
        type=interval,
        default=30.0,
        metavar="SECONDS",
        help="seconds an open breaker waits before letting a trial request through",
    )
    serve.add_argument(
        "--shadow-sample-rate",
        type=fraction,
        default=0.1,
        metavar="RATE",
        help="share of requests, 0-1, also run on the other version for comparison "
        "(with FF_USE_PARALLEL_RAG=true)",
    )
    serve.add_argument(
        "--search-timeout",
        type=interval,
        default=SEARCH_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="every search's deadline, end to end (the v1 fallback included): past it the "
        "request is answered 504 and counted as an error of the version it was routed to",
    )
    serve.add_argument(
        "--statement-timeout",
        type=interval,
        default=STATEMENT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="PostgreSQL's statement_timeout on every connection the service opens: a slower "
        "statement is cancelled and is an error of that request (a v2 search falls back to v1)",
    )
    serve.add_argument(
        "--query-cache-ttl",
        type=duration,
        default=f"{SHARED_TTL_SECONDS / 3600:g}h",
        metavar="DURATION",
        help="how long a query's embedding is reused from the shared query-cache table "
        "(embedshift_query_cache), as a Go duration (30m, 72h); older rows are never served "
        "and are deleted in the background",
    )
    serve.add_argument(
        "--query-cache-max-rows",
        type=positive,
        default=SHARED_MAX_ROWS,
        metavar="N",
        help="the most rows the shared query-cache table keeps: the oldest beyond it are "
        "deleted in the background (every few minutes, in small batches)",
    )
    serve.set_defaults(handler=_serve)


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rag_service.alerts import WEBHOOK_SECRET_ENV, webhook_secret
    from rag_service.service import create_app

    # Refused at start-up, not only once the record to serve has come.
    if webhook_secret(env(WEBHOOK_SECRET_ENV)) is None:
        log.warning(
            "%s is not set: POST /api/alerts/webhook and what shows alerts or the rollout "
            "(GET /api/alerts/webhook, /api/monitoring/rollout, /api/monitoring/dashboard, "
            "/api/monitoring/circuit-breaker, so the /dashboard page too) answer 503; set it "
            "to serve them to requests carrying it as their bearer token",
            WEBHOOK_SECRET_ENV,
        )
    settings, watch = await _what_to_serve(args)
    listener = _listen(args.host, args.port)
    config = uvicorn.Config(
        create_app(settings, watch=watch, max_body_bytes=args.max_body_bytes),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
    )
    log.info("listening on http://%s:%d", args.host, args.port)
    # uvicorn shuts down gracefully on SIGTERM, then restores the handler it found and raises
    # the signal again: with the default one the process would die by it (exit -15) after a
    # clean stop. A handler that does nothing makes that second delivery a no-op: exit 0, as
    # Kubernetes expects of a graceful stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    await uvicorn.Server(config).serve(sockets=[listener])
    return 0


def _settings(
    args: argparse.Namespace, spec: DataPlaneSpec, migration: str, url: str, prices: PriceTable
) -> ServiceSettings:
    from rag_service.service import ServiceSettings

    return ServiceSettings.from_env(
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
        allow_version_override=args.allow_version_override,
        search_timeout_seconds=args.search_timeout,
        statement_timeout_seconds=args.statement_timeout,
        query_cache_ttl_seconds=args.query_cache_ttl,
        query_cache_max_rows=args.query_cache_max_rows,
    )


async def _what_to_serve(
    args: argparse.Namespace,
) -> tuple[ServiceSettings | None, RecordWatch | None]:
    """The settings to start with (None: nothing recorded yet, or the database unreachable:
    the service starts and waits), and how to follow the record (None with a --config
    manifest, which replaces it). A flag, key or URL that is wrong or missing is a ConfigError
    now: exit 2, nothing to wait for."""
    from rag_service.schema import describe_url
    from rag_service.service import RecordWatch

    if _manifest_or_empty_key(args):
        return _settings(args, *resolve(args)), None
    key = _key(args)  # ConfigError without --migration (or --table)
    recorded = False  # whether the last settings read came from a record

    async def settings_now() -> ServiceSettings | None:
        nonlocal recorded
        found = await _resolve(args)
        if found is None:
            return None
        resolved, recorded = found
        return _settings(args, *resolved)

    try:
        # A ConfigError here (no DATABASE_URL, a bad flag, a record refused) is exit 2.
        first = await settings_now()
    except DatabaseUnavailable:
        # Not a reason to crash-loop: the database may come up after the service (one chart).
        # The service says so (log, /readyz) as it waits for the record.
        first = None
    if recorded:
        log.info("serving what `embedshift migrate setup` recorded for %s; flags override it", key)
    watch = RecordWatch(
        settings=settings_now,
        url=args.database_url,
        migration=key,
        waiting=f"waiting for `embedshift migrate setup` to record {key} in "
        f"{describe_url(args.database_url)}",
        reread_seconds=args.reread_seconds,
        statement_timeout_seconds=args.statement_timeout,
    )
    return first, watch


def _manifest_or_empty_key(args: argparse.Namespace) -> bool:
    return bool(args.config or (args.migration is not None and not args.migration.strip()))


def _key(args: argparse.Namespace) -> str:
    """The migration key: --migration, else default/<--table>."""
    if args.migration:
        return str(args.migration)
    if args.table:
        return f"default/{TableName.parse(args.table, field='--table').name}"
    raise ConfigError(
        "--migration: which migration to serve? give --migration NAMESPACE/NAME (env "
        "EMBEDSHIFT_MIGRATION), as `embedshift migrate setup` recorded it (or give "
        "--table/--source/--target)"
    )


async def resolve_recorded(
    args: argparse.Namespace,
) -> tuple[DataPlaneSpec, str, str, PriceTable] | None:
    """``resolve`` over what ``migrate setup`` recorded for the migration key: the record stands
    where a manifest would, so --config-less flags override it exactly as they override one.
    None when nothing is recorded and the flags do not name what to serve either; raises
    DatabaseUnavailable when the record cannot be read (and the flags do not name it)."""
    found = await _resolve(args)
    return None if found is None else found[0]


async def _resolve(
    args: argparse.Namespace,
) -> tuple[tuple[DataPlaneSpec, str, str, PriceTable], bool] | None:
    """``resolve_recorded``, and whether a record was found."""
    from rag_service.rollout_row import read_recorded

    if _manifest_or_empty_key(args):
        return resolve(args), False  # a manifest is a whole spec; an empty flag: resolve's line
    table = TableName.parse(args.table, field="--table") if args.table else None
    key = _key(args)
    by_flags = bool(args.table and args.target)  # enough for resolve without a record
    if not args.database_url:
        if by_flags:
            return resolve(args), False  # its one line about DATABASE_URL
        raise ConfigError(
            f"DATABASE_URL is not set: serve reads what `embedshift migrate setup` recorded for "
            f"{key} from the database; export DATABASE_URL=postgresql://user@host/db (or pass "
            "--database-url)"
        )
    try:
        recorded = await read_recorded(
            args.database_url,
            migration=key,
            schema=table.schema if table else None,
            statement_timeout_seconds=args.statement_timeout,
        )
    except DatabaseUnavailable as exc:
        if not by_flags:
            raise
        # As before the record existed: the flags name what to serve, the database may follow.
        log.warning("%s; serving what the flags name", exc)
        recorded = None
    if recorded is None:
        return (resolve(args), False) if by_flags else None
    namespace, _, name = key.rpartition("/")
    manifest: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"namespace": namespace or "default", "name": name},
        "spec": recorded.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    # resolve layers flags over a manifest file, so the record is handed to it as one (JSON is
    # YAML): one place decides how a flag overrides what is recorded.
    with tempfile.TemporaryDirectory(prefix="embedshift-serve-") as folder:
        path = Path(folder) / "recorded.yaml"
        path.write_text(json.dumps(manifest))
        with_key = argparse.Namespace(**{**vars(args), "config": path, "migration": key})
        return resolve(with_key), True


def _listen(host: str, port: int) -> socket.socket:
    """The bound socket. Bound here, before the service starts, so a port in use, a port
    that needs privileges or an unknown host is one line and nothing else: uvicorn would bind
    only after connecting to the database, then log the error and exit with its own code."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn sets it
    try:
        sock.bind((host, port))
    except OSError as exc:  # socket.gaierror (an unknown host) is one too
        sock.close()
        raise ConfigError(
            f"--host {host} --port {port}: cannot serve: {exc.strerror or exc}"
        ) from None
    return sock
