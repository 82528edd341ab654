"""``embedshift serve``: the search service (routed v1/v2 search, metrics, emergency webhook)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from embedshift_operator.cli.flags import (
    EF_SEARCH_HELP,
    add_spec_flags,
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

log = logging.getLogger("embedshift.serve")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``embedshift`` command line."""
    serve = commands.add_parser(
        "serve",
        help="run the search service: routed v1/v2 search, metrics, emergency webhook",
        description="Serve POST /api/rag/search, routing each user to v1 or v2 by the routing "
        "row's percentage (sticky per user). What it serves (the table, its id, text, category "
        "and v1 columns, both models) is what `embedshift migrate setup` recorded for "
        "--migration NAMESPACE/NAME, so DATABASE_URL, the migration and the API keys are all "
        "it needs. A --config manifest replaces the record and the flags below override either; "
        "without a record, --table, --source and --target name what to serve. GET /readyz is "
        "the readiness probe (the database only). The guide's FF_* flags are honoured: "
        "FF_NEW_EMBEDDINGS_PERCENTAGE (start-up default), FF_ENABLE_GRADUAL_MIGRATION=false "
        "(pin v1), FF_USE_PARALLEL_RAG (shadow comparison), FF_ENABLE_PERFORMANCE_LOGGING, "
        "FF_ENABLE_QUERY_ANALYTICS. ALERT_WEBHOOK_SECRET enables POST /api/alerts/webhook.",
    )
    add_spec_flags(serve)
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
        help="re-read the routing row this often (a NOTIFY wakes it sooner)",
    )
    serve.add_argument("--ef-search", type=ef_search, metavar="N", help=EF_SEARCH_HELP)
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
    serve.set_defaults(handler=_serve)


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rag_service.service import ServiceSettings, create_app

    spec, migration, url, prices = await resolve_recorded(args)
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
    listener = _listen(args.host, args.port)
    config = uvicorn.Config(
        create_app(settings), host=args.host, port=args.port, log_config=None, access_log=False
    )
    log.info("listening on http://%s:%d", args.host, args.port)
    # uvicorn shuts down gracefully on SIGTERM, then restores the handler it found and raises
    # the signal again: with the default one the process would die by it (exit -15) after a
    # clean stop. A handler that does nothing makes that second delivery a no-op: exit 0, as
    # Kubernetes expects of a graceful stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    await uvicorn.Server(config).serve(sockets=[listener])
    return 0


async def resolve_recorded(
    args: argparse.Namespace,
) -> tuple[DataPlaneSpec, str, str, PriceTable]:
    """``resolve`` over what ``migrate setup`` recorded for the migration key: the record stands
    where a manifest would, so --config-less flags override it exactly as they override one."""
    from rag_service.rollout_row import read_recorded
    from rag_service.schema import describe_url

    if args.config or (args.migration is not None and not args.migration.strip()):
        return resolve(args)  # a manifest is a whole spec; an empty flag is resolve's own line
    table = TableName.parse(args.table, field="--table") if args.table else None
    key: str | None = args.migration or (f"default/{table.name}" if table else None)
    by_flags = bool(args.table and args.target)  # enough for resolve without a record
    if key is None:
        raise ConfigError(
            "--migration: which migration to serve? give --migration NAMESPACE/NAME (env "
            "EMBEDSHIFT_MIGRATION), as `embedshift migrate setup` recorded it (or give "
            "--table/--source/--target)"
        )
    if not args.database_url:
        if by_flags:
            return resolve(args)  # its one line about DATABASE_URL
        raise ConfigError(
            f"DATABASE_URL is not set: serve reads what `embedshift migrate setup` recorded for "
            f"{key} from the database; export DATABASE_URL=postgresql://user@host/db (or pass "
            "--database-url)"
        )
    try:
        recorded = await read_recorded(
            args.database_url, migration=key, schema=table.schema if table else None
        )
    except DatabaseUnavailable as exc:
        if not by_flags:
            raise
        # As before the record existed: the flags name what to serve, the database may follow.
        log.warning("%s; serving what the flags name", exc)
        recorded = None
    if recorded is None:
        if by_flags:
            return resolve(args)
        raise ConfigError(
            f"--migration {key}: nothing is recorded for it in {describe_url(args.database_url)}; "
            f"run `embedshift migrate setup` for {key} first, or give --table/--source/--target"
        )
    log.info("serving what `embedshift migrate setup` recorded for %s; flags override it", key)
    namespace, _, name = key.rpartition("/")
    manifest = {
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
        return resolve(argparse.Namespace(**{**vars(args), "config": path, "migration": key}))


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
