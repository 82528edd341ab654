"""``embedshift serve``: the search service (routed v1/v2 search, metrics, emergency webhook)."""

from __future__ import annotations

import argparse

from embedshift_operator.cli.flags import add_spec_flags, env, positive, resolve


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``embedshift`` command line."""
    serve = commands.add_parser(
        "serve",
        help="run the search service: routed v1/v2 search, metrics, emergency webhook",
        description="Serve POST /api/rag/search, routing each user to v1 or v2 by the routing "
        "row's percentage (sticky per user). The guide's FF_* flags are honoured: "
        "FF_NEW_EMBEDDINGS_PERCENTAGE (start-up default), FF_ENABLE_GRADUAL_MIGRATION=false "
        "(pin v1), FF_USE_PARALLEL_RAG (shadow comparison), FF_ENABLE_PERFORMANCE_LOGGING, "
        "FF_ENABLE_QUERY_ANALYTICS. ALERT_WEBHOOK_SECRET enables POST /api/alerts/webhook.",
    )
    add_spec_flags(serve)
    serve.add_argument("--host", default=env("EMBEDSHIFT_HOST") or "127.0.0.1")
    serve.add_argument("--port", type=int, default=int(env("EMBEDSHIFT_PORT") or 8080))
    serve.add_argument("--sticky-header", default="X-User-Id", help="header used for bucketing")
    serve.add_argument(
        "--prometheus-url",
        default=env("EMBEDSHIFT_PROMETHEUS_URL"),
        help="the dashboard reads Prometheus instead of the service's own counters",
    )
    serve.add_argument(
        "--reread-seconds", type=float, default=5.0, help="re-read the routing row this often"
    )
    serve.add_argument("--ef-search", type=positive, help="hnsw.ef_search (recall vs latency)")
    serve.add_argument("--max-query-chars", type=positive, default=2000)
    serve.add_argument("--breaker-failures", type=positive, default=5)
    serve.add_argument("--breaker-cooldown", type=float, default=30.0, help="seconds")
    serve.add_argument("--shadow-sample-rate", type=float, default=0.1)
    serve.set_defaults(handler=_serve)


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
