"""The search service (``embedshift serve``): routed v1/v2 search, measured and protected.

Routing is sticky: a user's bucket is a stable hash of (migration, sticky key) and v2 serves the
buckets below the routing row's percentage. Each version has a circuit breaker; a v2 request
that cannot be served falls back to v1 (outcome ``fallback``) rather than failing. The emergency
webhook switches this replica at once and sets ``emergency`` on the routing row so every replica
follows within a second. Metric names are the contract the operator's PromQL is written against.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import psycopg
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rag_service import alerts as alerts_module
from rag_service.alerts import (
    WEBHOOK_SECRET_ENV,
    AlertLog,
    check_bearer,
    is_emergency,
    parse_alerts,
    webhook_secret,
)
from rag_service.breaker import BreakerState, CircuitBreaker
from rag_service.criteria import PROMQL_RANGE
from rag_service.dashboard_page import page_html, read_rollout_status
from rag_service.errors import ConfigError, DatabaseUnavailable, EmbedshiftError
from rag_service.identifiers import TableName
from rag_service.indexes import index_state
from rag_service.metrics import Outcome, ServiceMetrics
from rag_service.providers import EmbeddingProvider, api_key_from_env, make_provider
from rag_service.providers.pricing import PriceTable
from rag_service.query_cache import (
    PRUNE_EVERY_SECONDS,
    SHARED_MAX_ROWS,
    SHARED_TTL_SECONDS,
    QueryCache,
    normalise_query,
)
from rag_service.rollout_row import RoutingFollower, declare_emergency, wake_on_notify
from rag_service.routing import Version, choose, parse_forced, request_bucket
from rag_service.schema import (
    ROLLOUT_STATUS_TABLE,
    ROLLOUT_TABLE,
    Layout,
    check_side_table_identity,
    database_error_text,
    ident,
    inspect_source,
    layout_for,
    table_exists,
)
from rag_service.search import Hit, configure_connection, ef_search_for, search
from rag_service.shadow import ShadowComparer, ShadowJob, ShadowResult
from rag_service.spec import DataPlaneSpec
from rag_service.statement_timeout import STATEMENT_TIMEOUT_SECONDS as STATEMENT_TIMEOUT_SECONDS
from rag_service.statement_timeout import limit_statements

log = logging.getLogger("embedshift.service")
# How long /readyz waits for a database connection: within the chart's probe timeout (10 s).
READY_TIMEOUT_SECONDS = 5.0
# How long a switch to a new record lets the searches already running on the previous data
# plane finish before closing it (its pool and providers): longer than any search may take.
DRAIN_SECONDS = 30.0
# The ASGI scope key under which a request holds the Service it is served by, to its end.
_PINNED = "embedshift.service"
# Every search's deadline, end to end (``serve --search-timeout``): past it the user gets a 504
# instead of a hung request. Above the query embedding's own give-up (5 s, one retry) and the
# statement timeout, so those fail first and take the v1 fallback while there is time for it.
SEARCH_TIMEOUT_SECONDS: Final = 10.0
perf_log = logging.getLogger("embedshift.performance")
analytics_log = logging.getLogger("embedshift.analytics")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or value == "":
        return default
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: {value!r} is not true or false")


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the service needs; ``from_env`` reads the guide's FF_* flags. The fields that
    hold secrets (the database URL, the webhook secret, the API keys) are left out of its repr."""

    database_url: str = field(repr=False)
    spec: DataPlaneSpec
    migration: str
    sticky_header: str = "X-User-Id"
    default_percentage: int = 0
    gradual_enabled: bool = True
    shadow_enabled: bool = False
    shadow_sample_rate: float = 0.1
    performance_logging: bool = False
    query_analytics: bool = False
    webhook_secret: str | None = field(default=None, repr=False)
    prometheus_url: str | None = None
    reread_seconds: float = 5.0
    max_query_chars: int = 2000
    ef_search: int | None = None
    breaker_failures: int = 5
    breaker_window_seconds: float = 30.0
    breaker_cooldown_seconds: float = 30.0
    cache_capacity: int = 10_000
    cache_ttl_seconds: float = 3600.0
    # The shared query-cache table's bounds, and how often this replica prunes it.
    query_cache_ttl_seconds: float = SHARED_TTL_SECONDS
    query_cache_max_rows: int = SHARED_MAX_ROWS
    query_cache_prune_seconds: float = PRUNE_EVERY_SECONDS
    search_timeout_seconds: float = SEARCH_TIMEOUT_SECONDS
    statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS
    pool_size: int = 10
    prices: PriceTable = field(default_factory=PriceTable)
    source_api_key: str | None = field(default=None, repr=False)
    target_api_key: str | None = field(default=None, repr=False)
    # X-Embedding-Version forces a version for testing: off unless asked, and then only with
    # the webhook's bearer token (a stranger must not steer which version is measured).
    allow_version_override: bool = False

    def __post_init__(self) -> None:
        if self.allow_version_override and not self.webhook_secret:
            raise ConfigError(
                f"--allow-version-override needs {WEBHOOK_SECRET_ENV}: a request that forces "
                "a version must carry it as its bearer token"
            )

    @classmethod
    def from_env(
        cls,
        *,
        database_url: str,
        spec: DataPlaneSpec,
        migration: str,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> ServiceSettings:
        env = os.environ if env is None else env
        raw_percentage = env.get("FF_NEW_EMBEDDINGS_PERCENTAGE", "0") or "0"
        try:
            percentage = int(raw_percentage)
        except ValueError:
            percentage = -1
        if not 0 <= percentage <= 100:
            raise ConfigError(
                f"FF_NEW_EMBEDDINGS_PERCENTAGE: {raw_percentage!r} must be a whole number 0–100"
            )
        if spec.source is None:
            raise ConfigError(
                "spec.source: the service embeds v1 queries with the source model; set it "
                "(or --source provider:model@dims)"
            )
        values: dict[str, Any] = {
            "database_url": database_url,
            "spec": spec,
            "migration": migration,
            "default_percentage": percentage,
            "gradual_enabled": _flag(env, "FF_ENABLE_GRADUAL_MIGRATION", True),
            "shadow_enabled": _flag(env, "FF_USE_PARALLEL_RAG", False),
            "performance_logging": _flag(env, "FF_ENABLE_PERFORMANCE_LOGGING", False),
            "query_analytics": _flag(env, "FF_ENABLE_QUERY_ANALYTICS", False),
            "webhook_secret": webhook_secret(env.get(WEBHOOK_SECRET_ENV)),
            "source_api_key": api_key_from_env(spec.source, "source", env),
            "target_api_key": api_key_from_env(spec.target, "target", env),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class RecordWatch:
    """How the service follows what ``migrate setup`` records for its migration.

    ``settings`` reads the record again and returns what to serve (``embedshift serve`` lays its
    flags over the record there), or None while nothing is recorded; it raises an
    EmbedshiftError (or a psycopg error) when the record cannot be read or is refused. It is
    called while the service waits for a first record (on each NOTIFY on ``embedshift_rollout``
    naming the migration, and every ``reread_seconds``) and, once serving, whenever the routing
    row's recorded data plane changes. ``waiting`` says what a service without a record waits
    for: its log line and ``/readyz`` say it (name the key and the database, never a password).
    """

    settings: Callable[[], Awaitable[ServiceSettings | None]]
    url: str
    migration: str
    waiting: str
    reread_seconds: float = 5.0
    # The record's wait (LISTEN) connection's statement_timeout, as the service's pool's.
    statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS


@dataclass
class _Shared:
    """What outlives a switch to another data plane: the counters (one registry, counts kept),
    the alerts received, and what the app says while it has nothing to serve."""

    metrics: ServiceMetrics
    alert_log: AlertLog
    registry: CollectorRegistry
    waiting: str | None = None  # while nothing is served: what the service waits for
    problem: str | None = None  # the last failure to read or to serve the record
    # While serving: why what is served is no longer what is recorded (a new record that cannot
    # be served). Not ready meanwhile: a replica never answers from a data plane setup replaced.
    stale: str | None = None


# ---- request and response models ---------------------------------------------------------------


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, description="The question, in natural language.")
    k: int = Field(default=5, ge=1, le=100, description="How many results (1–100).")
    category: str | None = Field(default=None, description="Only results of this category.")
    min_similarity: float | None = Field(
        default=None,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,  # NaN passes ge/le (every comparison with it is false)
        description="Drop results below this cosine similarity.",
    )

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must not be empty")
        # JSON may escape half a surrogate pair ("\ud800"): a str no encoder, hash or
        # database takes.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("query must be Unicode text (it holds a lone surrogate)") from None
        return value


class SearchHit(BaseModel):
    id: str
    text: str
    category: str | None
    similarity: float


class SearchResponse(BaseModel):
    results: list[SearchHit]
    version: Version = Field(description="The embedding version that served the results.")
    cache_hit: bool = Field(description="Whether the query embedding came from the cache.")
    fallback: bool = Field(description="v2 was chosen but v1 served (breaker open or failure).")
    percentage: int = Field(description="The effective share of traffic on v2.")


# ---- the service ---------------------------------------------------------------------------------


class SearchFailed(Exception):
    """A version could not serve; the message is safe to log (no keys)."""


@dataclass
class Service:
    """The running parts, created by the app's lifespan."""

    settings: ServiceSettings
    layout: Layout
    pool: AsyncConnectionPool[Any]
    providers: dict[Version, EmbeddingProvider]
    cache: QueryCache
    follower: RoutingFollower
    breakers: dict[Version, CircuitBreaker]
    metrics: ServiceMetrics
    registry: CollectorRegistry
    alert_log: AlertLog
    shadow: ShadowComparer | None
    rng: random.Random
    started_at: float = field(default_factory=time.monotonic)
    provider_checks: dict[Version, tuple[float, bool, str]] = field(default_factory=dict)
    inflight: int = 0  # requests being served by this data plane (see _PinService)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set when inflight drops to 0

    async def embed_query(self, version: Version, text: str) -> tuple[Any, bool]:
        provider = self.providers[version]
        lookup = await self.cache.embed(provider, text)
        self.metrics.count_cache(version=version.value, hit=lookup.hit)
        if lookup.usage.tokens:
            name, model = _model_labels(provider.descriptor)
            self.metrics.count_usage(
                provider=name,
                model=model,
                tokens=lookup.usage.tokens,
                cost_usd=lookup.usage.cost_usd,
            )
        return lookup.vector, lookup.hit

    async def run_search(self, version: Version, request: SearchRequest) -> tuple[list[Hit], bool]:
        """Embed and search on ``version``; SearchFailed on any provider or database failure."""
        try:
            vector, hit = await self.embed_query(version, request.query)
            async with self.pool.connection() as conn:
                hits = await search(
                    conn,
                    self.layout,
                    version,
                    vector,
                    k=request.k,
                    category=request.category,
                    min_similarity=request.min_similarity,
                )
            return hits, hit
        except EmbedshiftError as exc:
            raise SearchFailed(f"{version.value}: {exc}") from None
        except (psycopg.Error, OSError, TimeoutError) as exc:
            said = database_error_text(exc, self.settings.database_url)
            raise SearchFailed(f"{version.value}: database: {said}") from None


MAX_BODY_BYTES: Final = 1024 * 1024  # searches are a few hundred bytes; Alertmanager's batches KiB


def create_app(
    settings: ServiceSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
    watch: RecordWatch | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The ASGI app; the running data plane lives in ``app.state.service`` once started.

    ``max_body_bytes``: a request body beyond it is refused with 413 before it is read whole or
    parsed (a 40 MB search must not cost 40 MB and a JSON parse).

    ``settings``: what to serve from the start. ``watch``: follow what ``migrate setup`` records
    for the migration: with no ``settings``, the app starts anyway (``/healthz`` answers,
    ``/readyz`` is 503 saying what it waits for) and serves the record once it appears; either
    way, when the record changes the app switches to the new data plane between requests
    (searches already running finish on the previous one).
    """
    if settings is not None:
        migration = settings.migration
    elif watch is not None:
        migration = watch.migration
    else:
        raise ValueError("create_app needs the settings to serve, a RecordWatch, or both")
    registry = registry if registry is not None else CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        shared = _Shared(
            metrics=ServiceMetrics(migration=migration, registry=registry),
            alert_log=AlertLog(),
            registry=registry,
            waiting=watch.waiting if settings is None and watch is not None else None,
        )
        app.state.shared = shared
        app.state.service = None
        changed = asyncio.Event()  # set by the follower when the recorded data plane changes
        on_record = changed.set if watch is not None else None
        if settings is not None:
            app.state.service = await _start(settings, shared, on_record=on_record)
        watcher = (
            None
            if watch is None
            else asyncio.create_task(
                _follow_record(app, watch, changed), name="embedshift-record-watch"
            )
        )
        try:
            yield
        finally:
            if watcher is not None:
                await _cancel(watcher)
            service: Service | None = app.state.service
            app.state.service = None
            if service is not None:
                await _stop(service)

    app = FastAPI(
        title="embedshift search",
        description="Routed v1/v2 semantic search during an embedding migration.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(_PinService)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)  # added last: runs first
    app.add_exception_handler(RequestValidationError, _invalid_request)
    _routes(app)
    return app


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """A 422 naming each field and what is wrong with it, never echoing the input: FastAPI's
    own answer quotes it, which is a stranger's text sent back (a lone surrogate in it could
    not even be encoded: a 500)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse(
        {
            "detail": [
                {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
                for e in errors
            ]
        },
        status_code=422,
    )


class _BodyLimit:
    """413 for a request body over ``limit`` bytes, before the app reads or parses any of it:
    by its Content-Length when it has one, else by counting as it arrives (the body is then
    handed to the app from memory, at most ``limit`` bytes of it)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await self._refuse(send, length.decode(errors="replace"))
                return
            await self.app(scope, receive, send)
            return
        if b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
            if len(body) > self.limit:
                await self._refuse(send, f"more than {len(body)}")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, length: str) -> None:
        detail = (
            f"the request body is {length} bytes; the limit is {self.limit} "
            "(embedshift serve --max-body-bytes)"
        )
        payload = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


class _PinService:
    """Each request is served to its end by the data plane that was current when it arrived,
    and counted on it: a switch to a new record closes the previous one only once its requests
    are done. A pure ASGI middleware, so it costs a counter, not a wrapped response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service: Service | None = None
        if scope["type"] == "http":
            service = getattr(scope["app"].state, "service", None)
        if service is None:
            await self.app(scope, receive, send)
            return
        scope[_PINNED] = service
        service.inflight += 1
        service.idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            service.inflight -= 1
            if not service.inflight:
                service.idle.set()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class _Said:
    """Logs each state of the record once, however many re-reads find it the same."""

    def __init__(self) -> None:
        self._last: str | None = None

    def __call__(self, level: int, message: str) -> None:
        if message != self._last:
            log.log(level, message)
        self._last = message

    def reset(self) -> None:
        """All is well again: the next problem is news, even the one said before."""
        self._last = None


async def _follow_record(app: FastAPI, watch: RecordWatch, changed: asyncio.Event) -> None:
    """Serve what ``migrate setup`` records for the migration, as it records it.

    While nothing is served, a LISTEN on ``embedshift_rollout`` (and a re-read every
    ``reread_seconds``) wakes it; once serving, the routing row's follower does, when the
    recorded data plane changes. A transient failure to read the record is retried every
    ``reread_seconds``; a record that cannot be served is logged and not retried until it
    changes again, while the previous data plane (if any) keeps serving.
    """
    said = _Said()
    failed: list[DataPlaneSpec] = []  # the last spec that could not be served
    ticker: asyncio.Task[None] | None = None
    retry = False
    try:
        while True:
            if app.state.service is None and ticker is None:
                ticker = asyncio.create_task(
                    wake_on_notify(
                        watch.url,
                        migration=watch.migration,
                        every=watch.reread_seconds,
                        wake=changed,
                        statement_timeout_seconds=watch.statement_timeout_seconds,
                    ),
                    name="embedshift-record-wait",
                )
            elif app.state.service is not None and ticker is not None:
                await _cancel(ticker)
                ticker = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), watch.reread_seconds if retry else None)
            changed.clear()
            try:
                retry = await _take_record(app, watch, changed, said, failed)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the following; it is logged in full
                log.exception("following the record of %s failed; retrying", watch.migration)
                retry = True
    finally:
        if ticker is not None:
            await _cancel(ticker)


async def _take_record(
    app: FastAPI,
    watch: RecordWatch,
    changed: asyncio.Event,
    said: _Said,
    failed: list[DataPlaneSpec],
) -> bool:
    """Read the record once and serve it if it differs from what is served. True when a
    transient failure (the database unreachable) wants another read soon.

    A record that cannot be served (refused, or its model's API key missing) leaves the data
    plane served before, if any, running but not ready (``_Shared.stale``): a replica never
    answers from the data plane setup replaced, and one that reaches it still gets an answer.
    """
    shared: _Shared = app.state.shared
    current: Service | None = app.state.service
    key = watch.migration
    if current is None:
        afterwards = "; still waiting for a record it can serve"
    else:
        afterwards = (
            f"; still serving v1 {_descriptor(current, Version.V1)}, v2 "
            f"{_descriptor(current, Version.V2)} to what reaches it, but not ready until the "
            "record can be served"
        )
    try:
        settings = await watch.settings()
    except (EmbedshiftError, psycopg.Error, OSError) as exc:
        shared.problem = database_error_text(exc, watch.url)
        if isinstance(exc, DatabaseUnavailable | psycopg.OperationalError | OSError):
            # Transient: the readiness probe sees the database anyway; read again soon.
            said(
                logging.WARNING,
                f"cannot read what `embedshift migrate setup` recorded for {key}: "
                f"{shared.problem}; " + ("still waiting for it" if current is None else "retrying"),
            )
            return current is not None  # while waiting, the ticker keeps the pace
        if current is not None:
            shared.stale = f"cannot read the record: {shared.problem}"
        said(
            logging.ERROR,
            f"cannot read what `embedshift migrate setup` recorded for {key}: "
            f"{shared.problem}{afterwards}",
        )
        return False
    if settings is None:
        shared.problem = None
        said(
            logging.WARNING,
            f"--migration {key}: {watch.waiting} (re-reading every {watch.reread_seconds:g}s, at "
            "once on NOTIFY embedshift_rollout); /readyz answers 503 until then: if this lasts, "
            "check the key and the database"
            if current is None
            else f"the record of {key} is gone from the routing row; still serving what it was",
        )
        return False
    if current is not None and settings.spec == current.settings.spec:
        shared.problem = shared.stale = None
        said.reset()
        return False
    if failed and failed[0] == settings.spec:
        return False  # said already; tried again when the record changes
    follower = None
    if current is not None and (
        current.settings.database_url == settings.database_url
        and current.follower.table
        == TableName(ROLLOUT_TABLE, settings.spec.database.table_name.schema)
    ):
        follower = current.follower  # keeps the percentage and a local emergency as they are
    try:
        new = await _start(settings, shared, follower=follower, on_record=changed.set)
    except (EmbedshiftError, psycopg.Error, OSError) as exc:
        failed[:] = [settings.spec]
        shared.problem = f"cannot serve the record: {database_error_text(exc, watch.url)}"
        if current is not None:
            shared.stale = shared.problem
        said(
            logging.ERROR,
            f"cannot serve what `embedshift migrate setup` recorded for {key}: "
            f"{database_error_text(exc, watch.url)}{afterwards}",
        )
        return False
    failed.clear()
    shared.problem = shared.waiting = shared.stale = None
    app.state.service = new  # from the next request on; the running ones keep `current`
    if current is None:
        said(logging.INFO, f"`embedshift migrate setup` recorded {key}: serving it")
        return False
    said(
        logging.WARNING,
        f"the record of {key} changed (`embedshift migrate setup` recorded another data plane): "
        f"switched from v1 {_descriptor(current, Version.V1)}, v2 "
        f"{_descriptor(current, Version.V2)} on {current.layout.source} to v1 "
        f"{_descriptor(new, Version.V1)}, v2 {_descriptor(new, Version.V2)} on "
        f"{new.layout.source}; searches already running finish on the previous one",
    )
    await _retire(current, keep_follower=new.follower is current.follower)
    return False


def _descriptor(service: Service, version: Version) -> str:
    return service.providers[version].descriptor


async def _retire(service: Service, *, keep_follower: bool) -> None:
    """Close a data plane no new request reaches, once its running requests are done."""
    try:
        if service.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(service.idle.wait(), DRAIN_SECONDS)
        if service.inflight:
            log.warning(
                "closing the previous data plane with %d searches still running after %.0fs",
                service.inflight,
                DRAIN_SECONDS,
            )
    finally:
        await _stop(service, keep_follower=keep_follower)


async def _start(
    settings: ServiceSettings,
    shared: _Shared,
    *,
    follower: RoutingFollower | None = None,
    on_record: Callable[[], None] | None = None,
) -> Service:
    """Start a data plane. ``follower``: the routing row's follower to keep (a switch to a new
    record in the same schema), else a new one, calling ``on_record`` when the record changes.
    A failure closes what it opened."""
    spec = settings.spec
    assert spec.source is not None  # from_env refuses a spec without one

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await limit_statements(conn, settings.statement_timeout_seconds)
        await configure_connection(conn, ef_search=ef_search_for(spec.target, settings.ef_search))

    # Before anything is opened: a missing key fails start-up with nothing to clean up.
    source = make_provider(
        spec.source,
        api_key=settings.source_api_key,
        prices=settings.prices,
        role="source",
        interactive=True,
    )
    try:
        target = make_provider(
            spec.target,
            api_key=settings.target_api_key,
            prices=settings.prices,
            role="target",
            interactive=True,
        )
    except BaseException:
        await source.aclose()
        raise
    providers: dict[Version, EmbeddingProvider] = {Version.V1: source, Version.V2: target}
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=settings.pool_size,
        configure=configure,
        open=False,
        kwargs={"autocommit": True},
    )
    await pool.open(wait=False)
    try:
        layout = await _layout(settings)
    except BaseException:
        await pool.close()
        for provider in providers.values():
            await provider.aclose()
        raise
    if follower is None:
        follower = RoutingFollower(
            url=settings.database_url,
            migration=settings.migration,
            default_percentage=settings.default_percentage,
            schema=spec.database.table_name.schema,
            reread_seconds=settings.reread_seconds,
            on_record=on_record,
            statement_timeout_seconds=settings.statement_timeout_seconds,
        )
        await follower.start()
    metrics = shared.metrics
    metrics.add_usage_models(_model_labels(p.descriptor) for p in providers.values())
    service = Service(
        settings=settings,
        layout=layout,
        pool=pool,
        providers=providers,
        cache=QueryCache(
            pool=pool,
            capacity=settings.cache_capacity,
            ttl_seconds=settings.cache_ttl_seconds,
            shared_ttl_seconds=settings.query_cache_ttl_seconds,
            shared_max_rows=settings.query_cache_max_rows,
            schema=spec.database.table_name.schema,
            error_text=lambda exc: database_error_text(exc, settings.database_url),
        ),
        follower=follower,
        breakers={
            v: CircuitBreaker(
                failure_threshold=settings.breaker_failures,
                window_seconds=settings.breaker_window_seconds,
                cooldown_seconds=settings.breaker_cooldown_seconds,
                clock=time.monotonic,
            )
            for v in Version
        },
        metrics=metrics,
        registry=shared.registry,
        alert_log=shared.alert_log,
        shadow=None,
        rng=random.Random(),
    )
    service.cache.start(prune_every=settings.query_cache_prune_seconds)
    if settings.shadow_enabled:
        service.shadow = ShadowComparer(
            sample_rate=settings.shadow_sample_rate,
            capacity=100,
            run=lambda job: _shadow_run(service, job),
            on_result=metrics.observe_shadow,
            on_drop=metrics.count_shadow_dropped,
            rng=random.Random(),
        )
        await service.shadow.start()
    for version, model in ((Version.V1, spec.source), (Version.V2, spec.target)):
        if not settings.prices.knows(model):
            # Its spend counts as $0: a cost criterion comparing v2 with v1 would judge nothing.
            log.warning(
                "%s %s has no known price: its cost counts as $0 in the metrics and the cost "
                "criteria; set usdPerMillionTokens on the model in the manifest or pass --price "
                "%s=USD_PER_MILLION_TOKENS",
                version.value,
                model.descriptor,
                PriceTable.key(model.provider.value, model.model),
            )
    log.info(
        "serving %s: v1 %s, v2 %s (sticky key %s, start-up default %d%%)",
        settings.migration,
        spec.source.descriptor,
        spec.target.descriptor,
        settings.sticky_header,
        settings.default_percentage,
    )
    return service


async def _layout(settings: ServiceSettings) -> Layout:
    """Resolve names from the catalog; if the database is down at start, from the spec alone."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True, connect_timeout=10
        )
        async with conn:
            await limit_statements(conn, settings.statement_timeout_seconds)
            layout = await inspect_source(conn, settings.spec)
            # Refused like any record it cannot serve: v2 queries embedded by this target must
            # not be answered from another identity's vectors.
            await check_side_table_identity(conn, layout)
            await _warn_unless_v2_ready(conn, layout)
            return layout
    except psycopg.OperationalError as exc:
        log.warning(
            "database unreachable at start (%s); serving will retry",
            database_error_text(exc, settings.database_url),
        )
        return layout_for(settings.spec, id_type="text")


async def _warn_unless_v2_ready(conn: psycopg.AsyncConnection[Any], layout: Layout) -> None:
    """Say at start-up what would otherwise show only as failing or slow v2 searches."""
    if not await table_exists(conn, layout.target):
        log.warning(
            "v2 side table %s does not exist: v2 searches fail (and fall back to v1) until "
            "`embedshift migrate setup` and `embedshift migrate run` have run for this target",
            layout.target,
        )
        return
    state = await index_state(conn, layout)
    if not (state.exists and state.valid):
        log.warning(
            "v2 index %s %s: v2 searches scan the whole side table (slow) until "
            "`embedshift migrate index` builds it",
            state.name,
            "is invalid (an interrupted build)" if state.exists else "does not exist",
        )


async def _stop(service: Service, *, keep_follower: bool = False) -> None:
    if service.shadow is not None:
        await service.shadow.aclose()
    if not keep_follower:
        await service.follower.aclose()
    await service.cache.aclose()  # queued shared-cache writes land before the pool closes
    for provider in service.providers.values():
        await provider.aclose()
    await service.pool.close()


async def _shadow_run(service: Service, job: ShadowJob) -> ShadowResult:
    started = time.perf_counter()
    request = SearchRequest(query=job.query, k=job.k, category=job.category)
    # Off the request path, but bounded: a hung v2 must not stall every later comparison.
    hits, _ = await asyncio.wait_for(
        service.run_search(job.other_version, request), service.settings.search_timeout_seconds
    )
    return ShadowResult.compare(
        job, other_ids=[h.id for h in hits], latency_seconds=time.perf_counter() - started
    )


def _unprocessable(field: list[str], message: str) -> HTTPException:
    return HTTPException(
        status_code=422, detail=[{"loc": field, "msg": message, "type": "value_error"}]
    )


def _may_force(settings: ServiceSettings, authorization: str | None) -> None:
    """An ``X-Embedding-Version`` request is served only when the override is on and it carries
    the bearer token: 403 / 401 otherwise, saying which."""
    if not settings.allow_version_override or not settings.webhook_secret:
        raise HTTPException(
            403,
            "X-Embedding-Version is off: start embedshift serve with --allow-version-override "
            f"(and {WEBHOOK_SECRET_ENV}), then send its bearer token",
        )
    _require_bearer(authorization, settings.webhook_secret, what="X-Embedding-Version")


def _require_bearer(authorization: str | None, secret: str, *, what: str) -> None:
    """401 without a bearer token, 403 with another than ``secret``; ``what`` names the
    request or header that needs it."""
    verdict = check_bearer(authorization, secret)
    if verdict == "missing":
        raise HTTPException(
            401,
            f"{what} needs Authorization: Bearer <{WEBHOOK_SECRET_ENV}>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if verdict == "wrong":
        raise HTTPException(403, f"{what}: wrong token")


def _service_of(request: Request) -> Service:
    """The data plane this request is served by (see _PinService); 503 while there is none:
    the service waits for `embedshift migrate setup` to record what to serve."""
    service: Service | None = request.scope.get(_PINNED)
    if service is None:
        shared: _Shared = request.app.state.shared
        raise HTTPException(503, f"not serving yet: {shared.waiting or 'starting'}")
    return service


async def _with_token(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Service:
    """The data plane, for a request carrying ALERT_WEBHOOK_SECRET as its bearer token: the
    one check of every endpoint that takes alerts or shows them, their labels or the rollout's
    internals. Fails closed: with no secret set they are not served at all (503), without the
    token 401, with another 403. Async: FastAPI would run a plain function in a thread."""
    service = _service_of(request)
    secret = service.settings.webhook_secret
    what = f"{request.method} {request.url.path}"
    if not secret:
        raise HTTPException(
            503,
            f"{what} is off: {WEBHOOK_SECRET_ENV} is not set on the service, and it is served "
            "only to requests carrying that secret as their bearer token",
        )
    _require_bearer(authorization, secret, what=what)
    return service


# A route parameter: the request's data plane, once its bearer token checked (_with_token).
WithToken = Annotated[Service, Depends(_with_token)]


def _routes(app: FastAPI) -> None:
    service_of = _service_of

    @app.post("/api/rag/search", response_model=SearchResponse)
    async def search_endpoint(
        body: SearchRequest,
        request: Request,
        x_embedding_version: Annotated[str | None, Header()] = None,
    ) -> SearchResponse:
        service = service_of(request)
        settings = service.settings
        if len(body.query) > settings.max_query_chars:
            raise _unprocessable(
                ["body", "query"],
                f"query is {len(body.query)} characters; the limit is {settings.max_query_chars}",
            )
        if x_embedding_version is not None:
            _may_force(settings, request.headers.get("authorization"))
        try:
            forced = parse_forced(x_embedding_version)
        except ValueError as exc:
            raise _unprocessable(["header", "X-Embedding-Version"], str(exc)) from None
        user_bucket = request_bucket(
            migration=settings.migration,
            key=request.headers.get(settings.sticky_header),
            rng=service.rng,
        )
        row = service.follower.current
        chosen = choose(
            bucket=user_bucket,
            percentage=row.percentage,
            emergency=row.emergency,
            gradual_enabled=settings.gradual_enabled,
            forced=forced,
        )
        started = time.perf_counter()
        version, fallback = chosen, False
        if chosen is Version.V2 and forced is None and not service.breakers[Version.V2].allow():
            version, fallback = Version.V1, True
        deadline = settings.search_timeout_seconds
        try:
            # The whole search, the v1 fallback included, within one deadline: the embedding
            # and the statement timeouts fail sooner (and fall back); this ends what hangs.
            async with asyncio.timeout(deadline):
                try:
                    hits, cache_hit = await service.run_search(version, body)
                    service.breakers[version].record_success()
                except SearchFailed as exc:
                    service.breakers[version].record_failure()
                    if forced is None:  # a forced request's failure is not v2's users' error
                        service.metrics.count_error(version=version.value, severity="error")
                    log.warning("search failed: %s", exc)
                    if version is not Version.V2 or forced is not None:
                        _observe(service, chosen, started, "error", None, forced=forced is not None)
                        raise HTTPException(
                            503, f"search on {version.value} is unavailable; see the service log"
                        ) from None
                    version, fallback = Version.V1, True
                    try:
                        hits, cache_hit = await service.run_search(version, body)
                        service.breakers[version].record_success()
                    except SearchFailed as again:
                        service.breakers[version].record_failure()
                        log.error("v1 fallback failed too: %s", again)
                        _observe(service, chosen, started, "error", None, forced=forced is not None)
                        raise HTTPException(
                            503, "search is unavailable; see the service log"
                        ) from None
        except TimeoutError:
            # An error of the version it was running on, and of the request: counted as one.
            service.breakers[version].record_failure()
            if forced is None:
                service.metrics.count_error(version=version.value, severity="error")
            _observe(service, chosen, started, "error", None, forced=forced is not None)
            log.warning(
                "search on %s gave up at its deadline of %gs (--search-timeout)",
                version.value,
                deadline,
            )
            raise HTTPException(
                504,
                f"the search did not finish within its deadline of {deadline:g} s "
                "(embedshift serve --search-timeout); try again",
            ) from None
        # Counted under the version the user was routed to: a v2 request served by v1 is a v2
        # fallback, so v2's error rate and latency are what v2's users experienced.
        outcome: Outcome = "fallback" if fallback else "ok"
        top = hits[0].similarity if hits else None
        _observe(service, chosen, started, outcome, top, forced=forced is not None)
        if service.shadow is not None and not fallback:
            service.shadow.maybe_submit(
                ShadowJob(
                    query=body.query,
                    k=body.k,
                    category=body.category,
                    primary_version=version,
                    primary_ids=tuple(h.id for h in hits),
                )
            )
        if settings.performance_logging:
            perf_log.info(
                "search %s %.1fms k=%d cache=%s fallback=%s",
                version.value,
                (time.perf_counter() - started) * 1000,
                body.k,
                cache_hit,
                fallback,
            )
        if settings.query_analytics:
            analytics_log.info(
                "query hash=%s chars=%d category=%s version=%s results=%d top=%.3f",
                hashlib.sha256(normalise_query(body.query).encode()).hexdigest()[:12],
                len(body.query),
                body.category,
                version.value,
                len(hits),
                hits[0].similarity if hits else 0.0,
            )
        return SearchResponse(
            results=[SearchHit(**h.__dict__) for h in hits],
            version=version,
            cache_hit=cache_hit,
            fallback=fallback,
            percentage=row.percentage if not row.emergency else 0,
        )

    async def health(version: Version, request: Request) -> JSONResponse:
        service = service_of(request)
        checks: dict[str, Any] = {}
        try:
            async with service.pool.connection(timeout=5) as conn:
                await conn.execute("SELECT 1")
                checks["database"] = {"ok": True}
                if version is Version.V2:
                    state = await index_state(conn, service.layout)
                    checks["index"] = {
                        "ok": state.exists and state.valid,
                        "name": state.name,
                        "exists": state.exists,
                        "valid": state.valid,
                    }
                    cur = await conn.execute(
                        psycopg.sql.SQL("SELECT count(*) FROM {}").format(
                            ident(service.layout.queue)
                        )
                    )
                    queued = (await cur.fetchone() or (0,))[0]
                    checks["pending"] = {"ok": True, "queued": int(queued)}
                else:
                    checks["index"] = {"ok": True, "column": service.layout.source_embedding_column}
        except Exception as exc:  # any failure of a health probe is reported, never raised
            error = database_error_text(exc, service.settings.database_url)
            checks["database"] = {"ok": False, "error": error}
        checks["provider"] = await _provider_check(service, version)
        breaker = service.breakers[version]
        checks["circuitBreaker"] = {
            "ok": breaker.state is not BreakerState.OPEN,
            **breaker.snapshot(),
        }
        healthy = all(bool(c.get("ok")) for c in checks.values())
        return JSONResponse(
            {"version": version.value, "healthy": healthy, "checks": checks},
            status_code=200 if healthy else 503,
        )

    @app.get("/api/rag/v1/health")
    async def health_v1(request: Request) -> JSONResponse:
        return await health(Version.V1, request)

    @app.get("/api/rag/v2/health")
    async def health_v2(request: Request) -> JSONResponse:
        return await health(Version.V2, request)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        """Liveness: the process answers. Nothing it depends on counts (a database or API
        outage must not restart every replica), nor waiting for the record."""
        return {"live": True}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: the database alone. Every search reads it, so without it this replica
        has nothing to serve. An embedding API's outage is not a reason: a breaker and the v1
        fallback answer it, and a replica taken out of the Service for it would also stop
        taking the emergency webhook and serving the version that still works. Not ready
        either while nothing is recorded to serve (the body says what it waits for), nor
        while setup has recorded a data plane it cannot serve (``stale``: it would answer
        from the one setup replaced)."""
        service: Service | None = request.scope.get(_PINNED)
        shared: _Shared = request.app.state.shared
        if service is None:
            waiting: dict[str, Any] = {"ready": False, "waiting": shared.waiting or "starting"}
            if shared.problem:
                waiting["error"] = shared.problem
            return JSONResponse(waiting, status_code=503)
        if shared.stale:
            return JSONResponse({"ready": False, "stale": shared.stale}, status_code=503)
        try:
            async with service.pool.connection(timeout=READY_TIMEOUT_SECONDS) as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:  # any failure means not ready; a probe never raises
            return JSONResponse(
                {
                    "ready": False,
                    "database": {
                        "ok": False,
                        "error": database_error_text(exc, service.settings.database_url),
                    },
                },
                status_code=503,
            )
        return JSONResponse({"ready": True, "database": {"ok": True}})

    @app.get("/api/monitoring/circuit-breaker")
    async def circuit_breaker(service: WithToken) -> dict[str, Any]:
        return {v.value: service.breakers[v].snapshot() for v in Version}

    @app.get("/api/monitoring/dashboard")
    async def dashboard(
        service: WithToken,
        range_: Annotated[str, Query(alias="range", pattern=PROMQL_RANGE)] = "24h",
    ) -> dict[str, Any]:
        settings = service.settings
        row = service.follower.current
        summary: dict[str, dict[str, float | None]]
        source = "service"
        if settings.prometheus_url:
            from rag_service.dashboard import prometheus_summary

            try:
                summary = await prometheus_summary(
                    settings.prometheus_url,
                    migration=settings.migration,
                    range_=range_,
                    models=_models(service),
                )
                source = "prometheus"
            except EmbedshiftError as exc:
                log.warning("dashboard: Prometheus unavailable (%s); using own counters", exc)
                summary = service.metrics.summary(models=_models(service))
        else:
            summary = service.metrics.summary(models=_models(service))
        return {
            "range": range_,
            "source": source,
            "percentage": 0 if row.emergency else row.percentage,
            "emergency": row.emergency,
            "reason": row.reason,
            "versions": summary,
        }

    @app.get("/api/monitoring/rollout")
    async def rollout_view(service: WithToken) -> dict[str, Any]:
        """The routing row this replica follows and, when the local driver runs the rollout,
        its phase, verdicts and recent transitions; recent alerts too. ``status`` is null when
        the kopf operator runs it (the status is on the resource) or nothing has run yet."""
        settings = service.settings
        row = service.follower.current
        status: dict[str, Any] | None = None
        status_error: str | None = None
        try:
            async with service.pool.connection(timeout=5) as conn:
                status = await read_rollout_status(
                    conn,
                    table=service.layout.rollout.sibling(ROLLOUT_STATUS_TABLE),
                    migration=settings.migration,
                )
        except (psycopg.Error, OSError, TimeoutError) as exc:
            status_error = f"database: {database_error_text(exc, settings.database_url)}"
        return {
            "migration": settings.migration,
            "routing": {
                "percentage": 0 if row.emergency else row.percentage,
                "emergency": row.emergency,
                "reason": row.reason,
                "updatedAt": row.updated_at.isoformat() if row.updated_at else None,
                "source": row.source,
            },
            "status": status,
            "statusError": status_error,
            "alerts": [a.as_dict() for a in service.alert_log.recent()[:10]],
        }

    page = page_html()

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard_page() -> HTMLResponse:
        # The CSP is the promise of "no external assets": the browser may load nothing but
        # this page's inline code and fetch nothing but this service.
        return HTMLResponse(
            page,
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": (
                    "default-src 'none'; script-src 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"
                ),
            },
        )

    @app.post("/api/alerts/webhook")
    async def alert_webhook(request: Request, service: WithToken) -> dict[str, Any]:
        settings = service.settings
        try:
            payload = await request.json()
        except ValueError:
            raise _unprocessable(["body"], "the body is not JSON") from None
        try:
            received = parse_alerts(payload, now=datetime.now(UTC))
        except ValueError as exc:
            raise _unprocessable(["body"], str(exc)) from None
        service.alert_log.add(received)
        emergencies = [a for a in received if is_emergency(a)]
        if emergencies:
            first = emergencies[0]
            reason = first.describe()
            service.follower.declare_local_emergency(reason)
            service.metrics.count_error(version="v2", severity="critical")
            log.error("EMERGENCY: %s; switching to v1", reason)
            try:
                conn = await psycopg.AsyncConnection.connect(
                    settings.database_url, autocommit=True, connect_timeout=5
                )
                async with conn:
                    await limit_statements(conn, settings.statement_timeout_seconds)
                    await declare_emergency(
                        conn,
                        table=service.layout.rollout,
                        migration=settings.migration,
                        reason=reason,
                    )
            except (psycopg.Error, OSError) as exc:
                log.error(
                    "could not record the emergency in the routing row: %s",
                    database_error_text(exc, settings.database_url),
                )
        return {"accepted": len(received), "emergency": bool(emergencies)}

    @app.get("/api/alerts/webhook")
    async def recent_alerts(
        service: WithToken,
        severity: Annotated[str | None, Query()] = None,
    ) -> dict[str, Any]:
        if severity is not None and severity not in alerts_module.SEVERITIES:
            raise _unprocessable(
                ["query", "severity"],
                f"severity must be one of {', '.join(alerts_module.SEVERITIES)}",
            )
        return {"alerts": [a.as_dict() for a in service.alert_log.recent(min_severity=severity)]}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        # Answered while nothing is served too: every series exists at 0 from the start.
        shared: _Shared = request.app.state.shared
        service: Service | None = request.scope.get(_PINNED)
        if service is not None:
            row = service.follower.current
            shared.metrics.set_percentage(0 if row.emergency else row.percentage)
            for v in Version:
                shared.metrics.set_breaker_open(
                    # Half-open refuses all but one probe: for traffic, that is still open.
                    version=v.value,
                    open=service.breakers[v].state is not BreakerState.CLOSED,
                )
        body, content_type = shared.metrics.render()
        return Response(content=body, media_type=content_type)


def _model_labels(descriptor: str) -> tuple[str, str]:
    """``openai:text-embedding-3-small@768`` → the (provider, model) its usage is counted under."""
    name, _, rest = descriptor.partition(":")
    return name, rest.rsplit("@", 1)[0]


def _models(service: Service) -> dict[str, tuple[str, str]]:
    return {v.value: _model_labels(p.descriptor) for v, p in service.providers.items()}


def _observe(
    service: Service,
    version: Version,
    started: float,
    outcome: Outcome,
    top: float | None,
    *,
    forced: bool = False,
) -> None:
    if forced:  # a test's request: never in the series the criteria judge v2 by
        service.metrics.count_forced(version=version, outcome=outcome)
        return
    service.metrics.observe_search(
        version=version.value,
        seconds=time.perf_counter() - started,
        outcome=outcome,
        top_similarity=top,
    )


async def _provider_check(service: Service, version: Version) -> dict[str, Any]:
    """A cheap embedding of a fixed text, at most once a minute per version."""
    now = time.monotonic()
    last = service.provider_checks.get(version)
    if last is not None and now - last[0] < 60:
        return {"ok": last[1], "detail": last[2], "cached": True}
    try:
        await asyncio.wait_for(
            service.cache.embed(service.providers[version], "embedshift health check"), 10
        )
        result = (now, True, service.providers[version].descriptor)
    except (EmbedshiftError, TimeoutError) as exc:
        result = (now, False, str(exc))
    service.provider_checks[version] = result
    return {"ok": result[1], "detail": result[2], "cached": False}
